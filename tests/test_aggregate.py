"""launcher.aggregate on hand-made task outputs: mean/std and the majority class by hand, missing tasks listed,
the plot's axes and legend."""

import csv
import json
from pathlib import Path

import pytest

from launcher import aggregate, sweep, tables


def fake_run(task: dict, dev: float, test: float, tokens_per_s: list[float]) -> None:
    out = Path(task["output_dir"])
    out.mkdir(parents=True)
    results = {"dev": {"accuracy": dev, "macro_f1": dev / 2}, "test": {"accuracy": test, "macro_f1": test / 2}}
    (out / "results.json").write_text(json.dumps(results))
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "train/tokens_per_s": v}) + "\n"
                                               for i, v in enumerate(tokens_per_s)))


def dataset(root: Path) -> Path:
    """Train labels a, a, b: the majority class is 'a', right on 1 of the 4 test rows."""
    root.mkdir()
    for split, labels in (("train", "aab"), ("dev", "ab"), ("test", "abbb")):
        (root / f"{split}.jsonl").write_text("".join(json.dumps({"text": f"t{i}", "label": y}) + "\n"
                                                     for i, y in enumerate(labels)))
    return root


def test_summary_csv_md_png(tmp_path, capsys):
    data = dataset(tmp_path / "data")
    tasks = sweep.expand(["tiny"], ["random"], [1, 20], [0, 1, 2], tmp_path, ["--dataset", str(data)])
    for t in tasks:  # a sweep.json written before the lr and depth axes
        del t["lr"], t["prompt_depth"]
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
    # always 'a': accuracy 1/4; F1 of a = 2 * 0.25 * 1 / 1.25 = 0.4, of b = 0, macro 0.2
    assert "Majority class (always label 'a'): test accuracy 0.2500, macro-F1 0.2000." in md
    assert "| tiny | random | 20 | 2/3 |" in md
    assert "## Missing or failed tasks (1)" in md and "- task 5: tiny random length 20 seed 2" in md
    assert "missing: task 5: tiny random length 20 seed 2" in capsys.readouterr().err
    assert (tmp_path / "prompt_length.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic writes left no temp files


def test_one_seed_has_no_std_and_nothing_finished_is_listed(tmp_path, capsys):
    tasks = sweep.expand(["tiny"], ["vocab"], [5, 50], [0], tmp_path, ["--dataset", str(tmp_path / "moved")])
    (tmp_path / "sweep.json").write_text(json.dumps({"tasks": tasks}))
    fake_run(tasks[0], 0.5, 0.5, [])
    assert aggregate.main([str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert rows[0]["test_accuracy_std"] == "" and rows[0]["tokens_per_s"] == ""
    assert rows[1]["seeds_finished"] == "0" and rows[1]["test_accuracy_mean"] == ""
    out, err = capsys.readouterr()
    assert "1 of 2 tasks finished" in out
    assert "warning: no majority-class line: --dataset" in err  # the data moved away: no line, not a failure


def test_not_a_sweep_dir_exits_2(tmp_path, capsys):
    assert aggregate.main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_lr_and_depth_columns_when_they_vary(tmp_path):
    tasks = sweep.expand(["tiny"], ["random"], [5], [0], tmp_path, ["--dataset", str(dataset(tmp_path / "data"))],
                         lrs=[0.3, 0.1], depths=["all"])
    (tmp_path / "sweep.json").write_text(json.dumps({"tasks": tasks}))
    fake_run(tasks[0], 0.5, 0.4, [])
    assert aggregate.main([str(tmp_path), "--format", "png,svg"]) == 0
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [(r["lr"], r["prompt_length"]) for r in rows] == [("0.3", "5"), ("0.1", "5")]
    assert "prompt_depth" not in rows[0]  # one depth: no column
    assert "| model | init | lr | prompt length |" in (tmp_path / "summary.md").read_text()
    assert aggregate.describe(tasks[1]) == "tiny random length 5 lr 0.1 depth all seed 0"
    assert (tmp_path / "prompt_length.svg").read_text().lstrip().startswith("<?xml")


def rows_for(lengths, inits=("random", "vocab")):
    return [{"model": "tiny", "init": init, "prompt_length": n, "seeds_finished": 3, "seeds_expected": 3,
             "test_accuracy_mean": 0.5 + 0.01 * k + 0.02 * i, "test_accuracy_std": 0.01}
            for i, init in enumerate(inits) for k, n in enumerate(lengths)]


def test_plot_ticks_at_the_lengths_baseline_line_and_legend_outside_the_data():
    fig = aggregate.draw(rows_for([1, 5, 20, 100]), {"test_accuracy": 0.4945, "label": "1", "dataset": "inews"})
    ax = fig.axes[0]
    assert list(ax.get_xticks()) == [1, 5, 20, 100] and [t.get_text() for t in ax.get_xticklabels()] == [
        "1", "5", "20", "100"]
    assert ax.get_xscale() == "log" and not ax.xaxis.get_minorticklocs().size
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == ["random init", "vocab init", "majority class\n(always label '1')"]
    assert list(ax.get_lines()[-1].get_ydata()) == [0.4945, 0.4945]
    assert len(ax.collections) == 2  # one ± std band per line
    assert ax.get_ylim()[0] < 0.4945 and ax.get_title().startswith("Prompt tuning of model tiny on inews: mean")
    fig.canvas.draw()
    legend, axes = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.x0 > axes.x1  # right of the axes: it covers no data
    tables.save_figure(fig, Path("/dev/null"), [])  # closes it


def test_from_csv_redraws_the_plot_only(tmp_path, capsys):
    (tmp_path / "summary.csv").write_text(tables.to_csv(rows_for([1, 20]), aggregate.columns([])))
    out = tmp_path / "docs"
    data = dataset(tmp_path / "data")
    assert aggregate.main(["--from_csv", str(tmp_path / "summary.csv"), "--output_dir", str(out), "--format",
                           "png,pdf", "--", "--dataset", str(data)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["prompt_length.pdf", "prompt_length.png"]
    assert aggregate.main(["--from_csv", str(tmp_path / "summary.csv"), "--output_dir", str(out), "--",
                           "--dataset", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith("error: after --: --dataset")


@pytest.mark.parametrize("argv, message", [
    ([], "give a sweep directory or --from_csv CSV"),
    (["--from_csv", "x.csv"], "required: --output_dir"),
    (["DIR", "--format", "png,gif"], "unknown format 'gif'"),
    (["DIR", "--", "--dataset", "inews"], "flags after -- are for --from_csv"),
])
def test_usage_errors(argv, message, capsys):
    assert aggregate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
