"""Benchmark one training step: ours (`PromptedMT5`) against HF PEFT prompt tuning, in one process.

    python -m benchmarks.bench                 # mT5-small shape, random weights, batch 8, length 128, prompt 20
    python -m benchmarks.bench --dtype fp32 --hf_kernels   # ours without its levers; PEFT stays fp32
    python -m benchmarks.bench --shape mt5-xl --batch_size 32 --zero3 ds_configs/zero3_bf16.json  # + a ZeRO-3 side

Ours runs as the trainer does on CPU: frozen weights in bf16 (DeepSpeed's bf16 mode) with
`softprompt.kernels.fuse` applied (the trainer applies it at load time); PEFT runs HF's stock model
in fp32, as its users do (`--peft_dtype bf16` for a like-for-like ratio). Both sides train the same
frozen weights (the same values; shared tensors when both sides use one dtype) on the same batch with
AdamW over the prompt only. Ours scores the verbalizer rows; PEFT (`PromptTuningConfig`,
num_transformer_submodules=1) computes the full-vocabulary loss of the label token, as PEFT users do.
Steps alternate ours/PEFT/a matmul sample, and each side's fastest step is reported (the median
beside it): load from other processes on a shared machine only slows a step, and hits all three
alike. The last line is the ratio ours/PEFT of tokens/s.

`--zero3 CONFIG` adds a third side, "zero3": ours on its own copy of the weights inside a 1-rank
DeepSpeed ZeRO-3 engine with CONFIG's `zero_optimization` section (bf16 mode when --dtype bf16, AdamW
over the prompt), stepped with engine.backward/engine.step as the trainer steps it: the cost of the
sharding machinery itself, with that config's buckets and persistence threshold.

Tokens per step = batch x seq_len (input tokens; the prompt is overhead). MFU = model FLOPs per step
(`softprompt.flops.train_flops`: encoder over prompt + input, the decoder step with its cross-attention
K/V over all encoder tokens, backward for input gradients only) / step time / the dense matmul peak
(the fastest n^3 matmul sampled between the steps, in the dtype ours computes in; n = 8192 on CUDA,
where smaller products do not reach the card's peak, 1024 on CPU: a CPU without native bf16 (AVX2)
multiplies bf16 at about 1 GFLOP/s, so a larger sample takes longer than the steps it is compared with).
Memory: on CUDA each side's weights and its step's allocator peak above what was resident before
the step (activations, gradients, optimizer state, workspace); on CPU the tensors autograd saves (measured in
one extra step, next to the planner's prediction) and the process's peak RSS.
"""

from __future__ import annotations

import contextlib
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from launcher import args as cli_args
from softprompt import flops, kernels, plan, verbalizer
from softprompt.model import PromptedMT5
from softprompt.prompt import SoftPrompt

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VERBALIZER_IDS = [3, 4, 5]


def matmul_flops_per_s(a: torch.Tensor, b: torch.Tensor) -> float:
    """FLOP/s of one dense square matmul a @ b."""
    sync(a.device)
    t = time.perf_counter()
    a @ b
    sync(a.device)
    return 2 * a.shape[0] ** 3 / (time.perf_counter() - t)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_mt5(s: plan.Shape, device: torch.device, seed: int = 0):
    from transformers import MT5Config, MT5ForConditionalGeneration

    config = MT5Config(vocab_size=s.vocab, d_model=s.d_model, d_ff=s.d_ff, d_kv=s.d_kv, num_layers=s.num_layers,
                       num_decoder_layers=s.num_decoder_layers, num_heads=s.num_heads, dropout_rate=0.0,
                       feed_forward_proj=s.feed_forward_proj, decoder_start_token_id=0)
    torch.manual_seed(seed)
    with device:  # initialized where it runs: an XL's random init on the CPU alone takes minutes
        model = MT5ForConditionalGeneration(config)
        # Real mT5 has its own lm_head (transformers 5's MT5Config ties it regardless; softprompt.tiny
        # explains), so untie it: the weights' memory is then mT5's. Scaled as softprompt.tiny does.
        model.lm_head.weight = torch.nn.Parameter(torch.randn(s.vocab, s.d_model) * s.d_model**-0.5)
    return model.requires_grad_(False)


def twin(mt5):
    """A second model object over the same weight tensors (no copy), so levers applied to our
    modules (dtype, `kernels.fuse`) leave PEFT's stock model alone."""
    with torch.device("meta"):
        other = type(mt5)(mt5.config)
    other.load_state_dict(mt5.state_dict(), assign=True)
    return other.requires_grad_(False)


