"""Checkpoint files that hold data only: safetensors + JSON, a sha256 manifest, no pickle anywhere.

A checkpoint directory is read by whoever resumes it, and run directories are often shared, so
nothing here may execute what it reads: tensors go through safetensors (a JSON header + raw
bytes), everything else through JSON. Every file is listed in `checksums.sha256` (the format of
`sha256sum`, so `sha256sum -c checksums.sha256` checks a directory by hand), and a file is parsed
only after the bytes read were hashed and matched: a corrupt file is named, never half-used.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

from .config import ConfigError
from .io import atomic_write, write_text

CHECKSUMS = "checksums.sha256"
TENSOR_REF = "__tensor__"  # {"__tensor__": key}: a JSON stand-in for a tensor stored in safetensors
_LINE = re.compile(r"([0-9a-f]{64})  ([A-Za-z0-9_.-]+)")  # plain file names only: no paths


# ---- checksums -----------------------------------------------------------------------------------

def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_checksums(directory: Path, names: list[str]) -> None:
    """checksums.sha256 over `names` (files in `directory`), in `sha256sum` format."""
    lines = [f"{sha256((directory / n).read_bytes())}  {n}\n" for n in sorted(names)]
    write_text(directory / CHECKSUMS, "".join(lines))


def read_checksums(directory: Path, label: str) -> dict[str, str]:
    """{file name: sha256} from `directory`/checksums.sha256; a malformed line is a ConfigError."""
    sums = {}
    for i, line in enumerate((directory / CHECKSUMS).read_text(errors="replace").splitlines(), 1):
        m = _LINE.fullmatch(line)
        if not m or m[2] == CHECKSUMS:
            raise ConfigError(f"{label}: {CHECKSUMS} line {i} is not '<sha256>  <file name>'")
        sums[m[2]] = m[1]
    return sums


def read_verified(directory: Path, name: str, sums: dict[str, str], label: str) -> bytes:
    """The bytes of `name`, after checking them against checksums.sha256."""
    if name not in sums:
        raise ConfigError(f"{label}: {name} is not listed in {CHECKSUMS}")
    try:
        data = (directory / name).read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{label}: {name} is missing (listed in {CHECKSUMS})") from None
    if sha256(data) != sums[name]:
        raise ConfigError(f"{label}: {name} fails its checksum: the file is corrupt or was changed")
    return data


def load_tensors(directory: Path, name: str, sums: dict[str, str], label: str) -> dict[str, torch.Tensor]:
    data = read_verified(directory, name, sums, label)
    try:
        return load_bytes(data)
    except Exception as e:  # safetensors raises its own SafetensorError for a bad header
        raise ConfigError(f"{label}: {name} is not a valid safetensors file ({str(e).splitlines()[0]})") from None


def load_json(directory: Path, name: str, sums: dict[str, str], label: str):
    data = read_verified(directory, name, sums, label)
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"{label}: {name} is not valid JSON ({e})") from None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Atomic safetensors write; copies, so views and shared storage are fine."""
    plain = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(plain, tmp, metadata={"format": "pt"}))


# ---- nested state <-> (JSON, tensors) --------------------------------------------------------------

def split_tensors(obj, prefix: str = "") -> tuple[object, dict[str, torch.Tensor]]:
    """A nested dict/list of JSON values and tensors -> (JSON-able copy, {flat key: tensor}).

    Each tensor is replaced by {"__tensor__": "a/b/0"}, its path of dict keys and list indices.
    Tuples come back as lists; dict keys must be strings. Anything else is a TypeError.
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(x, path):
        if torch.is_tensor(x):
            tensors[path] = x
            return {TENSOR_REF: path}
        if isinstance(x, dict):
            if TENSOR_REF in x or not all(isinstance(k, str) for k in x):
                raise TypeError(f"state at {path or '/'}: dict keys must be strings other than {TENSOR_REF!r}")
            return {k: walk(v, f"{path}/{k}" if path else k) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v, f"{path}/{i}" if path else str(i)) for i, v in enumerate(x)]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"state at {path or '/'}: {type(x).__name__} is neither JSON nor a tensor")

    return walk(obj, prefix), tensors


def join_tensors(obj, tensors: dict[str, torch.Tensor], label: str):
    """Inverse of `split_tensors`; a reference to a missing tensor is a ConfigError."""
    if isinstance(obj, dict):
        if set(obj) == {TENSOR_REF}:
            if obj[TENSOR_REF] not in tensors:
                raise ConfigError(f"{label}: refers to tensor {obj[TENSOR_REF]!r}, which it does not hold")
            return tensors[obj[TENSOR_REF]]
        return {k: join_tensors(v, tensors, label) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors, label) for v in obj]
    return obj


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str, label: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"{label}: unknown dtype {name!r}")
    return dtype


# ---- RNG state as tensors --------------------------------------------------------------------------

def rng_state() -> dict[str, torch.Tensor]:
    """This process's python, numpy, torch CPU (and CUDA) generator states, as tensors."""
    import numpy as np

    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    assert name == "MT19937", name
    state = {
        "python/version": torch.tensor(version),
        "python/state": torch.tensor(words, dtype=torch.int64),  # 624 words + position
        "python/gauss_next": torch.tensor([] if gauss is None else [gauss], dtype=torch.float64),
        "numpy/keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy/pos_has_gauss": torch.tensor([pos, has_gauss]),
        "numpy/cached_gaussian": torch.tensor(cached, dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state.update({f"cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    import numpy as np

    gauss = state["python/gauss_next"].tolist()
    random.setstate((int(state["python/version"]), tuple(state["python/state"].tolist()), gauss[0] if gauss else None))
    pos, has_gauss = state["numpy/pos_has_gauss"].tolist()
    np.random.set_state(("MT19937", state["numpy/keys"].numpy().astype(np.uint32), pos, has_gauss,
                         float(state["numpy/cached_gaussian"])))
    torch.set_rng_state(state["torch"])
    cuda = [state[k] for k in sorted((k for k in state if k.startswith("cuda/")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def reseed(seed: int) -> None:
    """Every generator `rng_state` covers, from one integer."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # CUDA generators too
