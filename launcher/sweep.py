"""Prompt-length scaling study: models x inits x prompt lengths x seeds, one training run each.

    python -m launcher.sweep --lengths 1,5,20,50,100,150 --seeds 0,1,2 --models google/mt5-base,google/mt5-xl \
        --out runs/sweep -- --ds_config ds_configs/zero3_bf16.json --dataset inews

writes runs/sweep/sweep.json (one entry per task: its grid point, output dir and train.py args) and
submits ONE Slurm job array, `sbatch --array=0-(N-1)%K slurm/sweep.sbatch runs/sweep/sweep.json`,
whose task i runs entry i. `--local` runs the same entries one after another without Slurm.
`python -m launcher.aggregate runs/sweep` then summarizes and plots them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INITS = ("random", "vocab", "labels")
# Set by the grid for every task, so they cannot also come after `--`.
GRID_FLAGS = ("--model", "--prompt_init", "--prompt_length", "--seed", "--output_dir", "--resume")


class UsageError(ValueError):
    """Bad command-line input: one line on stderr, exit code 2."""


def expand(models: list[str], inits: list[str], lengths: list[int], seeds: list[int], out: Path,
           extra: list[str]) -> list[dict]:
    """The grid, one task per (model, init, length, seed), seeds innermost. Pure."""
    tasks = []
    for model in models:
        for init in inits:
            for length in lengths:
                for seed in seeds:
                    i = len(tasks)
                    name = f"{i:03d}_{Path(model).name}_{init}_len{length}_seed{seed}"
                    tasks.append({
                        "model": model, "init": init, "prompt_length": length, "seed": seed,
                        "output_dir": str(out / "runs" / name),
                        "args": ["--model", model, "--prompt_init", init, "--prompt_length", str(length),
                                 "--seed", str(seed), "--quiet", *extra],
                    })
    return tasks


def _list(flag: str, text: str, kind=str) -> list:
    items = [s.strip() for s in text.split(",")]
    if not text.strip() or not all(items):
        raise UsageError(f"{flag} needs a comma-separated list, got {text!r}")
    try:
        values = [kind(s) for s in items]
    except ValueError:
        raise UsageError(f"{flag}: {text!r} is not a list of integers") from None
    if len(set(values)) != len(values):
        raise UsageError(f"{flag}: {text!r} repeats a value")
    return values


def split_extra(argv: list[str]) -> tuple[list[str], list[str]]:
    """(our flags, the train.py flags after `--`)."""
    return (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])


def choices(flag: str, text: str, allowed: tuple[str, ...], noun: str) -> list[str]:
    """A comma-separated list whose every item is one of `allowed` (a `noun`, in the error)."""
    values = _list(flag, text)
    if unknown := [v for v in values if v not in allowed]:
        raise UsageError(f"{flag}: unknown {noun} {unknown[0]!r} (choose from {', '.join(allowed)})")
    return values


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m launcher.sweep", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter,
                usage="%(prog)s --lengths L,.. --seeds S,.. --models M,.. --out DIR [options] [-- train.py args]")
    p.add_argument("--lengths", required=True, help="prompt lengths, e.g. 1,5,20,50,100,150")
    p.add_argument("--seeds", required=True, help="seeds, e.g. 0,1,2")
    p.add_argument("--models", required=True, help="HF hub ids or local model dirs (or 'tiny'), comma-separated")
    p.add_argument("--inits", default="random", help=f"prompt inits, from {', '.join(INITS)}")
    p.add_argument("--out", required=True, help="sweep directory: sweep.json, runs/, logs/, then the summary")
    p.add_argument("--max_concurrent", type=int, default=0,
                   help="at most K array tasks running at once (0 = no limit)")
    p.add_argument("--dry_run", action="store_true", help="write sweep.json and print the command, submit nothing")
    p.add_argument("--local", action="store_true",
                   help="run the tasks here, one after another, without Slurm (finished tasks are skipped)")
    return p


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[dict]]:
    own, extra = split_extra(argv)
    args = build_parser().parse_args(own)
    inits = choices("--inits", args.inits, INITS, "init")
    lengths = _list("--lengths", args.lengths, int)
    if min(lengths) <= 0:
        raise UsageError(f"--lengths must be > 0, got {args.lengths}")
    if args.max_concurrent < 0:
        raise UsageError(f"--max_concurrent must be >= 0, got {args.max_concurrent}")
    if clash := [a for a in extra if a.split("=")[0] in GRID_FLAGS]:
        raise UsageError(f"{clash[0].split('=')[0]} is set by the sweep; remove it after --")
    out = Path(args.out).resolve()
    return args, expand(_list("--models", args.models), inits, lengths, _list("--seeds", args.seeds, int), out,
                        extra)


def sbatch_command(sweep_json: Path, n_tasks: int, max_concurrent: int) -> list[str]:
    limit = f"%{max_concurrent}" if max_concurrent else ""
    logs = sweep_json.parent / "logs"
    return ["sbatch", "--parsable", f"--array=0-{n_tasks - 1}{limit}", f"--chdir={ROOT}",
            f"--output={logs}/%A_%a.out", str(ROOT / "slurm" / "sweep.sbatch"), str(sweep_json)]


def run_local(tasks: list[dict], dry_run: bool) -> int:
    from .aggregate import describe

    failed = []
    for i, task in enumerate(tasks):
        cmd = [sys.executable, "train.py", *task["args"], "--output_dir", task["output_dir"]]
        if dry_run:
            print(" ".join(cmd))
            continue
        if (Path(task["output_dir"]) / "results.json").exists():
            print(f"task {i}: done already ({task['output_dir']})")
            continue
        print(f"task {i}/{len(tasks)}: {describe(task)}", flush=True)
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            failed.append(i)
    if failed:
        print(f"error: {len(failed)} of {len(tasks)} tasks failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    try:
        args, tasks = parse(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    sweep_json = out / "sweep.json"
    from softprompt.checkpoint import write_json

    write_json(sweep_json, {"tasks": tasks})
    print(f"{sweep_json}: {len(tasks)} tasks")
    if args.local:
        return run_local(tasks, args.dry_run)

    cmd = sbatch_command(sweep_json, len(tasks), args.max_concurrent)
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    (out / "logs").mkdir(exist_ok=True)  # Slurm does not create the log directory
    # The sweep's name groups its runs in W&B; each task's own run id is keyed on its array task.
    env = {**os.environ, "WANDB_RUN_GROUP": os.environ.get("WANDB_RUN_GROUP", out.name)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"error: sbatch failed: {proc.stderr.strip()}", file=sys.stderr)
        return 1
    job_id = proc.stdout.strip().split(";")[0]
    write_json(sweep_json, {"job_id": job_id, "tasks": tasks})
    print(f"submitted job array {job_id}; logs in {out / 'logs'}; when it is done: python -m launcher.aggregate {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
