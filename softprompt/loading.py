"""Loading the frozen model: where it comes from (a local directory, the hub cache, the hub), its config and
tokenizer, and `from_pretrained` into ZeRO-3 partitions.

Order matters under ZeRO-3: an `HfDeepSpeedConfig` must be alive *during* `from_pretrained`, so the
frozen weights load straight into partitions (each rank keeps ~1/world of them) instead of a full
copy per rank; `load_frozen_model` owns that rule. Nothing here contacts the network unless the model
is a hub id missing from the local cache.
"""

from __future__ import annotations

import json
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from . import kernels
from .config import ConfigError
from .dsconfig import Settings

# Families whose decoder's first step we know how to score (encoder + decoder + untied/tied lm_head).
SUPPORTED_MODEL_TYPES = ("t5", "mt5")
HUB_PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class ModelSource:
    """Where the frozen model comes from: `path` is what from_pretrained gets; `local_files_only` keeps
    every load off the network (a local directory, or a hub id already in the cache)."""

    name: str
    path: str
    local_files_only: bool

    def describe(self) -> str:
        if Path(self.path).is_dir():
            return self.path
        return f"{self.name} (hub, {'from the local cache' if self.local_files_only else 'downloading'})"


def _hub_reachable(endpoint: str) -> bool:
    try:
        urllib.request.urlopen(endpoint, timeout=HUB_PROBE_TIMEOUT_S).close()  # honours *_PROXY variables
        return True
    except OSError as e:  # an HTTP error status still means the hub answered
        return hasattr(e, "code")


def model_source(name: str) -> ModelSource:
    """Resolve --model: 'tiny' (built once), a local directory, or a hub id that is used from the cache
    when it is there, so a compute node without internet never waits on the network."""
    from huggingface_hub import constants, try_to_load_from_cache

    from .tiny import resolve_model

    path = resolve_model(name)
    if Path(path).expanduser().is_dir():
        return ModelSource(name, str(Path(path).expanduser()), True)
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise ConfigError(f"--model {name}: no such model directory")
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return ModelSource(name, name, True)
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"--model {name}: not in the local cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is "
                          "set: download it where there is internet (`hf download NAME`) or give a local directory")
    if not _hub_reachable(constants.ENDPOINT):
        raise ConfigError(f"--model {name}: not in the local cache ({constants.HF_HUB_CACHE}) and the hub "
                          f"({constants.ENDPOINT}) is unreachable: download it where there is internet (`hf download "
                          "NAME`, with HF_HOME on a shared filesystem) or give a local directory")
    return ModelSource(name, name, False)


def _source(source: ModelSource | str) -> ModelSource:
    return source if isinstance(source, ModelSource) else model_source(source)


def load_model_config(source: ModelSource | str):
    from transformers import AutoConfig

    source = _source(source)
    try:
        config = AutoConfig.from_pretrained(source.path, local_files_only=source.local_files_only)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model {source.name}: not a T5/mT5 model directory or hub id "
                          f"({str(e).splitlines()[0]})") from None
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"--model {source.name}: model_type {config.model_type!r} is not supported "
                          f"(expected one of {SUPPORTED_MODEL_TYPES})")
    return config


def load_tokenizer(source: ModelSource | str):
    from transformers import AutoTokenizer

    source = _source(source)
    return AutoTokenizer.from_pretrained(source.path, local_files_only=source.local_files_only)


@dataclass(frozen=True)
class CheckpointInfo:
    has_lm_head: bool  # its own lm_head.weight (mT5, T5 v1.1), or it reuses `shared` (T5)
    nbytes: int  # the weight files' size


def checkpoint_info(source: ModelSource) -> CheckpointInfo:
    """What the weight files hold, read from the index or the file header: no tensor is loaded."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    def fetch(filename):
        return cached_file(source.path, filename, local_files_only=source.local_files_only,
                           _raise_exceptions_for_missing_entries=False)

    index = fetch("model.safetensors.index.json") or fetch("pytorch_model.bin.index.json")
    if index:
        index = json.loads(Path(index).read_text())
        return CheckpointInfo("lm_head.weight" in index["weight_map"], int(index.get("metadata", {}).get("total_size", 0)))
    single = fetch("model.safetensors")
    if single:
        with safe_open(single, "pt") as f:
            return CheckpointInfo("lm_head.weight" in f.keys(), os.path.getsize(single))
    single = fetch("pytorch_model.bin")
    if single:
        keys = torch.load(single, map_location="meta", weights_only=True)
        return CheckpointInfo("lm_head.weight" in keys, os.path.getsize(single))
    raise ConfigError(f"--model {source.name}: no model.safetensors or pytorch_model.bin found")


def load_frozen_model(source: ModelSource | str, config, dtype: torch.dtype = torch.float32, ds_config: dict | None = None,
                      dropout: float = 0.0, activation_checkpointing: bool = False):
    """from_pretrained into ZeRO-3 partitions when `ds_config` is ZeRO-3 (else a full copy), lm_head kept
    untied for untied checkpoints, every parameter frozen, the fused kernels swapped in.

    transformers 5 decides whether to tie lm_head to `shared` by comparing the loaded values; under
    ZeRO-3 both are size-0 placeholders, compare equal, and the checkpoint's own head is silently
    replaced by the input embedding. For a checkpoint that stores lm_head.weight we load through a
    subclass whose tie map leaves lm_head out, then assert the two stayed distinct.
    """
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING

    source = _source(source)
    cls = MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING[type(config)]
    untied = checkpoint_info(source).has_lm_head
    if untied:
        keys = {k: v for k, v in cls._tied_weights_keys.items() if k != "lm_head.weight"}
        cls = type(cls.__name__, (cls,), {"_tied_weights_keys": keys})
    # transformers reads this (through a weak reference) while from_pretrained runs: keep it referenced.
    hf_ds = HfDeepSpeedConfig(ds_config) if ds_config and Settings.of(ds_config).stage == 3 else None
    model = cls.from_pretrained(source.path, dropout_rate=dropout, dtype=dtype,
                                local_files_only=source.local_files_only)
    del hf_ds
    if untied:
        assert model.lm_head.weight is not model.shared.weight, "lm_head got tied to shared"
    model.requires_grad_(False)
    if activation_checkpointing:
        # Non-reentrant: the frozen blocks' inputs need no requires_grad, and a block's forward hooks
        # (the deep prompts' and ZeRO-3's) run outside the recomputed region.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    kernels.fuse(model)  # fused RMSNorm and GELU, faster CPU attention: the same functions
    return model


def environment_defaults() -> None:
    """Keep every from_pretrained off the network unless a download was asked for: transformers would
    start a thread asking the hub to convert a .bin-only repo to safetensors on every rank."""
    os.environ.setdefault("DISABLE_SAFETENSORS_CONVERSION", "1")
