"""The DeepSpeed engine around the prompted frozen model, built one way for training and for prediction.

The optimizer is given the trainable parameters only: the prompt's, or every parameter with --tune full.
"""

from __future__ import annotations

import torch

from .config import ConfigError


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

    from .dist import all_reduce_sum

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
        held = int(all_reduce_sum(torch.tensor(held)).item())
    n_train = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    assert held == n_train, f"the optimizer holds {held} elements; the trainable parameters have {n_train}"
    return engine, scheduler


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's wrapper (or the optimizer itself without one)."""
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


def build(cfg, v):
    """The DeepSpeed engine of a training run: the frozen model loaded as `v` (inputs.Inputs) says, the
    prompt initialised as the config says, the verbalizer head read once (a frozen lm_head never changes,
    so the 250k-row head is never gathered again), and for multi-piece words scored by sum/mean the
    rows of their pieces (softprompt/scoring.py)."""
    import sys

    from . import prompt as prompt_lib
    from . import scoring, verbalizer
    from .dist import is_main_process
    from .loading import load_frozen_model
    from .model import PromptedMT5

    m = cfg.model
    dtype = torch.bfloat16 if v.settings.bf16 else torch.float32
    mt5 = load_frozen_model(v.source, v.model_config, dtype, v.ds_config, m.dropout, v.activation_checkpointing)
    with prompt_lib.gathered([mt5.lm_head.weight]):
        head = verbalizer.class_head(mt5.lm_head.weight.detach(), v.pieces)  # (C, D), a copy
        # None unless some word has several pieces and --label_scoring is sum/mean; a live lm_head under --tune full.
        rank = scoring.rank_head(None if m.tune == "full" else mt5.lm_head.weight, [v.pieces], [m.label_scoring])
    prompt = None
    if m.prompt_length:
        init = v.init_prompt
        if init is None:
            frequent = (prompt_lib.most_frequent_ids(v.splits.train["input_ids"], set(v.tokenizer.all_special_ids),
                                                     v.model_config.vocab_size)
                        if m.prompt_init in ("vocab", "labels") else ())
            init = prompt_lib.init_prompt(m.prompt_init, m.prompt_length, mt5.shared, cfg.train.seed, frequent,
                                          v.pieces)
        prompt = prompt_lib.SoftPrompt(init, prompt_lib.layers_for(m.prompt_depth, v.model_config), m.reparam,
                                       m.reparam_dim, m.prompt_max_norm)
        threshold = v.settings.persistence_threshold
        if v.settings.stage == 3 and prompt.weight.numel() >= threshold and is_main_process():
            print(f"warning: the prompt ({prompt.weight.numel()} elements) is above "
                  f"stage3_param_persistence_threshold ({threshold}): it will be re-gathered every step; raise the "
                  "threshold", file=sys.stderr)
    if m.tune == "full":  # lm_head trains too: score with its live rows
        mt5.requires_grad_(True)
        model = PromptedMT5(mt5, prompt, pieces=v.pieces, rank=rank)
    else:
        model = PromptedMT5(mt5, prompt, head, rank=rank)
    return initialize(model, v.ds_config, m.tune)[0]


def param_counts(engine) -> dict:
    """Total and trainable parameter elements."""
    # (elements, trainable) per parameter; under ZeRO-3 a parameter is a size-0 placeholder + ds_numel
    params = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in engine.module.parameters()]
    return {"params_total": sum(n for n, _ in params),
            "params_trainable": sum(n for n, trainable in params if trainable)}
