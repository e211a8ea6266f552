"""Memory planner for prompt tuning a frozen mT5, and the parallel mode it recommends.

    python -m softprompt.plan --model mt5-xl --gpus 8 --gpu_mem_gb 80 --seq_len 512 --prompt_length 100

Only the prompt trains, so DeepSpeed's estimate_zero3_* (18 B/param) do not apply. Per GPU (or CPU rank):
- replicated (ZeRO stage 0, plain data parallelism): the full frozen weights, params x dtype bytes,
  lm_head included (loaded everywhere though training never reads it); no gathers, no ZeRO buckets.
- zero3: the shard params x dtype bytes / GPUs; the gathered transient, at most the input embedding
  `shared` (vocab x d_model, gathered every forward; never the lm_head: `PromptedMT5` reads the
  verbalizer rows once at build time); the ds_config's prefetch and reduce buckets
  (`stage3_max_live_parameters` caps gathered weights: shown, not added).
- zero3_offload: zero3 with the shard in CPU memory.
- all: prompt + optimizer, layers x prompt_length x d_model x (fp32: 4 param + 4 grad + 8 Adam = 16 B;
  bf16: 2 + 2 + 4 fp32 master + 4 fp32 grad + 8 Adam = 20 B); the activations' peak, linear in the
  micro-batch (softprompt.memory); headroom for the CUDA context, NCCL and fragmentation.

Recommendation: the first of replicated, replicated + activation checkpointing, zero3, zero3 +
checkpointing, zero3_offload, zero3_offload + checkpointing where micro-batch 1 fits, at the largest
micro-batch that fits (and divides the global batch per GPU, when given). Checkpointing costs one
more forward per step; ZeRO-3's per-layer gathers cost more (docs/performance.md), offload more still.
GPU numbers are formulas: the activations are measured on CPU only.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass

from .memory import (DTYPE_BYTES, GIB, MT5, Plan, PlanError, Shape, activation_bytes, activations,  # noqa: F401
                     deepspeed_all_trained, make_plan, param_count, resolve_shape, saved_tensor_bytes,
                     shape_from_hf_config, zero3_knobs)

MODES = ("replicated", "zero3", "zero3_offload")
TEMPLATES = {("gpu", "replicated"): "replicated_bf16", ("gpu", "zero3"): "zero3_bf16",
             ("gpu", "zero3_offload"): "zero3_bf16_offload",
             ("cpu", "replicated"): "replicated_cpu", ("cpu", "zero3"): "zero3_cpu"}
PROMPT_DEPTHS = ("input", "encoder", "all")  # train.py's --prompt_depth
CPU_RANK_OVERHEAD_GB = 1.0  # a rank's process without tensors: Python, torch, DeepSpeed (0.42 GiB measured)


def template(device: str, mode: str) -> dict:
    """The shipped ds_config of a mode."""
    from .dsconfig import load

    return load(TEMPLATES[device, mode])[0]


@dataclass(frozen=True)
class Recommendation:
    """What to run: `mode` in MODES, `config` the shipped template (ds_configs/<config>.json)."""

    mode: str
    config: str
    micro_batch: int
    activation_checkpointing: bool
    gib_per_gpu: float  # predicted peak per GPU (or CPU rank), headroom not included
    reason: str
    gpus_per_node: int
    nodes: int
    seq_len: int
    prompt_length: int
    global_batch: int | None = None
    prompt_depth: str = "input"

    def train_args(self, model: str) -> list[str]:
        args = ["--model", model, "--ds_config", self.config, "--micro_batch", str(self.micro_batch)]
        if self.global_batch:
            args += ["--global_batch", str(self.global_batch)]
        args += ["--max_length", str(self.seq_len), "--prompt_length", str(self.prompt_length)]
        if self.prompt_depth != "input":
            args += ["--prompt_depth", self.prompt_depth]
        return args + (["--activation_checkpointing"] if self.activation_checkpointing else [])

    def command(self, model: str) -> str:
        nodes = ["--num_nodes", str(self.nodes)] if self.nodes > 1 else []
        hosts = ["--hostfile", "hosts"] if self.nodes > 1 else []
        return shlex.join(["deepspeed", *nodes, "--num_gpus", str(self.gpus_per_node), *hosts, "train.py",
                           *self.train_args(model)])

    def sbatch(self, model: str, cpu: bool = False) -> str:
        res = [] if cpu else [f"--gpus-per-node={self.gpus_per_node}"]
        env = f"NPROC_PER_NODE={self.gpus_per_node} " if cpu else ""
        return env + shlex.join(["sbatch", "-N", str(self.nodes), *res, "slurm/train.sbatch", *self.train_args(model)])


def per_gpu_batch(global_batch: int | None, world: int) -> int | None:
    """The global batch's share per GPU (None: no global batch), which micro-batches must divide."""
    if global_batch is None:
        return None
    share, rem = divmod(global_batch, world)
    if rem or not share:
        raise PlanError(f"--global_batch {global_batch} is not a positive multiple of {world} GPUs")
    return share


