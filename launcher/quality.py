"""Quality benchmark: every method on the same frozen model and data, side by side.

    python -m launcher.quality --out runs/quality -- --epochs 3           # the full form (hours on 2 CPU cores)
    python -m launcher.quality --out runs/q --seeds 0 --lengths 5 --inits random -- --max_steps 3   # CI-sized

For every seed it runs, here and --jobs at a time (finished runs are skipped, so a rerun resumes
and a later grid over the same OUT reuses them):
- prompt tuning (Lester et al.) at each --lengths x --inits,
- deep prompts (`--prompt_depth all`) and residual prompts (`--reparam residual`) at each --method_lengths,
- full fine-tuning (`--tune full`),
- and again, for the --balanced methods, with the class-balanced loss (`--class_weights balanced`, best dev
  step by macro-F1): each balanced row is compared with full fine-tuning under the same loss,
each method with its own DeepSpeed JSON (--prompt_ds_config, --deep_ds_config, --residual_ds_config, --full_ds_config:
the JSON owns the learning rate, and these methods want different ones), then scores the majority
class (no training) and writes OUT/quality.md, OUT/quality.csv and
OUT/quality.png: mean ± sample std over seeds of test accuracy and macro-F1 (test = the best dev
step's), tokens/s, trainable parameters, optimizer state, and each method against full fine-tuning.
Flags after `--` go to every train.py run (e.g. --epochs 3, --max_steps 3, --dataset DIR).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import statistics
import sys
from pathlib import Path

from . import aggregate, sweep

METHODS = ("prompt", "deep", "residual", "full")
METHOD_FLAGS = {"prompt": [], "deep": ["--prompt_depth", "all"], "residual": ["--reparam", "residual"],
                "full": ["--tune", "full", "--prompt_length", "0"]}
# Why a second loss: inews's class 0 is 10% of train, and with the plain loss some seeds of every method
# predict it a handful of times (macro-F1 ~0.47); weighting it up trades a little accuracy for its recall.
BALANCED_FLAGS = ["--class_weights", "balanced", "--select_metric", "macro_f1"]
# Set per run by the benchmark, so they cannot also come after `--`.
OWN_FLAGS = ("--prompt_init", "--prompt_length", "--seed", "--output_dir", "--resume", "--ds_config", "--tune",
             "--prompt_depth", "--reparam", "--class_weights", "--select_metric")


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
            # Named by grid point, not position: another grid over the same OUT reuses finished runs.
            name = f"{method}_{init}_len{length}_seed{seed}" + ("_balanced" if loss == "balanced" else "")
            args = ["--ds_config", ds_configs[method], "--seed", str(seed), "--quiet", *METHOD_FLAGS[method]]
            if method != "full":
                args += ["--prompt_init", init, "--prompt_length", str(length)]
            if loss == "balanced":
                args += BALANCED_FLAGS
            tasks.append({"method": method, "model": model, "init": init, "prompt_length": length, "seed": seed,
                          "loss": loss, "output_dir": str(out / "runs" / name), "args": [*args, *extra]})
    return tasks


def majority(data_cfg) -> dict:
    """Test accuracy and macro-F1 of always predicting the training split's most frequent label."""
    import torch

    from softprompt import data, metrics

    splits = data.load_splits(data_cfg)
    names = splits.label_names
    top = statistics.mode(splits.train["label"])
    gold = torch.tensor(splits.test["label"])
    m = metrics.from_confusion(metrics.confusion(gold, torch.full_like(gold, top), len(names)), names)
    return {"test_accuracy": m["accuracy"], "test_macro_f1": m["macro_f1"], "label": names[top]}


