"""ZeRO-3 scaling: per-sample cost of 2 ranks against 1 rank at the same per-rank batch.

    python -m benchmarks.scaling                          # tiny mT5, ds_configs/zero3_cpu.json, micro-batch 16
    python -m benchmarks.scaling --max_steps 60 -- --max_length 64   # after --: more train.py flags

Runs `train.py` under the deepspeed launcher with --num_gpus 1, then 2, from the same ds_config
with `train_micro_batch_size_per_gpu` set and no accumulation (global batch = micro x ranks), and
reads each run's metrics.jsonl. The first log window is warm-up and skipped; the median of the
others is taken, so a burst of load from other processes on a shared machine moves it little.

Per-sample cost = ranks x wall time per sample (rank-seconds per sample): equal costs mean 2 ranks
process twice the samples per second. Each rank gets the same --threads_per_rank on CPU, so a rank
is the same "device" in both runs (on a 2-core machine: 1 rank on 1 core, then 2 ranks on 2).
The last line is the ratio 2-rank / 1-rank.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from launcher import args as cli_args

ROOT = Path(__file__).resolve().parents[1]


def parser() -> cli_args.Parser:
    ap = cli_args.Parser(prog="python -m benchmarks.scaling", description=__doc__.split("\n\n")[0],
                         epilog="Arguments after -- go to train.py as they are.")
    ap.add_argument("--model", default="tiny", help="train.py --model")
    ap.add_argument("--ds_config", default=str(ROOT / "ds_configs" / "zero3_cpu.json"),
                    help="the ZeRO-3 config both runs share (its batch sizes are replaced)")
    ap.add_argument("--micro_batch", type=int, default=16, help="per-rank batch, both runs")
    ap.add_argument("--max_steps", type=int, default=40, help="optimizer steps per run")
    ap.add_argument("--log_every", type=int, default=5, help="steps per measured window")
    ap.add_argument("--threads_per_rank", type=int, default=1, help="OMP_NUM_THREADS of every rank (CPU)")
    cli_args.add_output_dir(ap, "where the runs write (default: a temporary directory)")
    return ap


def ds_config(base: dict, micro_batch: int) -> dict:
    """The base config with only the micro-batch given: the global batch follows the world size."""
    cfg = {k: v for k, v in base.items() if k not in ("train_batch_size", "gradient_accumulation_steps")}
    return {**cfg, "train_micro_batch_size_per_gpu": micro_batch}


def launch(ranks: int, config: Path, out: Path, args, train_args: list[str]) -> None:
    from softprompt.dist import free_port  # imports torch: not at module level, for a fast --help

    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
           "--master_port", str(free_port()), str(ROOT / "train.py"),
           f"--model={args.model}", f"--ds_config={config}", f"--output_dir={out}",
           f"--max_steps={args.max_steps}", f"--log_every={args.log_every}",
           f"--eval_every={args.max_steps}", "--quiet", *train_args]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads_per_rank),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{ranks}-rank run failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def measure(out: Path) -> tuple[int, float, float]:
    """(windows, median step time s, median samples/s) over the log windows after the first."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "train/samples_per_s" in r][1:]  # the first: warm-up
    if not windows:
        raise RuntimeError(f"{out}: no train windows after the first; raise --max_steps or lower --log_every")
    return (len(windows), statistics.median(r["train/step_time_s"] for r in windows),
            statistics.median(r["train/samples_per_s"] for r in windows))


def main(argv: list[str] | None = None) -> int:
    ours, train_args = cli_args.split_extra(sys.argv[1:] if argv is None else argv)
    try:
        args = parser().parse_args(ours)
    except cli_args.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bad = [f"--{k} must be positive" for k in ("micro_batch", "max_steps", "log_every", "threads_per_rank")
           if getattr(args, k) <= 0]
    if args.max_steps < 2 * args.log_every:
        bad.append("--max_steps must cover 2 log windows (the first is warm-up)")
    if bad:
        print(f"error: {bad[0]}", file=sys.stderr)
        return 2
    base = json.loads(Path(args.ds_config).read_text())
    root = Path(args.output_dir or tempfile.mkdtemp(prefix="softprompt-scaling-"))
    if any((root / f"ranks{n}").exists() for n in (1, 2)):  # train.py would resume or mix runs there
        print(f"error: {root} already holds runs; give a new --output_dir", file=sys.stderr)
        return 2
    cost = {}
    for ranks in (1, 2):
        out = root / f"ranks{ranks}"
        config = root / f"ds_ranks{ranks}.json"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(json.dumps(ds_config(base, args.micro_batch), indent=2))
        try:
            launch(ranks, config, out, args, train_args)
            n, step_s, samples_s = measure(out)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        cost[ranks] = ranks / samples_s
        print(f"{ranks} rank{'s' if ranks > 1 else ''}: micro-batch {args.micro_batch}, {args.threads_per_rank} "
              f"thread(s) per rank, stage {base.get('zero_optimization', {}).get('stage', 0)}: "
              f"step {step_s:.4f} s, {samples_s:.1f} samples/s, {cost[ranks] * 1e3:.2f} rank-ms per sample "
              f"(median of {n} windows of {args.log_every} steps)")
    print(f"2-rank/1-rank per-sample cost: {cost[2] / cost[1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
