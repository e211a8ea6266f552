"""Summarize a sweep: python -m launcher.aggregate DIR

Reads DIR/sweep.json and every task's results.json and metrics.jsonl, and writes
- DIR/summary.csv and DIR/summary.md: per model x init x prompt length (and learning rate and prompt depth
  where the sweep varies them) the mean and sample std over finished seeds of dev/test accuracy and
  macro-F1, the seeds finished, and train tokens/s;
- DIR/prompt_length.png (--format for pdf or svg as well): test accuracy against prompt length, one line
  per model and init, a band of ± one std over seeds, and the majority-class baseline of the sweep's data.
Tasks without a results.json (failed, still running or never started) are listed in summary.md and
on stderr, never dropped silently.

    python -m launcher.aggregate --from_csv DIR/summary.csv --output_dir docs -- --dataset inews

draws the plot alone from a summary CSV; the train.py data flags after `--` give the baseline.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from launcher import args as cli_args
from launcher import tables
from launcher.tables import METRICS

ROOT = Path(__file__).resolve().parents[1]
# Sweep axes besides model, init, length and seed, with their value in sweeps that did not vary them.
AXES = {"lr": None, "prompt_depth": "input"}
KEYS = {"model": None, "init": None, **AXES, "prompt_length": None}
TEXT_COLUMNS = {"model", "init", "prompt_depth"}


def varying(entries: list[dict]) -> list[str]:
    """The AXES whose value differs between tasks (or rows)."""
    return [k for k, default in AXES.items() if len({e.get(k, default) for e in entries}) > 1]


def columns(vary: list[str]) -> list[str]:
    return ["model", "init", *vary, "prompt_length", "seeds_finished", "seeds_expected",
            *[f"{m}_{stat}" for m in METRICS for stat in ("mean", "std")], "tokens_per_s"]


def summarize(tasks: list[dict], finished: list[dict | None]) -> list[dict]:
    """One row per grid point (model, init, lr, depth, prompt length) over seeds, in sweep order. Pure."""
    return tables.summarize(tasks, finished, KEYS, METRICS, ["tokens_per_s"])


def to_markdown(rows: list[dict], missing: list[tuple[int, dict]], baseline: dict | None = None) -> str:
    vary = varying(rows)
    head = ["model", "init", *[{"lr": "lr", "prompt_depth": "prompt depth"}[k] for k in vary], "prompt length",
            "seeds", *[m.replace("_", " ").replace("macro f1", "macro-F1") for m in METRICS], "tokens/s"]
    cells = [[r["model"], r["init"], *[str(r[k]) for k in vary], str(r["prompt_length"]),
              f"{r['seeds_finished']}/{r['seeds_expected']}",
              *[tables.pm(r[f"{m}_mean"], r[f"{m}_std"]) for m in METRICS],
              "–" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.0f}"] for r in rows]
    text = "Mean ± sample std over finished seeds; dev = the best dev step, test = that step's prompt.\n\n"
    text += tables.markdown_table(head, cells)
    if baseline:
        text += (f"\nMajority class (always label {baseline['label']!r}): test accuracy "
                 f"{baseline['test_accuracy']:.4f}, macro-F1 {baseline['test_macro_f1']:.4f}.\n")
    if missing:
        text += f"\n## Missing or failed tasks ({len(missing)})\n\n"
        text += "".join(f"- task {i}: {describe(t)} (no {t['output_dir']}/results.json)\n" for i, t in missing)
    return text


def wandb_note(tasks: list[dict]) -> str:
    """summary.md's pointer to the same study in W&B: where the finished runs logged to, and the panels that
    plot it from their summaries (softprompt/tracking.py); '' when none logged to W&B."""
    places: dict[tuple, int] = {}
    for t in tasks:
        path = Path(t["output_dir"]) / "results.json"
        w = json.loads(path.read_text()).get("wandb") if path.exists() else None
        if w:
            places[w["project"], w.get("group")] = places.get((w["project"], w.get("group")), 0) + 1
    if not places:
        return ""
    where = "; ".join(f"project `{p}`" + (f", group `{g}`" if g else "") + f" ({n} runs)"
                      for (p, g), n in places.items())
    return (f"\n## In W&B\n\n{where}. The plot above: a Scatter plot panel, X `prompt_length` (log scale), "
            "Y `test/accuracy`, over the group's runs (one panel per model: filter `model`). Mean ± std per point: "
            "group the runs by `model` and `prompt_length`, then a Bar chart of `test/accuracy`. The runs table "
            "sorts by `eval/accuracy.max` (best dev) and `test/accuracy` (the best-dev prompt on test).\n")


def loss_suffix(entry: dict) -> str:
    """', balanced loss' for a task or row trained with the class-balanced loss (benchmarks.quality), else ''."""
    return ", balanced loss" if entry.get("loss") == "balanced" else ""


def describe(task: dict) -> str:
    method = f"{task['method']} " if "method" in task else ""
    axes = "".join(f" {name} {task[k]}" for k, name in (("lr", "lr"), ("prompt_depth", "depth"))
                   if task.get(k, AXES[k]) != AXES[k])
    return (f"{method}{task['model']} {task['init']} length {task['prompt_length']}{axes} seed {task['seed']}"
            + loss_suffix(task))


def line_label(row: dict, vary: list[str], with_model: bool) -> str:
    parts = [Path(row["model"]).name] if with_model else []
    parts.append(f"{row['init']} init")
    parts += [f"lr {row['lr']}" if k == "lr" else f"{row[k]} prompt" for k in vary]
    return ", ".join(parts)


def draw(rows: list[dict], baseline: dict | None, metric: str = "test_accuracy"):
    """The figure: `metric` against prompt length (log x, ticked at the lengths), one line per model,
    init and varying axis with a ± std band, the majority-class line, the legend right of the axes."""
    import numpy as np

    lines: dict[tuple, list[dict]] = {}
    for r in rows:
        if r[f"{metric}_mean"] is not None:
            lines.setdefault(tuple(r.get(k, d) for k, d in KEYS.items() if k != "prompt_length"), []).append(r)
    shown = [r for points in lines.values() for r in points]
    models = sorted({Path(r["model"]).name for r in shown})
    vary = varying(shown)
    fig, ax = tables.figure(6.4, 3.8)
    # Several models: a color per model, and a line style and marker per init (and lr, depth) within it,
    # so each model's lines read as a family. One model: a color per line.
    variants = list(dict.fromkeys(key[1:] for key in lines))  # (init, lr, depth) in sweep order
    for i, (key, points) in enumerate(lines.items()):
        points.sort(key=lambda r: r["prompt_length"])
        x = [r["prompt_length"] for r in points]
        mean = np.array([r[f"{metric}_mean"] for r in points])
        std = np.array([r[f"{metric}_std"] or 0.0 for r in points])
        first, v = points[0], variants.index(key[1:])
        color = f"C{models.index(Path(first['model']).name)}" if len(models) > 1 else f"C{i}"
        (line,) = ax.plot(x, mean, marker="os^Dv<>p"[v % 8], markersize=5, color=color,
                          linestyle=["-", "--", ":", "-."][v % 4] if len(models) > 1 else "-",
                          label=line_label(first, vary, len(models) > 1))
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15, linewidth=0)
    if baseline and baseline.get(metric) is not None:
        ax.axhline(baseline[metric], color="0.35", linestyle=":", linewidth=1.5,
                   label=f"majority class\n(always label {baseline['label']!r})")
        low, high = ax.get_ylim()  # the line inside the axes, not on their edge
        ax.set_ylim(min(low, baseline[metric] - 0.05 * (high - low)), high)
    lengths = sorted({r["prompt_length"] for r in shown})
    ax.set_xscale("log")
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.minorticks_off()
    ax.set_xlabel("prompt length (tokens, log scale)")
    ax.set_ylabel(metric.replace("_", " ").replace("macro f1", "macro-F1"))
    seeds = sorted({r["seeds_finished"] for r in shown})
    over = f"{seeds[0]} seeds" if len(seeds) == 1 else "finished seeds"
    what = (f" of model {models[0]}" if len(models) == 1 else "") + (f" on {baseline['dataset']}" if baseline else "")
    ax.set_title(f"Prompt tuning{what}: mean (line) ± std (band) over {over}", fontsize=10)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=9)
    return fig


def plot(rows: list[dict], baseline: dict | None, stem: Path, formats: list[str] = ("png",)) -> list[Path]:
    """draw() written to stem.<format> for each format."""
    metric = "test_accuracy" if any(r["test_accuracy_mean"] is not None for r in rows) else "dev_accuracy"
    return tables.save_figure(draw(rows, baseline, metric), stem, list(formats))


def build_parser():
    p = cli_args.Parser(prog="python -m launcher.aggregate", description=__doc__,
                        usage="%(prog)s DIR [options] | --from_csv CSV --output_dir DIR [options] [-- train.py args]")
    p.add_argument("dir", nargs="?", help="the sweep directory (launcher.sweep's --output_dir)")
    p.add_argument("--from_csv", metavar="CSV", type=Path,
                   help="plot the rows of this summary CSV instead of a sweep's runs (and write nothing else)")
    cli_args.add_output_dir(p, "where the summary and plot go (default: the sweep directory)")
    p.add_argument("--format", default="png", help=f"plot formats, comma-separated, from {', '.join(tables.FORMATS)}")
    return p


def baseline_for(data_args: list[str], explicit: bool) -> dict | None:
    """The majority-class scores of the data that train.py flags name; a sweep's data that cannot be
    read only loses the line (a warning), data named on our command line is an error."""
    from softprompt.config import ConfigError

    try:
        # A sweep's runs ran in ROOT: relative data paths in their flags are relative to it.
        with contextlib.nullcontext() if explicit else contextlib.chdir(ROOT):
            return tables.majority(tables.data_config(data_args))
    except ConfigError as e:
        if explicit:
            raise cli_args.UsageError(f"after --: {e}") from None
        print(f"warning: no majority-class line: {e}", file=sys.stderr)
        return None


def from_csv(path: Path, out: Path, formats: list[str], data_args: list[str] | None) -> int:
    try:
        rows = tables.read_csv(path, TEXT_COLUMNS)
        missing = [c for c in ("model", "init", "prompt_length", "test_accuracy_mean") if rows and c not in rows[0]]
    except (OSError, ValueError) as e:
        raise cli_args.UsageError(f"--from_csv {path}: not a summary CSV ({e})") from None
    if not rows or missing:
        raise cli_args.UsageError(f"--from_csv {path}: not a summary CSV (no rows, or no column {missing[:1]})")
    baseline = baseline_for(data_args, explicit=True) if data_args is not None else None
    if baseline is None:
        print("note: no majority-class line (give the data's train.py flags after --)", file=sys.stderr)
    paths = plot(rows, baseline, out / "prompt_length", formats)
    print(f"wrote {', '.join(map(str, paths))}")
    return 0


def run(argv: list[str]) -> int:
    own, extra = cli_args.split_extra(argv)
    args = build_parser().parse_args(own)
    formats = cli_args.choices("--format", args.format, tables.FORMATS, "format")
    if (args.dir is None) == (args.from_csv is None):
        raise cli_args.UsageError("give a sweep directory or --from_csv CSV (one of them)")
    if args.from_csv:
        cli_args.require(args, "--output_dir")
        return from_csv(args.from_csv, Path(args.output_dir), formats, extra if "--" in argv else None)
    if "--" in argv:
        raise cli_args.UsageError("flags after -- are for --from_csv: a sweep's data is the one its runs used")
    sweep_dir = Path(args.dir)
    out = Path(args.output_dir or sweep_dir)
    try:
        tasks = json.loads((sweep_dir / "sweep.json").read_text())["tasks"]
        assert tasks, "no tasks"
    except (OSError, ValueError, KeyError, AssertionError) as e:
        raise cli_args.UsageError(f"{sweep_dir}/sweep.json: not a sweep file ({e})") from None

    from softprompt.io import write_text

    finished = [tables.load_task(t) for t in tasks]
    rows = summarize(tasks, finished)
    missing = [(i, t) for i, (t, r) in enumerate(zip(tasks, finished)) if r is None]
    baseline = baseline_for(tasks[0]["args"], explicit=False)
    write_text(out / "summary.csv", tables.to_csv(rows, columns(varying(tasks))))
    write_text(out / "summary.md", to_markdown(rows, missing, baseline) + wandb_note(tasks))
    paths = plot(rows, baseline, out / "prompt_length", formats)
    print(f"{len(tasks) - len(missing)} of {len(tasks)} tasks finished; wrote {out}/summary.csv, summary.md, "
          + ", ".join(p.name for p in paths))
    for i, t in missing:
        print(f"missing: task {i}: {describe(t)} (no {t['output_dir']}/results.json)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except cli_args.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