def summarize(tasks: list[dict], finished: list[dict | None]) -> list[dict]:
    """One row per (method, init, prompt length, loss); `vs_full` = test accuracy / that of full fine-tuning
    with the same loss. Pure."""
    groups: dict[tuple, list] = {}
    for task, result in zip(tasks, finished):
        key = (task["method"], task["init"], task["prompt_length"], task.get("loss", "plain"))
        groups.setdefault(key, []).append(result)
    rows = []
    for (method, init, length, loss), results in groups.items():
        done = [r for r in results if r is not None]
        row = {"method": method, "init": init, "prompt_length": length, "loss": loss, "seeds_finished": len(done),
               "seeds_expected": len(results)}
        for key in ("test_accuracy", "test_macro_f1", "dev_accuracy"):
            row[f"{key}_mean"], row[f"{key}_std"] = aggregate._mean_std([r[key] for r in done])
        for key in ("tokens_per_s", "params_trainable", "optimizer_state_numel"):
            row[key] = aggregate._mean_std([r[key] for r in done if r.get(key) is not None])[0]
        rows.append(row)
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
        lines.append(f"- length {length}{aggregate.loss_suffix(r)}: {init} − random = "
                     f"{r['test_accuracy_mean'] - base['test_accuracy_mean']:+.4f} ± {math.sqrt(var):.4f} "
                     "(std of the difference of means)")
    return lines


def best_prompt_method(rows: list[dict], metric: str = "test_accuracy") -> dict | None:
    candidates = [r for r in rows if r["method"] != "full" and r[f"{metric}_mean"] is not None]
    return max(candidates, key=lambda r: r[f"{metric}_mean"], default=None)


def label(r: dict) -> str:
    loss = aggregate.loss_suffix(r)
    if r["method"] == "full":
        return f"full fine-tuning{loss}"
    return f"{r['method']} ({r['init']} init, {r['prompt_length']} tokens{loss})"


def tokenizer_warning(finished: list[dict | None]) -> str | None:
    """A warning when the finished runs saw more than one tokenizer: the same --model "tiny" built under
    another sentencepiece version has another vocabulary, so its rows are not on the same model. Pure."""
    hashes = sorted({r["tokenizer_hash"] for r in finished if r is not None and r.get("tokenizer_hash")})
    if len(hashes) < 2:
        return None
    return (f"Warning: these runs used {len(hashes)} different tokenizers ({', '.join(hashes)}): rows are not all "
            "on the same model and data.")


def to_markdown(rows: list[dict], base: dict, missing: list[tuple[int, dict]], warning: str | None = None) -> str:
    head = ["method", "seeds", "test accuracy", "test macro-F1", "dev accuracy", "vs full FT", "tokens/s",
            "trainable params", "optimizer state"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             f"| majority class ({base['label']}) | – | {base['test_accuracy']:.4f} | {base['test_macro_f1']:.4f} "
             f"| – | – | – | 0 | 0 |"]
    num = lambda v, fmt: "–" if v is None else format(v, fmt)  # noqa: E731
    for r in rows:
        lines.append("| " + " | ".join([
            label(r), f"{r['seeds_finished']}/{r['seeds_expected']}",
            aggregate._pm(r["test_accuracy_mean"], r["test_accuracy_std"]),
            aggregate._pm(r["test_macro_f1_mean"], r["test_macro_f1_std"]),
            aggregate._pm(r["dev_accuracy_mean"], r["dev_accuracy_std"]),
            num(r["vs_full"], ".1%"), num(r["tokens_per_s"], ".0f"), num(r["params_trainable"], ",.0f"),
            num(r["optimizer_state_numel"], ",.0f")]) + " |")
    text = ("Mean ± sample std over finished seeds; test = the best dev step's. Optimizer state: elements "
            "summed over ranks.\n\n" + (f"**{warning}**\n\n" if warning else "") + "\n".join(lines) + "\n")
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


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    return buf.getvalue()


