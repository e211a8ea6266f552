"""Progress in a batch job's log: one plain line per train-metrics log, where a tqdm bar would make none
(softprompt/tracking.py chooses between the two)."""

from __future__ import annotations

import math


def plain_progress(quiet: bool, stream) -> bool:
    """Plain progress lines rather than a tqdm bar: with --quiet, or when `stream` (stderr, where the bar
    would go) is not a terminal, e.g. a Slurm log, where a bar's carriage returns make no lines."""
    try:
        return quiet or not stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return True


def progress_line(step: int, total: int, loss: float, tokens_per_s: float, elapsed_s: float, excluded_s: float,
                  steps_done: int) -> str:
    """'step 120/334 (36%) loss 0.8123 tokens/s 5123 elapsed 2m10s ETA 3m50s'. The ETA assumes the rate
    of this session's `steps_done` steps, over `elapsed_s` less the `excluded_s` spent evaluating."""
    train_s = max(elapsed_s - excluded_s, 1e-9)
    eta = (total - step) * train_s / steps_done if steps_done else math.nan
    return (f"step {step}/{total} ({step / total:.0%}) loss {loss:.4f} tokens/s {tokens_per_s:.0f} "
            f"elapsed {duration(elapsed_s)} ETA {duration(eta)}")


def duration(seconds: float) -> str:
    """'45s', '2m10s', '1h05m'; '?' when unknown."""
    if not math.isfinite(seconds):
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
