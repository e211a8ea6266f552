"""Per-GPU memory planner for prompt tuning a frozen mT5 under ZeRO-3 (frozen-aware).

    python -m softprompt.plan --model mt5-xxl --gpus 8 --gpu_mem_gb 80 --seq_len 512 --prompt_length 100

DeepSpeed's `estimate_zero3_*` assume every parameter trains (18 B/param of weights, gradients and
Adam state). Here only the prompt trains, so per GPU the budget is:

- frozen weight shard: params x dtype bytes / GPUs (0 on the GPU with `--offload`);
- gathered transient: ZeRO-3 gathers each module's full weights for its forward. The largest is the
  input embedding `shared` (vocab x d_model), gathered every forward. The lm_head, as large, is never
  gathered during training: `PromptedMT5` reads the verbalizer rows once at build time;
- DeepSpeed buffers from the ds_config: prefetch bucket and reduce bucket (elements x dtype bytes);
  `stage3_max_live_parameters` is a cap on gathered weights, shown but not added;
- prompt + optimizer: prompt_length x d_model x (fp32: 4 param + 4 grad + 8 Adam = 16 B;
  bf16: 2 param + 2 grad + 4 fp32 master + 4 fp32 grad + 8 Adam = 20 B);
- activations: what autograd saves for the backward, plus one encoder layer's worth as the
  backward's working set.

Activation formula (bytes; measured against the tensors autograd saves, see tests/test_plan.py).
B micro-batch, L = prompt_length + seq_len encoder tokens, N = B x L, b activation dtype bytes,
d d_model, i = heads x d_kv, f d_ff, h heads. Frozen weights mean a Linear saves nothing (the input
gradient needs only the weight), so per token and layer what remains is:
    rmsnorm  ln = d*4 + 4: its input and the fp32 rsqrt. The input is fp32 even in bf16: HF keeps
        T5's FFN output projection `wo` in fp32 (`_keep_in_fp32_modules`), so the residual stream
        the norms read is fp32 (measured; softprompt/kernels.py fuses the norm itself)
    encoder layer = N*(2*ln + A*i*b + F*f*b) + B*h*L*L*b + attention extra
        GPU (HF's SDPA): A = 4 (q, k, v, out), plus the fp32 logsumexp N*4*h and its float mask:
        relative position bias + padding mask, (B, h, L, L) per layer. CPU (kernels.py's
        matmul-softmax-matmul): A = 3 (q, k, v) and the softmax output, (B, h, L, L). F = 3 for
        gated-gelu (mT5, T5 v1.1: the fused GELU's input, wi_1's output, their product), 1 for relu.
    decoder, per layer: cross-attention K and V over all encoder tokens N*2*i*b, plus one
        decoder step B*(3*ln + 6*i*b + 8*h + F*f*b + h*L*b) (GPU; on CPU 4*i*b, no logsumexp).
    no checkpointing:   n_enc*encoder_layer + N*ln (final norm) + n_dec*decoder_layer
    with checkpointing (HF gradient checkpointing, every block): the block inputs
        (n_enc + 1)*N*d*b + n_dec*B*d*b, plus the final norm, plus one block recomputed in the backward.
Everything scales linearly in B, so the largest micro-batch that fits is a division. CUDA's
mem-efficient SDPA also keeps the bias; flash kernels cannot take T5's bias and are not used.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
FF_SAVED = {"gated-gelu": 3, "relu": 1}  # (B, L, d_ff) tensors saved per feed-forward, measured
REPO_DS_CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"


class PlanError(ValueError):
    """Bad input: reported as one line, exit 2."""


@dataclass(frozen=True)
class Shape:
    name: str
    vocab: int
    d_model: int
    d_ff: int
    num_layers: int
    num_decoder_layers: int
    num_heads: int
    d_kv: int
    feed_forward_proj: str = "gated-gelu"
    tied: bool = False
    num_buckets: int = 32

    @property
    def inner(self) -> int:
        return self.num_heads * self.d_kv


# From the google/mt5-* config.json files (all: vocab 250112, d_kv 64, gated-gelu, untied lm_head).
MT5 = {
    name: Shape(name, 250112, d, ff, n, n, h, 64)
    for name, d, ff, n, h in [
        ("mt5-small", 512, 1024, 8, 6),
        ("mt5-base", 768, 2048, 12, 12),
        ("mt5-large", 1024, 2816, 24, 16),
        ("mt5-xl", 2048, 5120, 24, 32),
        ("mt5-xxl", 4096, 10240, 24, 64),
    ]
}


def shape_from_config(path: str | Path) -> Shape:
    """A Shape from a local model directory (or its config.json)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        c = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PlanError(f"--model {path}: cannot read a config.json ({e})") from None
    proj = c.get("feed_forward_proj", "relu")
    if proj not in FF_SAVED:
        raise PlanError(f"--model {path}: feed_forward_proj {proj!r} not modelled (expected {list(FF_SAVED)})")
    try:
        return Shape(path.name, c["vocab_size"], c["d_model"], c["d_ff"], c["num_layers"],
                     c.get("num_decoder_layers") or c["num_layers"], c["num_heads"], c["d_kv"], proj,
                     c.get("tie_word_embeddings", True), c.get("relative_attention_num_buckets", 32))
    except KeyError as e:
        raise PlanError(f"--model {path}: config.json has no {e.args[0]!r}") from None


