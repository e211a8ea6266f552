"""The optimizer's state and the engine's counters, in a form that does not depend on the world size.

ZeRO (and DeepSpeed's bf16 optimizer) hand the torch optimizer flat 1-D fp32 partitions of the
trainable parameters, so its state is split by rank. We store it per trainable parameter, full
size, as the un-partitioned optimizer would hold it:

- elementwise state (a tensor shaped like the optimized tensor: Adam's exp_avg / exp_avg_sq,
  Adafactor's unfactored exp_avg_sq) -> `<param name>/<key>`, gathered through DeepSpeed's
  `safe_get_full_optimizer_state` (ZeRO-1/2/3, bf16) or read directly without ZeRO;
- scalar state (Adam's step tensor, Adafactor's step and RMS) -> per optimized tensor `#<i>/<key>`
  (a 0-d tensor) or JSON (a number), taken from rank 0: every rank steps every tensor equally.
  Without ZeRO the optimized tensors are the parameters themselves, so state of any other shape
  (Adafactor's factored row/column moments of a matrix) is stored per tensor too.

On load the state does not exist yet (torch optimizers create it lazily at their first step): it is
created for each optimized tensor with the saved keys and dtypes, then filled.
"""

from __future__ import annotations

import json

import torch

from .config import ConfigError
from .engine import base_optimizer, optimized_tensors
from .statefile import dtype_name, parse_dtype

_SCALARS = (bool, int, float, str, type(None))


def trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def full_shape(p: torch.nn.Parameter) -> tuple[int, ...]:
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


