"""docs/data: the two tables behind the docs pictures hold the same prompt-tuning numbers."""

from pathlib import Path

from launcher import aggregate, tables

DATA = Path(__file__).resolve().parents[1] / "docs" / "data"


def test_prompt_rows_are_the_quality_tables_prompt_rows():
    quality = tables.read_csv(DATA / "quality.csv", {"method", "init", "loss"})
    prompt = tables.read_csv(DATA / "quality_prompt_rows.csv", aggregate.TEXT_COLUMNS)
    assert list(prompt[0]) == aggregate.columns([])
    expected = [r for r in quality if r["method"] == "prompt" and r["loss"] == "plain"]
    assert [(r["init"], r["prompt_length"]) for r in prompt] == [
        (i, n) for i in ("random", "vocab", "labels") for n in (1, 5, 20, 100)]
    for r, q in zip(prompt, expected, strict=True):
        assert (r["init"], r["prompt_length"], r["seeds_finished"]) == (q["init"], q["prompt_length"], 3)
        for key in ("test_accuracy_mean", "test_accuracy_std", "test_macro_f1_mean", "test_macro_f1_std",
                    "dev_accuracy_mean", "dev_accuracy_std", "tokens_per_s"):
            assert r[key] == q[key], key
    full = next(r for r in quality if r["method"] == "full" and r["loss"] == "plain")
    assert all(abs(q["vs_full"] - q["test_accuracy_mean"] / full["test_accuracy_mean"]) < 0.0015 for q in quality
               if q["loss"] == "plain")
