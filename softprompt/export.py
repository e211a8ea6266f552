"""PEFT interop: our input prompt <-> a HF PEFT prompt-tuning adapter, and reading either as a prompt.

    python -m softprompt.export --format peft PROMPT_DIR OUT_DIR [--base_model M]

PROMPT_DIR holds prompt.safetensors + prompt.json (a training run's output). OUT_DIR gets what
`peft.PeftModel.from_pretrained(base, OUT_DIR)` loads: adapter_config.json (a PromptTuningConfig)
and adapter_model.safetensors (key "prompt_embeddings", (P, D) fp32), plus our prompt.json, so the
labels and verbalizer come back when the adapter is read again (`--init_prompt`, predict's `--prompt`).

Why the two are the same model: PEFT's PeftModelForSeq2SeqLM with PROMPT_TUNING prepends the first
num_virtual_tokens rows of `prompt_embeddings` to the encoder's input embeddings (mask 1) and leaves
the decoder alone, which is our input prompt (prompt_depth "input"). Deep prompts (encoder/all) have
no prompt-tuning equivalent in PEFT. PEFT's default for SEQ_2_SEQ_LM is num_transformer_submodules 2:
the table then has 2 x num_virtual_tokens rows, and PEFT's forward and generate read only the first
num_virtual_tokens of them for prompt tuning, so those rows are the prompt (we write 1).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import checkpoint, loading
from .config import ConfigError
from .io import atomic_write, write_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_KEY = "prompt_embeddings"
PROMPT_FILE = "prompt.safetensors"
META_FILE = "prompt.json"


def is_adapter(path: Path) -> bool:
    """A PEFT adapter directory, or the adapter_model.safetensors inside one."""
    return (path / ADAPTER_CONFIG).is_file() if path.is_dir() else path.name == ADAPTER_WEIGHTS


def read_prompt(path: str | Path, flag: str, d_model: int | None = None) -> tuple[torch.Tensor, dict]:
    """(values, metadata or {}) from our prompt.safetensors, a run's output dir holding one, or a PEFT
    prompt-tuning adapter (dir or its weights file). Values are (P, D) or deep (L, P, D), fp32 and finite."""
    path = Path(path)
    if is_adapter(path):
        values, meta = read_peft(path if path.is_dir() else path.parent, flag, d_model)
        if bad := checkpoint.count_nonfinite(values):  # load_prompt checks our own files
            raise ConfigError(f"{flag} {path}: the prompt has {bad} NaN/Inf values (a diverged run?)")
    else:
        if path.is_dir():
            if not (path / PROMPT_FILE).is_file():
                raise ConfigError(f"{flag} {path}: a directory without {PROMPT_FILE} or a PEFT {ADAPTER_CONFIG}")
            path = path / PROMPT_FILE
        values, meta = checkpoint.load_prompt(path, flag=flag)
    return values.float(), meta


def read_peft(adapter: Path, flag: str, d_model: int | None = None) -> tuple[torch.Tensor, dict]:
    """The encoder-input prompt (P, D) of a PEFT prompt-tuning adapter for a seq2seq model, and our
    prompt.json beside it when there is one (an adapter we exported)."""
    where = f"{flag} {adapter}"
    try:
        config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: {ADAPTER_CONFIG} is not readable JSON ({str(e).splitlines()[0]})") from None
    kind, task = config.get("peft_type"), config.get("task_type")
    if kind != "PROMPT_TUNING" or task != "SEQ_2_SEQ_LM":
        raise ConfigError(f"{where}: a PEFT {kind} adapter for {task}; only PROMPT_TUNING for SEQ_2_SEQ_LM "
                          "(a prompt in front of the encoder input) converts")
    n, dim = config.get("num_virtual_tokens"), config.get("token_dim")
    submodules = config.get("num_transformer_submodules") or 2  # PEFT's default for SEQ_2_SEQ_LM
    if not isinstance(n, int) or n < 1 or not isinstance(dim, int) or submodules not in (1, 2):
        raise ConfigError(f"{where}: {ADAPTER_CONFIG} needs num_virtual_tokens >= 1, token_dim and "
                          f"num_transformer_submodules 1 or 2, got {n}, {dim}, {submodules}")
    if d_model is not None and dim != d_model:
        raise ConfigError(f"{where}: token_dim {dim} does not match the model's d_model {d_model}")
    weights = adapter / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ConfigError(f"{where}: no {ADAPTER_WEIGHTS} (a pickled adapter_model.bin is not read: save it with "
                          "safe_serialization=True)")
    try:
        with safe_open(weights, "pt") as f:
            table = f.get_tensor(PEFT_KEY)
    except Exception as e:  # safetensors raises its own error types for truncated files and missing keys
        raise ConfigError(f"{where}: no readable {PEFT_KEY!r} in {ADAPTER_WEIGHTS} ({str(e).splitlines()[0]})") \
            from None
    if tuple(table.shape) != (n * submodules, dim):
        raise ConfigError(f"{where}: {PEFT_KEY} has shape {tuple(table.shape)}, {ADAPTER_CONFIG} says "
                          f"({n} x {submodules}, {dim})")
    meta_path = adapter / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta and (meta.get("depth", "input") != "input" or meta.get("n_tokens", n) != n):
        raise ConfigError(f"{where}: its {META_FILE} describes another prompt (depth {meta.get('depth')}, "
                          f"{meta.get('n_tokens')} tokens) than the adapter's {n} input tokens")
    return table[:n].float(), meta


def classes_from_flags(labels: str | None, ids: str | None, words: str | None, tokenizer,
                       vocab_size: int) -> dict | None:
    """prompt.json's labels and verbalizer from --labels and --verbalizer_ids/--verbalizer_words, for a
    prompt that has no prompt.json (a PEFT adapter trained elsewhere); None when --labels is not given."""
    from launcher.args import parse_list

    from . import verbalizer

    if not labels:
        if ids or words:
            raise ConfigError("--verbalizer_ids/--verbalizer_words need --labels (the classes, in order)")
        return None
    if not (ids or words):  # the trainer's default ids 3, 4, ... would silently mean nothing for a foreign adapter
        raise ConfigError("--labels needs --verbalizer_words or --verbalizer_ids (the token of each class)")
    names = parse_list("--labels", labels)
    return {"label_names": names, "verbalizer_ids": verbalizer.resolve(names, tokenizer, vocab_size, ids, words)}


def peft_config(model: str, model_config, n_tokens: int) -> dict:
    """adapter_config.json of a PromptTuningConfig, with every field PEFT writes except its version."""
    return {
        "auto_mapping": None, "base_model_name_or_path": model, "inference_mode": True, "modules_to_save": None,
        "num_attention_heads": model_config.num_heads, "num_layers": model_config.num_layers,
        "num_transformer_submodules": 1, "num_virtual_tokens": n_tokens, "peft_type": "PROMPT_TUNING",
        "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "revision": None,
        "task_type": "SEQ_2_SEQ_LM", "token_dim": model_config.d_model, "tokenizer_kwargs": None,
        "tokenizer_name_or_path": None,
    }


def to_peft(prompt_dir: str | Path, out_dir: str | Path, model: str | None = None) -> Path:
    """Write OUT_DIR as a PEFT prompt-tuning adapter of the input prompt in PROMPT_DIR (module docstring).
    `model` (default: prompt.json's) gives num_heads/num_layers and base_model_name_or_path."""
    values, meta = read_prompt(prompt_dir, "PROMPT_DIR")
    layers = values.shape[0] if values.dim() == 3 else 1
    if layers > 1 or meta.get("depth", "input") != "input":
        raise ConfigError(f"PROMPT_DIR {prompt_dir}: a deep prompt (depth {meta.get('depth')}, {layers} layers) has "
                          "no PEFT equivalent: PEFT's prompt tuning only prefixes the encoder input")
    values = values.reshape(values.shape[-2:]).contiguous()  # (P, D)
    model = model or meta.get("model")
    if not model:
        raise ConfigError(f"PROMPT_DIR {prompt_dir}: no {META_FILE} naming the model: give --base_model")
    try:
        model_config = loading.load_model_config(loading.model_source(model))
    except ConfigError as e:  # its message names --model, which is prompt.json's here
        raise ConfigError(f"PROMPT_DIR {prompt_dir}: {e}; give --base_model") from None
    if values.shape[1] != model_config.d_model:
        raise ConfigError(f"PROMPT_DIR {prompt_dir}: d_model {values.shape[1]} does not match {model}'s "
                          f"{model_config.d_model}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"OUT_DIR {out}: exists and is not a directory")
    # adapter_config.json last: a dir without it is not an adapter to PEFT or to `read_prompt`.
    atomic_write(out / ADAPTER_WEIGHTS, lambda tmp: save_file({PEFT_KEY: values}, tmp, metadata={"format": "pt"}))
    if meta:
        write_json(out / META_FILE, meta)
    write_json(out / ADAPTER_CONFIG, peft_config(model, model_config, values.shape[0]))
    return out


def build_parser():
    from launcher.args import Parser

    p = Parser(prog="python -m softprompt.export", description="\n\n".join(__doc__.split("\n\n")[:3]))
    p.add_argument("--format", choices=("peft",), default="peft", help="what to write")
    p.add_argument("--base_model", default=None,
                   help="the model the prompt was trained on, for the adapter's base_model_name_or_path and layer "
                        "counts (default: prompt.json's model)")
    p.add_argument("prompt_dir", metavar="PROMPT_DIR", help="prompt.safetensors + prompt.json, or that file")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the adapter directory to write")
    return p


def main(argv: list[str] | None = None) -> int:
    from launcher.args import UsageError

    try:
        args = build_parser().parse_args(argv)
        out = to_peft(args.prompt_dir, args.out_dir, args.base_model)
    except (ConfigError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote a PEFT prompt-tuning adapter to {out}: PeftModel.from_pretrained(base_model, {str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
