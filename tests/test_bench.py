"""benchmarks.bench and benchmarks.throughput run end to end on tiny shapes and print parseable lines (no timing
assertions)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench

TINY = ["--d_model", "32", "--d_ff", "64", "--num_layers", "2", "--num_heads", "2", "--d_kv", "16", "--vocab", "500",
        "--batch_size", "2", "--seq_len", "12", "--prompt_length", "4", "--steps", "2", "--warmup", "0"]


@pytest.mark.parametrize("extra, peak", [([], "bf16"), (["--dtype", "fp32", "--hf_kernels"], "fp32")])
def test_bench_prints_parseable_lines(capsys, extra, peak):
    assert bench.main(TINY + extra) == 0  # default: ours as the trainer runs it, bf16 + softprompt.kernels
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("config: d_model 32")
    assert f"{peak} (PEFT fp32)" in lines[0] and f"kernels {not extra}" in lines[0]
    assert re.fullmatch(rf"matmul peak {peak}: [\d.]+ GFLOP/s", lines[1])
    assert re.fullmatch(r"model FLOPs per step: [\d.]+ GFLOP", lines[2])
    side = r"{}: step [\d.]+ s \(median [\d.]+ s\), [\d.]+ tokens/s, MFU [\d.]+%, activations [\d.]+ MiB.*"
    assert re.fullmatch(side.format("ours"), lines[3]) and re.fullmatch(side.format("peft"), lines[4])
    assert re.fullmatch(r"ours/PEFT tokens/s: [\d.]+", lines[-1])


def test_bad_input_exits_2(capsys):
    assert bench.main(TINY + ["--batch_size", "0"]) == 2
    assert capsys.readouterr().err == "error: --batch_size must be positive\n"
    assert bench.main(TINY + ["--dtype", "fp16"]) == 2
    assert capsys.readouterr().err.startswith("error: argument --dtype: invalid choice: 'fp16'")


def test_former_batch_flag_still_sets_the_batch_size(capsys):
    args = bench.parser().parse_args(["--batch", "3"])
    assert args.batch_size == 3 and "--batch is now --batch_size" in capsys.readouterr().err


def test_bench_zero3_side_runs_in_a_deepspeed_engine():
    """A subprocess: the 1-rank process group it starts must not outlive the test."""
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "benchmarks.bench", *TINY, "--zero3", str(root / "ds_configs" / "zero3_cpu_bf16.json")]
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300,
                         check=True).stdout.strip().splitlines()
    side = r"zero3: step [\d.]+ s \(median [\d.]+ s\), [\d.]+ tokens/s, MFU [\d.]+%, activations: as ours"
    assert any(re.fullmatch(side, line) for line in out), out
    assert re.fullmatch(r"zero3/ours tokens/s \(the sharding machinery's cost\): [\d.]+", out[-2])
    assert re.fullmatch(r"ours/PEFT tokens/s: [\d.]+", out[-1])


def test_trainer_throughput_mode_prints_parseable_ratios(tiny_tokenizer_dir):
    """The real training loop beside the engine and the bare step under ZeRO-3 (the replicated path is the same
    code with stage 0): one warm-up and one timed window of one step each, so the smoke test stays short."""
    root = Path(__file__).resolve().parents[1]
    shape = TINY[:TINY.index("--vocab")] + ["--vocab", "2176", "--batch_size", "2", "--seq_len", "12",
                                           "--prompt_length", "4"]
    cmd = [sys.executable, "-m", "benchmarks.throughput", *shape, "--windows", "1", "--window_steps", "1",
           "--ds_config", "zero3_cpu", "--dtypes", "fp32", "--tokenizer", str(tiny_tokenizer_dir)]
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300,
                         check=True).stdout.strip().splitlines()
    number = r"(\d+\.\d+)"
    assert any(line.startswith("config: d_model 32,") and "zero3_cpu (ZeRO stage 3)" in line for line in out), out
    side = (rf"(trainer|engine|bare): step {number} s \(median {number} s\), {number} tokens/s; "
            rf"CPU {number} s per step \(median {number} s\)")
    assert sum(bool(re.fullmatch(side, line)) for line in out) == 3, out
    ratio = (rf"trainer/bare tokens/s: {number} \(fastest\), {number} \(median of adjacent\), "
             rf"{number} \(CPU time, medians\)")
    m = re.fullmatch(ratio, out[-1])
    assert m and all(0 < float(x) < float("inf") for x in m.groups()), out


def test_trainer_throughput_mode_bad_input_exits_2(capsys, tmp_path):
    from benchmarks import throughput

    assert throughput.main(["--windows", "0"]) == 2
    assert capsys.readouterr().err == "error: --windows must be positive\n"
    assert throughput.main(["--dtypes", "fp32,fp16"]) == 2
    assert capsys.readouterr().err.startswith("error: --dtypes: unknown dtype 'fp16'")
    assert throughput.main(["--tokenizer", str(tmp_path)]) == 2
    assert "no tokenizer_config.json" in capsys.readouterr().err
