"""What a run says about itself: the header it prints, config.yaml, results.json, the W&B config and
prompt.json's metadata. Pure functions of the resolved settings (softprompt/recipe.py's `Inputs`)."""

from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import asdict

from . import prompt as prompt_lib
from .config import RunConfig
from .dsconfig import AUTO


def eval_steps(steps) -> str:
    """'steps 167, 334, 501', or for many: 'steps 100, 200, ..., 5000 (50 evals)'."""
    steps = sorted(steps)
    shown = steps if len(steps) <= 6 else [*steps[:2], "...", steps[-1]]
    return f"steps {', '.join(map(str, shown))}" + (f" ({len(steps)} evals)" if len(steps) > 6 else "")


def describe_prompt(cfg: RunConfig, model_config) -> str:
    m = cfg.model
    if m.prompt_length == 0:
        return "no prompt"
    layers = prompt_lib.layers_for(m.prompt_depth, model_config)
    return (f"prompt {m.prompt_length} x {model_config.d_model} ({m.prompt_init} init"
            + (f", deep: {layers} layers ({m.prompt_depth})" if layers > 1 else "")
            + (f", residual MLP {m.reparam_dim}" if m.reparam == "residual" else "")
            + (f", max row norm {m.prompt_max_norm}" if m.prompt_max_norm else "") + ")")


def header(cfg: RunConfig, v) -> str:
    """The run's first lines: data, model, parallelism, batch, optimizer and schedule, as resolved."""
    s, mc, st = v.splits, v.model_config, v.settings
    sizes = {k: len(getattr(s, k)) for k in ("train", "dev", "test") if getattr(s, k) is not None}
    mode = {0: "replicated (ZeRO stage 0)", 1: "ZeRO-1", 2: "ZeRO-2", 3: "ZeRO-3"}[st.stage]
    return "\n".join([
        f"data: {cfg.data.dataset} {sizes} labels {s.label_names}",
        f"verbalizer token ids per class: {v.pieces}"
        + (f" (label scoring {cfg.model.label_scoring})" if any(len(p) > 1 for p in v.pieces) else ""),
        f"model: {v.source.describe()} ({mc.model_type}, d_model {mc.d_model}, {mc.num_layers}+"
        f"{mc.num_decoder_layers} layers, vocab {mc.vocab_size}); tune {cfg.model.tune}; {describe_prompt(cfg, mc)}",
        f"parallelism: {mode}{', frozen weights offloaded to CPU' if st.offload_param else ''}, "
        f"{'bf16' if st.bf16 else 'fp32'}{', activation checkpointing' if v.activation_checkpointing else ''}"
        f"; DeepSpeed JSON {v.ds_source}",
        loading_memory(v),
        f"batch: global {v.sizes.global_batch} = micro {v.sizes.micro_batch} x accum {v.sizes.grad_accum} x "
        f"world {v.sizes.world_size}; optimizer {st.optimizer} lr {st.lr:g}"
        + (f" ({'; '.join(v.notes)})" if v.notes else ""),
        f"schedule: {v.schedule.total_steps} steps ({v.schedule.steps_per_epoch}/epoch), "
        f"dev eval at {eval_steps(v.schedule.eval_steps)}; best by {cfg.train.select_metric}"
        + (f"; class weights {[round(w, 3) for w in v.class_weights]}" if v.class_weights else ""),
    ])


def size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


def loading_memory(v) -> str:
    """How much host memory loading the frozen model takes, per node: under ZeRO-3 rank 0 maps every weight file
    of the checkpoint at once (transformers' ZeRO-3 path); otherwise every rank builds a full copy in host
    memory before it moves to its device. A node's memory limit (Slurm --mem) must allow it."""
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or v.sizes.world_size)
    if v.settings.stage == 3:
        need = f"rank 0 maps the whole checkpoint, {size(v.weights.nbytes)}"
    else:
        copy = v.weights.nbytes * (2 if v.settings.bf16 else 4) / 4  # the hub's mT5 files are fp32
        need = f"each of {ranks} rank(s) per node builds a full copy, {size(ranks * copy)} in all"
    return f"host memory while the model loads: {need} (a node's memory limit must allow it)"