def resolve_shape(model: str) -> Shape:
    key = model.lower().removeprefix("google/")
    if key in MT5:
        return MT5[key]
    if Path(model).exists():
        return shape_from_config(model)
    raise PlanError(f"--model {model}: not one of {', '.join(MT5)} and no such config.json or directory")


def param_count(s: Shape) -> int:
    ff = (3 if s.feed_forward_proj.startswith("gated") else 2) * s.d_model * s.d_ff
    bias = s.num_buckets * s.num_heads  # relative position bias, first block of each stack
    enc = s.num_layers * (4 * s.d_model * s.inner + ff + 2 * s.d_model) + s.d_model + bias
    dec = s.num_decoder_layers * (8 * s.d_model * s.inner + ff + 3 * s.d_model) + s.d_model + bias
    return s.vocab * s.d_model * (1 if s.tied else 2) + enc + dec


def _per_sample_terms(s: Shape, enc_tokens: int, b: int, gpu: bool = True) -> dict[str, float]:
    """Activation bytes per sample (B = 1) by component; the formula in the module docstring.
    `gpu`: HF's SDPA attention (GPUs) rather than kernels.py's CPU attention."""
    L, d, i, h, f = enc_tokens, s.d_model, s.inner, s.num_heads, s.d_ff
    F = FF_SAVED[s.feed_forward_proj]
    ln = d * 4 + 4  # fp32 residual stream, also in bf16 (docstring)
    attn = (4 * i * b + 4 * h) if gpu else 3 * i * b  # per token: q, k, v (+ out and logsumexp on GPU)
    enc_layer = L * (2 * ln + attn + F * f * b) + h * L * L * b
    dec_layer = L * 2 * i * b + (3 * ln + (6 * i * b + 8 * h if gpu else 4 * i * b) + F * f * b + h * L * b)
    return {"enc_layer": enc_layer, "dec_layer": dec_layer, "final_norm": L * ln,
            "ckpt_inputs": (s.num_layers + 1) * L * d * b + s.num_decoder_layers * d * b}


def activation_bytes(s: Shape, micro_batch: int, enc_tokens: int, b: int, checkpointing: bool,
                     gpu: bool = True) -> float:
    """Bytes autograd keeps for the backward of one micro-batch (docstring formula)."""
    t = _per_sample_terms(s, enc_tokens, b, gpu)
    if checkpointing:
        per = t["ckpt_inputs"] + t["final_norm"] + max(t["enc_layer"], t["dec_layer"])
    else:
        per = s.num_layers * t["enc_layer"] + t["final_norm"] + s.num_decoder_layers * t["dec_layer"]
    return micro_batch * per


