"""Run logging on rank 0: metrics.jsonl, W&B and progress on the console; plus what the log records.

metrics.jsonl mirrors W&B: each `log(step, metrics)` writes one JSON line and sends the same keys
and values to W&B at that step (W&B merges the events of one step into one history row). A value
W&B stores as an object is written as its plain data: a `Table` as its rows (`data`), a
non-finite float as the string W&B stores ("NaN", "Infinity", "-Infinity").
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import resource
import subprocess
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from .config import ConfigError
from .progress import plain_progress, progress_line

if TYPE_CHECKING:
    from .config import RunConfig

COLLAPSE_SHARE = 0.95  # eval/collapsed: this share of the predictions or more is one class
RUNAWAY_RATIO = 10.0  # train/runaway: the prompt's norm is this many times its initial norm or more
# W&B summaries that sort a sweep: the best dev scores (W&B stores {"max": ...}). The test scores are logged
# once, for the best-dev prompt, and train/loss keeps its last value, which shows a run diverging late.
SUMMARY_MAX = ("eval/accuracy", "eval/macro_f1")
PROMPT_FILES = ("prompt.safetensors", "prompt.json")  # the W&B artifact of type "prompt"


@dataclass(frozen=True)
class Table:
    """A W&B table; metrics.jsonl gets its rows."""

    columns: list[str]
    data: list[list]


@dataclass(frozen=True)
class WandbSettings:
    """What `wandb.init` is given besides the config."""

    project: str
    mode: str  # online | offline
    name: str
    group: str | None = None
    tags: tuple[str, ...] = ()


def wandb_settings(cfg: RunConfig, environ) -> WandbSettings | None:
    """W&B's settings for a run, resolved once from the flags and the environment: None when W&B is off
    (no --wandb_project nor $WANDB_PROJECT, or mode disabled). An absent --wandb_mode becomes
    $WANDB_MODE, else online with an API key, else offline, and an absent --wandb_group $WANDB_RUN_GROUP
    (launcher.sweep sets it), so that the records name the mode and group used."""
    from .config import WandbMode, default_run_name

    t = cfg.train
    project = t.wandb_project or environ.get("WANDB_PROJECT") or None
    if project is None:
        for name in ("wandb_mode", "wandb_group", "wandb_tags", "wandb_run_name"):
            if getattr(t, name) is not None:
                raise ConfigError(f"--{name} needs --wandb_project (or $WANDB_PROJECT)")
        return None
    mode, source = (t.wandb_mode, "--wandb_mode") if t.wandb_mode else default_wandb_mode(environ)
    if mode not in typing.get_args(WandbMode):
        raise ConfigError(f"{source} must be one of {', '.join(typing.get_args(WandbMode))}, got {mode!r}")
    if mode == "disabled":
        return None
    tags = tuple(x.strip() for x in t.wandb_tags.split(",")) if t.wandb_tags else ()
    return WandbSettings(project, mode, t.wandb_run_name or default_run_name(cfg.model, t.seed),
                         t.wandb_group or environ.get("WANDB_RUN_GROUP") or None, tags)


class Tracker:
    """metrics.jsonl (one JSON object per event, each with `step`), W&B when configured, progress on the
    console; silent off rank 0: only rank 0 ever calls `wandb.init`.

    W&B never stops a run: its first failing call (a dead `wandb-core`, no network, no API key) prints
    one warning and turns W&B off for the process; metrics.jsonl goes on. On preemption Slurm sends
    SIGTERM to every process of the job step, and `wandb-core` exits on it (a signal to the ranks'
    process group alone misses it: it runs in a session of its own): the run must still checkpoint.

    Progress: a tqdm bar on a terminal; with --quiet or when stderr is not a terminal (a batch job's log)
    one plain line (softprompt/progress.py) each time the loop logs train metrics.
    """

    def __init__(self, output_dir: str | Path, is_main: bool, total_steps: int, quiet: bool = False,
                 start_step: int = 0, *, wandb: WandbSettings | None = None, run_config: dict | None = None,
                 resume_run_id: str | None = None, summary: dict | None = None):
        """`start_step` > 0 resumes: metrics.jsonl is appended to and progress starts there.

        `run_config` is the W&B run's config and `summary` the keys its summary starts with (a sweep's
        axes, for W&B's run table and panels); `resume_run_id` continues that W&B run (online or
        offline). `run_id` is the W&B run's id: None off rank 0 and when W&B is off; kept when W&B fails,
        so that a resumed run continues the same W&B run.
        """
        self.is_main = is_main
        self.file = None
        self.bar = None
        self.run = None
        self.run_id: str | None = None
        self.plain = False
        if not is_main:
            return
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        self.file = open(Path(output_dir) / "metrics.jsonl", "a" if start_step else "w")
        self.total, self.start_step, self.step = total_steps, start_step, start_step
        self.plain = plain_progress(quiet, sys.stderr)
        if not self.plain:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        if wandb is not None:
            self.run = self._wandb("init", _init_wandb, wandb, Path(output_dir), run_config or {}, resume_run_id,
                                   summary or {})
            self.run_id = self.run.id if self.run is not None else resume_run_id
        self.t0, self.excluded_s = time.perf_counter(), 0.0  # the step rate's clock: after W&B's start-up

    def _wandb(self, what: str, fn, *args, **kwargs):
        """fn(*args, **kwargs), or None once W&B has failed: the first failure warns and turns W&B off."""
        if what != "init" and self.run is None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - whatever W&B raises, training goes on
            self.run = None
            self.print(f"warning: W&B {what} failed ({type(e).__name__}: {' '.join(str(e).split())[:300]}); W&B "
                       "is off for the rest of this run, metrics.jsonl goes on")
            _teardown_wandb()
            return None

    def log(self, step: int, metrics: dict) -> None:
        if self.file is None:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()
        self._wandb("log", lambda: self.run.log({k: _for_wandb(v) for k, v in metrics.items()}, step=step))

    def log_outputs(self, output_dir: str | Path, best_step: int, prompt: bool) -> None:
        """The end of a run in W&B: the best dev step in the summary and, with `prompt`, the prompt
        file (prompt.safetensors + prompt.json in `output_dir`) as an artifact of type "prompt"."""
        self._wandb("summary", lambda: self.run.summary.update({"best_step": best_step}))
        if prompt:
            self._wandb("artifact", lambda: self.run.log_artifact(_prompt_artifact(Path(output_dir), self.run.id)))

    def advance(self, **postfix) -> None:
        """One step done; `postfix` (loss, tok_s) on the steps that logged train metrics."""
        if not self.is_main:
            return
        self.step += 1
        if self.bar is not None:
            self.bar.update(1)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
        elif postfix:
            self.print(progress_line(self.step, self.total, postfix["loss"], postfix["tok_s"],
                                     time.perf_counter() - self.t0, self.excluded_s, self.step - self.start_step))

    def exclude(self, seconds: float) -> None:
        """Time spent off training (evaluation): left out of the step rate that the ETA comes from."""
        if self.is_main:
            self.excluded_s += seconds

    def print(self, msg: str) -> None:
        if self.is_main:
            (self.bar.write if self.bar is not None else print)(msg, file=sys.stdout)
            sys.stdout.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        # Called from main's `finally`: an exception on its way out marks the W&B run failed.
        self._wandb("finish", lambda: self.run.finish(exit_code=0 if sys.exc_info()[0] is None else 1))
        self.file = self.bar = self.run = None


def run_summary(cfg: RunConfig, lr: float) -> dict:
    """The keys a W&B run's summary starts with: the sweep axes (launcher.sweep), flat, so that W&B's run
    table sorts and groups by them and a scatter panel plots test/accuracy against prompt_length."""
    m = cfg.model
    return {"model": m.model.rstrip("/").rsplit("/", 1)[-1], "prompt_length": m.prompt_length,
            "init": m.prompt_init, "prompt_depth": m.prompt_depth, "lr": lr, "seed": cfg.train.seed}


def _init_wandb(settings: WandbSettings, output_dir: Path, run_config: dict, resume_run_id: str | None,
                summary: dict):
    import wandb

    # init's `mode` alone leaves W&B's process-wide settings as they were, and W&B 0.31 still sends its
    # own SDK telemetry to the server unless those say offline: set the mode process-wide first.
    wandb.setup(wandb.Settings(mode=settings.mode))
    run = wandb.init(
        project=settings.project, name=settings.name, group=settings.group, tags=list(settings.tags),
        mode=settings.mode, config=run_config,
        # <output_dir>/wandb, beside metrics.jsonl, unless WANDB_DIR says otherwise
        dir=os.environ.get("WANDB_DIR", str(output_dir)),
        id=resume_run_id, resume="allow" if resume_run_id else None,
    )
    for key in SUMMARY_MAX:
        run.define_metric(key, summary="max")
    run.summary.update(summary)
    return run


def _prompt_artifact(output_dir: Path, run_id: str):
    import wandb

    artifact = wandb.Artifact(f"prompt-{run_id}", type="prompt",
                              metadata=json.loads((output_dir / "prompt.json").read_text()))
    for name in PROMPT_FILES:
        artifact.add_file(str(output_dir / name), name=name)
    return artifact


def _teardown_wandb() -> None:
    """Let go of W&B after a failure, so that its exit hook does not print a traceback at exit. Its
    teardown raises, or exits with the service's exit code, when the service died: both are ignored."""
    import wandb

    with contextlib.suppress(Exception, SystemExit):
        wandb.teardown()


