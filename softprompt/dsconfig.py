"""The DeepSpeed JSON: found by name or path, checked the way DeepSpeed will read it, `"auto"` values
filled, and a typed view of the few settings the project reads.

`"auto"` is accepted for `train_batch_size`, `train_micro_batch_size_per_gpu`,
`gradient_accumulation_steps` and the optimizer's `lr` (as in HF's DeepSpeed integration). It means
"the trainer decides": from `--global_batch`, `--micro_batch`, `--lr` when given, else by a rule
(`resolve`). A number in the JSON is fixed: a flag that disagrees with it is an error, never a silent
override. The resolved JSON (no "auto" left) is what DeepSpeed gets and what every run records.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError

AUTO = "auto"
SHIPPED_DIR = Path(str(importlib.resources.files("softprompt.ds_configs")))  # ds_configs/, installed as package data
DEFAULT_GLOBAL_BATCH = 32
CPU_MICRO_BATCH_CAP = 16  # the CPU configs' micro-batch: larger ones gain nothing on a few cores
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
# DeepSpeed's own optimizers (deepspeed.runtime.config.DEEPSPEED_OPTIMIZERS) plus Adafactor, which
# engine.client_optimizer builds from the same section.
OPTIMIZERS = ("adagrad", "adam", "adamw", "lamb", "lion", "muadam", "muadamw", "musgd", "muon", "adafactor")
SCHEDULERS = ("LRRangeTest", "OneCycle", "WarmupLR", "WarmupDecayLR", "WarmupCosineLR")


@dataclass(frozen=True)
class BatchSizes:
    """The DeepSpeed batch triple for a world size: global = micro x accum x world."""

    global_batch: int
    micro_batch: int
    grad_accum: int
    world_size: int


@dataclass(frozen=True)
class Settings:
    """The settings of a resolved DeepSpeed JSON that the project reads, read in one place."""

    stage: int
    bf16: bool
    offload_param: bool
    optimizer: str
    lr: float
    gradient_clipping: float
    scheduler: str | None
    persistence_threshold: int  # ZeRO-3: parameters smaller than this stay resident on every rank

    @staticmethod
    def of(ds: dict) -> Settings:
        zero = ds.get("zero_optimization", {})
        sched = ds.get("scheduler")
        return Settings(stage=int(zero.get("stage", 0)), bf16=bool(ds.get("bf16", {}).get("enabled", False)),
                        offload_param=zero.get("offload_param", {}).get("device", "none") not in (None, "none"),
                        optimizer=ds["optimizer"].get("type", ""), lr=ds["optimizer"].get("params", {}).get("lr"),
                        gradient_clipping=float(ds.get("gradient_clipping", 0.0)),
                        scheduler=sched.get("type") if sched else None,
                        persistence_threshold=int(zero.get("stage3_param_persistence_threshold", 100_000)))

    def recipe(self, ds: dict) -> dict:
        """What optimized the run: optimizer, lr, schedule, clipping (results.json, W&B)."""
        sched = ds.get("scheduler") or {}
        return {"optimizer": self.optimizer, "lr": self.lr, "scheduler": self.scheduler or "constant",
                "scheduler_params": sched.get("params", {}), "gradient_clipping": self.gradient_clipping}


def shipped() -> list[str]:
    """Names of the shipped configs (ds_configs/*.json without the suffix)."""
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.json"))


def find(spec: str) -> Path:
    """A path as given when it exists, else a shipped config by name (`zero3_bf16` or `zero3_bf16.json`)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    named = SHIPPED_DIR / (path.name if path.suffix == ".json" else f"{path.name}.json")
    if path.parent == Path(".") and named.is_file():
        return named
    raise ConfigError(f"--ds_config {spec}: no such file and not a shipped config ({', '.join(shipped())}, auto)")


def load(spec: str) -> tuple[dict, str]:
    """(the JSON object, where it came from) for a name or path."""
    path = find(spec)
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"--ds_config {path}: line {e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"--ds_config {path}: expected a JSON object")
    return cfg, str(path)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_types(cfg: dict, source: str) -> None:
    """The values DeepSpeed would take without complaint and then crash on (or silently misuse)."""
    for key in BATCH_KEYS:
        v = cfg.get(key)
        if v is not None and v != AUTO and not (_is_int(v) and v > 0):
            raise ConfigError(f"{source}: {key} must be a positive integer or \"auto\", got {v!r}")
    if "gradient_clipping" in cfg and not (_is_number(cfg["gradient_clipping"]) and cfg["gradient_clipping"] >= 0):
        raise ConfigError(f"{source}: gradient_clipping must be a number >= 0, got {cfg['gradient_clipping']!r}")
    for section in ("bf16", "fp16"):
        enabled = cfg.get(section, {}).get("enabled", False)
        if not isinstance(enabled, bool):
            raise ConfigError(f"{source}: {section}.enabled must be true or false, got {enabled!r}")
    if cfg.get("fp16", {}).get("enabled", False):
        raise ConfigError(f"{source}: fp16 is enabled, but mT5 overflows in fp16 (inf/NaN activations); use bf16 on "
                          "GPU or fp32")
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if not (_is_int(stage) and 0 <= stage <= 3):
        raise ConfigError(f"{source}: zero_optimization.stage must be 0, 1, 2 or 3 (an integer), got {stage!r}")
    opt = cfg.get("optimizer")
    if not isinstance(opt, dict):
        raise ConfigError(f"{source}: needs an 'optimizer' section (it owns the optimizer and its lr)")
    if str(opt.get("type", "")).lower() not in OPTIMIZERS:
        raise ConfigError(f"{source}: optimizer.type {opt.get('type')!r} is not one of {', '.join(OPTIMIZERS)}")
    for name, v in opt.get("params", {}).items():
        ok = (v == AUTO if name == "lr" else False) or (
            _is_number(v) if name in ("lr", "eps", "weight_decay", "clip_threshold", "decay_rate", "beta1")
            else isinstance(v, bool) if name in ("torch_adam", "adam_w_mode", "amsgrad")
            else isinstance(v, list) and len(v) == 2 and all(map(_is_number, v)) if name == "betas" else True)
        if not ok:
            raise ConfigError(f"{source}: optimizer.params.{name} has the wrong type: {v!r}")
    sched = cfg.get("scheduler")
    if sched is not None and (not isinstance(sched, dict) or sched.get("type") not in SCHEDULERS):
        raise ConfigError(f"{source}: scheduler.type must be one of {', '.join(SCHEDULERS)}, got {sched!r}")


def check_with_deepspeed(resolved: dict, source: str) -> None:
    """Parse the resolved JSON with DeepSpeed's own config classes (its pydantic models catch e.g. a
    misspelled zero_optimization key), as `deepspeed.initialize` will. Before the process group exists
    DeepSpeed assumes one rank, so it checks the triple with the global batch of one rank (`resolve`
    checked it for the real world size)."""
    from deepspeed.runtime import config as ds_runtime
    from deepspeed.utils import logger

    level = logger.level
    logger.setLevel(logging.WARNING)  # it logs its parsed config at INFO
    try:
        one_rank = {**copy.deepcopy(resolved), "train_batch_size": resolved["train_micro_batch_size_per_gpu"]
                    * resolved["gradient_accumulation_steps"]}
        ds_runtime.DeepSpeedConfig(one_rank)
    except Exception as e:  # noqa: BLE001 - pydantic and assertion errors alike: report, don't crash
        raise ConfigError(f"{source}: DeepSpeed rejects it: {' '.join(str(e).split())[:400]}") from None
    finally:
        logger.setLevel(level)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def resolve(cfg: dict, source: str, world: int, *, global_batch: int | None = None, micro_batch: int | None = None,
            lr: float | None = None, default_lr: float = 0.3, micro_cap: int = CPU_MICRO_BATCH_CAP,
            ) -> tuple[dict, BatchSizes, list[str]]:
    """(the JSON with every "auto" filled, the batch triple, notes on how "auto" values were chosen). Pure.

    Batch rule: the global batch comes from the JSON, --global_batch or, when "auto", 32 rounded up to a
    multiple of the world size; the micro-batch from the JSON, --micro_batch or the largest divisor of
    global / world that is <= `micro_cap`; accumulation = global / (micro x world). A triple that cannot
    divide is one error that names valid choices.
    """
    check_types(cfg, source)
    out = copy.deepcopy(cfg)
    notes = []
    fixed = {k: cfg.get(k) for k in BATCH_KEYS}
    for key, flag, value in (("train_batch_size", "--global_batch", global_batch),
                             ("train_micro_batch_size_per_gpu", "--micro_batch", micro_batch)):
        if value is not None and _is_int(fixed[key]) and fixed[key] != value:
            raise ConfigError(f"{flag} {value}: {source} fixes {key} = {fixed[key]}; set it to \"auto\" there to "
                              "take it from the flag")
        if value is not None:
            fixed[key] = value
    g, m, a = (fixed[k] if _is_int(fixed[k]) else None for k in BATCH_KEYS)
    auto = {k for k in BATCH_KEYS if cfg.get(k) == AUTO}
    if g is None and (m is None or "train_batch_size" in auto):
        g = -(-max(DEFAULT_GLOBAL_BATCH, world) // world) * world
        notes.append(f"global batch {g}" + (f" ({DEFAULT_GLOBAL_BATCH} rounded up to a multiple of the world "
                                             f"size {world})" if g != DEFAULT_GLOBAL_BATCH else ""))
    if g is None:  # only the micro-batch (and accumulation) given: the global batch follows the world size
        a = a or 1
        g = m * a * world
    if g % world:
        near = sorted({max(world, g // world * world), -(-g // world) * world})
        raise ConfigError(f"{source}: the global batch {g} cannot be split over {world} ranks: use a multiple of "
                          f"{world} (--global_batch {' or '.join(map(str, near))}) or another number of ranks")
    per_rank = g // world
    if m is None and a is not None:
        m, rem = divmod(per_rank, a)
        if rem:
            raise ConfigError(f"{source}: global batch {g} / world size {world} = {per_rank} per rank is not divisible "
                              f"by gradient_accumulation_steps {a} (divisors: {_divisors(per_rank)})")
    if m is None:
        m = max(d for d in _divisors(per_rank) if d <= max(1, micro_cap))
        notes.append(f"micro-batch {m} (the largest divisor of {per_rank} per rank up to {micro_cap})")
    if per_rank % m:
        raise ConfigError(f"{source}: micro-batch {m} does not divide the global batch {g} / world size {world} = "
                          f"{per_rank} per rank: use --micro_batch {', '.join(map(str, _divisors(per_rank)))}")
    if a is not None and m * a != per_rank:
        raise ConfigError(f"{source}: train_batch_size {g} != train_micro_batch_size_per_gpu {m} x "
                          f"gradient_accumulation_steps {a} x world size {world} (= {m * a * world})")
    sizes = BatchSizes(g, m, per_rank // m, world)
    out.update(train_batch_size=g, train_micro_batch_size_per_gpu=m, gradient_accumulation_steps=sizes.grad_accum)

    params = out["optimizer"].setdefault("params", {})
    if lr is not None and _is_number(cfg["optimizer"].get("params", {}).get("lr")) and params["lr"] != lr:
        raise ConfigError(f"--lr {lr}: {source} fixes optimizer.params.lr = {params['lr']}; set it to \"auto\" there "
                          "to take it from the flag")
    if params.get("lr", AUTO) == AUTO:
        params["lr"] = lr if lr is not None else default_lr
        if lr is None:
            notes.append(f"lr {default_lr}")
    return out, sizes, notes


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))