def saved_tensor_bytes(module, step) -> int:
    """Measured activations: bytes of the distinct tensors autograd saves while `step()` builds the
    loss (parameters and buffers of `module` excluded), then runs its backward."""
    import torch

    own = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return sum(seen.values())


@dataclass(frozen=True)
class Plan:
    shape: Shape
    params: int
    gpus: int
    capacity: float  # bytes usable per GPU (card minus headroom)
    fixed: dict[str, float]  # bytes per GPU that do not depend on the micro-batch
    per_sample: dict[bool, float]  # checkpointing -> activation + backward working set, bytes per sample
    deepspeed_18b: float  # DeepSpeed's estimate for the same model if every parameter trained

    def total(self, micro_batch: int, checkpointing: bool) -> float:
        return sum(self.fixed.values()) + micro_batch * self.per_sample[checkpointing]

    def max_micro_batch(self, checkpointing: bool) -> int:
        return max(0, math.floor((self.capacity - sum(self.fixed.values())) / self.per_sample[checkpointing]))


def zero3_knobs(ds_config: dict) -> dict[str, int]:
    """DeepSpeed's ZeRO-3 bucket sizes (elements), its defaults where the config is silent."""
    z = ds_config.get("zero_optimization", {})
    return {"reduce_bucket_size": int(z.get("reduce_bucket_size", 5e8)),
            "stage3_prefetch_bucket_size": int(z.get("stage3_prefetch_bucket_size", 5e7)),
            "stage3_max_live_parameters": int(z.get("stage3_max_live_parameters", 1e9))}


def deepspeed_all_trained(params: int, largest: int, gpus: int, offload: bool) -> float:
    """DeepSpeed's own per-GPU model-state estimate, which assumes every parameter is trained."""
    # DeepSpeed logs its accelerator detection on import to stdout; keep the plan alone on stdout.
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    _, gpu_mem, _ = estimate_zero3_model_states_mem_needs(params, largest, num_gpus_per_node=gpus,
                                                          cpu_offload=offload, cpu_offload_params=offload)
    return gpu_mem


def make_plan(s: Shape, gpus: int, gpu_mem_gb: float, seq_len: int, prompt_length: int, dtype: str,
              offload: bool, ds_config: dict, headroom_gb: float) -> Plan:
    b = DTYPE_BYTES[dtype]
    params = param_count(s)
    knobs = zero3_knobs(ds_config)
    L = seq_len + prompt_length
    per_sample = {}
    for ckpt in (False, True):
        working = _per_sample_terms(s, L, b)["enc_layer"]  # backward: about one layer's gradients live
        per_sample[ckpt] = activation_bytes(s, 1, L, b, ckpt) + working
    fixed = {
        "frozen weight shard": 0.0 if offload else params * b / gpus,
        "gathered transient: shared embedding": s.vocab * s.d_model * b,
        "prefetch bucket": knobs["stage3_prefetch_bucket_size"] * b,
        "reduce bucket": knobs["reduce_bucket_size"] * b,
        "prompt + optimizer": prompt_length * s.d_model * (16 if b == 4 else 20),
    }
    return Plan(s, params, gpus, (gpu_mem_gb - headroom_gb) * GIB, fixed, per_sample,
                deepspeed_all_trained(params, s.vocab * s.d_model, gpus, offload))


