"""The benchmark runs end to end on a tiny shape and prints parseable lines (no timing assertions)."""

import re

from launcher import bench

TINY = ["--d_model", "32", "--d_ff", "64", "--num_layers", "2", "--num_heads", "2", "--d_kv", "16",
        "--vocab", "500", "--batch", "2", "--seq_len", "12", "--prompt_length", "4", "--steps", "2", "--warmup", "0"]


def test_bench_prints_parseable_lines(capsys):
    assert bench.main(TINY + ["--dtype", "bf16", "--fused_gelu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("config: d_model 32")
    assert re.fullmatch(r"matmul peak bf16: [\d.]+ GFLOP/s", lines[1])
    assert re.fullmatch(r"model FLOPs per step: [\d.]+ GFLOP", lines[2])
    side = r"{}: step [\d.]+ s \(median [\d.]+ s\), [\d.]+ tokens/s, MFU [\d.]+%, activations [\d.]+ MiB.*"
    assert re.fullmatch(side.format("ours"), lines[3]) and re.fullmatch(side.format("peft"), lines[4])
    assert re.fullmatch(r"ours/PEFT tokens/s: [\d.]+", lines[-1])


def test_bad_input_exits_2(capsys):
    assert bench.main(TINY + ["--batch", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --batch")
