"""parse -> validate -> build -> train -> close. `train.py` calls `main`.

Everything that can be wrong with the inputs (data, labels, verbalizer, model path, ds_config,
batch triple) is checked in `validate`, before any process group exists or any file is written,
so a bad run fails in seconds with one line and exit code 2. `--dry_run` stops right there.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from softprompt import checkpoint, data, engine, prompt as prompt_lib, tiny, verbalizer
from softprompt.config import ConfigError, RunConfig
from softprompt.io import write_json
from softprompt.metrics import balanced_weights
from softprompt.tokenize import tokenizer_hash

from . import cli

EXIT_CONFIG_ERROR = 2


@dataclass
class Validated:
    """Everything derived from the config and inputs, computed once."""

    ds_config: dict
    sizes: engine.BatchSizes
    model_path: str
    model_config: object
    tokenizer: object
    splits: data.Splits
    pieces: list[list[int]]
    schedule: object
    checkpoint: Path | None  # to resume from
    init_prompt: object  # (n_tokens, d_model) tensor from --init_prompt, or None
    class_weights: list[float] | None  # per class, from --class_weights balanced
    tokenizer_hash: str  # "tiny" trains its own tokenizer: it differs across sentencepiece versions


def validate(cfg: RunConfig) -> Validated:
    from transformers import AutoTokenizer

    from softprompt.trainer import Schedule

    ds_config = engine.load_ds_config(cfg.train.ds_config)
    sizes = engine.batch_sizes(ds_config, engine.world_size_from_env(), f"--ds_config {cfg.train.ds_config}")
    model_path = tiny.resolve_model(cfg.model.model)
    model_config = engine.load_model_config(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    cache_dir = cfg.data.cache_dir or os.path.join(tiny.cache_dir(), "tokenized")
    splits = data.tokenize_splits(data.load_splits(cfg.data), tokenizer, cfg.data.max_length, cache_dir)
    pieces = verbalizer.resolve(splits.label_names, tokenizer, model_config.vocab_size,
                                cfg.model.verbalizer_ids, cfg.model.verbalizer_words)
    try:
        schedule = Schedule.build(len(splits.train), sizes.global_batch, cfg.train.max_steps,
                                  cfg.train.epochs, cfg.train.eval_every)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    resume_from = checkpoint.find_checkpoint(cfg.train.output_dir, cfg.train.resume)
    init = None
    tok_hash = tokenizer_hash(tokenizer)  # once: it serializes the whole vocabulary
    if cfg.train.init_prompt:
        init = load_init_prompt(cfg, model_config, splits.label_names, tok_hash)
    weights = None
    if cfg.train.class_weights == "balanced":
        weights = balanced_weights(splits.train["label"], splits.label_names)
    v = Validated(ds_config, sizes, model_path, model_config, tokenizer, splits, pieces, schedule,
                  resume_from, init, weights, tok_hash)
    if resume_from is not None:
        checkpoint.check_fingerprint(checkpoint.read_fingerprint(resume_from), fingerprint(cfg, v), resume_from)
    return v


def fingerprint(cfg: RunConfig, v: Validated) -> dict:
    """What a run resumed from a checkpoint must share with the run that wrote it: everything that
    decides the examples, the model, the prompt and the optimizer (not the world size)."""
    m = cfg.model
    data = {k: val for k, val in asdict(cfg.data).items() if k != "cache_dir"}
    splits = {k: len(getattr(v.splits, k)) for k in ("train", "dev", "test") if getattr(v.splits, k) is not None}
    return {**data, "split_sizes": splits, "label_names": v.splits.label_names, "model": v.model_path,
            "tokenizer_hash": v.tokenizer_hash, "verbalizer_ids": v.pieces, "tune": m.tune,
            "prompt_length": m.prompt_length, "prompt_depth": m.prompt_depth, "prompt_init": m.prompt_init,
            "reparam": m.reparam, "reparam_dim": m.reparam_dim, "prompt_max_norm": m.prompt_max_norm,
            "dropout": m.dropout, "seed": cfg.train.seed, "class_weights": cfg.train.class_weights,
            "select_metric": cfg.train.select_metric, "global_batch": v.sizes.global_batch,
            "optimizer": v.ds_config.get("optimizer"), "scheduler": v.ds_config.get("scheduler"),
            "gradient_clipping": v.ds_config.get("gradient_clipping", 0.0)}


def load_init_prompt(cfg: RunConfig, model_config, label_names: list[str], tok_hash: str):
    """--init_prompt's values as (L, P, D), checked against this run's prompt shape, labels and tokenizer."""
    path = cfg.train.init_prompt
    values, meta = checkpoint.load_prompt(path, flag="--init_prompt")
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


def _steps(eval_steps) -> str:
    """'steps 167, 334, 501', or for many: 'steps 100, 200, ..., 5000 (50 evals)'."""
    steps = sorted(eval_steps)
    shown = steps if len(steps) <= 6 else [*steps[:2], "...", steps[-1]]
    return f"steps {', '.join(map(str, shown))}" + (f" ({len(steps)} evals)" if len(steps) > 6 else "")


def summary(cfg: RunConfig, v: Validated) -> str:
    s = v.splits
    sizes = {k: len(getattr(s, k)) for k in ("train", "dev", "test") if getattr(s, k) is not None}
    mc = v.model_config
    return "\n".join([
        f"data: {cfg.data.dataset} {sizes} labels {s.label_names}",
        f"verbalizer token ids per class: {v.pieces}",
        f"model: {v.model_path} ({mc.model_type}, d_model {mc.d_model}, {mc.num_layers}+{mc.num_decoder_layers} "
        f"layers, vocab {mc.vocab_size}); tune {cfg.model.tune}; {describe_prompt(cfg, mc)}",
        f"batch: global {v.sizes.global_batch} = micro {v.sizes.micro_batch} x accum {v.sizes.grad_accum} x "
        f"world {v.sizes.world_size}; ZeRO stage {engine.zero_stage(v.ds_config)}",
        f"schedule: {v.schedule.total_steps} steps ({v.schedule.steps_per_epoch}/epoch), "
        f"dev eval at {_steps(v.schedule.eval_steps)}; best by {cfg.train.select_metric}"
        + (f"; class weights {[round(w, 3) for w in v.class_weights]}" if v.class_weights else ""),
    ])


def describe_prompt(cfg: RunConfig, model_config) -> str:
    m = cfg.model
    if m.prompt_length == 0:
        return "no prompt"
    layers = prompt_lib.layers_for(m.prompt_depth, model_config)
    return (f"prompt {m.prompt_length} x {model_config.d_model} ({m.prompt_init} init"
            + (f", deep: {layers} layers ({m.prompt_depth})" if layers > 1 else "")
            + (f", residual MLP {m.reparam_dim}" if m.reparam == "residual" else "")
            + (f", max row norm {m.prompt_max_norm}" if m.prompt_max_norm else "") + ")")


def build(cfg: RunConfig, v: Validated):
    """The frozen model loaded into ZeRO-3 partitions, the prompt, and the DeepSpeed engine."""
    import torch
    from transformers.integrations import HfDeepSpeedConfig

    from softprompt.model import PromptedMT5

    bf16 = v.ds_config.get("bf16", {}).get("enabled", False)
    # Must stay referenced until the model is built: from_pretrained reads it to load into partitions.
    hf_ds = HfDeepSpeedConfig(v.ds_config) if engine.zero_stage(v.ds_config) == 3 else None
    mt5 = engine.load_frozen_model(v.model_path, v.model_config, cfg.model.dropout,
                                   torch.bfloat16 if bf16 else torch.float32)
    with prompt_lib.gathered([mt5.lm_head.weight]):
        head = verbalizer.class_head(mt5.lm_head.weight.detach(), v.pieces)  # (C, D), a copy
    special = set(v.tokenizer.all_special_ids)
    frequent = (prompt_lib.most_frequent_ids(v.splits.train["input_ids"], special)
                if cfg.model.prompt_init in ("vocab", "labels") else ())
    m = cfg.model
    prompt = None
    if m.prompt_length:
        init = v.init_prompt
        if init is None:
            init = prompt_lib.init_prompt(m.prompt_init, m.prompt_length, mt5.shared, cfg.train.seed, frequent,
                                          v.pieces)
        prompt = prompt_lib.SoftPrompt(init, prompt_lib.layers_for(m.prompt_depth, v.model_config), m.reparam,
                                       m.reparam_dim, m.prompt_max_norm)
        threshold = v.ds_config.get("zero_optimization", {}).get("stage3_param_persistence_threshold", 100_000)
        if hf_ds is not None and prompt.weight.numel() >= threshold and engine.is_main_process():
            print(f"warning: the prompt ({prompt.weight.numel()} elements) is above "
                  f"stage3_param_persistence_threshold ({threshold}): it will be re-gathered every step; "
                  "raise the threshold", file=sys.stderr)
    if m.tune == "full":  # lm_head trains too: score with its live rows
        mt5.requires_grad_(True)
        model = PromptedMT5(mt5, prompt, pieces=v.pieces)
    else:
        model = PromptedMT5(mt5, prompt, head)
    eng, _ = engine.initialize(model, v.ds_config, m.tune)
    del hf_ds
    return eng


def prompt_meta(cfg: RunConfig, v: Validated) -> dict:
    """What prompt.json records: enough to check a prompt against a model and data before use."""
    return {
        "model": v.model_path,
        "init": cfg.model.prompt_init,
        "depth": cfg.model.prompt_depth,
        "label_names": v.splits.label_names,
        "verbalizer_ids": v.pieces,
        "tokenizer_hash": v.tokenizer_hash,
        "max_length": cfg.data.max_length,
    }


def recipe(ds_config: dict) -> dict:
    """What optimized the run, from the DeepSpeed JSON that owns it: optimizer, lr, schedule."""
    opt = ds_config.get("optimizer", {})
    sched = ds_config.get("scheduler")
    return {"optimizer": opt.get("type"), "lr": opt.get("params", {}).get("lr"),
            "scheduler": sched.get("type") if sched else "constant",
            "scheduler_params": sched.get("params", {}) if sched else {},
            "gradient_clipping": ds_config.get("gradient_clipping", 0.0)}


def outputs(cfg: RunConfig, v: Validated, result: dict, wall_s: float, world: int, counts: dict) -> None:
    out = Path(cfg.train.output_dir)
    final = None
    if result["prompt"] is not None:  # --tune full keeps no prompt file: it is a baseline
        checkpoint.save_prompt(out, result["prompt"], {**prompt_meta(cfg, v), "best_step": result["best_step"]})
        final = hashlib.sha256(result["final_prompt"].numpy().tobytes()).hexdigest()
    write_json(out / "results.json", {
        "config": asdict(cfg),
        "ds_config": v.ds_config,
        "recipe": recipe(v.ds_config),
        "batch": asdict(v.sizes),
        "world_size": world,
        **counts,
        "label_names": v.splits.label_names,
        "verbalizer_ids": v.pieces,
        "tokenizer_hash": v.tokenizer_hash,
        "class_weights": v.class_weights,
        "steps": v.schedule.total_steps,
        "best_step": result["best_step"],
        "dev": result["dev"],
        "test": result["test"],
        "guards": result["guards"],
        "final_prompt_sha256": final,
        "wall_time_s": wall_s,
    })


def param_counts(eng) -> dict:
    """Total and trainable parameter elements."""
    # (elements, trainable) per parameter; under ZeRO-3 a parameter is a size-0 placeholder + ds_numel
    params = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in eng.module.parameters()]
    return {"params_total": sum(n for n, _ in params),
            "params_trainable": sum(n for n, trainable in params if trainable)}


def run_config(cfg: RunConfig, v: Validated, world: int, counts: dict) -> dict:
    """The W&B run's config: every resolved setting, the DeepSpeed JSON, batch sizes, model size,
    world size and the code's git commit."""
    from softprompt.tracking import git_commit

    return {
        **asdict(cfg),
        "ds_config": v.ds_config,
        "recipe": recipe(v.ds_config),
        "batch": asdict(v.sizes),
        "world_size": world,
        "params_total": counts["params_total"],
        "params_trainable": counts["params_trainable"],
        "git_commit": git_commit(),
    }


