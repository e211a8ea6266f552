"""Memory of prompt tuning a frozen T5/mT5: shapes, parameter counts, activation bytes, and their measurement.

Activations, in bytes per sample (`activations`). L encoder tokens (prompt + input), Q decoder tokens
(1; prompt + 1 with deep prompts in the decoder), b activation dtype bytes, d d_model, i = heads x
d_kv, f d_ff, h heads, F = 3 (gated-gelu: the fused GELU's input, wi_1's output, their product) or 1
(relu). The weights are frozen, so a Linear saves nothing: its input gradient needs only the weight.

    rmsnorm ln = its input + the fp32 rstd. The residual stream has the weights' dtype: T5's
        `_keep_in_fp32_modules = ["wo"]` applies to fp16 loads only, a bf16 load has a bf16 `wo`.
        CPU: F.rms_norm is a composite that saves the fp32 upcast of its input, ln = d*4 + 4.
        GPU: the fused CUDA kernel saves the input as it is, ln = d*b + 4 (formula only).
    encoder layer = L*(2*ln + A*i*b + F*f*b) + h*L*L*b
        CPU (kernels.py's matmul-softmax-matmul): A = 3 (q, k, v), the L*L term the softmax output.
        GPU (HF's SDPA): A = 4 (q, k, v, out) + 4*h (fp32 logsumexp), the L*L term its float mask
        (relative position bias + padding).
    decoder layer = L*2*i*b (cross-attention K, V) + Q*(3*ln + A*i*b + C + F*f*b + h*L*b) + h*Q*Q*b,
        C the cross-attention query: i*b on CPU, 2*i*b + 4*h (q, out, logsumexp) on GPU.
    held, without checkpointing: n_enc*encoder layer + n_dec*decoder layer + (L + Q)*ln (final norms).
    held, with checkpointing (non-reentrant, every block): the block inputs, (n_enc + 1)*L*d*b (the
        encoder's output feeds every decoder block) + (n_dec + 1)*Q*d*b; the input embeddings L*d*b
        (HF's checkpointing makes them require grad, so autograd keeps them); the final norms
        (L + Q)*ln; the bool masks L*L + Q*(L + Q). Per micro-batch, not per sample: the position
        biases h*(L*L + Q*(L + Q))*b.
    transient, on top of what is held at the backward's peak: a working set (gradients and
        temporaries of one layer's forward or backward) max(3*h*L*L*b, 3*L*f*b, 5*L*d*4): bias,
        scores and their sum on CPU, or the L*L gradients; the FFN's gradients; the CPU norm's fp32
        backward. With checkpointing also the recomputed block (the larger layer above), alive until
        its backward ends; and the backward ends recomputing the first block, which rebuilds the
        position bias: 49*L*L bytes of (L, L) int64 and bool temporaries per micro-batch, while
        3*L*d*b + L*L + L*(ln + 3*i*b) per sample is alive. The peak is the larger of the two moments.

Measured on CPU with `live_tensor_bytes` (tests/test_plan.py; also 4 shapes x fp32/bf16 x checkpointing
x input/deep prompts x 2 batch shapes): held within -0.7%..+3.2%, peak +3%..+23% over, never under.
GPU terms follow the CUDA kernels' saved tensors, unmeasured here; the CPU working set is kept as a bound.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
DTYPE_BYTES = {"bf16": 2, "fp32": 4}
FF_SAVED = {"gated-gelu": 3, "relu": 1}  # (B, L, d_ff) tensors saved per feed-forward, measured


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


def shape_from_dict(c: dict, name: str, where: str = "config") -> Shape:
    """A Shape from a T5/mT5 config.json's fields (`where` names the source in errors)."""
    proj = c.get("feed_forward_proj", "relu")
    if proj not in FF_SAVED:
        raise PlanError(f"{where}: feed_forward_proj {proj!r} not modelled (expected {list(FF_SAVED)})")
    tied = c.get("tie_word_embeddings", c.get("model_type") != "mt5")  # google/mt5-* have their own lm_head
    try:
        return Shape(name, c["vocab_size"], c["d_model"], c["d_ff"], c["num_layers"],
                     c.get("num_decoder_layers") or c["num_layers"], c["num_heads"], c["d_kv"], proj,
                     tied, c.get("relative_attention_num_buckets", 32))
    except KeyError as e:
        raise PlanError(f"{where}: no {e.args[0]!r}") from None


