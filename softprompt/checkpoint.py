"""The exported prompt, and resumable checkpoints that never execute what they read.

`prompt.safetensors` holds the fp32 prompt under the key "prompt": (n_tokens, d_model) for an input
prompt, (layers, n_tokens, d_model) for deep prompts (any reparameterization already folded in);
`prompt.json` the metadata needed to use it again (depth, model, d_model, labels, verbalizer, tokenizer).

A checkpoint is OUTPUT_DIR/checkpoints/step_NNNNNNNN/, safetensors and JSON only (statefile.py):

    checkpoint.json         format, step, world size, run fingerprint, DeepSpeed counters, lr
                            scheduler state, optimizer hyperparameters and state layout
    params.safetensors      fp32 master of every trainable parameter, full shape, by name
    optimizer.safetensors   optimizer state per parameter, full shape (optim_state.py)
    trainer.json            the trainer's state; its tensors are in trainer.safetensors
    rng_rank<r>.safetensors rank r's python / numpy / torch (/ CUDA) generator states
    prompt.safetensors/json the exported prompt
    checksums.sha256        sha256 of every file above (`sha256sum -c` format), written last

Nothing is partitioned by rank except the RNG files, so a checkpoint resumes at any world size
(the data order depends on the global batch only); at another world size the RNGs are re-seeded.
The frozen model is never written. A checkpoint becomes visible when rank 0 rewrites
`checkpoints/latest`, after every rank finished writing: a run killed mid-save resumes from the
previous one. Files of DeepSpeed's pickle format (*.pt) are refused, never loaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from . import optim_state, statefile
from .config import ConfigError
from .io import atomic_write, write_json, write_text
from .statefile import CHECKSUMS, rng_state, set_rng_state  # noqa: F401 (rng_state: public API)

EXIT_REQUEUE = 75  # EX_TEMPFAIL: "preempted, checkpoint saved, requeue me" (slurm/*.sbatch act on it)
CHECKPOINTS = "checkpoints"
LATEST = "latest"
FORMAT = "softprompt-checkpoint-1"
MANIFEST, PARAMS, OPTIMIZER = "checkpoint.json", "params.safetensors", "optimizer.safetensors"
TRAINER, TRAINER_TENSORS = "trainer.json", "trainer.safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle")


def count_nonfinite(t: torch.Tensor) -> int:
    """How many NaN/Inf values `t` holds: a prompt with any is never saved or used."""
    return int((~torch.isfinite(t)).sum())


def save_prompt(output_dir: str | Path, prompt: torch.Tensor, meta: dict) -> None:
    """`prompt` is (P, D) or an exported (L, P, D); one layer is stored as (P, D). Never non-finite."""
    output_dir = Path(output_dir)
    prompt = prompt.detach().float().cpu()
    if bad := count_nonfinite(prompt):
        raise ValueError(f"refusing to save a prompt with {bad} NaN/Inf values to {output_dir}")
    prompt = (prompt[0] if prompt.dim() == 3 and prompt.shape[0] == 1 else prompt).contiguous()
    meta = {**meta, "layers": prompt.shape[0] if prompt.dim() == 3 else 1, "n_tokens": prompt.shape[-2],
            "d_model": prompt.shape[-1]}
    atomic_write(output_dir / "prompt.safetensors",
                 lambda tmp: save_file({"prompt": prompt}, tmp, metadata={"format": "pt"}))
    write_json(output_dir / "prompt.json", meta)


def load_prompt(path: str | Path, flag: str = "prompt") -> tuple[torch.Tensor, dict]:
    """(prompt, prompt.json metadata or {}); an unreadable or non-finite prompt is a ConfigError naming `flag`."""
    path = Path(path)
    try:
        prompt = load_file(path)["prompt"]
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise ConfigError(f"{flag} {path}: not a readable prompt file ({str(e).splitlines()[0]})") from None
    if bad := count_nonfinite(prompt):
        raise ConfigError(f"{flag} {path}: the prompt has {bad} NaN/Inf values (a diverged run?)")
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return prompt, meta


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.safetensors"


def save_checkpoint(engine, output_dir, step: int, client_state: dict, prompt: torch.Tensor | None,
                    prompt_meta: dict, keep: int, rank: int, *, fingerprint: dict) -> Path:
    """Collective: every rank writes its part, then rank 0 moves `latest` and prunes old ones.
    `client_state`: the trainer's, a nested dict of JSON values and tensors. `prompt` (the exported
    prompt; None with --tune full and no prompt) is saved beside it. `fingerprint`: what a resumed
    run must match (`check_fingerprint`)."""
    root = Path(output_dir) / CHECKPOINTS
    path = root / tag_for(step)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if prompt is not None and (bad := count_nonfinite(prompt)):  # every rank raises, before any barrier
        raise ValueError(f"step {step}: the prompt has {bad} NaN/Inf values; not checkpointing it")
    client_json, client_tensors = statefile.split_tensors(dict(client_state))
    engine_state = optim_state.read_engine(engine)
    params = optim_state.read_masters(engine, keep=rank == 0)  # collective under ZeRO-3
    optim_tensors, optim_meta = optim_state.read_optimizer(engine, keep=rank == 0)  # collective
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)  # leftovers of an earlier run at this step
    _barrier()
    statefile.save_tensors(path / rng_file(rank), rng_state())
    if rank == 0:
        statefile.save_tensors(path / PARAMS, params)
        statefile.save_tensors(path / OPTIMIZER, optim_tensors)
        statefile.save_tensors(path / TRAINER_TENSORS, client_tensors)
        write_json(path / TRAINER, client_json)
        if prompt is not None:
            save_prompt(path, prompt, prompt_meta)
        write_json(path / MANIFEST, {"format": FORMAT, "step": step, "world_size": world, "fingerprint": fingerprint,
                                     "engine": engine_state, "optimizer": optim_meta})
    _barrier()  # every rank's files are on disk before they are summed and the checkpoint becomes visible
    if rank == 0:
        names = [MANIFEST, PARAMS, OPTIMIZER, TRAINER, TRAINER_TENSORS, *map(rng_file, range(world))]
        names += ["prompt.safetensors", "prompt.json"] if prompt is not None else []
        if missing := [n for n in names if not (path / n).is_file()]:
            raise RuntimeError(f"checkpoint {path}: {missing} not visible to rank 0: checkpoints need a file "
                               "system shared by all ranks")
        statefile.write_checksums(path, names)
        write_text(root / LATEST, path.name)
        for name in prune_keep([p.name for p in root.glob("step_*") if p.is_dir()], keep):
            shutil.rmtree(root / name, ignore_errors=True)
    _barrier()  # nobody exits (or is killed by the launcher) before `latest` is written
    return path


def prune_keep(names: list[str], keep: int) -> list[str]:
    """Which checkpoint tags to delete so that the newest `keep` remain."""
    return sorted(names)[:-keep] if len(names) > keep else []


def find_checkpoint(output_dir, resume: str) -> Path | None:
    """The checkpoint dir to resume from (`auto` -> the one `latest` names; None if there is none),
    verified (`verify_checkpoint`), and OUTPUT_DIR/metrics.jsonl readable. Local: no collectives."""
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
    verify_checkpoint(path)
    read_metrics(Path(output_dir) / "metrics.jsonl")
    return path


def verify_checkpoint(path: Path) -> dict:
    """Every file checked against checksums.sha256; returns checkpoint.json. Local: no collectives."""
    sums, manifest = _inspect(path)
    for name in sums:
        statefile.read_verified(path, name, sums, f"checkpoint {path}")
    return manifest


def _inspect(path: Path) -> tuple[dict[str, str], dict]:
    """(checksums, checkpoint.json) of a directory that holds exactly the files its checksums.sha256
    lists. Pickle files are refused whatever their name: loading one can run code as the resuming user."""
    label = f"checkpoint {path}"
    names = sorted(p.name for p in path.iterdir())
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if pickles and MANIFEST not in names and CHECKSUMS not in names:
        raise ConfigError(f"{label}: written by an older softprompt in DeepSpeed's pickle format, which is never "
                          "loaded (it can run code); start from its prompt with "
                          f"--init_prompt {path / 'prompt.safetensors'}")
    if pickles:
        raise ConfigError(f"{label}: holds {', '.join(pickles)}: pickle files are never loaded (they can run code), "
                          "and softprompt checkpoints have none; remove them or resume from another checkpoint")
    if CHECKSUMS not in names:
        raise ConfigError(f"{label} is not a complete checkpoint (no {CHECKSUMS}: killed while saving?)")
    sums = statefile.read_checksums(path, label)
    if stray := [n for n in names if n not in sums and n != CHECKSUMS]:
        raise ConfigError(f"{label}: {', '.join(stray)} not listed in {CHECKSUMS}: not written by softprompt")
    m = statefile.load_json(path, MANIFEST, sums, label)
    if not (isinstance(m, dict) and m.get("format") == FORMAT and isinstance(m.get("step"), int)
            and isinstance(m.get("world_size"), int) and m["world_size"] >= 1
            and all(isinstance(m.get(k), dict) for k in ("fingerprint", "engine", "optimizer"))):
        raise ConfigError(f"{label}: {MANIFEST} is not a {FORMAT} manifest")
    if missing := [rng_file(r) for r in range(m["world_size"]) if rng_file(r) not in sums]:
        raise ConfigError(f"{label}: {', '.join(missing)} missing for the {m['world_size']} ranks that wrote it")
    return sums, m


def read_fingerprint(path: Path) -> dict:
    """The fingerprint a checkpoint recorded (`find_checkpoint` verified its files)."""
    return _inspect(path)[1]["fingerprint"]


def check_fingerprint(saved: dict, current: dict, path) -> None:
    """A ConfigError naming every field recorded in both that differs, with both values."""
    current = json.loads(json.dumps(current))  # tuples -> lists, as the saved side went through JSON
    diff = [f"{k} {json.dumps(saved[k])} (checkpoint) != {json.dumps(current[k])} (this run)"
            for k in sorted(set(saved) & set(current)) if saved[k] != current[k]]
    if diff:
        raise ConfigError(f"checkpoint {path} belongs to another run: {'; '.join(diff)}. Resume with the same "
                          "settings, or start a new run in another --output_dir (it may start from this prompt: "
                          f"--init_prompt {Path(path) / 'prompt.safetensors'})")


def load_checkpoint(engine, path: Path, world: int, rank: int) -> dict:
    """Restore parameters, optimizer, DeepSpeed counters, lr scheduler and this rank's RNG (at the
    saved world size; re-seeded otherwise); return the trainer's client state. Collective."""
    path, label = Path(path), f"checkpoint {path}"
    sums, manifest = _inspect(path)  # each file's checksum is checked as it is read
    params = statefile.load_tensors(path, PARAMS, sums, label)
    optim = statefile.load_tensors(path, OPTIMIZER, sums, label)
    client = statefile.join_tensors(statefile.load_json(path, TRAINER, sums, label),
                                    statefile.load_tensors(path, TRAINER_TENSORS, sums, label), label)
    rngs = [statefile.load_tensors(path, rng_file(r), sums, label) for r in range(manifest["world_size"])]
    # Everything is checked before the first collective, so that every rank fails alike.
    named = optim_state.trainable(engine)
    if sorted(params) != sorted(n for n, _ in named):
        raise ConfigError(f"{label}: {PARAMS} holds {sorted(params)}, this run trains {[n for n, _ in named]}")
    for name, p in named:
        if tuple(params[name].shape) != optim_state.full_shape(p):
            raise ConfigError(f"{label}: {PARAMS} '{name}' has shape {tuple(params[name].shape)}, this run's is "
                              f"{optim_state.full_shape(p)}")
    optim_state.check_optimizer(engine, optim, manifest["optimizer"], label)
    if not isinstance(client, dict) or client.get("step") != manifest["step"]:
        raise ConfigError(f"{label}: {TRAINER} does not hold the state of step {manifest['step']}")
    optim_state.write_masters(engine, params)  # collective under ZeRO-3
    optim_state.write_optimizer(engine, optim, manifest["optimizer"])
    optim_state.write_engine(engine, manifest["engine"], label)
    if manifest["world_size"] == world:
        set_rng_state(rngs[rank])
    else:
        statefile.reseed(manifest["step"] * 1_000_003 + rank)
        if rank == 0:
            print(f"note: {path} was written with world size {manifest['world_size']}, this run has {world}: the "
                  "random generators are re-seeded (only dropout > 0 uses them)", flush=True)
    return client


def read_metrics(path: Path) -> list[tuple[str, dict]]:
    """(line, record) of metrics.jsonl. A torn last line (a run killed or out of disk mid-write) is
    dropped; an invalid line before it is a ConfigError naming the line."""
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            out.append((line, record))
        elif i < len(lines):
            raise ConfigError(f"{path} line {i}: not a JSON record with a step; the file is corrupt (remove that "
                              "line to resume)")
    return out


def forget_after(output_dir, step: int) -> None:
    """On resume from `step` (rank 0): drop what the interrupted run wrote after it. Checkpoint dirs
    of later steps are partial (never made `latest`), and metrics.jsonl records of later steps are
    logged again by the resumed run; so is a torn last line."""
    for p in (Path(output_dir) / CHECKPOINTS).glob("step_*"):
        if p.is_dir() and p.name > tag_for(step):
            shutil.rmtree(p, ignore_errors=True)
    path = Path(output_dir) / "metrics.jsonl"
    if path.exists():
        kept = [line for line, record in read_metrics(path) if record["step"] <= step]
        write_text(path, "".join(line + "\n" for line in kept))
