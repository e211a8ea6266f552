"""One data file (jsonl, csv or tsv) read into validated columns, and the file and line of any problem.

Every problem becomes a one-line :class:`ConfigError` of the form ``path:LINE: field 'name': what was
expected``, so a bad row in a 100k-line file is found in seconds rather than from a traceback deep inside
pyarrow. Line numbers are physical lines in the file (1-based; for csv/tsv the header is line 1); they are
only worked out when there is an error, by re-reading the file, so the happy path pays nothing for them.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import datasets

from softprompt.config import ConfigError

# Extension -> reader. .json is JSON lines too (one object per line), like datasets reads it.
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "tsv"}
INEWS = "inews"  # the packaged data set: errors name its rows, not a file
# Files are UTF-8; "utf-8-sig" also drops the byte-order mark some editors (Excel, Notepad) write first,
# which would otherwise become part of the first field's name.
ENCODING = "utf-8-sig"

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