def shape_from_hf_config(config, name: str | None = None, tied: bool | None = None) -> Shape:
    """A Shape from a live transformers config object (the model the trainer loads). `tied`: whether
    lm_head is `shared` (the trainer knows: `model.lm_head.weight is model.shared.weight`). Default:
    the config's word, except for mT5, whose config always says tied in transformers 5 though every
    google/mt5-* checkpoint has its own lm_head."""
    name = name or getattr(config, "name_or_path", "") or config.model_type
    c = {k: v for k, v in config.to_dict().items() if k != "tie_word_embeddings" or config.model_type != "mt5"}
    if tied is not None:
        c["tie_word_embeddings"] = tied
    return shape_from_dict(c, Path(name).name, f"model config {name}")


def shape_from_config(path: str | Path) -> Shape:
    """A Shape from a local model directory (or its config.json)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        c = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PlanError(f"--model {path}: cannot read a config.json ({e})") from None
    return shape_from_dict(c, path.name, f"--model {path}")


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


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one micro-batch of B samples (module docstring)."""

    held: float  # per sample: what the forward leaves for the backward
    transient: float  # per sample, on top of `held` at the backward's peak
    held_fixed: float = 0.0  # per micro-batch whatever B
    # Checkpointing: the backward ends recomputing the first block, which rebuilds the position
    # bias: then little is held per sample but (L, L) temporaries are made per micro-batch.
    last_held: float = 0.0
    last_fixed: float = 0.0

    def held_bytes(self, micro_batch: int) -> float:
        return micro_batch * self.held + self.held_fixed

    def peak_bytes(self, micro_batch: int) -> float:
        first = micro_batch * (self.held + self.transient) + self.held_fixed
        last = micro_batch * self.last_held + self.held_fixed + self.last_fixed
        return max(first, last)


def activations(s: Shape, enc_tokens: int, b: int, checkpointing: bool, gpu: bool = True,
                dec_tokens: int = 1) -> Activations:
    """The module docstring's formulas for `enc_tokens` encoder tokens (prompt + input) and
    `dec_tokens` decoder tokens (1, or prompt + 1 with deep prompts in the decoder). `gpu`: HF's
    SDPA attention and the fused CUDA RMSNorm rather than kernels.py's CPU attention and the
    composite CPU norm."""
    L, Q, d, i, h, f = enc_tokens, dec_tokens, s.d_model, s.inner, s.num_heads, s.d_ff
    F = FF_SAVED[s.feed_forward_proj]
    ln = d * (b if gpu else 4) + 4
    attn = (4 * i * b + 4 * h) if gpu else 3 * i * b  # per token: q, k, v (+ out and logsumexp on GPU)
    cross = (2 * i * b + 4 * h) if gpu else i * b  # per token: q (+ out and logsumexp)
    enc_layer = L * (2 * ln + attn + F * f * b) + h * L * L * b
    dec_layer = L * 2 * i * b + Q * (3 * ln + attn + cross + F * f * b + h * L * b) + h * Q * Q * b
    work = max(3 * h * L * L * b, 3 * L * f * b, 5 * L * d * 4)
    if not checkpointing:
        return Activations(s.num_layers * enc_layer + (L + Q) * ln + s.num_decoder_layers * dec_layer, work)
    held = ((s.num_layers + 2) * L * d * b + L * ln + L * L  # encoder
            + (s.num_decoder_layers + 1) * Q * d * b + Q * ln + Q * (L + Q))  # decoder
    # Recomputing the first block: its input, the embeddings, the mask, then its norm, q, k, v are
    # alive when T5's position bucketing makes six int64 and one bool (L, L) temporaries.
    last = 3 * L * d * b + L * L + L * (ln + 3 * i * b)
    return Activations(held, max(enc_layer, dec_layer) + work, h * (L * L + Q * (L + Q)) * b, last, 49 * L * L)


def activation_bytes(s: Shape, micro_batch: int, enc_tokens: int, b: int, checkpointing: bool,
                     gpu: bool = True) -> float:
    """Bytes the forward of one micro-batch leaves for its backward (docstring formula)."""
    return activations(s, enc_tokens, b, checkpointing, gpu).held_bytes(micro_batch)