def replayable(cfg: RunConfig, v) -> dict:
    """config.yaml's content: every setting as resolved, the DeepSpeed JSON inline. Its batch triple and lr
    go back to "auto" with the resolved values in --global_batch/--micro_batch/--lr, so the file also runs
    at another world size (accumulation is derived again)."""
    out = cfg.to_dict()
    ds = copy.deepcopy(v.ds_config)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        ds[key] = AUTO
    ds["optimizer"].setdefault("params", {})["lr"] = AUTO
    out["train"].update(ds_config=ds, global_batch=v.sizes.global_batch, micro_batch=v.sizes.micro_batch,
                        lr=v.settings.lr, activation_checkpointing=v.activation_checkpointing, overwrite=False,
                        dry_run=False)
    if v.wandb is not None:
        out["train"].update(wandb_project=v.wandb.project, wandb_mode=v.wandb.mode, wandb_run_name=v.wandb.name,
                            wandb_group=v.wandb.group)
    return out


def fingerprint(cfg: RunConfig, v) -> dict:
    """What a run resumed from a checkpoint must share with the run that wrote it: everything that decides
    the examples, the model, the prompt and the optimizer (not the world size)."""
    m = cfg.model
    data = {k: val for k, val in asdict(cfg.data).items() if k != "cache_dir"}
    splits = {k: len(getattr(v.splits, k)) for k in ("train", "dev", "test") if getattr(v.splits, k) is not None}
    return {**data, "split_sizes": splits, "label_names": v.splits.label_names, "model": v.source.name,
            "tokenizer_hash": v.tokenizer_hash, "verbalizer_ids": v.pieces,
            "label_scoring": m.label_scoring, "tune": m.tune,
            "prompt_length": m.prompt_length, "prompt_depth": m.prompt_depth, "prompt_init": m.prompt_init,
            "reparam": m.reparam, "reparam_dim": m.reparam_dim, "prompt_max_norm": m.prompt_max_norm,
            "dropout": m.dropout, "seed": cfg.train.seed, "class_weights": cfg.train.class_weights,
            "select_metric": cfg.train.select_metric, "global_batch": v.sizes.global_batch,
            "optimizer": v.ds_config.get("optimizer"), "scheduler": v.ds_config.get("scheduler"),
            "gradient_clipping": v.ds_config.get("gradient_clipping", 0.0)}


def prompt_meta(cfg: RunConfig, v) -> dict:
    """What prompt.json records: enough to check a prompt against a model and data before use."""
    return {"model": v.source.name, "init": cfg.model.prompt_init, "depth": cfg.model.prompt_depth,
            "label_names": v.splits.label_names, "verbalizer_ids": v.pieces, "label_scoring": cfg.model.label_scoring,
            "tokenizer_hash": v.tokenizer_hash, "max_length": cfg.data.max_length}


def resolved(cfg: RunConfig, v, world: int, counts: dict) -> dict:
    """The settings part of results.json and of the W&B run's config: the flags' sections (data, model,
    train), the resolved DeepSpeed JSON, batch triple, optimizer recipe and W&B settings."""
    from .tracking import git_commit

    return {**cfg.to_dict(), "ds_config": v.ds_config, "ds_config_source": v.ds_source,
            "recipe": v.settings.recipe(v.ds_config), "batch": asdict(v.sizes), "auto": v.notes,
            "activation_checkpointing": v.activation_checkpointing,
            "wandb": asdict(v.wandb) if v.wandb else None, "world_size": world, **counts, "git_commit": git_commit()}


def results(cfg: RunConfig, v, result, world: int, counts: dict, wall_s: float) -> dict:
    final = result.final_prompt
    return {
        **resolved(cfg, v, world, counts),
        "label_names": v.splits.label_names,
        "verbalizer_ids": v.pieces,
        "tokenizer_hash": v.tokenizer_hash,
        "class_weights": v.class_weights,
        "steps": v.schedule.total_steps,
        "best_step": result.best_step,
        "dev": result.dev,
        "test": result.test,
        "guards": result.guards,
        "final_prompt_sha256": hashlib.sha256(final.numpy().tobytes()).hexdigest() if final is not None else None,
        "wall_time_s": wall_s,
    }