def choose(plans: list[Plan], share: int | None = None) -> tuple[Plan, bool, int]:
    """(plan, checkpointing, micro-batch): the first plan, without then with checkpointing, where
    micro-batch 1 fits; the largest micro-batch that fits and divides `share` (the global batch per GPU)."""
    for p in plans:
        for ckpt in (False, True):
            fit = p.max_micro_batch(ckpt) if share is None else min(p.max_micro_batch(ckpt), share)
            micro = next((m for m in range(fit, 0, -1) if share is None or share % m == 0), 0)
            if micro:
                return p, ckpt, micro
    last = plans[-1]
    raise PlanError(f"{last.shape.name}: micro-batch 1 fits in no mode: {last.mode} with checkpointing needs "
                    f"{last.total(1, True) / GIB:.1f} GiB per rank, {last.capacity / GIB:.1f} usable")


def _reason(plans: list[Plan], p: Plan, ckpt: bool, micro: int) -> str:
    cap = p.capacity / GIB
    if p.mode == "replicated":
        why = (f"the full weights ({p.fixed['frozen weights (full copy)'] / GIB:.1f} GiB) and micro-batch {micro} "
               f"fit in {cap:.1f} GiB per rank, with no ZeRO-3 all-gathers")
    else:
        why = "; ".join(f"{q.mode} does not fit micro-batch 1 even with checkpointing ({q.total(1, True) / GIB:.1f} "
                        f"GiB > {cap:.1f})" for q in plans[:plans.index(p)]) or f"{p.mode} as asked"
    if ckpt:
        return why + f"; activation checkpointing, as micro-batch 1 needs {p.total(1, False) / GIB:.1f} GiB without it"
    return why + f"; activation checkpointing would fit micro-batch {p.max_micro_batch(True)} at one more forward"


def plans_for(shape: Shape, world: int, mem_gb: float, seq_len: int, prompt_length: int, dtype: str,
              headroom_gb: float, hardware: str = "gpu", prompt_depth: str = "input", modes=MODES,
              ds_config: dict | None = None) -> list[Plan]:
    """The plans of `modes` that have a template, in order of preference; bf16 uses the GPU
    templates, fp32 the fp32 ones (replicated_cpu, zero3_cpu; no offload)."""
    device = "gpu" if hardware == "gpu" and dtype == "bf16" else "cpu"
    return [make_plan(shape, world, mem_gb, seq_len, prompt_length, dtype, m, ds_config or template(device, m),
                      headroom_gb, hardware, prompt_depth) for m in modes if (device, m) in TEMPLATES]


def _recommend(plans: list[Plan], share: int | None, gpus_per_node: int, nodes: int, seq_len: int,
               prompt_length: int, global_batch: int | None, prompt_depth: str) -> Recommendation:
    p, ckpt, micro = choose(plans, share)
    device = "gpu" if p.dtype == "bf16" and p.hardware == "gpu" else "cpu"
    return Recommendation(p.mode, TEMPLATES[device, p.mode], micro, ckpt, p.total(micro, ckpt) / GIB,
                          _reason(plans, p, ckpt, micro), gpus_per_node, nodes, seq_len, prompt_length,
                          global_batch, prompt_depth)


