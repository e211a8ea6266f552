"""Summaries shared by launcher.aggregate and benchmarks.quality: each run's results, mean ± std over
seeds, CSV and markdown tables, the majority-class baseline, and figures written in several formats."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

METRICS = [f"{split}_{name}" for split in ("dev", "test") for name in ("accuracy", "macro_f1")]
FORMATS = ("png", "pdf", "svg")
# Leave out the metadata that changes with each run or matplotlib version, so a figure redrawn from the
# same numbers is the same file.
_STABLE = {"png": {"Software": None}, "pdf": {"CreationDate": None, "Producer": None}, "svg": {"Date": None}}


def load_task(task: dict) -> dict | None:
    """A finished run's metrics (None where its results.json lacks a split), or None if it has no
    results.json."""
    out = Path(task["output_dir"])
    try:
        results = json.loads((out / "results.json").read_text())
    except FileNotFoundError:
        return None
    row = {m: (results.get(m.split("_")[0]) or {}).get(m.split("_", 1)[1]) for m in METRICS}
    row.update({k: results.get(k) for k in ("params_trainable", "optimizer_state_numel", "tokenizer_hash")})
    speeds = []
    if (out / "metrics.jsonl").exists():
        records = (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line)
        speeds = [r["train/tokens_per_s"] for r in records if "train/tokens_per_s" in r]
    row["tokens_per_s"] = statistics.fmean(speeds) if speeds else None
    return row


def mean_std(values: list) -> tuple[float | None, float | None]:
    """Mean and sample std of the values that are not None (std None below two values)."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def pm(mean: float | None, std: float | None) -> str:
    """'0.6123 ± 0.0168', '0.6123' without a std, '–' without a mean."""
    if mean is None:
        return "–"
    return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def summarize(tasks: list[dict], finished: list[dict | None], keys: dict[str, object], stats: list[str],
              means: list[str] = ()) -> list[dict]:
    """One row per distinct value of `keys` (task field -> its value when a task lacks it), in task order:
    the keys, seeds finished/expected, `<stat>_mean` and `<stat>_std` for each of `stats`, and the mean
    of each of `means`, over the finished runs. Pure."""
    groups: dict[tuple, list] = {}
    for task, result in zip(tasks, finished):
        groups.setdefault(tuple(task.get(k, default) for k, default in keys.items()), []).append(result)
    rows = []
    for key, results in groups.items():
        done = [r for r in results if r is not None]
        row = {**dict(zip(keys, key)), "seeds_finished": len(done), "seeds_expected": len(results)}
        for stat in stats:
            row[f"{stat}_mean"], row[f"{stat}_std"] = mean_std([r.get(stat) for r in done])
        for name in means:
            row[name] = mean_std([r.get(name) for r in done])[0]
        rows.append(row)
    return rows


def to_csv(rows: list[dict], columns: list[str] | None = None) -> str:
    """The rows as CSV (None as an empty cell); columns: those of the first row unless given."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns or list(rows[0]), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return buf.getvalue()


def read_csv(path: Path, text_columns: set[str]) -> list[dict]:
    """Rows written by to_csv, back as values: empty cells None, other columns than `text_columns`
    as int or float."""
    def value(column: str, cell: str):
        if cell == "" or column in text_columns:
            return cell or None
        number = float(cell)
        return int(number) if number.is_integer() and "." not in cell else number

    with open(path, encoding="utf-8-sig", newline="") as f:
        return [{k: value(k, v) for k, v in row.items()} for row in csv.DictReader(f)]


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows]) + "\n"


def data_config(train_args: list[str]):
    """The DataConfig that train.py flags give (other flags ignored); raises ConfigError."""
    import dataclasses

    from launcher import cli
    from softprompt.config import DataConfig

    parsed = vars(cli.build_parser().parse_known_args(train_args)[0])
    return DataConfig(**{f.name: parsed[f.name] for f in dataclasses.fields(DataConfig)})


def majority(data_cfg, split: str = "test") -> dict | None:
    """Accuracy and macro-F1 on `split` of always predicting the train split's most frequent label
    (None when the data has no such split). Raises ConfigError for unreadable data."""
    import datasets
    import torch

    from softprompt import data, metrics

    datasets.disable_progress_bars()  # a summary's output is its own lines, not the data loader's
    splits = data.load_splits(data_cfg)
    if getattr(splits, split) is None:
        return None
    names = splits.label_names
    top = statistics.mode(splits.train["label"])
    gold = torch.tensor(getattr(splits, split)["label"])
    m = metrics.from_confusion(metrics.confusion(gold, torch.full_like(gold, top), len(names)), names)
    return {f"{split}_accuracy": m["accuracy"], f"{split}_macro_f1": m["macro_f1"], "label": names[top],
            "dataset": Path(data_cfg.dataset).name}


def figure(width: float, height: float):
    """A new matplotlib (figure, axes), drawn off-screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), dpi=150)


def save_figure(fig, stem: Path, formats: list[str]) -> list[Path]:
    """Write `fig` as stem.<format> for each format (atomically, cropped to what is drawn, legends
    outside the axes included) and close it."""
    import matplotlib.pyplot as plt

    from softprompt.io import atomic_write

    paths = [stem.with_suffix(f".{fmt}") for fmt in formats]
    for path in paths:
        fmt = path.suffix[1:]
        atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, bbox_inches="tight", metadata=_STABLE[fmt]))
    plt.close(fig)
    return paths