def run(cfg: RunConfig) -> int:
    t0 = time.perf_counter()
    v = validate(cfg)
    if cfg.train.dry_run:
        if engine.is_main_process():
            print(summary(cfg, v))
            print("dry run: inputs are valid; nothing was written")
        return 0

    import torch

    from softprompt import trainer
    from softprompt.metrics import all_reduce_sum
    from softprompt.tracking import Tracker, WandbSettings

    tracker = None
    finished = False
    preemption = trainer.Preemption()  # before the slow build: a signal during it is not lost
    rank, world = engine.init_distributed()
    try:
        eng = build(cfg, v)
        counts = param_counts(eng)
        state = checkpoint.load_checkpoint(eng, v.checkpoint, world, rank) if v.checkpoint else None
        start = state["step"] if state else 0
        if rank == 0 and state:
            checkpoint.forget_after(cfg.train.output_dir, start)
        tracker = Tracker(cfg.train.output_dir, rank == 0, v.schedule.total_steps, cfg.train.quiet, start,
                          wandb=WandbSettings.from_config(cfg.train),
                          run_config=run_config(cfg, v, world, counts) if rank == 0 else None,
                          resume_run_id=state.get("wandb_run_id") if state else None)
        tracker.print(summary(cfg, v) + (f"\nresumed from {v.checkpoint}" if state else ""))

        def save(step: int, trainer_state: dict) -> None:
            prompt = eng.module.prompt
            values = prompt.export(prompt_lib.read_state(prompt)) if prompt is not None else None  # collective
            checkpoint.save_checkpoint(eng, cfg.train.output_dir, step, trainer_state, values, prompt_meta(cfg, v),
                                       cfg.train.keep_checkpoints, rank, fingerprint=fingerprint(cfg, v))

        result = trainer.train(eng, v.splits, v.sizes, v.schedule, cfg, tracker, v.tokenizer.pad_token_id,
                               rank, engine.device(), state, save, preemption, v.class_weights)
        if result["preempted"]:
            finished = True  # every rank stops here together, after the checkpoint's barriers
            return checkpoint.EXIT_REQUEUE
        # Summed over ranks (collective): what the optimizer holds once its state exists.
        counts["optimizer_state_numel"] = int(all_reduce_sum(torch.tensor(engine.optimizer_state_numel(eng))))
        if rank == 0:
            outputs(cfg, v, result, time.perf_counter() - t0, world, counts)
            tracker.print(f"wrote {cfg.train.output_dir}/results.json"
                          + (" and prompt.safetensors" if result["prompt"] is not None else ""))
        finished = True
    finally:
        if tracker is not None:
            tracker.close()
        engine.close_distributed(synchronize=finished)
    return 0


def quiet_libraries() -> None:
    """Keep the console for our own progress: library progress bars on rank 0 only, no noise."""
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if not engine.is_main_process():
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    try:
        return run(cli.parse(argv))
    except ConfigError as e:
        if engine.is_main_process():
            print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