def add_shape_args(ap: cli_args.Parser) -> None:
    """The model shape and the batch: --shape and its overrides, --batch_size, --seq_len, --prompt_length."""
    ap.add_argument("--shape", choices=plan.MT5, default="mt5-small",
                    help="model shape (random weights); the flags below override its fields")
    for field in ("d_model", "d_ff", "num_layers", "num_heads", "d_kv", "vocab"):
        ap.add_argument(f"--{field}", type=int, help="the --shape's unless given"
                        + (" (encoder and decoder layers each)" if field == "num_layers" else ""))
    ap.add_argument("--batch_size", type=int, default=8, help="examples per step")
    cli_args.add_renamed(ap, "--batch", "--batch_size", type=int)
    ap.add_argument("--seq_len", type=int, default=128, help="input tokens per example (no padding)")
    ap.add_argument("--prompt_length", type=int, default=20, help="soft prompt tokens")


def shape_of(args, *positive: str) -> tuple[plan.Shape, list[str]]:
    """(the shape `add_shape_args`' flags describe, one message per bad value); `positive`: more flags
    that must be positive when given."""
    preset = plan.MT5[args.shape]
    for k in ("d_model", "d_ff", "num_layers", "num_heads", "d_kv", "vocab"):
        if getattr(args, k) is None:
            setattr(args, k, getattr(preset, k))
    bad = [f"--{k} must be positive" for k in ("d_model", "d_ff", "num_layers", "num_heads", "d_kv", "batch_size",
                                                "seq_len", "prompt_length", *positive)
           if getattr(args, k) is not None and getattr(args, k) <= 0]
    if args.vocab <= max(VERBALIZER_IDS):
        bad.append(f"--vocab must exceed the verbalizer ids {VERBALIZER_IDS}")
    s = plan.Shape("bench", args.vocab, args.d_model, args.d_ff, args.num_layers, args.num_layers, args.num_heads,
                   args.d_kv)
    return s, bad


