"""What a run derives from its config before any process group exists: the resolved DeepSpeed JSON and
batch triple, the model source, the tokenized data, the verbalizer, the schedule, the checkpoint to resume.
`validate` finds everything that can be wrong with the inputs, so a bad run fails in seconds with one line
and exit code 2; `--dry_run` stops after it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint, data, dsconfig, export, loading, rundir, tiny, verbalizer
from . import prompt as prompt_lib
from .config import ConfigError, RunConfig
from .metrics import balanced_weights
from .report import fingerprint
from .tokenize import tokenizer_hash
from .trainer import Schedule


@dataclass
class Inputs:
    """Everything derived from the config and the inputs, once, before any process group exists."""

    ds_config: dict  # resolved: no "auto" left
    ds_source: str  # the file (or "auto: ...") it came from
    settings: dsconfig.Settings
    sizes: dsconfig.BatchSizes
    notes: list[str]  # how "auto" values were chosen
    source: loading.ModelSource
    model_config: object  # transformers PretrainedConfig
    tokenizer: object
    tokenizer_hash: str
    splits: data.Splits
    pieces: list[list[int]]  # verbalizer token ids per class
    schedule: Schedule
    resume_from: Path | None
    init_prompt: torch.Tensor | None  # (L, P, D) from --init_prompt
    class_weights: list[float] | None
    wandb: object  # tracking.WandbSettings or None
    activation_checkpointing: bool  # asked for, or what --ds_config auto's plan needs
    weights: loading.CheckpointInfo  # the frozen model's files


def default_lr(cfg: RunConfig) -> float:
    if cfg.model.tune == "full":
        return 5e-4
    return 0.3 if cfg.model.prompt_depth == "input" else 0.03


def validate(cfg: RunConfig) -> Inputs:
    from .tracking import wandb_settings

    t = cfg.train
    rundir.check(t.output_dir, t.resume, t.overwrite)
    source = loading.model_source(cfg.model.model)
    model_config = loading.load_model_config(source)
    world = dsconfig.world_size_from_env()
    weights = loading.checkpoint_info(source)
    _, raw, ds_source, micro_cap, checkpointing = plan_parallelism(cfg, model_config, source,
                                                                   not weights.has_lm_head, world)
    where = f"--ds_config {ds_source.split(' (')[0]}"
    ds_config, sizes, notes = dsconfig.resolve(raw, where, world, global_batch=t.global_batch, micro_batch=t.micro_batch,
                                               lr=t.lr, default_lr=default_lr(cfg), micro_cap=micro_cap)
    dsconfig.check_with_deepspeed(ds_config, where)
    tokenizer = loading.load_tokenizer(source)
    cache_dir = cfg.data.cache_dir or os.path.join(tiny.cache_dir(), "tokenized")
    splits = data.tokenize_splits(data.load_splits(cfg.data), tokenizer, cfg.data.max_length, cache_dir)
    pieces = verbalizer.resolve(splits.label_names, tokenizer, model_config.vocab_size, cfg.model.verbalizer_ids,
                                cfg.model.verbalizer_words)
    try:
        schedule = Schedule.build(len(splits.train), sizes.global_batch, t.max_steps, t.epochs, t.eval_every)
        class_weights = balanced_weights(splits.train["label"], splits.label_names) if t.class_weights == "balanced" \
            else None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    tok_hash = tokenizer_hash(tokenizer)  # once: it serializes the whole vocabulary
    init = load_init_prompt(cfg, model_config, splits.label_names, tok_hash) if t.init_prompt else None
    v = Inputs(ds_config, ds_source, dsconfig.Settings.of(ds_config), sizes, notes, source, model_config,
               tokenizer, tok_hash, splits, pieces, schedule, checkpoint.find_checkpoint(t.output_dir, t.resume),
               init, class_weights, wandb_settings(cfg, os.environ), checkpointing, weights)
    if v.resume_from is not None:  # the same run, or a clear refusal naming what differs
        checkpoint.check_fingerprint(checkpoint.read_fingerprint(v.resume_from), fingerprint(cfg, v), v.resume_from)
    return v


def devices(world: int) -> tuple[str, int, int, float]:
    """(gpu or cpu, ranks per node, nodes, GiB per GPU or per host) as the launcher's environment and the
    visible devices say, before any process group exists."""
    import torch.cuda
    from deepspeed.accelerator import get_accelerator

    gpu = get_accelerator().device_name() != "cpu"
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE")
                or (min(world, torch.cuda.device_count()) if gpu else world))
    if gpu:
        memory = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory
    else:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return ("gpu" if gpu else "cpu"), local, -(-world // local), memory / 2**30


def plan_parallelism(cfg: RunConfig, model_config, source, tied: bool,
                     world: int) -> tuple[object, dict, str, int, bool]:
    """Where the planner (softprompt/plan.py) decides: (its recommendation for --ds_config auto, else None;
    the DeepSpeed JSON and where it came from; the largest micro-batch for an "auto" micro-batch; whether
    activation checkpointing is on: asked for, or what the recommendation needs)."""
    from . import plan

    kind, per_node, nodes, mem_gb = devices(world)
    shape = plan.shape_from_hf_config(model_config, source.name, tied=tied)
    m, t = cfg.model, cfg.train
    sizes = dict(seq_len=cfg.data.max_length, prompt_length=max(1, m.prompt_length), prompt_depth=m.prompt_depth)
    rec = None
    try:
        if t.ds_config == "auto":
            recommend = plan.recommend if kind == "gpu" else plan.recommend_cpu
            rec = recommend(shape, per_node, nodes, mem_gb, global_batch=t.global_batch, **sizes)
            raw, source_name = dsconfig.load(rec.config)[0], f"{rec.config} (--ds_config auto: {rec.reason})"
        else:
            raw, source_name = dsconfig.load(t.ds_config) if isinstance(t.ds_config, str) else (t.ds_config,
                                                                                                "config file")
        checkpointing = t.activation_checkpointing or bool(rec and rec.activation_checkpointing)
        if kind == "cpu":  # larger micro-batches gain nothing on a few cores
            cap = dsconfig.CPU_MICRO_BATCH_CAP
            return rec, raw, source_name, min(rec.micro_batch, cap) if rec else cap, checkpointing
        settings = dsconfig.Settings.of({"optimizer": {}, **raw})
        mode = "zero3_offload" if settings.offload_param else "zero3" if settings.stage == 3 else "replicated"
        fit = plan.plans_for(shape, world, mem_gb, dtype="bf16" if settings.bf16 else "fp32", headroom_gb=3.0,
                             modes=(mode,), ds_config=raw, **sizes)[0].max_micro_batch(checkpointing)
    except plan.PlanError as e:
        raise ConfigError(f"--ds_config {t.ds_config if isinstance(t.ds_config, str) else 'from --config'}: {e}") \
            from None
    return rec, raw, source_name, max(1, fit), checkpointing


def load_init_prompt(cfg: RunConfig, model_config, label_names: list[str], tok_hash: str) -> torch.Tensor:
    """--init_prompt's values as (L, P, D), checked against this run's prompt shape, labels and tokenizer. A
    prompt.safetensors, a run's output dir or a PEFT prompt-tuning adapter (softprompt/export.py)."""
    path = cfg.train.init_prompt
    values, meta = export.read_prompt(path, "--init_prompt", model_config.d_model)
    values = values if values.dim() == 3 else values.unsqueeze(0)
    expected = (prompt_lib.layers_for(cfg.model.prompt_depth, model_config), cfg.model.prompt_length,
                model_config.d_model)
    if tuple(values.shape) != expected:
        raise ConfigError(f"--init_prompt {path}: shape (layers, tokens, d_model) = {tuple(values.shape)}, this "
                          f"run needs {expected} (--prompt_depth {cfg.model.prompt_depth}, --prompt_length)")
    for key, ours in (("label_names", label_names), ("tokenizer_hash", tok_hash)):
        if key in meta and meta[key] != ours:
            raise ConfigError(f"--init_prompt {path}: {key} {meta[key]} does not match this run's {ours}")
    return values
