"""benchmarks.quality: the method grid (pure), the summary (pure), and a CI-sized benchmark end to end."""

import csv
import json
from pathlib import Path

import pytest

from benchmarks import quality
from launcher.args import UsageError


def test_expand_methods_seeds_innermost(tmp_path):
    ds = {"prompt": "p.json", "deep": "d.json", "full": "f.json"}
    tasks = quality.expand(["prompt", "deep", "full"], [1, 20], ["random", "labels"], [20, 100], [0, 1], ds,
                           tmp_path, ["--epochs", "3"])
    assert [(t["method"], t["init"], t["prompt_length"], t["seed"]) for t in tasks] == [
        *[("prompt", i, n, s) for i in ("random", "labels") for n in (1, 20) for s in (0, 1)],
        *[("deep", "random", n, s) for n in (20, 100) for s in (0, 1)], ("full", "-", 0, 0), ("full", "-", 0, 1)]
    full, deep = tasks[-1], tasks[-6]
    assert full["args"] == ["--ds_config", "f.json", "--seed", "1", "--quiet", "--tune", "full", "--prompt_length",
                            "0", "--epochs", "3"]
    assert deep["args"][:7] == ["--ds_config", "d.json", "--seed", "0", "--quiet", "--prompt_depth", "all"]
    assert len({t["output_dir"] for t in tasks}) == len(tasks) and {t["loss"] for t in tasks} == {"plain"}


def test_balanced_rows_run_after_the_plain_grid_and_compare_with_balanced_full(tmp_path):
    ds = {"prompt": "p.json", "deep": "d.json", "full": "f.json"}
    tasks = quality.expand(["prompt", "deep", "full"], [5], ["random"], [20], [0], ds, tmp_path, ["--epochs", "3"],
                           balanced=["deep", "full"])
    assert [(t["method"], t["loss"], Path(t["output_dir"]).name) for t in tasks] == [
        ("prompt", "plain", "prompt_random_len5_seed0"), ("deep", "plain", "deep_random_len20_seed0"),
        ("full", "plain", "full_-_len0_seed0"), ("deep", "balanced", "deep_random_len20_seed0_balanced"),
        ("full", "balanced", "full_-_len0_seed0_balanced")]
    assert tasks[-1]["args"][-6:] == ["--class_weights", "balanced", "--select_metric", "macro_f1", "--epochs", "3"]
    assert "--class_weights" not in tasks[2]["args"]
    rows = quality.summarize(tasks, [row(0.6), row(0.7), row(0.8), row(0.6, f1=0.6), row(0.75, f1=0.62)])
    by = {quality.label(r): r for r in rows}
    assert by["deep (random init, 20 tokens)"]["vs_full"] == pytest.approx(0.7 / 0.8)
    assert by["deep (random init, 20 tokens, balanced loss)"]["vs_full"] == pytest.approx(0.6 / 0.75)
    assert quality.best_prompt_method(rows, "test_macro_f1")["loss"] == "balanced"
    text = quality.to_markdown(rows, {"label": "1", "test_accuracy": 0.5, "test_macro_f1": 0.2}, [])
    assert ("Best prompt-only method by test macro-F1: deep (random init, 20 tokens, balanced loss): test accuracy "
            "0.6000 = 80.0% of full fine-tuning (same loss), macro-F1 0.6000.") in text


def test_residual_prompts_get_their_own_ds_config(tmp_path, monkeypatch):
    monkeypatch.chdir(Path(quality.__file__).resolve().parents[1])  # the shipped ds_configs/ paths

    def residual_config(*flags):
        _, tasks, _ = quality.parse(["--output_dir", str(tmp_path), "--methods", "residual", "--seeds", "0", *flags])
        return tasks[0]["args"][1]

    assert residual_config() == "ds_configs/zero3_cpu_bf16_deep.json"  # lr 0.03, not prompt tuning's 0.3
    other = "ds_configs/zero3_cpu_bf16.json"
    assert residual_config("--residual_ds_config", other) == other
    with pytest.raises(UsageError, match="--residual_ds_config nope.json: file not found"):
        residual_config("--residual_ds_config", "nope.json")


def row(acc, f1=0.5):
    return {"test_accuracy": acc, "test_macro_f1": f1, "dev_accuracy": acc, "tokens_per_s": 100.0,
            "params_trainable": 10, "optimizer_state_numel": 20}


