"""Reading raw sources (SPEC section 2) into rows, one file at a time.

Every format is turned into the same shape, a `RawRows` frame of plain Python values
(object columns), so that the SPEC's validation rules exist once, in cleaning.py,
whatever the file format was. A line that does not even decode is marked `malformed`
here; everything else is judged there.
"""

import csv
import gzip
import io
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from recpipe.cli import UserError

# Required fields first, in the SPEC's order; validation reports the first failing field.
FIELDS = {
    "impressions": ("dt", "ranking_id", "customer_id", "user_agent", "impressions"),
    "clicks": ("dt", "customer_id", "item_id", "click_time"),
    "add_to_carts": ("dt", "customer_id", "config_id", "simple_id", "occur_at"),
    "previous_orders": ("order_date", "customer_id", "config_id"),
}
SOURCES = tuple(FIELDS)
FORMATS = (".jsonl", ".json", ".csv", ".parquet")


def file_format(path):
    """'.jsonl', '.csv', ... from the file name, looking through a trailing .gz; None if unknown."""
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    suffix = Path(name).suffix
    if suffix == ".json":
        return ".jsonl"
    return suffix if suffix in FORMATS else None


def list_source_files(raw_dir, source):
    """Every data file of one source, sorted; stops with a clear message if the source is unusable.

    Names starting with '.' or '_' are skipped (editor swap files, _SUCCESS markers,
    the generator's _generated.json), as Spark and Dask do.
    """
    source_dir = Path(raw_dir) / source
    if not source_dir.is_dir():
        raise UserError(f"raw source {source_dir}/ is missing: every run needs {', '.join(SOURCES)} under --raw {raw_dir}")
    files = sorted(
        path for path in source_dir.rglob("*")
        if path.is_file() and not any(part.startswith((".", "_")) for part in path.relative_to(source_dir).parts)
    )
    if not files:
        raise UserError(f"raw source {source_dir}/ is empty: it needs at least one .jsonl, .csv or .parquet file (optionally .gz)")
    for path in files:
        fmt = file_format(path)
        if fmt is None:
            raise UserError(
                f"{path}: unknown format; raw files must end in .jsonl, .json, .csv or .parquet, optionally .gz "
                "(rename it, or move it out of the source folder)"
            )
        if fmt == ".csv" and source == "impressions":
            raise UserError(f"{path}: impressions cannot be CSV (their rows hold a nested list); write them as JSON Lines or Parquet")
    return files


@dataclass
class RawRows:
    """One raw file's rows: `frame` has `row` (1-based), `raw`, `malformed` and one object column per field."""

    frame: pd.DataFrame
    extra_fields: set = field(default_factory=set)


def read_rows(path, source):
    """Read one raw file of `source` into RawRows; a file that cannot be read at all is a UserError."""
    fields = FIELDS[source]
    try:
        data = Path(path).read_bytes()
        if Path(path).name.lower().endswith(".gz"):
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise UserError(f"{path}: cannot be read or decompressed ({error}); replace or remove the file") from None
    fmt = file_format(path)
    if fmt == ".jsonl":
        return _read_json_lines(data, fields)
    if fmt == ".csv":
        return _read_csv(data, fields, path)
    return _read_parquet(data, fields, path)


def _frame(rows, raw, malformed, columns, fields):
    frame = pd.DataFrame({"row": pd.array(rows, dtype="int64"), "raw": pd.Series(raw, dtype=object),
                          "malformed": pd.array(malformed, dtype=bool)})
    for name in fields:
        frame[name] = pd.Series(columns.get(name, [None] * len(frame)), dtype=object)
    return frame


_NOT_AN_OBJECT = {}


def _decode(line):
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:  # also raised for invalid UTF-8
        return None
    return record if type(record) is dict else None


def _read_json_lines(data, fields):
    # One malformed line must not take its neighbours with it, so lines are decoded one
    # by one (orjson, in C); everything after decoding is columnar.
    lines = data.split(b"\n")
    rows = [number for number, line in enumerate(lines, start=1) if line.strip()]
    lines = [lines[number - 1] for number in rows]
    records = [_decode(line) for line in lines]
    malformed = [record is None for record in records]
    records = [_NOT_AN_OBJECT if record is None else record for record in records]
    columns = {name: [record.get(name) for record in records] for name in fields}
    # Records share a handful of key layouts; collecting those (map(tuple) runs in C) is cheap.
    extra = set().union(*set(map(tuple, records))) - set(fields)
    return RawRows(_frame(rows, lines, malformed, columns, fields), extra)


def _read_csv(data, fields, path):
    if not data.strip():
        return RawRows(_frame([], [], [], {}, fields))
    header = next(csv.reader(io.StringIO(data.split(b"\n", 1)[0].decode("utf-8", "replace"))))
    invalid = []

    def set_aside(row):
        invalid.append(row)
        return "skip"

    try:
        table = pacsv.read_csv(
            io.BytesIO(data),
            # Single-threaded so that pyarrow numbers the invalid rows it hands us.
            read_options=pacsv.ReadOptions(use_threads=False),
            parse_options=pacsv.ParseOptions(invalid_row_handler=set_aside),
            convert_options=pacsv.ConvertOptions(
                column_types={name: pa.string() for name in header}, strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid as error:
        raise UserError(f"{path}: not readable as CSV with a header row ({error})") from None
    # pyarrow numbers rows from 1 at the header; ours count data rows from 1.
    bad_rows = sorted(row.number - 1 for row in invalid)
    good_rows = sorted(set(range(1, table.num_rows + len(invalid) + 1)) - set(bad_rows))
    columns = {name: table.column(name).to_pylist() for name in fields if name in table.column_names}
    good = _frame(good_rows, [None] * table.num_rows, [False] * table.num_rows, columns, fields)
    bad = _frame(bad_rows, [row.text for row in sorted(invalid, key=lambda row: row.number)],
                 [True] * len(invalid), {}, fields)
    frame = pd.concat([good, bad], ignore_index=True).sort_values("row", kind="stable", ignore_index=True)
    return RawRows(frame, set(table.column_names) - set(fields))


def _read_parquet(data, fields, path):
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as error:
        raise UserError(f"{path}: not a readable Parquet file ({error}); replace or remove the file") from None
    columns = {}
    for name in fields:
        if name not in table.column_names:
            continue
        column = table.column(name)
        # Dates and timestamps are judged like JSON/CSV text, by the same parser.
        if pa.types.is_temporal(column.type):
            column = column.cast(pa.string())
        columns[name] = column.to_pylist()
    n = table.num_rows
    return RawRows(_frame(range(1, n + 1), [None] * n, [False] * n, columns, fields),
                   set(table.column_names) - set(fields))
