"""Prompt-length scaling study: models x prompt depths x learning rates x inits x prompt lengths x seeds,
one training run each.

    python -m launcher.sweep --lengths 1,5,20,50,100,150 --seeds 0,1,2 --models google/mt5-base,google/mt5-xl \
        --output_dir runs/sweep -- --ds_config ds_configs/zero3_bf16.json --dataset inews

writes runs/sweep/sweep.json (one entry per task: its grid point, output dir and train.py args) and
submits ONE Slurm job array, `sbatch --array=0-(N-1)%K slurm/sweep.sbatch runs/sweep/sweep.json`,
whose task i runs entry i. `--local` runs the same entries here without Slurm, `--jobs` at a time.
`--lrs` sweeps train.py's --lr (the DeepSpeed JSON's optimizer lr must be "auto"), `--depths` its
--prompt_depth. `python -m launcher.aggregate runs/sweep` then summarizes and plots them.
"""

from __future__ import annotations

import itertools
import os
import shlex
import subprocess
import sys
import time
import typing
from pathlib import Path

from launcher import args as cli_args
from launcher.args import UsageError
from softprompt.config import PromptDepth, PromptInit

ROOT = Path(__file__).resolve().parents[1]
PROMPT_DEPTHS = typing.get_args(PromptDepth)
INITS = typing.get_args(PromptInit)
# Set by the grid for every task, so they cannot also come after `--`.
GRID_FLAGS = ("--model", "--prompt_init", "--prompt_length", "--seed", "--lr", "--prompt_depth", "--output_dir",
              "--resume")


def expand(models: list[str], inits: list[str], lengths: list[int], seeds: list[int], out: Path,
           extra: list[str], lrs: list[float | None] = (None,), depths: list[str] = ("input",)) -> list[dict]:
    """The grid, one task per (model, depth, lr, init, length, seed), seeds innermost; lr None: the
    DeepSpeed JSON's. Task names carry the lr and the depth when the grid has several. Pure."""
    tasks = []
    for model, depth, lr, init, length, seed in itertools.product(models, depths, lrs, inits, lengths, seeds):
        axes = (f"_lr{lr}" if len(lrs) > 1 else "") + (f"_{depth}" if len(depths) > 1 else "")
        name = f"{len(tasks):03d}_{Path(model).name}_{init}_len{length}{axes}_seed{seed}"
        tasks.append({
            "model": model, "init": init, "prompt_length": length, "seed": seed, "lr": lr, "prompt_depth": depth,
            "output_dir": str(out / "runs" / name),
            "args": ["--model", model, "--prompt_init", init, "--prompt_length", str(length), "--seed", str(seed),
                     *(["--lr", str(lr)] if lr is not None else []), "--prompt_depth", depth, "--quiet", *extra],
        })
    return tasks


def build_parser() -> cli_args.Parser:
    p = cli_args.Parser(prog="python -m launcher.sweep", description=__doc__,
                        usage="%(prog)s --lengths L,.. --seeds S,.. --output_dir DIR [options] [-- train.py args]")
    p.add_argument("--lengths", required=True, help="prompt lengths, e.g. 1,5,20,50,100,150")
    p.add_argument("--seeds", required=True, help="seeds, e.g. 0,1,2")
    p.add_argument("--models", default="tiny", help="HF hub ids or local model dirs (or 'tiny'), comma-separated")
    p.add_argument("--inits", default="random", help=f"prompt inits, comma-separated, from {', '.join(INITS)}")
    p.add_argument("--lrs", help="learning rates, comma-separated, passed as train.py --lr (which needs "
                                 "\"lr\": \"auto\" in the DeepSpeed JSON); unset: the JSON's own lr, no lr axis")
    p.add_argument("--depths", default="input",
                   help=f"prompt depths (train.py --prompt_depth), comma-separated, from {', '.join(PROMPT_DEPTHS)}")
    cli_args.add_output_dir(p, "sweep directory: sweep.json, runs/, logs/, then the summary")
    p.add_argument("--max_concurrent", type=int, default=0,
                   help="at most K array tasks running at once (0 = no limit)")
    p.add_argument("--dry_run", action="store_true", help="write sweep.json and print the command, submit nothing")
    p.add_argument("--local", action="store_true",
                   help="run the tasks here without Slurm, --jobs at a time (finished tasks are skipped)")
    p.add_argument("--jobs", type=int, default=1,
                   help="with --local: tasks at once; above 1 each gets the cores split as torch threads and "
                        "writes its output to OUTPUT_DIR/logs/")
    return p