def test_summary_against_full_and_init_effects():
    tasks = [{"method": m, "init": i, "prompt_length": n, "loss": "plain"} for m, i, n in
             [("prompt", "random", 5)] * 2 + [("prompt", "labels", 5)] * 2 + [("full", "-", 0)] * 2]
    finished = [row(0.5), row(0.6), row(0.7), None, row(0.8), row(0.8)]
    rows = quality.summarize(tasks, finished)
    assert [r["seeds_finished"] for r in rows] == [2, 1, 2]
    assert rows[0]["test_accuracy_mean"] == pytest.approx(0.55) and rows[0]["vs_full"] == pytest.approx(0.55 / 0.8)
    assert quality.best_prompt_method(rows)["init"] == "labels"
    # labels - random = 0.7 - 0.55; std of the difference of means: sqrt(0.0707^2 / 2 + 0)
    assert quality.init_effects(rows) == ["- length 5: labels − random = +0.1500 ± 0.0500 (std of the difference "
                                          "of means)"]


def test_bad_input_exits_2(tmp_path, capsys):
    assert quality.main(["--output_dir", str(tmp_path), "--methods", "prompt,bogus"]) == 2
    assert "unknown method 'bogus'" in capsys.readouterr().err
    assert quality.main(["--output_dir", str(tmp_path), "--", "--tune", "full"]) == 2
    assert "--tune is set by the benchmark" in capsys.readouterr().err
    assert quality.main(["--output_dir", str(tmp_path), "--", "--class_weights", "balanced"]) == 2
    assert "--class_weights is set by the benchmark" in capsys.readouterr().err
    assert quality.main(["--output_dir", str(tmp_path), "--balanced", "full,nope"]) == 2
    assert "--balanced: unknown method 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "quality.json").exists()


