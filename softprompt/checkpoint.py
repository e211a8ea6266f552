"""Files a run leaves behind, written atomically (temp name + rename) by rank 0 only, and
resumable checkpoints.

`prompt.safetensors` holds the fp32 prompt under the key "prompt": (n_tokens, d_model) for an input
prompt, (layers, n_tokens, d_model) for deep prompts (any reparameterization already folded in);
`prompt.json` the metadata needed to use it again (depth, model, d_model, labels, verbalizer, tokenizer).

Checkpoints live in OUTPUT_DIR/checkpoints/step_NNNNNNNN/: DeepSpeed's engine checkpoint without
the frozen model (`exclude_frozen_parameters=True`: an XXL checkpoint stays megabytes), the
trainer's client state, one RNG file per rank and an exported prompt. A checkpoint becomes
visible only when rank 0 rewrites `checkpoints/latest` after every rank finished writing, so a
run killed mid-save resumes from the previous one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .config import ConfigError
from .io import atomic_write, write_json, write_text

EXIT_REQUEUE = 75  # EX_TEMPFAIL: "preempted, checkpoint saved, requeue me" (slurm/*.sbatch act on it)
CHECKPOINTS = "checkpoints"
LATEST = "latest"


def save_prompt(output_dir: str | Path, prompt: torch.Tensor, meta: dict) -> None:
    """`prompt` is (P, D) or an exported (L, P, D); one layer is stored as (P, D)."""
    output_dir = Path(output_dir)
    prompt = prompt.detach().float().cpu()
    prompt = (prompt[0] if prompt.dim() == 3 and prompt.shape[0] == 1 else prompt).contiguous()
    meta = {**meta, "layers": prompt.shape[0] if prompt.dim() == 3 else 1, "n_tokens": prompt.shape[-2],
            "d_model": prompt.shape[-1]}
    atomic_write(output_dir / "prompt.safetensors",
                 lambda tmp: save_file({"prompt": prompt}, tmp, metadata={"format": "pt"}))
    write_json(output_dir / "prompt.json", meta)


def load_prompt(path: str | Path, flag: str = "prompt") -> tuple[torch.Tensor, dict]:
    """(prompt, prompt.json metadata or {}); an unreadable file is a ConfigError naming `flag`."""
    path = Path(path)
    try:
        prompt = load_file(path)["prompt"]
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise ConfigError(f"{flag} {path}: not a readable prompt file ({str(e).splitlines()[0]})") from None
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return prompt, meta


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(engine, output_dir, step: int, client_state: dict, prompt: torch.Tensor | None,
                    prompt_meta: dict, keep: int, rank: int) -> Path:
    """Collective: every rank writes its part, then rank 0 moves `latest` and prunes old ones.
    `prompt` (the exported prompt; None with --tune full and no prompt) is saved beside it."""
    root = Path(output_dir) / CHECKPOINTS
    tag = tag_for(step)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=True)
    atomic_write(root / tag / f"rng_rank{rank}.pt", lambda tmp: torch.save(rng_state(), tmp))
    if rank == 0 and prompt is not None:
        save_prompt(root / tag, prompt, prompt_meta)
    _barrier()  # every rank's files are on disk before the checkpoint becomes visible
    if rank == 0:
        write_text(root / LATEST, tag)
        for name in prune_keep([p.name for p in root.glob("step_*") if p.is_dir()], keep):
            shutil.rmtree(root / name, ignore_errors=True)
    _barrier()  # nobody exits (or is killed by the launcher) before `latest` is written
    return root / tag


def prune_keep(names: list[str], keep: int) -> list[str]:
    """Which checkpoint tags to delete so that the newest `keep` remain."""
    return sorted(names)[:-keep] if len(names) > keep else []


def find_checkpoint(output_dir, resume: str) -> Path | None:
    """The checkpoint dir to resume from: `auto` -> the one `latest` names (None if there is none)."""
    if resume == "none":
        return None
    if resume == "auto":
        marker = Path(output_dir) / CHECKPOINTS / LATEST
        if not marker.exists():
            return None
        path = marker.parent / marker.read_text().strip()
    else:
        path = Path(resume)
        if (path / LATEST).is_file():
            path = path / (path / LATEST).read_text().strip()
        elif (path / CHECKPOINTS / LATEST).is_file():
            path = path / CHECKPOINTS / (path / CHECKPOINTS / LATEST).read_text().strip()
    if not path.is_dir():
        raise ConfigError(f"--resume {resume}: no checkpoint directory at {path}")
    if not any(path.glob("*model_states.pt")) or not checkpoint_world_size(path):
        raise ConfigError(f"--resume {resume}: {path} is not a complete checkpoint (no model states or RNG files)")
    return path


def checkpoint_world_size(path: Path) -> int:
    ranks = [p for p in path.iterdir() if re.fullmatch(r"rng_rank\d+\.pt", p.name)]
    return len(ranks)


def load_checkpoint(engine, path: Path, world: int, rank: int) -> dict:
    """Restore prompt, optimizer, scheduler and this rank's RNG; return the trainer's client state."""
    saved_world = checkpoint_world_size(path)
    if saved_world != world:
        raise ConfigError(
            f"checkpoint {path} was written by {saved_world} ranks, this run has {world}: DeepSpeed's "
            f"ZeRO checkpoint needs the same data-parallel size. Start from its prompt instead: "
            f"--init_prompt {path / 'prompt.safetensors'}"
        )
    try:
        _, client = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=False)
        rng = torch.load(path / f"rng_rank{rank}.pt", weights_only=False)
    except (OSError, RuntimeError, EOFError, KeyError, ValueError) as e:
        raise ConfigError(f"checkpoint {path} is corrupt or truncated: {str(e).splitlines()[0]}") from None
    if client is None or "step" not in client:
        raise ConfigError(f"checkpoint {path} is corrupt: no trainer state")
    set_rng_state(rng)
    return client


def forget_after(output_dir, step: int) -> None:
    """On resume from `step` (rank 0): drop what the interrupted run wrote after it. Checkpoint dirs
    of later steps are partial (never made `latest`), and metrics.jsonl records of later steps are
    logged again by the resumed run."""
    for p in (Path(output_dir) / CHECKPOINTS).glob("step_*"):
        if p.is_dir() and p.name > tag_for(step):
            shutil.rmtree(p, ignore_errors=True)
    path = Path(output_dir) / "metrics.jsonl"
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    write_text(path, "".join(line + "\n" for line in kept))
