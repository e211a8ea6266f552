"""One training run as one object, in the shape of torchtune's recipes:

    recipe = TrainRecipe(cfg)       # a RunConfig (softprompt/config.py)
    recipe.setup()                  # inputs checked, process group, frozen model, prompt, engine, resume
    result = recipe.train()         # the loop; returns early, checkpointed, on preemption
    recipe.save(result)             # rank 0: prompt.safetensors, results.json
    recipe.close()

`run(cfg)` does exactly that and turns failures into exit codes; train.py calls it. Everything that can
be wrong with the inputs is found by `validate`, before a process group exists or a file is written.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import checkpoint, data, dist, dsconfig, engine, loading, report, rundir, tiny, verbalizer
from . import prompt as prompt_lib
from .config import ConfigError, RunConfig, to_yaml
from .io import write_json, write_text
from .metrics import balanced_weights
from .tokenize import tokenizer_hash
from . import preemption
from .trainer import Schedule

EXIT_CONFIG_ERROR = 2
EXIT_FAILURE = 1


class NonFiniteError(RuntimeError):
    """The loss or the prompt stopped being finite: the run stops before anything is saved."""


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
    _, raw, ds_source, micro_cap, checkpointing = plan_parallelism(cfg, model_config, source, world)
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
        weights = balanced_weights(splits.train["label"], splits.label_names) if t.class_weights == "balanced" \
            else None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    tok_hash = tokenizer_hash(tokenizer)  # once: it serializes the whole vocabulary
    init = load_init_prompt(cfg, model_config, splits.label_names, tok_hash) if t.init_prompt else None
    return Inputs(ds_config, ds_source, dsconfig.Settings.of(ds_config), sizes, notes, source, model_config,
                  tokenizer, tok_hash, splits, pieces, schedule, checkpoint.find_checkpoint(t.output_dir, t.resume),
                  init, weights, wandb_settings(cfg, os.environ), checkpointing)


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


def plan_parallelism(cfg: RunConfig, model_config, source, world: int) -> tuple[object, dict, str, int, bool]:
    """Where the planner (softprompt/plan.py) decides: (its recommendation for --ds_config auto, else None;
    the DeepSpeed JSON and where it came from; the largest micro-batch for an "auto" micro-batch; whether
    activation checkpointing is on: asked for, or what the recommendation needs)."""
    from . import plan

    kind, per_node, nodes, mem_gb = devices(world)
    shape = plan.shape_from_hf_config(model_config, source.name, tied=not loading.checkpoint_has_lm_head(source))
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


@dataclass
class Best:
    """The best dev evaluation so far, and the prompt that scored it."""

    step: int = 0
    metrics: dict | None = None
    state: dict[str, torch.Tensor] | None = None  # the trainable parameters then (None with --tune full)
    test: dict | None = None  # --tune full keeps no prompt: test is scored at each new best instead


@dataclass
class Guards:
    """Dev evals whose predictions collapsed onto one class, and the step the prompt norm ran away
    (a runaway norm preceded the collapse of published mT5 prompt runs)."""

    collapsed_steps: list[int] = field(default_factory=list)
    runaway_step: int | None = None
    init_norm: float | None = None


@dataclass
class TrainState:
    """What a checkpoint carries besides the optimizer and RNG: the loop resumes exactly from it."""

    step: int = 0
    best: Best = field(default_factory=Best)
    window: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.float64))
    window_s: float = 0.0  # seconds the window's examples took
    guards: Guards = field(default_factory=Guards)
    wandb_run_id: str | None = None

    def to_dict(self) -> dict:
        return {**asdict(self), "window": self.window.detach().cpu()}

    @staticmethod
    def from_dict(d: dict) -> TrainState:
        return TrainState(d["step"], Best(**d["best"]), d["window"], d["window_s"], Guards(**d["guards"]),
                          d.get("wandb_run_id"))


@dataclass
class RunResult:
    preempted: bool
    step: int
    best_step: int = 0
    dev: dict | None = None
    test: dict | None = None
    prompt: torch.Tensor | None = None  # the best-dev prompt, exported (L, P, D)
    final_prompt: torch.Tensor | None = None
    guards: dict = field(default_factory=dict)


class TrainRecipe:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.inputs: Inputs | None = None
        self.engine = self.tracker = self.lock = None
        self.state = TrainState()
        self.rank, self.world = 0, 1
        self.t0 = time.perf_counter()

    def setup(self) -> None:
        from .tracking import Tracker, run_summary

        v = self.inputs = self.inputs or validate(self.cfg)
        t = self.cfg.train
        self.preemption = preemption.install()  # before the slow build: a signal during it is not lost
        self.rank, self.world = dist.init(t.dist_timeout)
        if self.world != v.sizes.world_size:
            raise ConfigError(f"WORLD_SIZE says {v.sizes.world_size} ranks but {self.world} joined")
        if self.rank == 0:
            self.lock = rundir.Lock(t.output_dir)
            if t.overwrite:
                rundir.clear(t.output_dir)
            write_text(Path(t.output_dir) / "config.yaml", to_yaml(report.replayable(self.cfg, v)))
        dist.phase("setup: loading the model and starting the DeepSpeed engine")
        self.engine = engine.build(self.cfg, v)
        self.counts = engine.param_counts(self.engine)
        if v.resume_from:
            dist.phase("setup: loading the checkpoint")
            self.state = TrainState.from_dict(checkpoint.load_checkpoint(self.engine, v.resume_from, self.world,
                                                                         self.rank))
            if self.rank == 0:
                checkpoint.forget_after(t.output_dir, self.state.step)
        self.tracker = Tracker(t.output_dir, self.rank == 0, v.schedule.total_steps, t.quiet, self.state.step,
                               wandb=v.wandb, resume_run_id=self.state.wandb_run_id,
                               run_config=report.resolved(self.cfg, v, self.world, self.counts) if self.rank == 0
                               else None, summary=run_summary(self.cfg, v.settings.lr))
        self.tracker.print(report.header(self.cfg, v) + (f"\nresumed from {v.resume_from}" if v.resume_from else ""))

    def train(self) -> RunResult:
        from .trainer import train_loop

        return train_loop(self)

    def save_checkpoint(self) -> None:
        """Collective: every rank writes its part of the checkpoint of `self.state`."""
        prompt = self.engine.module.prompt
        values = prompt.export(prompt_lib.read_state(prompt)) if prompt is not None else None
        checkpoint.save_checkpoint(self.engine, self.cfg.train.output_dir, self.state.step, self.state.to_dict(),
                                   values, report.prompt_meta(self.cfg, self.inputs), self.cfg.train.keep_checkpoints,
                                   self.rank)

    def save(self, result: RunResult) -> None:
        """prompt.safetensors (the best-dev prompt; none with --tune full) and results.json, on rank 0."""
        self.counts["optimizer_state_numel"] = int(dist.all_reduce_sum(
            torch.tensor(engine.optimizer_state_numel(self.engine))))  # collective
        if self.rank != 0:
            return
        out, v = Path(self.cfg.train.output_dir), self.inputs
        if result.prompt is not None:
            checkpoint.save_prompt(out, result.prompt, {**report.prompt_meta(self.cfg, v), "best_step": result.best_step})
        write_json(out / "results.json", report.results(self.cfg, v, result, self.world, self.counts,
                                                        time.perf_counter() - self.t0))
        self.tracker.print(f"wrote {out}/results.json" + (" and prompt.safetensors" if result.prompt is not None else ""))
        self.tracker.log_outputs(out, result.best_step, prompt=result.prompt is not None)  # to W&B

    def close(self, clean: bool = True) -> None:
        if self.tracker is not None:
            self.tracker.close()
        dist.close(synchronize=clean)
        if self.lock is not None:
            self.lock.release()


def run(cfg: RunConfig) -> int:
    """Run one training job; returns the process's exit code (0, 2 bad input, 75 preempted, 1 failure)."""
    recipe = TrainRecipe(cfg)
    clean = False
    try:
        if cfg.train.dry_run:
            v = recipe.inputs = validate(cfg)
            if dist.is_main_process():
                print(report.header(cfg, v))
                print("dry run: inputs are valid; nothing was written")
            return 0
        recipe.setup()
        result = recipe.train()
        if not result.preempted:
            recipe.save(result)
        clean = True  # every rank got here together
        return checkpoint.EXIT_REQUEUE if result.preempted else 0
    except Exception as e:  # noqa: BLE001 - every failure becomes one report and an exit code
        return fail(e)
    finally:
        recipe.close(clean)


def fail(e: Exception) -> int:
    """Report a failure truthfully from every rank (softprompt/dist.py) and choose the exit code."""
    import traceback

    known = isinstance(e, (ConfigError, NonFiniteError))
    if not known and not dist.is_communication_error(e):
        traceback.print_exc()  # a bug or an environment problem: the traceback is the report
    message = str(e) if known else f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"
    lines = dist.report(e, message)
    if lines and (dist.is_main_process() or len(lines) == 1 and lines[0].startswith("rank ")):
        dist.print_error(lines)
    return EXIT_CONFIG_ERROR if isinstance(e, ConfigError) else EXIT_FAILURE