def parser() -> cli_args.Parser:
    ap = cli_args.Parser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0])
    add_shape_args(ap)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    ap.add_argument("--dtype", choices=DTYPES, default="bf16",
                    help="ours: frozen weights and activations (bf16 = DeepSpeed's bf16 mode); prompt and loss stay fp32")
    ap.add_argument("--peft_dtype", choices=DTYPES, default="fp32",
                    help="PEFT's frozen weights (fp32: PEFT as its users run it; bf16 for a like-for-like ratio)")
    ap.add_argument("--autocast", action="store_true",
                    help="ours only: fp32 weights, forward under bf16 autocast, fp32 class scores and loss")
    ap.add_argument("--hf_kernels", action="store_true",
                    help="ours keeps HF's modules (no softprompt.kernels: HF's GELU, RMSNorm and SDPA attention)")
    ap.add_argument("--compile", action="store_true", help="ours only: torch.compile the prompted model")
    ap.add_argument("--zero3", metavar="CONFIG", type=Path,
                    help="add a side: ours inside a 1-rank ZeRO-3 engine with this DeepSpeed JSON's zero_optimization")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--lr", type=float, default=0.3, help="AdamW learning rate of every side")
    return ap


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except cli_args.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s, bad = shape_of(args, "steps", "threads")
    if args.warmup < 0:
        bad.append("--warmup must be >= 0")
    if args.zero3:
        try:
            zero = json.loads(args.zero3.read_text())["zero_optimization"]
            assert zero.get("stage") == 3, "stage is not 3"
        except (OSError, ValueError, KeyError, AssertionError) as e:
            bad.append(f"--zero3 {args.zero3}: not a DeepSpeed JSON with a ZeRO-3 zero_optimization section ({e!r})")
    if bad:
        print(f"error: {bad[0]}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    B, T, P = args.batch_size, args.seq_len, args.prompt_length

    mt5 = build_mt5(s, device)
    peft_base = twin(mt5).to(DTYPES[args.peft_dtype])
    mt5.to(dtype)  # after the twin: a dtype change gives ours new tensors and leaves PEFT's
    if not args.hf_kernels:
        kernels.fuse(mt5)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(len(VERBALIZER_IDS) + 3, s.vocab, (B, T), generator=g).to(device)
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    labels = torch.randint(len(VERBALIZER_IDS), (B,), generator=g).to(device)
    init = torch.rand(P, s.d_model, generator=g) - 0.5

    ours = PromptedMT5(mt5, SoftPrompt(init), mt5.lm_head.weight[VERBALIZER_IDS].detach()).to(device).train()
    forward = torch.compile(ours) if args.compile else ours
    amp = (lambda: torch.autocast(device.type, torch.bfloat16)) if args.autocast else contextlib.nullcontext

    def ours_loss():
        with amp():
            scores = forward(ids, mask)
        return verbalizer.loss(scores.float(), labels)

    from peft import PromptTuningConfig, TaskType, get_peft_model

    peft_model = get_peft_model(peft_base, PromptTuningConfig(
        task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=P, num_transformer_submodules=1)).to(device).train()
    peft_model.prompt_encoder["default"].embedding.weight.data.copy_(init)
    label_tokens = torch.tensor(VERBALIZER_IDS, device=device)[labels][:, None]  # (B, 1): one decoder step

    def peft_loss():
        return peft_model(input_ids=ids, attention_mask=mask, labels=label_tokens).loss

    sides = {
        "ours": (ours_loss, torch.optim.AdamW([ours.prompt.weight], lr=args.lr), ours),
        "peft": (peft_loss, torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=args.lr),
                 peft_model),
    }
    if args.zero3:
        sides["zero3"] = zero3_side(mt5, init, ids, mask, labels, args, zero)
    times = {k: [] for k in sides}
    peak = {k: 0 for k in sides}
    compute = "bf16" if args.autocast else args.dtype  # ours' matmul dtype: the peak to compare with
    n = 8192 if device.type == "cuda" else 1024
    mats = [torch.randn(n, n, device=device).to(DTYPES[compute]) for _ in range(2)]
    matmul = []
    for i in range(args.warmup + args.steps):
        # Alternate the sides and sample the matmul peak in between, so that load from other
        # processes on a shared machine hits all three alike.
        matmul.append(matmul_flops_per_s(*mats))
        for name, (loss_fn, opt, _) in sides.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()  # all sides' weights live in this one process
            sync(device)
            t = time.perf_counter()
            if opt is None:  # a DeepSpeed engine: loss_fn runs the whole step
                loss_fn()
            else:
                loss_fn().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            sync(device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t)
            if device.type == "cuda":
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated() - resident)

    step_flops = flops.train_flops(mt5.config, B, T + P)
    fpeak = max(matmul)  # the best sample: load and the first call's warm-up only slow it
    print(f"config: d_model {s.d_model}, d_ff {s.d_ff}, {s.num_layers}+{s.num_layers} layers, {s.num_heads} heads, "
          f"vocab {s.vocab}, batch {B}, seq_len {T}, prompt {P}, {args.dtype} (PEFT {args.peft_dtype}), AdamW, "
          f"{device.type}, "
          f"threads {torch.get_num_threads()}, autocast {args.autocast}, kernels {not args.hf_kernels}, "
          f"compile {args.compile}")
    print(f"matmul peak {compute}: {fpeak / 1e9:.1f} GFLOP/s")
    print(f"model FLOPs per step: {step_flops / 1e9:.2f} GFLOP")
    mib = 2**20
    predicted = plan.activation_bytes(s, B, T + P, 2 if args.dtype == "bf16" else 4, checkpointing=False,
                                      gpu=device.type == "cuda")
    tok_s = {}
    for name, (loss_fn, opt, module) in sides.items():
        dt = min(times[name])
        tok_s[name] = B * T / dt
        if device.type == "cuda":
            tensors = [getattr(t, "ds_tensor", t) for t in [*module.parameters(), *module.buffers()]]  # ZeRO: shards
            weights = sum({t.data_ptr(): t.numel() * t.element_size() for t in tensors}.values())  # shared once
            memory = f"weights {weights / mib:.1f} MiB, step peak above them {peak[name] / mib:.1f} MiB"
            if name == "ours" and not args.hf_kernels and not args.autocast:
                memory += f" (planner activations: {predicted / mib:.1f} MiB)"
        elif opt is None:
            memory = "activations: as ours"
        else:
            saved = plan.saved_tensor_bytes(module, loss_fn)
            opt.zero_grad(set_to_none=True)
            memory = f"activations {saved / mib:.1f} MiB"
            if name == "ours" and not args.hf_kernels and not args.autocast:  # the trainer's model
                memory += f" (planner, for padded batches: {predicted / mib:.1f} MiB)"
        print(f"{name}: step {dt:.3f} s (median {statistics.median(times[name]):.3f} s), {tok_s[name]:.1f} tokens/s, "
              f"MFU {step_flops / dt / fpeak:.1%}, {memory}")
    if device.type == "cpu":
        print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if args.zero3:
        print(f"zero3/ours tokens/s (the sharding machinery's cost): {tok_s['zero3'] / tok_s['ours']:.2f}")
    print(f"ours/PEFT tokens/s: {tok_s['ours'] / tok_s['peft']:.2f}")
    return 0


def zero3_side(mt5, init: torch.Tensor, ids, mask, labels, args, zero: dict):
    """(step function, None, module): ours on a copy of the frozen weights inside a 1-rank ZeRO-3
    engine, built by the trainer's own `engine.initialize`."""
    import copy

    from softprompt import dist, engine

    dist.init(600.0)
    config = {"train_micro_batch_size_per_gpu": args.batch_size, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": args.lr, "torch_adam": True}},
              "bf16": {"enabled": args.dtype == "bf16"},
              "zero_optimization": zero,
              "steps_per_print": 10**9}
    frozen = copy.deepcopy(mt5)  # ZeRO-3 partitions the module it gets in place
    model = PromptedMT5(frozen, SoftPrompt(init), frozen.lm_head.weight[VERBALIZER_IDS].detach().clone())
    eng, _ = engine.initialize(model, config)

    def step():
        loss = verbalizer.loss(eng(ids, mask).float(), labels)
        eng.backward(loss)
        eng.step()

    return step, None, eng


if __name__ == "__main__":
    sys.exit(main())