def _partitioned(p: torch.nn.Parameter) -> bool:
    """Whether DeepSpeed's fragment API owns this parameter's state (ZeRO-3, or ZeRO-1/2 and bf16)."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def _param_keys(engine, p, specs: list[dict]) -> list[str]:
    """The elementwise state keys stored for parameter `p`: those of the optimized tensor that is `p`
    (no ZeRO), or those every partition holds (ZeRO: each partition spans parameters alike)."""
    if not _partitioned(p):
        index = [i for i, t in enumerate(optimized_tensors(engine)) if t is p]
        return sorted(specs[index[0]]["elementwise"]) if index else []
    keys = {tuple(sorted(s["elementwise"])) for s in specs}
    if len(keys) > 1:
        raise ValueError(f"the optimizer's partitions hold different elementwise state {sorted(keys)}")
    return list(keys.pop()) if keys else []


def read_optimizer(engine, keep: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """({key: tensor}, JSON description) of the whole optimizer state. Collective under ZeRO;
    `keep=False` drops the gathered tensors (ranks that do not write)."""
    opt, named = base_optimizer(engine), trainable(engine)
    partitioned = any(_partitioned(p) for _, p in named)
    tensors, specs = {}, []
    for i, t in enumerate(optimized_tensors(engine)):
        spec = {"elementwise": {}, "tensors": {}, "values": {}}
        for key, v in opt.state.get(t, {}).items():
            if torch.is_tensor(v) and v.dim() > 0 and v.shape == t.shape:
                spec["elementwise"][key] = dtype_name(v.dtype)
            elif torch.is_tensor(v):
                if partitioned and v.dim() > 0:
                    raise ValueError(f"optimizer state {key!r} of shape {tuple(v.shape)} on a ZeRO partition is "
                                     "neither elementwise nor a scalar: it cannot be saved for another world size")
                spec["tensors"][key] = {"dtype": dtype_name(v.dtype), "on_param_device": v.device == t.device}
                tensors[f"#{i}/{key}"] = v
            elif isinstance(v, _SCALARS):
                spec["values"][key] = v
            else:
                raise TypeError(f"optimizer state {key!r} is a {type(v).__name__}: neither a tensor nor a number")
        specs.append(spec)
    from deepspeed.utils import safe_get_full_optimizer_state

    for name, p in named:
        for key in _param_keys(engine, p, specs):
            full = safe_get_full_optimizer_state(p, key) if _partitioned(p) else opt.state[p][key]
            if keep:
                tensors[f"{name}/{key}"] = full.detach().reshape(full_shape(p)).cpu()
    return (tensors if keep else {}), {"tensors": specs}


def check_optimizer(engine, tensors: dict[str, torch.Tensor], meta: dict, label: str) -> None:
    """Local: does the saved state fit this run's optimizer? Runs before any collective, so that
    every rank fails alike."""
    specs, ts = meta["tensors"], optimized_tensors(engine)
    if len(specs) != len(ts):
        raise ConfigError(f"{label}: its optimizer state covers {len(specs)} tensors, this run's optimizer updates "
                          f"{len(ts)} (another ZeRO stage or optimizer?)")
    for i, spec in enumerate(specs):
        for key, info in spec["tensors"].items():
            if f"#{i}/{key}" not in tensors:
                raise ConfigError(f"{label}: optimizer.safetensors lacks '#{i}/{key}'")
            parse_dtype(info["dtype"], label)
        for dt in spec["elementwise"].values():
            parse_dtype(dt, label)
    for name, p in trainable(engine):
        try:
            keys = _param_keys(engine, p, specs)
        except ValueError as e:
            raise ConfigError(f"{label}: {e}") from None
        for key in keys:
            got = tensors.get(f"{name}/{key}")
            if got is None:
                raise ConfigError(f"{label}: optimizer.safetensors lacks '{name}/{key}'")
            if tuple(got.shape) != full_shape(p):
                raise ConfigError(f"{label}: optimizer.safetensors '{name}/{key}' has shape {tuple(got.shape)}, "
                                  f"this run's {name} is {full_shape(p)}")


def write_optimizer(engine, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Create the optimizer state with the saved keys and dtypes, then fill it. Collective under ZeRO."""
    from deepspeed.utils import safe_set_full_optimizer_state

    opt = base_optimizer(engine)
    for i, (t, spec) in enumerate(zip(optimized_tensors(engine), meta["tensors"])):
        state = {key: torch.zeros_like(t, dtype=parse_dtype(dt, "")) for key, dt in spec["elementwise"].items()}
        for key, info in spec["tensors"].items():
            state[key] = tensors[f"#{i}/{key}"].to(t.device if info["on_param_device"] else "cpu",
                                                   parse_dtype(info["dtype"], ""), copy=True)
        opt.state[t] = {**state, **spec["values"]}
    wrapper = engine.optimizer
    if hasattr(wrapper, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO-1/2 and the bf16 optimizer link each parameter's fragment to the state tensors after
        # their first step; the state now exists, so link now (to these tensors, not stale ones).
        wrapper._hp_optimizer_states_linked = False
        wrapper._lazy_init_hp_params_optimizer_state()
    for name, p in trainable(engine):
        for key in _param_keys(engine, p, meta["tensors"]):
            value = tensors[f"{name}/{key}"]
            if _partitioned(p):
                safe_set_full_optimizer_state(p, value.to(p.device), key)
            else:
                opt.state[p][key].copy_(value)


def read_engine(engine) -> dict:
    """DeepSpeed's step counters, the lr scheduler's state and the optimizer's hyperparameters
    (the scheduled lr), as JSON."""
    scheduler = engine.lr_scheduler
    groups = [{k: v for k, v in g.items() if k != "params" and _jsonable(v)} for g in base_optimizer(engine).param_groups]
    state = {"global_steps": engine.global_steps, "global_samples": engine.global_samples,
             "micro_steps": engine.micro_steps, "skipped_steps": engine.skipped_steps,
             "grad_accum": engine.gradient_accumulation_steps(), "param_groups": groups,
             "lr_scheduler": scheduler.state_dict() if scheduler is not None else None}
    try:
        json.dumps(state["lr_scheduler"])
    except TypeError:
        raise TypeError(f"the lr scheduler {type(scheduler).__name__}'s state_dict is not JSON") from None
    return state


def _jsonable(v) -> bool:
    return isinstance(v, _SCALARS) or (isinstance(v, (list, tuple)) and all(isinstance(x, _SCALARS) for x in v))


def write_engine(engine, state: dict, label: str) -> None:
    groups = base_optimizer(engine).param_groups
    if len(state["param_groups"]) != len(groups):
        raise ConfigError(f"{label}: {len(state['param_groups'])} optimizer param groups, this run has {len(groups)}")
    if state["micro_steps"] % state["grad_accum"]:
        raise ConfigError(f"{label}: saved between accumulation boundaries (micro step {state['micro_steps']})")
    for group, saved in zip(groups, state["param_groups"]):
        for k, v in saved.items():
            if k in group:
                group[k] = tuple(v) if isinstance(group[k], tuple) else v
    engine.global_steps = state["global_steps"]
    engine.global_samples = state["global_samples"]
    engine.skipped_steps = state["skipped_steps"]
    # Micro-steps per optimizer step follow this run's accumulation, which the world size sets.
    engine.micro_steps = state["micro_steps"] // state["grad_accum"] * engine.gradient_accumulation_steps()
    if (state["lr_scheduler"] is None) != (engine.lr_scheduler is None):
        raise ConfigError(f"{label}: lr scheduler {'absent' if state['lr_scheduler'] is None else 'present'} in the "
                          "checkpoint but not in this run's ds_config")
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
