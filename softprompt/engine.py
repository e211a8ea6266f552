"""DeepSpeed: the ds_config contract, process-group setup, loading the frozen model, the engine.

Order matters under ZeRO-3: an `HfDeepSpeedConfig` must be alive *before* `from_pretrained`, so
the frozen weights load straight into partitions (each rank holds ~1/world of them) instead of a
full copy per rank. The optimizer is given the prompt and nothing else.
"""

from __future__ import annotations

import json
import os
import random
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from . import kernels
from .config import ConfigError

# Families whose decoder's first step we know how to score (encoder + decoder + untied/tied lm_head).
SUPPORTED_MODEL_TYPES = ("t5", "mt5")


@dataclass(frozen=True)
class BatchSizes:
    """The DeepSpeed batch triple, resolved once for a world size: global = micro x accum x world."""

    global_batch: int
    micro_batch: int
    grad_accum: int
    world_size: int


def load_ds_config(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--ds_config {path}: file not found")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--ds_config {path}: line {e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"--ds_config {path}: expected a JSON object")
    if cfg.get("fp16", {}).get("enabled", False):
        raise ConfigError(
            f"--ds_config {path}: fp16 is enabled, but mT5 overflows in fp16 (inf/NaN activations); "
            "use bf16 on GPU or fp32"
        )
    if "optimizer" not in cfg:
        raise ConfigError(f"--ds_config {path}: needs an 'optimizer' section (it owns the learning rate)")
    return cfg


def batch_sizes(ds_config: dict, world_size: int, source: str = "ds_config") -> BatchSizes:
    """Resolve train_batch_size = micro x grad_accum x world; any two may be given. Never rewrites."""
    g = ds_config.get("train_batch_size")
    m = ds_config.get("train_micro_batch_size_per_gpu")
    a = ds_config.get("gradient_accumulation_steps")
    given = {k: v for k, v in (("train_batch_size", g), ("train_micro_batch_size_per_gpu", m),
                               ("gradient_accumulation_steps", a)) if v is not None}
    for k, v in given.items():
        if not isinstance(v, int) or v <= 0:
            raise ConfigError(f"{source}: {k} must be a positive integer, got {v!r}")
    if m is None and g is None:
        raise ConfigError(f"{source}: set train_batch_size or train_micro_batch_size_per_gpu")
    if g is None:
        a = a or 1
        g = m * a * world_size
    elif m is None:
        a = a or 1
        m, rem = divmod(g, a * world_size)
        if rem or m == 0:
            raise ConfigError(
                f"{source}: train_batch_size {g} is not divisible by gradient_accumulation_steps {a} x "
                f"world size {world_size}"
            )
    elif a is None:
        a, rem = divmod(g, m * world_size)
        if rem or a == 0:
            raise ConfigError(
                f"{source}: train_batch_size {g} is not divisible by train_micro_batch_size_per_gpu {m} x "
                f"world size {world_size}"
            )
    if g != m * a * world_size:
        raise ConfigError(
            f"{source}: train_batch_size {g} != train_micro_batch_size_per_gpu {m} x "
            f"gradient_accumulation_steps {a} x world size {world_size} (= {m * a * world_size})"
        )
    return BatchSizes(g, m, a, world_size)


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def is_main_process() -> bool:
    """Rank 0, known from the launcher's environment even before the process group exists."""
    return os.environ.get("RANK", "0") == "0"


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def free_port() -> int:
    """A free TCP port for a rendezvous (--master_port), from 10000-19999: below the kernel's ephemeral
    range, where any outgoing connection (gloo opens many) can take a port between this pick and the
    launcher's bind (seen in the tests: EADDRINUSE), and below slurm/train.sbatch's 20000 + job id."""
    rng = random.Random()  # seeded from the OS: not the global RNG, which seeded runs would share
    for _ in range(200):
        port = rng.randrange(10000, 20000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free TCP port in 10000-19999")


def init_distributed() -> tuple[int, int]:
    """Join the process group started by a launcher, or start a 1-process group for `python train.py`."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()))
    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op at init (minutes on 2 cores) and leaves
    # a 69 MB /dev/shm buffer per rank behind after every run (never unlinked; see DeepSpeed PR #4115). ZeRO-3
    # moves the prompt's gradients with reduce-scatter/all-gather, which that op does not serve: use plain gloo.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(verbose=False)
    import torch.distributed as dist

    if device().type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # torch gives every process all cores; N ranks on one node would oversubscribe them N-fold.
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local))
    return dist.get_rank(), dist.get_world_size()


def close_distributed(synchronize: bool = False) -> None:
    """`synchronize`: every rank got here (a clean finish), so wait for all before tearing gloo down: a rank
    that destroys its group while rank 0 still writes the outputs was seen to abort at exit ("terminate
    called without an active exception", SIGABRT). Not after an error: the others may be in another collective."""
    import torch.distributed as dist

    if dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() == "cpu":
        return torch.device("cpu")
    return torch.device(acc.device_name(), acc.current_device())


def load_model_config(name_or_path: str):
    from transformers import AutoConfig

    if name_or_path.startswith(("/", ".", "~")) and not Path(name_or_path).expanduser().is_dir():
        raise ConfigError(f"--model {name_or_path}: no such model directory")
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"--model {name_or_path}: not a local model directory and not loadable from the hub "
            f"({str(e).splitlines()[0]})"
        ) from None
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"--model {name_or_path}: model_type {config.model_type!r} is not supported "
            f"(expected one of {SUPPORTED_MODEL_TYPES})"
        )
    return config


def checkpoint_has_lm_head(name_or_path: str) -> bool:
    """Whether the checkpoint stores its own lm_head.weight (mT5, T5 v1.1) or reuses `shared` (T5)."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    def fetch(filename):
        return cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=False)

    index = fetch("model.safetensors.index.json") or fetch("pytorch_model.bin.index.json")
    if index:
        return "lm_head.weight" in json.loads(Path(index).read_text())["weight_map"]
    single = fetch("model.safetensors")
    if single:
        with safe_open(single, "pt") as f:
            return "lm_head.weight" in f.keys()
    single = fetch("pytorch_model.bin")
    if single:
        return "lm_head.weight" in torch.load(single, map_location="meta", weights_only=True)
    raise ConfigError(f"--model {name_or_path}: no model.safetensors or pytorch_model.bin found")


def load_frozen_model(name_or_path: str, config, dropout: float, dtype: torch.dtype):
    """from_pretrained with the lm_head kept untied for untied checkpoints, every parameter frozen.

    transformers 5 decides whether to tie lm_head to `shared` by comparing the loaded values; under
    ZeRO-3 both are size-0 placeholders, compare equal, and the checkpoint's own head is silently
    replaced by the input embedding. For a checkpoint that stores lm_head.weight we load through a
    subclass whose tie map leaves lm_head out, then assert the two stayed distinct.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING

    cls = MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING[type(config)]
    untied = checkpoint_has_lm_head(name_or_path)
    if untied:
        keys = {k: v for k, v in cls._tied_weights_keys.items() if k != "lm_head.weight"}
        cls = type(cls.__name__, (cls,), {"_tied_weights_keys": keys})
    model = cls.from_pretrained(name_or_path, dropout_rate=dropout, dtype=dtype)
    if untied:
        assert model.lm_head.weight is not model.shared.weight, "lm_head got tied to shared"
    model.requires_grad_(False)
    kernels.fuse(model)  # fused RMSNorm and GELU, faster CPU attention: the same functions
    return model


def frozen_numel(model: torch.nn.Module) -> tuple[int, int]:
    """(elements this rank holds, elements of the full model) over frozen parameters."""
    local = full = 0
    for p in model.parameters():
        if p.requires_grad:
            continue
        full += p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        local += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
    return local, full


def client_optimizer(ds_config: dict, params: list) -> tuple[dict, torch.optim.Optimizer | None]:
    """DeepSpeed builds the optimizers it knows; `"type": "Adafactor"` (Lester et al.'s recipe, not
    one of DeepSpeed's) is built here from the same section -- the JSON still owns it -- and handed
    to DeepSpeed as a client optimizer. Returns the config DeepSpeed gets and that optimizer."""
    section = ds_config.get("optimizer", {})
    if section.get("type", "").lower() != "adafactor":
        return ds_config, None
    from transformers.optimization import Adafactor

    # Lester et al.: constant lr (no relative step), no parameter scaling.
    kwargs = {"scale_parameter": False, "relative_step": False, "warmup_init": False, **section.get("params", {})}
    try:
        opt = Adafactor(params, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"ds_config optimizer Adafactor: {e}") from None
    return {k: v for k, v in ds_config.items() if k != "optimizer"}, opt


def initialize(model: torch.nn.Module, ds_config: dict, tune: str = "prompt"):
    """deepspeed.initialize with the trainable parameters only: the prompt's, unless `tune` is
    "full" (asserted: an optimizer over frozen weights would cost 12+ bytes per parameter)."""
    import deepspeed

    from .metrics import all_reduce_sum

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if tune == "prompt":
        stray = [n for n, _ in named if not n.startswith("prompt.")]
        assert named and not stray, f"only the prompt may train, found {stray or 'nothing'}"
    params = [p for _, p in named]
    config, optimizer = client_optimizer(ds_config, params)
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer,
                                                   config=config)
    # ZeRO (and the bf16 optimizer, which links `_hp_mapping`) hands the optimizer flat fp32 partitions
    # of the trainable parameters, so compare element counts summed over ranks rather than tensor
    # identities. Without ZeRO every rank holds all of them.
    held = sum(p.numel() for p in optimized_tensors(engine))
    if any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for p in params):
        held = all_reduce_sum(torch.tensor(held)).item()
    n_train = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    assert held == n_train, f"the optimizer holds {held} elements; the trainable parameters have {n_train}"
    return engine, scheduler


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's ZeRO wrapper (or the optimizer itself without one)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def optimized_tensors(engine) -> list[torch.Tensor]:
    """The fp32 tensors the optimizer updates on this rank. ZeRO-3 keeps its flat partitions out of
    the torch optimizer's param_groups between steps, so ask it directly."""
    if hasattr(engine.optimizer, "fp32_partitioned_groups_flat"):
        return list(engine.optimizer.fp32_partitioned_groups_flat)
    return [p for g in base_optimizer(engine).param_groups for p in g["params"]]


def optimizer_state_numel(engine) -> int:
    """Elements of optimizer state on this rank: every state tensor (Adam's two moments, Adafactor's
    factored second moment), scalars such as the step count left out."""
    return sum(t.numel() for s in base_optimizer(engine).state.values() for t in s.values()
               if torch.is_tensor(t) and t.dim() > 0)
