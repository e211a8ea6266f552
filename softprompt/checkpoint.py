"""Files a run leaves behind, written atomically (temp name + rename) by rank 0 only.

`prompt.safetensors` holds the fp32 prompt under the key "prompt" (n_tokens, d_model);
`prompt.json` the metadata needed to use it again (model, d_model, labels, verbalizer, tokenizer).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | Path, write) -> None:
    """Call write(tmp_path) then rename over `path`: readers never see a half-written file."""
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


def write_json(path: str | Path, obj) -> None:
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_prompt(output_dir: str | Path, prompt: torch.Tensor, meta: dict) -> None:
    output_dir = Path(output_dir)
    prompt = prompt.detach().float().cpu().contiguous()
    meta = {**meta, "n_tokens": prompt.shape[0], "d_model": prompt.shape[1]}
    atomic_write(output_dir / "prompt.safetensors",
                 lambda tmp: save_file({"prompt": prompt}, tmp, metadata={"format": "pt"}))
    write_json(output_dir / "prompt.json", meta)


def load_prompt(path: str | Path) -> tuple[torch.Tensor, dict]:
    path = Path(path)
    prompt = load_file(path)["prompt"]
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return prompt, meta