def _plain(v):
    if isinstance(v, Table):
        return v.data
    if isinstance(v, float) and not math.isfinite(v):  # JSON has none: the strings W&B stores
        return "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    return v


def _for_wandb(v):
    if isinstance(v, Table):
        import wandb

        return wandb.Table(columns=v.columns, data=v.data)
    return v


def default_wandb_mode(environ) -> tuple[str, str]:
    """(mode, where it came from) for a run without --wandb_mode: $WANDB_MODE if set, else online
    when an API key is configured (WANDB_API_KEY, `wandb login`'s netrc or settings), else offline.
    Reads the environment and local files only: no network."""
    if environ.get("WANDB_MODE"):
        return environ["WANDB_MODE"], "$WANDB_MODE"
    if environ.get("WANDB_API_KEY"):
        return "online", "default"
    import wandb

    # wandb.api is deprecated in wandb 0.31 (it prints a warning) but is still the one spelling of
    # "the configured key" that works across the wandb versions we support.
    with contextlib.redirect_stderr(io.StringIO()):
        return ("online" if wandb.api.api_key else "offline"), "default"


def memory_mb(device: torch.device) -> dict[str, float]:
    """This process's peak memory: host RSS always (ru_maxrss is in KiB on Linux), device memory on GPUs."""
    out = {"train/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["train/max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def norm_guard(norm: float, init_norm: float) -> dict:
    """The prompt-norm metrics: its L2 norm, the ratio to its initial norm, and whether that ratio
    reached RUNAWAY_RATIO (published mT5 prompt runs grew ~60x before dev accuracy fell)."""
    ratio = norm / init_norm if init_norm else 1.0
    return {"train/prompt_norm": norm, "train/prompt_norm_ratio": ratio, "train/runaway": ratio >= RUNAWAY_RATIO}


def stability(guards: dict) -> str:
    """The end-of-run line about the guards: what tripped, or "ok"."""
    found = []
    if guards["collapsed_steps"]:
        found.append(f"dev predictions collapsed onto one class at steps {guards['collapsed_steps']}")
    if guards["runaway_step"] is not None:
        found.append(f"runaway prompt norm from step {guards['runaway_step']}")
    return "; ".join(found) or "ok"


def collapsed(pred_counts: dict[str, int]) -> bool:
    """True when one class takes COLLAPSE_SHARE or more of the predictions: a prompt that stopped
    discriminating (often stuck on the majority class)."""
    total = sum(pred_counts.values())
    return total > 0 and max(pred_counts.values()) >= COLLAPSE_SHARE * total


def git_commit() -> str | None:
    """HEAD of the git checkout this code runs from; None outside one or without git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None
