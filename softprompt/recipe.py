"""One training run as one object, in the shape of torchtune's recipes:

    recipe = TrainRecipe(cfg)       # a RunConfig (softprompt/config.py)
    recipe.setup()                  # inputs checked, process group, frozen model, prompt, engine, resume
    result = recipe.train()         # the loop; returns early, checkpointed, on preemption
    recipe.save(result)             # rank 0: prompt.safetensors, results.json
    recipe.close()

`run(cfg)` does exactly that and turns failures into exit codes; train.py calls it. Everything that can
be wrong with the inputs is found first (softprompt/inputs.py), before a process group exists or a file
is written.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import checkpoint, dist, engine, preemption, report, rundir
from . import prompt as prompt_lib
from .config import ConfigError, RunConfig
from .inputs import Inputs, validate
from .io import to_yaml, write_json, write_text

EXIT_CONFIG_ERROR = 2
EXIT_FAILURE = 1


class NonFiniteError(RuntimeError):
    """The loss or the prompt stopped being finite: the run stops before anything is saved."""


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
                                   self.rank, fingerprint=report.fingerprint(self.cfg, self.inputs))

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
    dist.print_error(dist.report(e, message))
    return EXIT_CONFIG_ERROR if isinstance(e, ConfigError) else EXIT_FAILURE