def report(p: Plan, args) -> list[str]:
    s, b, B = p.shape, DTYPE_BYTES[args.dtype], args.micro_batch
    row = lambda label, x: f"  {label:<46}{x / GIB:8.2f}"
    out = [
        f"{s.name}: {p.params / 1e9:.2f}B params (d_model {s.d_model}, d_ff {s.d_ff}, {s.num_layers}+"
        f"{s.num_decoder_layers} layers, {s.num_heads} heads, vocab {s.vocab:,}), {args.dtype}",
        f"{p.gpus} GPUs x {args.gpu_mem_gb:g} GiB, {args.headroom_gb:g} GiB each kept for the CUDA context and "
        f"fragmentation; {args.prompt_length} prompt + {args.seq_len} input tokens",
        f"  {'per GPU':<46}{'GiB':>8}",
    ]
    out += [row(k, v) for k, v in p.fixed.items()]
    out.append(row("(lm_head: rows read once at build)", 0))
    if args.offload:
        out.append(row("(frozen weights offloaded: CPU memory per GPU)", p.params * b / p.gpus))
    out.append(row("(stage3_max_live_parameters: a cap, not added)",
                   zero3_knobs(args.ds)["stage3_max_live_parameters"] * b))
    out.append(row("activations + backward working set, per sample", p.per_sample[False]))
    out.append(row("  the same with activation checkpointing", p.per_sample[True]))
    out.append(f"micro-batch {B}: {p.total(B, False) / GIB:.2f} GiB per GPU without checkpointing, "
               f"{p.total(B, True) / GIB:.2f} GiB with")
    out.append(f"largest micro-batch that fits: {p.max_micro_batch(False)} without checkpointing, "
               f"{p.max_micro_batch(True)} with")
    out.append(f"DeepSpeed estimate_zero3_model_states_mem_needs (every parameter trained, 18 B/param): "
               f"{p.deepspeed_18b / GIB:.2f} GiB per GPU for model states; frozen-aware: "
               f"{sum(p.fixed.values()) / GIB:.2f} GiB")
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m softprompt.plan",
        description="Per-GPU memory of prompt tuning a frozen mT5 under ZeRO-3, and the largest micro-batch "
                    "that fits. Formulas in the module docstring (python -c 'import softprompt.plan; "
                    "help(softprompt.plan)').")
    ap.add_argument("--model", default="mt5-xl",
                    help=f"one of {', '.join(MT5)}, or a local model directory / config.json")
    ap.add_argument("--gpus", type=int, default=8, help="total GPUs (ZeRO-3 shards the frozen weights over all)")
    ap.add_argument("--gpu_mem_gb", type=float, default=80, help="memory per GPU, GiB")
    ap.add_argument("--headroom_gb", type=float, default=3,
                    help="GiB per GPU kept free for the CUDA context, communication buffers and fragmentation")
    ap.add_argument("--seq_len", type=int, default=512, help="input tokens per example (padded length)")
    ap.add_argument("--prompt_length", type=int, default=100, help="soft prompt tokens")
    ap.add_argument("--micro_batch", type=int,
                    help="micro-batch per GPU to cost (default: the ds_config's train_micro_batch_size_per_gpu, else 1)")
    ap.add_argument("--offload", action="store_true",
                    help="frozen weights in CPU memory (ZeRO-3 offload_param); implied by the ds_config's offload_param")
    ap.add_argument("--dtype", choices=DTYPE_BYTES, default="bf16", help="frozen weights and activations")
    ap.add_argument("--ds_config",
                    help="DeepSpeed JSON for the bucket sizes (default: ds_configs/zero3_bf16.json, "
                         "or zero3_bf16_offload.json with --offload)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        for k in ("gpus", "seq_len", "prompt_length", "micro_batch"):
            v = getattr(args, k)
            if v is not None and v <= 0:
                raise PlanError(f"--{k} must be positive, got {v}")
        if args.gpu_mem_gb <= args.headroom_gb:
            raise PlanError(f"--gpu_mem_gb {args.gpu_mem_gb:g} must exceed --headroom_gb {args.headroom_gb:g}")
        path = Path(args.ds_config or REPO_DS_CONFIGS / f"zero3_bf16{'_offload' if args.offload else ''}.json")
        try:
            args.ds = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PlanError(f"--ds_config {path}: cannot read it ({e})") from None
        if args.ds.get("zero_optimization", {}).get("offload_param", {}).get("device") == "cpu":
            args.offload = True
        args.micro_batch = args.micro_batch or args.ds.get("train_micro_batch_size_per_gpu", 1)
        shape = resolve_shape(args.model)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    p = make_plan(shape, args.gpus, args.gpu_mem_gb, args.seq_len, args.prompt_length, args.dtype,
                  args.offload, args.ds, args.headroom_gb)
    print("\n".join(report(p, args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
