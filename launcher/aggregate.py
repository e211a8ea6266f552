"""Summarize a sweep: python -m launcher.aggregate DIR

Reads DIR/sweep.json and every task's results.json and metrics.jsonl, and writes
- DIR/summary.csv and DIR/summary.md: per model x init x prompt length, the mean and sample std over
  finished seeds of dev/test accuracy and macro-F1, the seeds finished, and train tokens/s;
- DIR/prompt_length.png: test accuracy against prompt length (log x), one line per model/init,
  error bars = std over seeds.
Tasks without a results.json (failed, still running or never started) are listed in summary.md and
on stderr, never dropped silently.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import sys
from pathlib import Path

METRICS = [(split, name) for split in ("dev", "test") for name in ("accuracy", "macro_f1")]
COLUMNS = ["model", "init", "prompt_length", "seeds_finished", "seeds_expected",
           *[f"{s}_{m}_{stat}" for s, m in METRICS for stat in ("mean", "std")], "tokens_per_s"]


def load_task(task: dict) -> dict | None:
    """The task's metrics, or None if it has no results.json."""
    out = Path(task["output_dir"])
    try:
        results = json.loads((out / "results.json").read_text())
    except FileNotFoundError:
        return None
    row = {f"{s}_{m}": results[s][m] for s, m in METRICS}
    row.update({k: results.get(k) for k in ("params_trainable", "optimizer_state_numel", "tokenizer_hash")})
    speeds = []
    if (out / "metrics.jsonl").exists():
        records = (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line)
        speeds = [r["train/tokens_per_s"] for r in records if "train/tokens_per_s" in r]
    row["tokens_per_s"] = statistics.fmean(speeds) if speeds else None
    return row


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(tasks: list[dict], finished: list[dict | None]) -> list[dict]:
    """One row per (model, init, prompt length), in sweep order. Pure."""
    groups: dict[tuple, list] = {}
    for task, result in zip(tasks, finished):
        groups.setdefault((task["model"], task["init"], task["prompt_length"]), []).append(result)
    rows = []
    for (model, init, length), results in groups.items():
        done = [r for r in results if r is not None]
        row = {"model": model, "init": init, "prompt_length": length, "seeds_finished": len(done),
               "seeds_expected": len(results)}
        for s, m in METRICS:
            row[f"{s}_{m}_mean"], row[f"{s}_{m}_std"] = _mean_std([r[f"{s}_{m}"] for r in done])
        row["tokens_per_s"] = _mean_std([r["tokens_per_s"] for r in done if r["tokens_per_s"] is not None])[0]
        rows.append(row)
    return rows


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return buf.getvalue()


def _pm(mean, std) -> str:
    if mean is None:
        return "–"
    return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def to_markdown(rows: list[dict], missing: list[tuple[int, dict]]) -> str:
    head = ["model", "init", "prompt length", "seeds", *[f"{s} {m.replace('_', '-')}" for s, m in METRICS],
            "tokens/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["init"], str(r["prompt_length"]), f"{r['seeds_finished']}/{r['seeds_expected']}",
                 *[_pm(r[f"{s}_{m}_mean"], r[f"{s}_{m}_std"]) for s, m in METRICS],
                 "–" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    text = "Mean ± sample std over finished seeds; dev = the best dev step, test = that step's prompt.\n\n"
    text += "\n".join(lines) + "\n"
    if missing:
        text += f"\n## Missing or failed tasks ({len(missing)})\n\n"
        text += "".join(f"- task {i}: {describe(t)} (no {t['output_dir']}/results.json)\n" for i, t in missing)
    return text


def loss_suffix(entry: dict) -> str:
    """', balanced loss' for a task or row trained with the class-balanced loss (launcher.quality), else ''."""
    return ", balanced loss" if entry.get("loss") == "balanced" else ""


def describe(task: dict) -> str:
    method = f"{task['method']} " if "method" in task else ""
    return (f"{method}{task['model']} {task['init']} length {task['prompt_length']} seed {task['seed']}"
            + loss_suffix(task))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from softprompt.io import atomic_write

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    lines: dict[tuple, list] = {}
    for r in rows:
        if r["test_accuracy_mean"] is not None:
            lines.setdefault((r["model"], r["init"]), []).append(r)
    for (model, init), points in lines.items():
        points.sort(key=lambda r: r["prompt_length"])
        ax.errorbar([r["prompt_length"] for r in points], [r["test_accuracy_mean"] for r in points],
                    yerr=[r["test_accuracy_std"] or 0.0 for r in points], marker="o", capsize=3,
                    label=f"{Path(model).name} ({init} init)")
    ax.set_xscale("log")
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Soft prompt tuning: accuracy vs prompt length")
    ax.grid(True, which="both", alpha=0.3)
    if lines:
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.aggregate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", help="the sweep directory given to launcher.sweep --out")
    args = parser.parse_args(argv)
    out = Path(args.dir)
    try:
        tasks = json.loads((out / "sweep.json").read_text())["tasks"]
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {out}/sweep.json: not a sweep file ({e})", file=sys.stderr)
        return 2

    from softprompt.io import write_text

    finished = [load_task(t) for t in tasks]
    rows = summarize(tasks, finished)
    missing = [(i, t) for i, (t, r) in enumerate(zip(tasks, finished)) if r is None]
    for name, text in (("summary.csv", to_csv(rows)), ("summary.md", to_markdown(rows, missing))):
        write_text(out / name, text)
    plot(rows, out / "prompt_length.png")
    print(f"{len(tasks) - len(missing)} of {len(tasks)} tasks finished; wrote {out}/summary.csv, summary.md, "
          "prompt_length.png")
    for i, t in missing:
        print(f"missing: task {i}: {describe(t)} (no {t['output_dir']}/results.json)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