def parse(argv: list[str]) -> tuple:
    """(our flags, the tasks)."""
    own, extra = cli_args.split_extra(argv)
    args = build_parser().parse_args(own)
    cli_args.require(args, "--output_dir")
    inits = cli_args.choices("--inits", args.inits, INITS, "init")
    depths = cli_args.choices("--depths", args.depths, PROMPT_DEPTHS, "prompt depth")
    lengths = cli_args.parse_list("--lengths", args.lengths, int)
    if min(lengths) <= 0:
        raise UsageError(f"--lengths must be > 0, got {args.lengths}")
    lrs = [None] if args.lrs is None else cli_args.parse_list("--lrs", args.lrs, float)
    if lrs != [None] and min(lrs) <= 0:
        raise UsageError(f"--lrs must be > 0, got {args.lrs}")
    if args.jobs < 1 or (args.jobs > 1 and not args.local):
        raise UsageError(f"--jobs must be >= 1 and is for --local runs, got --jobs {args.jobs}")
    if args.max_concurrent < 0:
        raise UsageError(f"--max_concurrent must be >= 0, got {args.max_concurrent}")
    cli_args.reject(extra, GRID_FLAGS, "the sweep")
    out = Path(args.output_dir).resolve()
    return args, expand(cli_args.parse_list("--models", args.models), inits, lengths,
                        cli_args.parse_list("--seeds", args.seeds, int), out, extra, lrs, depths)


def sbatch_command(sweep_json: Path, n_tasks: int, max_concurrent: int) -> list[str]:
    limit = f"%{max_concurrent}" if max_concurrent else ""
    logs = sweep_json.parent / "logs"
    return ["sbatch", "--parsable", f"--array=0-{n_tasks - 1}{limit}", f"--chdir={ROOT}",
            f"--output={logs}/%A_%a.out", str(ROOT / "slurm" / "sweep.sbatch"), str(sweep_json)]


def run_local(tasks: list[dict], dry_run: bool, jobs: int = 1, log_dir: Path | None = None,
              env: dict | None = None) -> int:
    """Run the tasks here, in `env` (default: ours), `jobs` at a time, skipping finished ones; 1 if any
    failed. With jobs > 1 each task writes its output to log_dir/<run name>.log and gets the cores split
    `jobs` ways as torch threads (OMP_NUM_THREADS, unless set): a small model keeps one thread busier
    than several, so parallel runs get more done than threads within one run."""
    from launcher.aggregate import describe

    todo = []
    for i, task in enumerate(tasks):
        # --resume auto: a run stopped by a signal (it checkpoints and exits 75) goes on where it stopped.
        cmd = [sys.executable, "train.py", *task["args"], "--output_dir", task["output_dir"], "--resume", "auto"]
        if dry_run:
            print(shlex.join(cmd))
        elif (Path(task["output_dir"]) / "results.json").exists():
            print(f"task {i}: done already ({task['output_dir']})")
        else:
            todo.append((i, task, cmd))
    env = dict(os.environ if env is None else env)
    if jobs > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, os.cpu_count() // jobs)))
        log_dir.mkdir(parents=True, exist_ok=True)
    failed, running = [], {}  # running: Popen -> (task index, its log file or None)
    try:
        while todo or running:
            while todo and len(running) < jobs:
                i, task, cmd = todo.pop(0)
                log = log_dir / f"{Path(task['output_dir']).name}.log" if jobs > 1 else None
                print(f"task {i}/{len(tasks)}: {describe(task)}" + (f" (output: {log})" if log else ""), flush=True)
                out = log.open("w") if log else None
                running[subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=out)] = (i, out)
            time.sleep(0.2)
            for proc in [p for p in running if p.poll() is not None]:
                i, out = running.pop(proc)
                if out:
                    out.close()
                if proc.returncode != 0:
                    failed.append(i)
                    print(f"task {i} failed (exit {proc.returncode})", file=sys.stderr, flush=True)
    finally:  # Ctrl-C or an error here: stop what still runs
        for proc in running:
            proc.terminate()
            proc.wait()
    if failed:
        print(f"error: {len(failed)} of {len(tasks)} tasks failed: {sorted(failed)}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    try:
        args, tasks = parse(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.output_dir).resolve()
    sweep_json = out / "sweep.json"
    from softprompt.io import write_json

    write_json(sweep_json, {"tasks": tasks})
    print(f"{sweep_json}: {len(tasks)} tasks")
    # The sweep's name groups its runs in W&B (train.py records $WANDB_RUN_GROUP as the run's group);
    # under Slurm each task's own run id is keyed on its array task (slurm/train.sbatch).
    env = {**os.environ, "WANDB_RUN_GROUP": os.environ.get("WANDB_RUN_GROUP", out.name)}
    if args.local:
        return run_local(tasks, args.dry_run, args.jobs, out / "logs", env)

    cmd = sbatch_command(sweep_json, len(tasks), args.max_concurrent)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    (out / "logs").mkdir(exist_ok=True)  # Slurm does not create the log directory
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