def test_ci_sized_benchmark_end_to_end(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Every method for 3 steps on inews, one seed, two runs at a time, full fine-tuning again with the
    balanced loss: the table, CSV and plot, with parameter and optimizer-state counts checked by hand."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    out = tmp_path / "q"
    train = ["--model", str(tiny_model_dir), "--dataset", "inews", "--inews_content_chars", "0",
             "--max_length", "24", "--max_steps", "3", "--eval_every", "3", "--log_every", "1"]
    assert quality.main(["--output_dir", str(out), "--seeds", "0", "--lengths", "5", "--inits", "random",
                         "--method_lengths", "5", "--balanced", "full", "--jobs", "2", "--", *train]) == 0
    assert len(list((out / "logs").glob("*_seed0*.log"))) == 5  # --jobs 2: each run's output in its own log
    table = list(csv.DictReader((out / "quality.csv").open()))
    rows = {r["method"]: r for r in table if r["loss"] == "plain"}
    assert set(rows) == {"prompt", "deep", "residual", "full"}
    balanced = json.loads((out / "runs" / "full_-_len0_seed0_balanced" / "results.json").read_text())
    assert balanced["class_weights"] is not None and [r["loss"] for r in table].count("balanced") == 1
    D, layers = 32, 2 + 2  # the tiny test model: d_model 32, 2 encoder + 2 decoder layers
    mlp = D * 512 + 512 + 512 * D + D + 2 * D  # two linears (--reparam_dim 512 by default), a LayerNorm
    full = json.loads((out / "runs" / "full_-_len0_seed0" / "results.json").read_text())
    expected = {"prompt": 5 * D, "deep": layers * 5 * D, "residual": 5 * D + mlp, "full": full["params_total"]}
    for method, n in expected.items():
        assert float(rows[method]["params_trainable"]) == n, method
        assert float(rows[method]["optimizer_state_numel"]) == 2 * n, method  # AdamW: two moments
        assert 0 <= float(rows[method]["test_accuracy_mean"]) <= 1
    text = (out / "quality.md").read_text()
    from softprompt import data  # the majority row is recomputed here as its oracle
    from softprompt.config import DataConfig

    test_labels = data.load_splits(DataConfig(dataset="inews")).test["label"]
    share = max(test_labels.count(c) for c in set(test_labels)) / len(test_labels)
    assert "| majority class" in text and f"{share:.4f}" in text
    assert "Best prompt-only method by test macro-F1:" in text and (out / "quality.png").stat().st_size > 1000
    assert "different tokenizers" not in text  # one model, one tokenizer
    prompt_json = json.loads((out / "runs" / "prompt_random_len5_seed0" / "prompt.json").read_text())
    assert full["tokenizer_hash"] == prompt_json["tokenizer_hash"] and len(full["tokenizer_hash"]) == 16
    # A larger grid over the same OUT: finished runs are reused, the rest reported missing, nothing runs.
    assert quality.main(["--output_dir", str(out), "--seeds", "0,1", "--lengths", "5", "--inits", "random",
                         "--method_lengths", "5", "--balanced", "", "--report_only", "--", *train]) == 0
    text = (out / "quality.md").read_text()
    assert "| 1/2 |" in text and "Missing or failed runs (4)" in text and "prompt_random_len5_seed1" in text
    assert not (out / "runs" / "prompt_random_len5_seed1").exists()


def test_rows_from_different_tokenizers_are_flagged():
    """`--model tiny` trains its vocabulary: another sentencepiece version gives another model, so a table
    mixing them must say so."""
    same = [{**row(0.5), "tokenizer_hash": "aaaa"}, None, {**row(0.6), "tokenizer_hash": "aaaa"}, row(0.7)]
    assert quality.tokenizer_warning(same) is None  # row(0.7): an older results.json without the hash
    mixed = same + [{**row(0.6), "tokenizer_hash": "bbbb"}]
    assert quality.tokenizer_warning(mixed) == ("Warning: these runs used 2 different tokenizers (aaaa, bbbb): rows "
                                                "are not all on the same model and data.")
    tasks = [{"method": "prompt", "init": "random", "prompt_length": 5}] * len(mixed)
    base = {"label": "1", "test_accuracy": 0.5, "test_macro_f1": 0.2}
    text = quality.to_markdown(quality.summarize(tasks, mixed), base, [], quality.tokenizer_warning(mixed))
    assert "**Warning: these runs used 2 different tokenizers" in text


def test_plot_legend_covers_no_bar_and_one_token_is_singular():
    tasks = [{"method": m, "init": i, "prompt_length": n, "loss": loss} for m, i, n, loss in
             [("prompt", "random", 1, "plain"), ("prompt", "random", 20, "plain"), ("deep", "random", 20, "plain"),
              ("full", "-", 0, "plain"), ("full", "-", 0, "balanced")]]
    rows = quality.summarize(tasks, [row(0.5), row(0.6), row(0.68), row(0.7), row(0.66)])
    assert [quality.label(r) for r in rows[:2]] == ["prompt (random init, 1 token)", "prompt (random init, 20 tokens)"]
    fig = quality.draw(rows, {"test_accuracy": 0.49, "label": "1", "dataset": "inews"})
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()][0] == "prompt (random init, 1 token)"
    refs = [line for line in ax.get_lines() if not line.get_label().startswith("_")]  # not the error bars
    assert [line.get_xdata()[0] for line in refs] == [0.49, pytest.approx(0.95 * 0.7)]
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    bars = [p.get_window_extent() for p in ax.patches]
    assert len(bars) == 5 and not any(legend.overlaps(b) for b in bars)
    assert legend.y0 >= ax.get_window_extent().y1  # above the axes
    assert ax.get_legend().get_title().get_text() == "Every method on the same frozen model and inews"
    assert [p.get_hatch() for p in ax.patches] == [None, None, None, None, "///"]  # the balanced-loss row


def test_from_csv_redraws_the_plot_only(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for split, labels in (("train", "aab"), ("dev", "ab")):
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"text": "t", "label": y}) + "\n" for y in labels))
    tasks = [{"method": "prompt", "init": "random", "prompt_length": 5}, {"method": "full", "init": "-",
                                                                         "prompt_length": 0}]
    (tmp_path / "quality.csv").write_text(quality.tables.to_csv(quality.summarize(tasks, [row(0.6), row(0.7)])))
    out = tmp_path / "docs"
    assert quality.main(["--from_csv", str(tmp_path / "quality.csv"), "--output_dir", str(out), "--format", "svg",
                         "--", "--dataset", str(data)]) == 0
    assert [p.name for p in out.iterdir()] == ["quality.svg"]