@dataclass(frozen=True)
class Plan:
    """Bytes per GPU (or CPU rank) of one parallel mode."""

    shape: Shape
    mode: str
    params: int
    gpus: int
    capacity: float  # bytes usable per GPU (card minus headroom)
    fixed: dict[str, float]  # bytes that do not depend on the micro-batch
    acts: dict[bool, Activations]  # checkpointing -> activations
    dtype: str = "bf16"
    hardware: str = "gpu"  # or "cpu": CPU ranks, whose kernels save differently
    offloaded: float = 0.0  # CPU memory per GPU holding the offloaded shard

    def per_sample(self, checkpointing: bool) -> float:
        a = self.acts[checkpointing]
        return a.held + a.transient

    def total(self, micro_batch: int, checkpointing: bool) -> float:
        return sum(self.fixed.values()) + self.acts[checkpointing].peak_bytes(micro_batch)

    def max_micro_batch(self, checkpointing: bool) -> int:
        a, room = self.acts[checkpointing], self.capacity - sum(self.fixed.values())
        bounds = [(room - a.held_fixed) / (a.held + a.transient)]
        if a.last_held:
            bounds.append((room - a.held_fixed - a.last_fixed) / a.last_held)
        return max(0, math.floor(min(bounds)))


def zero3_knobs(ds_config: dict) -> dict[str, int]:
    """DeepSpeed's ZeRO-3 bucket sizes (elements), its defaults where the config is silent or says "auto"."""
    z = ds_config.get("zero_optimization", {})
    defaults = {"reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7, "stage3_max_live_parameters": 1e9}
    return {k: int(v if isinstance(v := z.get(k, d), (int, float)) else d) for k, d in defaults.items()}


def make_plan(s: Shape, gpus: int, gpu_mem_gb: float, seq_len: int, prompt_length: int, dtype: str = "bf16",
              mode: str = "zero3", ds_config: dict | None = None, headroom_gb: float = 3.0, device: str = "gpu",
              prompt_depth: str = "input") -> Plan:
    """One mode's budget per GPU (`device="cpu"`: per CPU rank, `gpu_mem_gb` its share of the host)."""
    b = DTYPE_BYTES[dtype]
    params = param_count(s)
    layers = {"input": 1, "encoder": s.num_layers, "all": s.num_layers + s.num_decoder_layers}[prompt_depth]
    dec_tokens = prompt_length + 1 if prompt_depth == "all" else 1
    L = seq_len + prompt_length
    acts = {c: activations(s, L, b, c, device == "gpu", dec_tokens) for c in (False, True)}
    fixed = {"frozen weights (full copy)": params * b} if mode == "replicated" else {
        "frozen weight shard": 0.0 if mode == "zero3_offload" else params * b / gpus,
        "gathered transient: shared embedding": s.vocab * s.d_model * b,
        "prefetch bucket": zero3_knobs(ds_config or {})["stage3_prefetch_bucket_size"] * b,
        "reduce bucket": zero3_knobs(ds_config or {})["reduce_bucket_size"] * b,
    }
    fixed["prompt + optimizer"] = layers * prompt_length * s.d_model * (16 if b == 4 else 20)
    return Plan(s, mode, params, gpus, (gpu_mem_gb - headroom_gb) * GIB, fixed, acts, dtype, device,
                params * b / gpus if mode == "zero3_offload" else 0.0)


def deepspeed_all_trained(params: int, largest: int, gpus: int, offload: bool) -> float:
    """DeepSpeed's own per-GPU model-state estimate, which assumes every parameter is trained."""
    # DeepSpeed logs its accelerator detection on import to stdout; keep the plan alone on stdout.
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    _, gpu_mem, _ = estimate_zero3_model_states_mem_needs(params, largest, num_gpus_per_node=gpus,
                                                          cpu_offload=offload, cpu_offload_params=offload)
    return gpu_mem


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


def live_tensor_bytes(step) -> tuple[int, int]:
    """Measured (held, peak): bytes of the tensors `step()` creates that are alive when it returns the
    loss, and the most alive at once over that forward and its backward; tensors made before are not
    counted. Unlike `saved_tensor_bytes` it sees what checkpointing holds outside autograd's saved
    tensors and what the backward allocates: the memory the allocator must hold, up to its rounding."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from torch.utils.weak import WeakIdKeyDictionary

    import torch

    class Tracker(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live = self.peak = 0
            self.known = WeakIdKeyDictionary()  # storage -> bytes, for storages created under the mode

        def freed(self, n: int):
            self.live -= n

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            for t in tree_leaves(out):
                if not isinstance(t, torch.Tensor):
                    continue
                storage = t.untyped_storage()
                if id(storage) in inputs or storage in self.known:  # a view or in-place: no new memory
                    continue
                n = storage.nbytes()
                self.known[storage] = n
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self.freed, n)
            return out

    with Tracker() as tracker:
        loss = step()
        held = tracker.live - loss.untyped_storage().nbytes()
        loss.backward()
        del loss
    return held, tracker.peak
