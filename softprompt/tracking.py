"""Run logging: metrics.jsonl and a progress bar, on rank 0 only."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from tqdm import tqdm


class Tracker:
    """metrics.jsonl (one JSON object per event, each with `step`) + a tqdm bar; silent off rank 0."""

    def __init__(self, output_dir: str | Path, is_main: bool, total_steps: int, quiet: bool = False):
        self.is_main = is_main
        self.file = None
        self.bar = None
        if not is_main:
            return
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        self.file = open(Path(output_dir) / "metrics.jsonl", "w")
        self.bar = tqdm(total=total_steps, desc="train", unit="step", disable=quiet, dynamic_ncols=True)

    def log(self, step: int, metrics: dict) -> None:
        if self.file is None:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()

    def advance(self, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def print(self, msg: str) -> None:
        if self.is_main:
            (self.bar.write if self.bar is not None else print)(msg, file=sys.stdout)
            sys.stdout.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        self.file = self.bar = None


def _plain(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    return v