def _check(**positive) -> None:
    for k, v in positive.items():
        if v is not None and v <= 0:
            raise PlanError(f"{k} must be positive, got {v}")


def recommend(shape: Shape, gpus_per_node: int, nodes: int, gpu_mem_gb: float, seq_len: int, prompt_length: int,
              dtype: str = "bf16", global_batch: int | None = None, headroom_gb: float = 3.0,
              prompt_depth: str = "input") -> Recommendation:
    """The parallel mode, micro-batch and checkpointing for GPUs (module docstring); PlanError when
    micro-batch 1 fits in no mode or the global batch does not split over the GPUs."""
    _check(gpus_per_node=gpus_per_node, nodes=nodes, seq_len=seq_len, prompt_length=prompt_length)
    world = gpus_per_node * nodes
    plans = plans_for(shape, world, gpu_mem_gb, seq_len, prompt_length, dtype, headroom_gb, "gpu", prompt_depth)
    return _recommend(plans, per_gpu_batch(global_batch, world), gpus_per_node, nodes, seq_len, prompt_length,
                      global_batch, prompt_depth)


def recommend_cpu(shape: Shape, ranks_per_node: int, nodes: int, host_mem_gb: float, seq_len: int,
                  prompt_length: int, global_batch: int | None = None, headroom_gb: float = 2.0,
                  prompt_depth: str = "input") -> Recommendation:
    """`recommend` for CPU hosts: fp32, `host_mem_gb` per node shared by its ranks (each also costs
    CPU_RANK_OVERHEAD_GB), replicated_cpu or zero3_cpu; `gib_per_gpu` is then per rank."""
    _check(ranks_per_node=ranks_per_node, nodes=nodes, seq_len=seq_len, prompt_length=prompt_length)
    world = ranks_per_node * nodes
    plans = plans_for(shape, world, cpu_rank_gb(host_mem_gb, headroom_gb, ranks_per_node), seq_len, prompt_length,
                      "fp32", 0.0, "cpu", prompt_depth)
    return _recommend(plans, per_gpu_batch(global_batch, world), ranks_per_node, nodes, seq_len, prompt_length,
                      global_batch, prompt_depth)


def cpu_rank_gb(host_mem_gb: float, headroom_gb: float, ranks_per_node: int) -> float:
    """GiB one CPU rank may use: its share of the node after the OS headroom, less its process."""
    return (host_mem_gb - headroom_gb) / ranks_per_node - CPU_RANK_OVERHEAD_GB


