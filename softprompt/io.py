"""Atomic file writes (a reader, or a run killed mid-write, never sees a half-written file) and the
config.yaml format."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

from .config import ConfigError

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """Call write(tmp_path) then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


YAML_HEADER = """\
# A softprompt run's whole configuration, as resolved (the DeepSpeed JSON inline).
# Repeat the run:  train.py --config config.yaml --output_dir NEW_DIR   (flags after it override it)
"""


def to_yaml(values: dict) -> str:
    import yaml

    return YAML_HEADER + yaml.safe_dump(values, sort_keys=False, allow_unicode=True, width=120)


def read_yaml(path: str) -> dict:
    """A config.yaml as {section: {field: value}}; unreadable or malformed files are one ConfigError."""
    import yaml

    try:
        values = yaml.safe_load(open(path, encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"--config {path}{where}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(values, dict) or not all(isinstance(v, (dict, type(None))) for v in values.values()):
        raise ConfigError(f"--config {path}: expected sections data:, model:, train: holding settings")
    return values
