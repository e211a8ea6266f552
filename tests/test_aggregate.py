"""launcher.aggregate on hand-made task outputs: mean/std by hand, missing tasks listed."""

import csv
import json
from pathlib import Path

from launcher import aggregate, sweep


def fake_run(task: dict, dev: float, test: float, tokens_per_s: list[float]) -> None:
    out = Path(task["output_dir"])
    out.mkdir(parents=True)
    results = {"dev": {"accuracy": dev, "macro_f1": dev / 2}, "test": {"accuracy": test, "macro_f1": test / 2}}
    (out / "results.json").write_text(json.dumps(results))
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "train/tokens_per_s": v}) + "\n"
                                               for i, v in enumerate(tokens_per_s)))


def test_summary_csv_md_png(tmp_path, capsys):
    tasks = sweep.expand(["tiny"], ["random"], [1, 20], [0, 1, 2], tmp_path, [])
    (tmp_path / "sweep.json").write_text(json.dumps({"tasks": tasks}))
    # length 1: three seeds; length 20: seeds 0 and 1 (seed 2 failed: no results.json)
    fake_run(tasks[0], 0.5, 0.4, [100.0, 200.0])
    fake_run(tasks[1], 0.6, 0.5, [300.0])
    fake_run(tasks[2], 0.7, 0.9, [400.0])
    fake_run(tasks[3], 0.8, 0.8, [50.0])
    fake_run(tasks[4], 0.8, 0.6, [50.0])

    assert aggregate.main([str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [(r["prompt_length"], r["seeds_finished"], r["seeds_expected"]) for r in rows] == [("1", "3", "3"),
                                                                                           ("20", "2", "3")]
    one, twenty = rows
    assert float(one["dev_accuracy_mean"]) == 0.6 and abs(float(one["dev_accuracy_std"]) - 0.1) < 1e-12
    # test accuracies 0.4, 0.5, 0.9: mean 0.6, sample variance (0.04 + 0.01 + 0.09) / 2 = 0.07
    assert abs(float(one["test_accuracy_mean"]) - 0.6) < 1e-12
    assert abs(float(one["test_accuracy_std"]) - 0.07 ** 0.5) < 1e-12
    assert abs(float(one["test_macro_f1_mean"]) - 0.3) < 1e-12
    assert float(one["tokens_per_s"]) == (150 + 300 + 400) / 3  # per run mean, then over seeds
    assert abs(float(twenty["test_accuracy_mean"]) - 0.7) < 1e-12
    assert abs(float(twenty["test_accuracy_std"]) - 0.02 ** 0.5) < 1e-12

    md = (tmp_path / "summary.md").read_text()
    assert "| tiny | random | 1 | 3/3 | 0.6000 ± 0.1000 |" in md
    assert "| tiny | random | 20 | 2/3 |" in md
    assert "## Missing or failed tasks (1)" in md and "- task 5: tiny random length 20 seed 2" in md
    assert "missing: task 5: tiny random length 20 seed 2" in capsys.readouterr().err
    assert (tmp_path / "prompt_length.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic writes left no temp files


def test_one_seed_has_no_std_and_nothing_finished_is_listed(tmp_path, capsys):
    tasks = sweep.expand(["tiny"], ["vocab"], [5, 50], [0], tmp_path, [])
    (tmp_path / "sweep.json").write_text(json.dumps({"tasks": tasks}))
    fake_run(tasks[0], 0.5, 0.5, [])
    assert aggregate.main([str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert rows[0]["test_accuracy_std"] == "" and rows[0]["tokens_per_s"] == ""
    assert rows[1]["seeds_finished"] == "0" and rows[1]["test_accuracy_mean"] == ""
    assert "1 of 2 tasks finished" in capsys.readouterr().out


def test_not_a_sweep_dir_exits_2(tmp_path, capsys):
    assert aggregate.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
