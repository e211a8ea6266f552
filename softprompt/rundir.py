"""One run per output directory. A fresh run is refused where an earlier run left its files, unless
--resume or --overwrite says what to do with them, and rank 0 holds a lock on the directory while it
runs, so two live runs can never interleave their metrics.jsonl."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
from pathlib import Path

from .config import ConfigError

RUN_FILES = ("config.yaml", "metrics.jsonl", "results.json", "prompt.safetensors", "prompt.json", "checkpoints")
LOCK = ".lock"


def check(output_dir: str, resume: str, overwrite: bool) -> None:
    """Refuse to start where a run already is (read-only: every rank may call it)."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output_dir {out}: exists and is not a directory")
    found = [name for name in RUN_FILES if (out / name).exists()]
    if not found or overwrite:
        return
    if resume == "none":
        raise ConfigError(f"--output_dir {out} holds a run ({', '.join(found)}): continue it with --resume auto, "
                          "start afresh with --overwrite, or choose another --output_dir")
    if resume == "auto" and (out / "results.json").exists():
        raise ConfigError(f"--output_dir {out}: that run has finished (results.json); nothing to resume "
                          "(--overwrite starts it afresh)")


def clear(output_dir: str) -> None:
    """--overwrite: remove an earlier run's files (rank 0, holding the lock)."""
    for name in RUN_FILES:
        path = Path(output_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


class Lock:
    """An exclusive, non-blocking flock on OUTPUT_DIR/.lock, held until `release` or process exit."""

    def __init__(self, output_dir: str):
        path = Path(output_dir) / LOCK
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise ConfigError(f"--output_dir {output_dir} is in use by a live run ({holder}); wait for it or choose "
                              "another --output_dir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.file.flush()

    def release(self) -> None:
        if not self.file.closed:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