def plot(rows: list[dict], base: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from softprompt.io import atomic_write

    shown = [r for r in rows if r["test_accuracy_mean"] is not None]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(shown) + 1.5), dpi=100)
    y = range(len(shown))
    ax.barh(list(y), [r["test_accuracy_mean"] for r in shown], xerr=[r["test_accuracy_std"] or 0 for r in shown],
            color=["tab:gray" if r["method"] == "full" else "tab:blue" for r in shown], capsize=3)
    ax.set_yticks(list(y), [label(r) for r in shown], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(base["test_accuracy"], color="k", linestyle=":", label="majority class")
    full = next((r["test_accuracy_mean"] for r in shown if r["method"] == "full" and r["loss"] == "plain"), None)
    if full:
        ax.axvline(0.95 * full, color="tab:red", linestyle="--", label="95% of full fine-tuning (plain loss)")
    ax.set_xlabel("test accuracy (mean ± std over seeds)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = sweep._Parser(prog="python -m launcher.quality", description=__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter,
                      usage="%(prog)s --out DIR [options] [-- train.py args]")
    p.add_argument("--out", required=True, help="benchmark directory: quality.json, runs/, then the table and plot")
    p.add_argument("--methods", default=",".join(METHODS), help=f"from {', '.join(METHODS)}")
    p.add_argument("--lengths", default="1,5,20,100", help="prompt lengths for plain prompt tuning")
    p.add_argument("--inits", default=",".join(sweep.INITS), help="prompt inits for plain prompt tuning")
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
                   help="DeepSpeed JSON of residual prompts (AdamW lr 0.03: at 0.3 the MLP branch's "
                        "LayerNorm gain grows 0.3 a step and the prompt runs away)")
    p.add_argument("--full_ds_config", default="ds_configs/zero3_cpu_bf16_full.json",
                   help="DeepSpeed JSON of full fine-tuning (AdamW lr 5e-4: every weight trains)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once, each with the cores split as torch threads, output in OUT/logs/ "
                        "(default 1: one after another, output here)")
    p.add_argument("--dry_run", action="store_true", help="write quality.json and print the commands, run nothing")
    p.add_argument("--report_only", action="store_true",
                   help="run nothing: write the table and plot from the runs that finished (the rest listed as missing)")
    return p


def parse(argv: list[str]):
    """(our flags, the runs, the RunConfig every run's train.py flags give)."""
    own, extra = sweep.split_extra(argv)
    args = build_parser().parse_args(own)
    methods = sweep.choices("--methods", args.methods, METHODS, "method")
    inits = sweep.choices("--inits", args.inits, sweep.INITS, "init")
    balanced = sweep.choices("--balanced", args.balanced, METHODS, "method") if args.balanced.strip() else []
    lengths = sweep._list("--lengths", args.lengths, int)
    method_lengths = sweep._list("--method_lengths", args.method_lengths, int)
    if min(lengths + method_lengths) <= 0 or args.jobs <= 0:
        raise sweep.UsageError("--lengths, --method_lengths and --jobs must be > 0")
    if clash := [a for a in extra if a.split("=")[0] in OWN_FLAGS]:
        raise sweep.UsageError(f"{clash[0].split('=')[0]} is set by the benchmark; remove it after --")
    ds_configs = {"prompt": args.prompt_ds_config, "residual": args.residual_ds_config, "deep": args.deep_ds_config,
                  "full": args.full_ds_config}
    for flag in ("prompt_ds_config", "deep_ds_config", "residual_ds_config", "full_ds_config"):
        if not Path(getattr(args, flag)).is_file():
            raise sweep.UsageError(f"--{flag} {getattr(args, flag)}: file not found")
    from launcher import cli
    from softprompt.config import ConfigError

    try:  # the flags every run gets, checked now rather than after hours of runs
        run_cfg = cli.parse(extra)
    except ConfigError as e:
        raise sweep.UsageError(f"after --: {e}") from None
    out = Path(args.out).resolve()
    return args, expand(methods, lengths, inits, method_lengths, sweep._list("--seeds", args.seeds, int),
                        ds_configs, out, extra, run_cfg.model.model, balanced), run_cfg


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, tasks, run_cfg = parse(argv)
    except sweep.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from softprompt.io import write_json, write_text

    out = Path(args.out).resolve()
    write_json(out / "quality.json", {"tasks": tasks})
    print(f"{out / 'quality.json'}: {len(tasks)} runs")
    failed = 0 if args.report_only else sweep.run_local(tasks, args.dry_run, args.jobs, out / "logs")
    if args.dry_run:
        return 0
    base = majority(run_cfg.data)
    finished = [aggregate.load_task(t) for t in tasks]
    rows = summarize(tasks, finished)
    missing = [(i, t) for i, (t, r) in enumerate(zip(tasks, finished)) if r is None]
    text = to_markdown(rows, base, missing, tokenizer_warning(finished))
    write_text(out / "quality.md", text)
    write_text(out / "quality.csv", to_csv(rows))
    plot(rows, base, out / "quality.png")
    print(text)
    print(f"wrote {out}/quality.md, quality.csv, quality.png")
    return failed


if __name__ == "__main__":
    sys.exit(main())
