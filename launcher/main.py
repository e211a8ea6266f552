"""parse -> validate -> build -> train -> close. `train.py` calls `main`.

Everything that can be wrong with the inputs (data, labels, verbalizer, model path, ds_config,
batch triple) is checked in `validate`, before any process group exists or any file is written,
so a bad run fails in seconds with one line and exit code 2. `--dry_run` stops right there.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from softprompt import data, engine, prompt as prompt_lib, tiny, verbalizer
from softprompt.config import ConfigError, RunConfig
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


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


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
    return Validated(ds_config, sizes, model_path, model_config, tokenizer, splits, pieces, schedule)


def summary(cfg: RunConfig, v: Validated) -> str:
    s = v.splits
    sizes = {k: len(getattr(s, k)) for k in ("train", "dev", "test") if getattr(s, k) is not None}
    mc = v.model_config
    return "\n".join([
        f"data: {cfg.data.dataset} {sizes} labels {s.label_names}",
        f"verbalizer token ids per class: {v.pieces}",
        f"model: {v.model_path} ({mc.model_type}, d_model {mc.d_model}, {mc.num_layers}+{mc.num_decoder_layers} "
        f"layers, vocab {mc.vocab_size}); prompt {cfg.model.prompt_length} x {mc.d_model} ({cfg.model.prompt_init})",
        f"batch: global {v.sizes.global_batch} = micro {v.sizes.micro_batch} x accum {v.sizes.grad_accum} x "
        f"world {v.sizes.world_size}; ZeRO stage {engine.zero_stage(v.ds_config)}",
        f"schedule: {v.schedule.total_steps} steps ({v.schedule.steps_per_epoch}/epoch), "
        f"dev eval at {len(v.schedule.eval_steps)} steps",
    ])


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
                if cfg.model.prompt_init == "vocab" else ())
    init = prompt_lib.init_prompt(cfg.model.prompt_init, cfg.model.prompt_length, mt5.shared,
                                  cfg.train.seed, frequent, v.pieces)
    model = PromptedMT5(mt5, prompt_lib.SoftPrompt(init), head)
    threshold = v.ds_config.get("zero_optimization", {}).get("stage3_param_persistence_threshold", 100_000)
    if hf_ds is not None and init.numel() >= threshold and is_main_process():
        print(f"warning: the prompt ({init.numel()} elements) is above stage3_param_persistence_threshold "
              f"({threshold}): it will be re-gathered every step; raise the threshold", file=sys.stderr)
    eng, _ = engine.initialize(model, v.ds_config)
    del hf_ds
    return eng


def outputs(cfg: RunConfig, v: Validated, result: dict, wall_s: float, world: int) -> None:
    from softprompt.checkpoint import save_prompt, write_json

    out = Path(cfg.train.output_dir)
    meta = {
        "model": v.model_path,
        "init": cfg.model.prompt_init,
        "label_names": v.splits.label_names,
        "verbalizer_ids": v.pieces,
        "tokenizer_hash": tokenizer_hash(v.tokenizer),
        "best_step": result["best_step"],
    }
    save_prompt(out, result["prompt"], meta)
    write_json(out / "results.json", {
        "config": asdict(cfg),
        "ds_config": v.ds_config,
        "batch": asdict(v.sizes),
        "world_size": world,
        "label_names": v.splits.label_names,
        "verbalizer_ids": v.pieces,
        "steps": v.schedule.total_steps,
        "best_step": result["best_step"],
        "dev": result["dev"],
        "test": result["test"],
        "wall_time_s": wall_s,
    })


def run(cfg: RunConfig) -> int:
    t0 = time.perf_counter()
    v = validate(cfg)
    if cfg.train.dry_run:
        if is_main_process():
            print(summary(cfg, v))
            print("dry run: inputs are valid; nothing was written")
        return 0

    from softprompt import trainer
    from softprompt.tracking import Tracker

    tracker = None
    rank, world = engine.init_distributed()
    try:
        eng = build(cfg, v)
        tracker = Tracker(cfg.train.output_dir, rank == 0, v.schedule.total_steps, cfg.train.quiet)
        tracker.print(summary(cfg, v))
        result = trainer.train(eng, v.splits, v.sizes, v.schedule, cfg, tracker, v.tokenizer.pad_token_id,
                               rank, engine.device())
        if rank == 0:
            outputs(cfg, v, result, time.perf_counter() - t0, world)
            tracker.print(f"wrote {cfg.train.output_dir}/results.json and prompt.safetensors")
    finally:
        if tracker is not None:
            tracker.close()
        engine.close_distributed()
    return 0


def quiet_libraries() -> None:
    """Keep the console for our own progress: library progress bars on rank 0 only, no noise."""
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if not is_main_process():
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    try:
        return run(cli.parse(argv))
    except ConfigError as e:
        if is_main_process():
            print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
