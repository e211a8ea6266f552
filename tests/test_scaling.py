"""benchmarks.scaling: the measurement (pure, by hand) and a 1- then 2-rank run end to end."""

import json
import re

import pytest

from benchmarks import scaling


def test_scaling_skips_the_warmup_window_and_takes_the_median(tmp_path):
    windows = [(9.0, 1.0), (0.5, 16.0), (0.4, 20.0), (0.6, 12.0)]  # (step s, samples/s); the first: warm-up
    lines = [{"step": 5 * (i + 1), "train/step_time_s": t, "train/samples_per_s": s} for i, (t, s) in enumerate(windows)]
    lines.insert(2, {"step": 10, "eval/accuracy": 0.5})  # other records are ignored
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    assert scaling.measure(tmp_path) == (3, 0.5, 16.0)


@pytest.mark.distributed
def test_scaling_runs_one_and_two_ranks(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    argv = ["--model", str(tiny_model_dir), "--micro_batch", "4", "--max_steps", "4", "--log_every", "2",
            "--output_dir", str(tmp_path), "--", "--inews_content_chars=0", "--max_length=24", "--prompt_length=4",
            "--eval_batch_size=256"]
    assert scaling.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    run = r"{}: micro-batch 4, 1 thread\(s\) per rank, stage 3: step [\d.]+ s, [\d.]+ samples/s, [\d.]+ rank-ms per " \
          r"sample \(median of 1 windows of 2 steps\)"
    assert re.fullmatch(run.format("1 rank"), lines[0]) and re.fullmatch(run.format("2 ranks"), lines[1])
    assert re.fullmatch(r"2-rank/1-rank per-sample cost: [\d.]+", lines[-1])
    for ranks in (1, 2):  # the micro-batch is per rank: the global batch follows the world size
        config = json.loads((tmp_path / f"ds_ranks{ranks}.json").read_text())
        assert config["train_micro_batch_size_per_gpu"] == 4 and "train_batch_size" not in config
        results = json.loads((tmp_path / f"ranks{ranks}" / "results.json").read_text())
        assert results["world_size"] == ranks and results["batch"]["global_batch"] == 4 * ranks


def test_scaling_bad_input_exits_2(capsys):
    assert scaling.main(["--max_steps", "4", "--log_every", "5"]) == 2
    assert capsys.readouterr().err.startswith("error: --max_steps must cover 2 log windows")
