"""Quality benchmark: every method on the same frozen model and data, side by side.

    python -m benchmarks.quality --output_dir runs/quality -- --epochs 3       # the full grid (hours on 2 CPU cores)
    python -m benchmarks.quality --output_dir runs/q --seeds 0 --lengths 5 --inits random -- --max_steps 3  # CI-sized

For every seed it runs, here and --jobs at a time (finished runs are skipped, so a rerun resumes
and a later grid over the same OUTPUT_DIR reuses them):
- prompt tuning (Lester et al.) at each --lengths x --inits,
- deep prompts (`--prompt_depth all`) and residual prompts (`--reparam residual`) at each --method_lengths,
- full fine-tuning (`--tune full`),
- and again, for the --balanced methods, with the class-balanced loss (`--class_weights balanced`, best dev
  step by macro-F1): each balanced row is compared with full fine-tuning under the same loss,
each method with its own DeepSpeed JSON (--prompt_ds_config, --deep_ds_config, --residual_ds_config,
--full_ds_config: the JSON owns the learning rate, and these methods want different ones), then scores the
majority class (no training) and writes OUTPUT_DIR/quality.md, quality.csv and quality.png: mean ± sample
std over seeds of test accuracy and macro-F1 (test = the best dev step's), tokens/s, trainable parameters,
optimizer state, and each method against full fine-tuning.
Flags after `--` go to every train.py run (e.g. --epochs 3, --max_steps 3, --dataset DIR).

    python -m benchmarks.quality --from_csv runs/quality/quality.csv --output_dir docs

redraws quality.png alone from a quality.csv (the majority class from the data the flags after `--` name).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from launcher import args as cli_args
from launcher import tables
from launcher.aggregate import loss_suffix
from launcher.sweep import INITS, run_local

METHODS = ("prompt", "deep", "residual", "full")
METHOD_FLAGS = {"prompt": [], "deep": ["--prompt_depth", "all"], "residual": ["--reparam", "residual"],
                "full": ["--tune", "full", "--prompt_length", "0"]}
# The class-balanced loss weights rare classes up: a little accuracy for their recall, so macro-F1 is
# compared under both losses.
BALANCED_FLAGS = ["--class_weights", "balanced", "--select_metric", "macro_f1"]
# Set per run by the benchmark, so they cannot also come after `--`.
OWN_FLAGS = ("--prompt_init", "--prompt_length", "--seed", "--output_dir", "--resume", "--ds_config", "--tune",
             "--prompt_depth", "--reparam", "--class_weights", "--select_metric")
KEYS = {"method": None, "init": None, "prompt_length": None, "loss": "plain"}
STATS = ["test_accuracy", "test_macro_f1", "dev_accuracy"]


def expand(methods: list[str], lengths: list[int], inits: list[str], method_lengths: list[int], seeds: list[int],
           ds_configs: dict[str, str], out: Path, extra: list[str], model: str = "tiny",
           balanced: list[str] = ()) -> list[dict]:
    """One task per (loss, method, init, prompt length, seed), seeds innermost: every method with the plain
    loss, then the `balanced` ones with the class-balanced loss; `ds_configs`: method -> DeepSpeed JSON. Pure."""
    points = []
    for loss in ("plain", "balanced"):
        for method in methods if loss == "plain" else [m for m in methods if m in balanced]:
            if method == "prompt":
                points += [(loss, method, init, length) for init in inits for length in lengths]
            elif method == "full":
                points.append((loss, method, "-", 0))
            else:
                points += [(loss, method, "random", length) for length in method_lengths]
    tasks = []
    for loss, method, init, length in points:
        for seed in seeds:
            # Named by grid point, not position: another grid over the same OUTPUT_DIR reuses finished runs.
            name = f"{method}_{init}_len{length}_seed{seed}" + ("_balanced" if loss == "balanced" else "")
            args = ["--ds_config", ds_configs[method], "--seed", str(seed), "--quiet", *METHOD_FLAGS[method]]
            if method != "full":
                args += ["--prompt_init", init, "--prompt_length", str(length)]
            if loss == "balanced":
                args += BALANCED_FLAGS
            tasks.append({"method": method, "model": model, "init": init, "prompt_length": length, "seed": seed,
                          "loss": loss, "output_dir": str(out / "runs" / name), "args": [*args, *extra]})
    return tasks


def summarize(tasks: list[dict], finished: list[dict | None]) -> list[dict]:
    """One row per (method, init, prompt length, loss); `vs_full` = test accuracy / that of full fine-tuning
    with the same loss. Pure."""
    rows = tables.summarize(tasks, finished, KEYS, STATS, ["tokens_per_s", "params_trainable", "optimizer_state_numel"])
    full = {r["loss"]: r["test_accuracy_mean"] for r in rows if r["method"] == "full"}
    for r in rows:
        ref = full.get(r["loss"])
        r["vs_full"] = r["test_accuracy_mean"] / ref if ref and r["test_accuracy_mean"] is not None else None
    return rows


def init_effects(rows: list[dict]) -> list[str]:
    """Per prompt length (and loss): each init's test accuracy minus random init's, with the std of that
    difference."""
    by = {(r["init"], r["prompt_length"], r["loss"]): r for r in rows
          if r["method"] == "prompt" and r["test_accuracy_mean"]}
    lines = []
    for (init, length, loss), r in by.items():
        base = by.get(("random", length, loss))
        if init == "random" or base is None:
            continue
        var = sum((x["test_accuracy_std"] or 0.0) ** 2 / x["seeds_finished"] for x in (r, base))
        lines.append(f"- length {length}{loss_suffix(r)}: {init} − random = "
                     f"{r['test_accuracy_mean'] - base['test_accuracy_mean']:+.4f} ± {math.sqrt(var):.4f} "
                     "(std of the difference of means)")
    return lines


def best_prompt_method(rows: list[dict], metric: str = "test_accuracy") -> dict | None:
    candidates = [r for r in rows if r["method"] != "full" and r[f"{metric}_mean"] is not None]
    return max(candidates, key=lambda r: r[f"{metric}_mean"], default=None)


def label(r: dict) -> str:
    loss = loss_suffix(r)
    if r["method"] == "full":
        return f"full fine-tuning{loss}"
    n = r["prompt_length"]
    return f"{r['method']} ({r['init']} init, {n} token{'' if n == 1 else 's'}{loss})"


def tokenizer_warning(finished: list[dict | None]) -> str | None:
    """A warning when the finished runs saw more than one tokenizer: the same --model "tiny" built under
    another sentencepiece version has another vocabulary, so its rows are not on the same model. Pure."""
    hashes = sorted({r["tokenizer_hash"] for r in finished if r is not None and r.get("tokenizer_hash")})
    if len(hashes) < 2:
        return None
    return (f"Warning: these runs used {len(hashes)} different tokenizers ({', '.join(hashes)}): rows are not all "
            "on the same model and data.")


def to_markdown(rows: list[dict], base: dict | None, missing: list[tuple[int, dict]],
                warning: str | None = None) -> str:
    head = ["method", "seeds", "test accuracy", "test macro-F1", "dev accuracy", "vs full FT", "tokens/s",
            "trainable params", "optimizer state"]
    num = lambda v, fmt: "–" if v is None else format(v, fmt)  # noqa: E731
    cells = [[f"majority class ({base['label']})", "–", f"{base['test_accuracy']:.4f}",
              f"{base['test_macro_f1']:.4f}", "–", "–", "–", "0", "0"]] if base else []
    cells += [[label(r), f"{r['seeds_finished']}/{r['seeds_expected']}",
               *[tables.pm(r[f"{m}_mean"], r[f"{m}_std"]) for m in STATS],
               num(r["vs_full"], ".1%"), num(r["tokens_per_s"], ".0f"), num(r["params_trainable"], ",.0f"),
               num(r["optimizer_state_numel"], ",.0f")] for r in rows]
    text = ("Mean ± sample std over finished seeds; test = the best dev step's. Optimizer state: elements "
            "summed over ranks.\n\n" + (f"**{warning}**\n\n" if warning else "") + tables.markdown_table(head, cells))
    if effects := init_effects(rows):
        text += "\nInit against random init (test accuracy):\n\n" + "\n".join(effects) + "\n"
    for metric, what in (("test_accuracy", "test accuracy"), ("test_macro_f1", "test macro-F1")):
        if (best := best_prompt_method(rows, metric)) is not None:
            text += (f"\nBest prompt-only method by {what}: {label(best)}: test accuracy "
                     f"{best['test_accuracy_mean']:.4f}"
                     + (f" = {best['vs_full']:.1%} of full fine-tuning (same loss)" if best["vs_full"] else "")
                     + f", macro-F1 {best['test_macro_f1_mean']:.4f}.\n")
    if missing:
        text += f"\n## Missing or failed runs ({len(missing)})\n\n"
        text += "".join(f"- {t['output_dir']} (no results.json)\n" for _, t in missing)
    return text


COLORS = {"prompt": "tab:blue", "deep": "tab:orange", "residual": "tab:green", "full": "0.5"}


def draw(rows: list[dict], base: dict | None):
    """Horizontal bars of test accuracy ± std per row, the value beside each bar, the majority class and 95%
    of full fine-tuning as lines; the legend above the axes."""
    from matplotlib.patches import Patch

    shown = [r for r in rows if r["test_accuracy_mean"] is not None]
    mean = [r["test_accuracy_mean"] for r in shown]
    std = [r["test_accuracy_std"] or 0.0 for r in shown]
    fig, ax = tables.figure(7.0, 0.26 * len(shown) + 1.5)
    bars = ax.barh(range(len(shown)), mean, xerr=std, color=[COLORS[r["method"]] for r in shown], height=0.7,
                   error_kw={"elinewidth": 0.8, "capsize": 2})
    for i, (bar, r) in enumerate(zip(bars, shown)):
        if r.get("loss") == "balanced":
            bar.set_hatch("///")
            bar.set_edgecolor("white")
        # The numbers in a column right of the axes, where no bar or line runs through them.
        ax.text(1.02, i, tables.pm(mean[i], r["test_accuracy_std"]), va="center", fontsize=7.5,
                transform=ax.get_yaxis_transform())
    ax.set_yticks(range(len(shown)), [label(r) for r in shown], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max((m + s for m, s in zip(mean, std)), default=1.0) + 0.02)
    names = {"prompt": "prompt tuning", "deep": "deep prompts", "residual": "residual prompts",
             "full": "full fine-tuning"}
    handles = [Patch(color=COLORS[m], label=names[m]) for m in METHODS if any(r["method"] == m for r in shown)]
    if any(r.get("loss") == "balanced" for r in shown):
        handles.append(Patch(facecolor="0.7", hatch="///", edgecolor="white", label="class-balanced loss"))
    if base:
        handles.append(ax.axvline(base["test_accuracy"], color="k", linestyle=":",
                                  label=f"majority class (always label {base['label']!r})"))
    if full := next((r["test_accuracy_mean"] for r in shown if r["method"] == "full" and r.get("loss") != "balanced"),
                    None):
        handles.append(ax.axvline(0.95 * full, color="tab:red", linestyle="--",
                                  label="95% of full fine-tuning (plain loss)"))
    seeds = sorted({r["seeds_finished"] for r in shown})
    ax.set_xlabel(f"test accuracy, mean ± std over {seeds[0] if len(seeds) == 1 else 'finished'} seeds")
    ax.grid(True, axis="x", alpha=0.3)
    title = f"Every method on the same frozen model and {base['dataset']}" if base else None
    ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.0, 1.01), ncol=2, frameon=False, fontsize=8,
              title=title, title_fontsize=10, alignment="left")
    return fig


def plot(rows: list[dict], base: dict | None, stem: Path, formats: list[str] = ("png",)) -> list[Path]:
    """draw() written to stem.<format> for each format."""
    return tables.save_figure(draw(rows, base), stem, list(formats))


def build_parser() -> cli_args.Parser:
    p = cli_args.Parser(prog="python -m benchmarks.quality", description=__doc__,
                        usage="%(prog)s --output_dir DIR [options] [-- train.py args]")
    cli_args.add_output_dir(p, "benchmark directory: quality.json, runs/, logs/, then the table and plot")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--lengths", default="1,5,20,100", help="prompt lengths for plain prompt tuning")
    p.add_argument("--inits", default=",".join(INITS), help="prompt inits for plain prompt tuning")
    p.add_argument("--method_lengths", default="20,100", help="prompt lengths for deep and residual prompts")
    p.add_argument("--balanced", default="deep,full",
                   help="those of --methods that also run with the class-balanced loss (--class_weights balanced, "
                        "best dev step by macro-F1), as extra rows; '' for none")
    p.add_argument("--seeds", default="0,1,2", help="seeds")
    p.add_argument("--prompt_ds_config", default="ds_configs/zero3_cpu_bf16.json",
                   help="DeepSpeed JSON of prompt tuning (AdamW lr 0.3)")
    p.add_argument("--deep_ds_config", default="ds_configs/zero3_cpu_bf16_deep.json",
                   help="DeepSpeed JSON of deep prompts (AdamW lr 0.03: every layer's input moves at once)")
    p.add_argument("--residual_ds_config", default="ds_configs/zero3_cpu_bf16_deep.json",
                   help="DeepSpeed JSON of residual prompts (AdamW lr 0.03: at prompt tuning's lr the MLP "
                        "branch grows until the prompt runs away)")
    p.add_argument("--full_ds_config", default="ds_configs/zero3_cpu_bf16_full.json",
                   help="DeepSpeed JSON of full fine-tuning (AdamW lr 5e-4: every weight trains)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once; above 1 each gets the cores split as torch threads and writes its output "
                        "to OUTPUT_DIR/logs/")
    p.add_argument("--dry_run", action="store_true", help="write quality.json and print the commands, run nothing")
    p.add_argument("--report_only", action="store_true",
                   help="run nothing: write the table and plot from the runs that finished (the rest listed as missing)")
    p.add_argument("--from_csv", metavar="CSV", type=Path,
                   help="run nothing: draw OUTPUT_DIR/quality.png (and nothing else) from this quality.csv")
    p.add_argument("--format", default="png", help=f"plot formats, comma-separated, from {', '.join(tables.FORMATS)}")
    return p


def parse(argv: list[str]):
    """(our flags, the runs, the RunConfig every run's train.py flags give)."""
    own, extra = cli_args.split_extra(argv)
    args = build_parser().parse_args(own)
    cli_args.require(args, "--output_dir")
    args.format = cli_args.choices("--format", args.format, tables.FORMATS, "format")
    methods = cli_args.choices("--methods", args.methods, METHODS, "method")
    inits = cli_args.choices("--inits", args.inits, INITS, "init")
    balanced = cli_args.choices("--balanced", args.balanced, METHODS, "method") if args.balanced.strip() else []
    lengths = cli_args.parse_list("--lengths", args.lengths, int)
    method_lengths = cli_args.parse_list("--method_lengths", args.method_lengths, int)
    if min(lengths + method_lengths) <= 0 or args.jobs <= 0:
        raise cli_args.UsageError("--lengths, --method_lengths and --jobs must be > 0")
    cli_args.reject(extra, OWN_FLAGS, "the benchmark")
    ds_configs = {method: getattr(args, f"{method}_ds_config") for method in METHODS}
    if missing := [m for m, path in ds_configs.items() if not args.from_csv and not Path(path).is_file()]:
        raise cli_args.UsageError(f"--{missing[0]}_ds_config {ds_configs[missing[0]]}: file not found")
    from launcher import cli
    from softprompt.config import ConfigError

    try:  # the flags every run gets, checked now rather than after hours of runs
        run_cfg = cli.parse(extra)
    except ConfigError as e:
        raise cli_args.UsageError(f"after --: {e}") from None
    out = Path(args.output_dir).resolve()
    return args, expand(methods, lengths, inits, method_lengths, cli_args.parse_list("--seeds", args.seeds, int),
                        ds_configs, out, extra, run_cfg.model.model, balanced), run_cfg


def report(args, tasks: list[dict], run_cfg) -> None:
    """The table, CSV and plot of the runs that finished."""
    from softprompt.io import write_text

    out = Path(args.output_dir).resolve()
    base = tables.majority(run_cfg.data)
    finished = [tables.load_task(t) for t in tasks]
    rows = summarize(tasks, finished)
    missing = [(i, t) for i, (t, r) in enumerate(zip(tasks, finished)) if r is None]
    text = to_markdown(rows, base, missing, tokenizer_warning(finished))
    write_text(out / "quality.md", text)
    write_text(out / "quality.csv", tables.to_csv(rows))
    paths = plot(rows, base, out / "quality", args.format)
    print(text)
    print(f"wrote {out}/quality.md, quality.csv, " + ", ".join(p.name for p in paths))


def run(argv: list[str]) -> int:
    args, tasks, run_cfg = parse(argv)
    out = Path(args.output_dir).resolve()
    if args.from_csv:
        try:
            rows = tables.read_csv(args.from_csv, {"method", "init", "loss"})
        except (OSError, ValueError) as e:
            raise cli_args.UsageError(f"--from_csv {args.from_csv}: not a quality CSV ({e})") from None
        paths = plot(rows, tables.majority(run_cfg.data), out / "quality", args.format)
        print(f"wrote {', '.join(map(str, paths))}")
        return 0
    from softprompt.io import write_json

    write_json(out / "quality.json", {"tasks": tasks})
    print(f"{out / 'quality.json'}: {len(tasks)} runs")
    failed = 0 if args.report_only else run_local(tasks, args.dry_run, args.jobs, out / "logs")
    if not args.dry_run:
        report(args, tasks, run_cfg)
    return failed


def main(argv: list[str] | None = None) -> int:
    from softprompt.config import ConfigError

    try:
        return run(sys.argv[1:] if argv is None else argv)
    except (cli_args.UsageError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