def report(plans: list[Plan], rec: Recommendation | None, args) -> list[str]:
    s, b, B, cpu = plans[0].shape, DTYPE_BYTES[args.dtype], args.micro_batch, args.host_mem_gb is not None
    unit = "rank" if cpu else "GPU"
    out = [f"{s.name}: {plans[0].params / 1e9:.2f}B params (d_model {s.d_model}, d_ff {s.d_ff}, {s.num_layers}+"
           f"{s.num_decoder_layers} layers, {s.num_heads} heads, vocab {s.vocab:,}), {args.dtype}",
           (f"{args.gpus} CPU ranks on {args.nodes} node(s) x {args.host_mem_gb:g} GiB: {plans[0].capacity / GIB:.2f} "
            f"GiB per rank after {args.headroom_gb:g} GiB per node and {CPU_RANK_OVERHEAD_GB:g} per rank process"
            if cpu else
            f"{args.gpus} GPUs ({args.nodes} node(s)) x {args.gpu_mem_gb:g} GiB, {args.headroom_gb:g} GiB each kept "
            f"for the CUDA context, NCCL and fragmentation") + f"; {args.prompt_length} prompt + {args.seq_len} "
           f"input tokens, prompt depth {args.prompt_depth}",
           f"  {'per ' + unit + ', GiB':<46}" + "".join(f"{p.mode:>15}" for p in plans)]
    keys = sorted(dict.fromkeys(k for p in plans for k in p.fixed), key=lambda k: k == "prompt + optimizer")
    out += [f"  {k:<46}" + "".join(f"{p.fixed[k] / GIB:15.2f}" if k in p.fixed else f"{'-':>15}" for p in plans)
            for k in keys]
    rows = [("activations at their peak, per sample", lambda p: f"{p.per_sample(False) / GIB:.3f}"),
            ("  the same with activation checkpointing", lambda p: f"{p.per_sample(True) / GIB:.3f}"),
            (f"micro-batch {B}: total without / with ckpt", lambda p: f"{p.total(B, False) / GIB:.1f} / "
                                                                      f"{p.total(B, True) / GIB:.1f}"),
            ("largest micro-batch that fits: without / with", lambda p: f"{p.max_micro_batch(False)} / "
                                                                        f"{p.max_micro_batch(True)}")]
    out += [f"  {label:<46}" + "".join(f"{f(p):>15}" for p in plans) for label, f in rows]
    for p in plans:
        if p.offloaded:
            out.append(f"  (zero3_offload: {p.offloaded / GIB:.2f} GiB of weights in CPU memory per GPU)")
    z = next((p for p in plans if p.mode != "replicated"), None)
    if z:
        out.append(f"  (lm_head: rows read once at build, never gathered; stage3_max_live_parameters, a cap, not "
                   f"added: {zero3_knobs(args.ds)['stage3_max_live_parameters'] * b / GIB:.2f} GiB)")
        dsp = deepspeed_all_trained(z.params, s.vocab * s.d_model, args.gpus, z.mode == "zero3_offload")
        out.append(f"DeepSpeed estimate_zero3_model_states_mem_needs (every parameter trained, 18 B/param): "
                   f"{dsp / GIB:.2f} GiB per GPU for model states; frozen-aware {z.mode}: "
                   f"{sum(z.fixed.values()) / GIB:.2f} GiB")
    if rec is None:
        return out
    ckpt = " with activation checkpointing" if rec.activation_checkpointing else ""
    model = f"google/{s.name}" if args.model.lower().removeprefix("google/") in MT5 else args.model
    return out + [f"Recommendation: {rec.mode}{ckpt}, micro-batch {rec.micro_batch} per {unit}, "
                  f"{rec.gib_per_gpu:.1f} GiB per {unit} predicted (--ds_config {rec.config})",
                  f"  why: {rec.reason}", f"  {rec.command(model)}",
                  f"  or under Slurm, from the repository root: {rec.sbatch(model, cpu)}"]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m softprompt.plan",
        description="Per-GPU memory of prompt tuning a frozen mT5 replicated (ZeRO stage 0), under ZeRO-3 and "
                    "ZeRO-3 with offload, and the recommended mode, micro-batch, activation checkpointing and "
                    "command. Formulas: python -c 'import softprompt.plan, softprompt.memory; "
                    "help(softprompt.plan); help(softprompt.memory)'.")
    ap.add_argument("--model", default="mt5-xl",
                    help=f"one of {', '.join(MT5)}, or a local model directory / config.json")
    ap.add_argument("--gpus", type=int, default=8, help="total GPUs (CPU ranks with --host_mem_gb) over all nodes")
    ap.add_argument("--nodes", type=int, default=1, help="nodes the GPUs are spread over (they divide --gpus)")
    ap.add_argument("--gpu_mem_gb", type=float, default=80, help="memory per GPU, GiB")
    ap.add_argument("--host_mem_gb", type=float,
                    help="plan for CPU hosts instead: memory per node, GiB, shared by its ranks (fp32)")
    ap.add_argument("--headroom_gb", type=float,
                    help="GiB kept free per GPU for the CUDA context, NCCL buffers and fragmentation (default 3), or "
                         "per node for the OS with --host_mem_gb (default 2)")
    ap.add_argument("--seq_len", type=int, default=512, help="input tokens per example (padded length; "
                                                             "train.py's --max_length)")
    ap.add_argument("--prompt_length", type=int, default=100, help="soft prompt tokens")
    ap.add_argument("--prompt_depth", choices=PROMPT_DEPTHS, default="input", help="as train.py's --prompt_depth")
    ap.add_argument("--global_batch", type=int, help="the run's global batch: the micro-batch must divide its "
                                                     "share per GPU")
    ap.add_argument("--micro_batch", type=int, help="micro-batch per GPU to cost (default: the ds_config's "
                                                    "train_micro_batch_size_per_gpu, else 1)")
    ap.add_argument("--mode", choices=("auto", *MODES), default="auto",
                    help="recommend among all modes (auto) or only checkpointing and micro-batch for this one")
    ap.add_argument("--offload", action="store_true",
                    help="same as --mode zero3_offload; implied by the ds_config's offload_param")
    ap.add_argument("--dtype", choices=DTYPE_BYTES, help="frozen weights and activations (default bf16; fp32 on CPU)")
    ap.add_argument("--ds_config",
                    help="DeepSpeed JSON for the ZeRO-3 bucket sizes (default: the shipped template of each mode)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cpu = args.host_mem_gb is not None
    args.dtype = args.dtype or ("fp32" if cpu else "bf16")
    args.headroom_gb = (2.0 if cpu else 3.0) if args.headroom_gb is None else args.headroom_gb
    mem, flag = (args.host_mem_gb, "--host_mem_gb") if cpu else (args.gpu_mem_gb, "--gpu_mem_gb")
    try:
        _check(**{f"--{k}": getattr(args, k) for k in ("gpus", "nodes", "seq_len", "prompt_length", "micro_batch",
                                                        "global_batch", "host_mem_gb")})
        if args.gpus % args.nodes:
            raise PlanError(f"--gpus {args.gpus} is not a multiple of --nodes {args.nodes}")
        if cpu and args.dtype != "fp32":
            raise PlanError("--dtype bf16 with --host_mem_gb: CPU hosts are planned in fp32 (the CPU templates)")
        if mem <= args.headroom_gb:
            raise PlanError(f"{flag} {mem:g} must exceed --headroom_gb {args.headroom_gb:g}")
        args.ds = {}
        if args.ds_config:
            from .config import ConfigError
            from .dsconfig import load

            try:
                args.ds = load(args.ds_config)[0]
            except ConfigError as e:
                raise PlanError(str(e)) from None
        if args.offload or args.ds.get("zero_optimization", {}).get("offload_param", {}).get("device") == "cpu":
            if args.mode not in ("auto", "zero3_offload"):
                raise PlanError(f"--offload (or the ds_config's offload_param) contradicts --mode {args.mode}")
            args.mode = "zero3_offload"
        per_node, share = args.gpus // args.nodes, per_gpu_batch(args.global_batch, args.gpus)
        plans = plans_for(resolve_shape(args.model), args.gpus,
                          cpu_rank_gb(mem, args.headroom_gb, per_node) if cpu else mem, args.seq_len,
                          args.prompt_length, args.dtype, 0.0 if cpu else args.headroom_gb, "cpu" if cpu else "gpu",
                          args.prompt_depth, [m for m in MODES if args.mode in ("auto", m)], args.ds)
        if not plans:
            raise PlanError(f"--mode {args.mode}: no shipped {args.dtype} template for it")
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.ds = args.ds or template("gpu" if args.dtype == "bf16" and not cpu else "cpu", "zero3")
    micro = args.micro_batch or args.ds.get("train_micro_batch_size_per_gpu")
    args.micro_batch = micro if isinstance(micro, int) else 1
    try:
        rec = _recommend(plans, share, per_node, args.nodes, args.seq_len, args.prompt_length, args.global_batch,
                         args.prompt_depth)
    except PlanError as e:  # nothing fits: the table says by how much
        print("\n".join(report(plans, None, args)) + f"\nRecommendation: none: {e}")
        return 1
    print("\n".join(report(plans, rec, args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
