"""The trainable parameters' fp32 masters, the optimizer's state and the engine's counters, in a
form that does not depend on the world size.

ZeRO (and DeepSpeed's bf16 optimizer) hand the torch optimizer flat 1-D fp32 partitions of the
trainable parameters, so its state is split by rank. We store it per trainable parameter, full
size, as the un-partitioned optimizer would hold it:

- elementwise state (a tensor shaped like the optimized tensor: Adam's exp_avg / exp_avg_sq,
  Adafactor's unfactored exp_avg_sq) -> `<param name>/<key>`, through DeepSpeed's fragment API
  (`safe_get_full_optimizer_state`: ZeRO-1/2/3, bf16 optimizer) or, without ZeRO, as the view of
  the parameter in the optimized tensor it lives in (`_replicated`);
- scalar state (Adam's step tensor, Adafactor's step and RMS) -> per optimized tensor `#<i>/<key>`
  (a 0-d tensor) or JSON (a number), taken from rank 0: every rank steps every tensor equally.
  Without ZeRO every rank holds the whole state, so state of any other shape (Adafactor's factored
  row/column moments of a matrix) is stored per optimized tensor too.

On load the state does not exist yet (torch optimizers create it lazily at their first step): it is
created for each optimized tensor with the saved keys and dtypes, then filled.
"""

from __future__ import annotations

import json

import torch

from .config import ConfigError
from .engine import base_optimizer, optimized_tensors
from .prompt import read_param, write_param
from .statefile import dtype_name, parse_dtype

_SCALARS = (bool, int, float, str, type(None))


def trainable(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def full_shape(p: torch.nn.Parameter) -> tuple[int, ...]:
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


def _partitioned(engine) -> bool:
    """Whether DeepSpeed's fragment API owns the trainable parameters' fp32 masters and state
    (ZeRO-3; ZeRO-1/2 and the bf16 optimizer link `_hp_mapping`)."""
    return any(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for _, p in trainable(engine))


def _replicated(engine) -> dict[int, tuple[int, int]]:
    """Without ZeRO: id(param) -> (index of the optimized tensor holding its fp32 master, offset in it).
    That tensor is the parameter itself (fp32), its fp32 copy (FP16_UnfusedOptimizer: bf16 without
    ZeRO) or its group's flat fp32 copy (FP16_Optimizer)."""
    index = {id(t): i for i, t in enumerate(optimized_tensors(engine))}
    wrapper = engine.optimizer
    if hasattr(wrapper, "fp16_groups") and hasattr(wrapper, "fp32_groups_flat"):
        out = {}
        for params, flat in zip(wrapper.fp16_groups, wrapper.fp32_groups_flat):
            offsets = [0, *torch.tensor([p.numel() for p in params]).cumsum(0).tolist()]
            out.update({id(p): (index[id(flat)], off) for p, off in zip(params, offsets)})
        return out
    if hasattr(wrapper, "fp16_groups") and hasattr(wrapper, "fp32_groups"):
        return {id(p): (index[id(m)], 0) for ps, ms in zip(wrapper.fp16_groups, wrapper.fp32_groups)
                for p, m in zip(ps, ms)}
    return {i: (j, 0) for i, j in index.items()}


def _locations(engine) -> dict[int, tuple[int, int]]:
    """`_replicated(engine)`, or {} where DeepSpeed's fragment API owns the masters and state."""
    return {} if _partitioned(engine) else _replicated(engine)


def _view(t: torch.Tensor, offset: int, p: torch.nn.Parameter) -> torch.Tensor:
    return t.view(-1).narrow(0, offset, p.numel()).view(p.shape)


def read_masters(engine, keep: bool = True) -> dict[str, torch.Tensor]:
    """{name: full fp32 master} of every trainable parameter. Collective under ZeRO-3; `keep=False`
    drops the copies (ranks that do not write)."""
    out, where, ts = {}, _locations(engine), optimized_tensors(engine)
    for name, p in trainable(engine):
        value = _view(ts[where[id(p)][0]], where[id(p)][1], p).detach().clone() if where else read_param(p)
        if keep:
            out[name] = value
    return out


def write_masters(engine, values: dict[str, torch.Tensor]) -> None:
    """Set every trainable parameter and its fp32 master. Collective under ZeRO-3."""
    where, ts = _locations(engine), optimized_tensors(engine)
    for name, p in trainable(engine):
        if where:
            with torch.no_grad():
                _view(ts[where[id(p)][0]], where[id(p)][1], p).copy_(values[name])
                p.copy_(values[name].to(p.dtype))
        else:
            write_param(p, values[name])


def _param_keys(engine, p, specs: list[dict], where: dict) -> list[str]:
    """The elementwise state keys stored for parameter `p`: those of the optimized tensor it lives in
    (no ZeRO), or those every partition holds (ZeRO: each partition spans parameters alike)."""
    if where:
        return sorted(specs[where[id(p)][0]]["elementwise"])
    keys = {tuple(sorted(s["elementwise"])) for s in specs}
    if len(keys) > 1:
        raise ValueError(f"the optimizer's partitions hold different elementwise state {sorted(keys)}")
    return list(keys.pop()) if keys else []


def read_optimizer(engine, keep: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """({key: tensor}, JSON description) of the whole optimizer state. Collective under ZeRO;
    `keep=False` drops the gathered tensors (ranks that do not write)."""
    opt, ts = base_optimizer(engine), optimized_tensors(engine)
    where = _locations(engine)
    tensors, specs = {}, []
    for i, t in enumerate(ts):
        spec = {"elementwise": {}, "tensors": {}, "values": {}}
        for key, v in opt.state.get(t, {}).items():
            if torch.is_tensor(v) and v.dim() > 0 and v.shape == t.shape:
                spec["elementwise"][key] = dtype_name(v.dtype)
            elif torch.is_tensor(v):
                if not where and v.dim() > 0:
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

    for name, p in trainable(engine):
        for key in _param_keys(engine, p, specs, where):
            if where:
                i, offset = where[id(p)]
                full = _view(opt.state[ts[i]][key], offset, p)
            else:
                full = safe_get_full_optimizer_state(p, key)  # collective
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
    where = _locations(engine)
    for name, p in trainable(engine):
        try:
            keys = _param_keys(engine, p, specs, where)
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

    opt, ts = base_optimizer(engine), optimized_tensors(engine)
    for i, (t, spec) in enumerate(zip(ts, meta["tensors"])):
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
    where = _locations(engine)
    for name, p in trainable(engine):
        for key in _param_keys(engine, p, meta["tensors"], where):
            value = tensors[f"{name}/{key}"]
            if where:
                i, offset = where[id(p)]
                _view(opt.state[ts[i]][key], offset, p).copy_(value)
            else:
                safe_set_full_optimizer_state(p, value.to(p.device), key)  # collective under ZeRO-3


def read_engine(engine) -> dict:
    """DeepSpeed's step counters, the lr scheduler's state and the optimizer's hyperparameters
    (the scheduled lr), as JSON."""
    scheduler = engine.lr_scheduler
    groups = [{k: v for k, v in g.items() if k != "params" and _jsonable(v)}
              for g in base_optimizer(engine).param_groups]
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
