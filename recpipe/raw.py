"""Reading raw sources (SPEC section 2) into rows, one file at a time.

Every format is turned into the same shape, a `RawRows` frame of plain Python values
(object columns), so that the SPEC's validation rules exist once, in cleaning.py,
whatever the file format was. A line that does not even decode is marked `malformed`
here; everything else is judged there.
"""

import codecs
import csv
import gzip
import io
import os
import re
import stat
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
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
    """Every data file directly in one source folder, sorted; stops with a clear message if the source is unusable.

    Names starting with '.' or '_' are skipped (editor swap files, _SUCCESS markers,
    the generator's _generated.json, a `_backup/` folder), as Spark and Dask do. Anything
    else that is not a regular file stops the stage, naming it: a sub-folder (its files
    would be read twice when it holds copies), a symbolic link (it may point anywhere, and
    its target's lines would land in the quarantine), a named pipe or a device.
    """
    source_dir = Path(raw_dir) / source
    if not source_dir.is_dir():
        raise UserError(f"raw source {source_dir}/ is missing: every run needs {', '.join(SOURCES)} under --raw {raw_dir}")
    files = []
    for path in sorted(source_dir.iterdir()):
        if path.name.startswith((".", "_")):
            continue
        mode = path.lstat().st_mode
        if stat.S_ISLNK(mode):
            raise UserError(f"{path}: a symbolic link (to {os.readlink(path)}); raw files must be regular files in "
                            f"{source_dir}/: copy the file there, or point --raw at the folder that holds it")
        if stat.S_ISDIR(mode):
            raise UserError(f"{path}/: a folder inside {source_dir}/; only the files directly in a source folder "
                            "are read: move its files up, or move it out (or prefix its name with _ to keep it "
                            "there unread)")
        if not stat.S_ISREG(mode):
            raise UserError(f"{path}: not a regular file (a named pipe, socket or device); raw files must be "
                            "regular files: remove it from the source folder")
        files.append(path)
    if not files:
        raise UserError(f"raw source {source_dir}/ is empty: it needs at least one .jsonl, .csv or .parquet file (optionally .gz)")
    for path in files:
        try:
            str(path).encode("utf-8")
        except UnicodeEncodeError:  # Python keeps undecodable bytes of a name as surrogates; Parquet cannot
            shown = str(path).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            raise UserError(f"{shown}: the file name is not valid UTF-8; rename the file") from None
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
    if data.startswith(codecs.BOM_UTF8):  # a byte order mark names the encoding; it is not part of the first row
        data = data[len(codecs.BOM_UTF8):]
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


BLANK = " \t\n\r\x0b\x0c"  # what bytes.strip() removes: a line of only these is not a row
_NON_BLANK = re.compile(rb"[^ \t\n\r\x0b\x0c]")
_LINE_END = re.compile(rb"\r\n?|\n")


def _read_csv(data, fields, path):
    first = _NON_BLANK.search(data)
    if first is None:
        return RawRows(_frame([], [], [], {}, fields))
    start = max(data.rfind(b"\n", 0, first.start()), data.rfind(b"\r", 0, first.start())) + 1
    if start:  # blank lines before the header
        data = data[start:]
    end = _LINE_END.search(data)
    header = _csv_header(data[:end.start()] if end else data, path)
    if end is None or not _NON_BLANK.search(data, end.end()):  # the header alone (pyarrow refuses one with no line end)
        return RawRows(_frame([], [], [], {}, fields), set(header) - set(fields))
    marker = None
    if not (data.isascii() or _is_utf8(data)):
        marker, data = _mark_invalid_utf8(data)
    invalid, blank = [], []

    def set_aside(row):
        (invalid if row.text.strip(BLANK) else blank).append(row)  # a line of spaces is blank, as in JSON Lines
        return "skip"

    try:
        table = pacsv.read_csv(
            io.BytesIO(data),
            # Single-threaded so that pyarrow numbers the invalid rows it hands us; one block for the
            # whole file (it is in memory already) so that no field is too long for a block.
            read_options=pacsv.ReadOptions(use_threads=False, block_size=min(max(len(data) + 1, 1 << 20), 1 << 30)),
            parse_options=pacsv.ParseOptions(invalid_row_handler=set_aside),
            convert_options=pacsv.ConvertOptions(
                column_types={name: pa.string() for name in header}, strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid as error:
        raise UserError(f"{path}: not readable as CSV with a header row ({error})") from None
    # pyarrow numbers rows from 1 at the header, leaving out empty lines; ours count data rows from 1.
    bad_rows = sorted(row.number - 1 for row in invalid)
    good_rows = np.arange(1, table.num_rows + len(invalid) + len(blank) + 1)
    good_rows = good_rows[~np.isin(good_rows, np.array([row.number - 1 for row in invalid + blank], dtype=np.int64))]
    malformed = np.zeros(table.num_rows, dtype=bool)
    if marker is not None:  # a row with invalid UTF-8 anywhere is malformed, like a JSON line with it
        for column in table.columns:
            malformed |= pc.match_substring(column, marker).to_numpy(zero_copy_only=False)
        table = pa.table([pc.replace_substring(column, marker, "\ufffd") for column in table.columns],
                         names=table.column_names)
    columns = {name: table.column(name).to_pylist() for name in fields if name in table.column_names}
    good = _frame(good_rows, [None] * table.num_rows, malformed, columns, fields)
    bad_text = [row.text for row in sorted(invalid, key=lambda row: row.number)]
    if marker is not None:
        bad_text = [text.replace(marker, "\ufffd") for text in bad_text]
    bad = _frame(bad_rows, bad_text, [True] * len(invalid), {}, fields)
    frame = pd.concat([good, bad], ignore_index=True).sort_values("row", kind="stable", ignore_index=True)
    return RawRows(frame, set(table.column_names) - set(fields))


def _csv_header(line, path):
    """The column names of a CSV header line; a header we cannot read unambiguously stops the stage."""
    try:
        header = next(csv.reader([line.decode("utf-8")]), [])
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: the header row is not valid UTF-8 ({error}); save the file as UTF-8") from None
    except csv.Error as error:
        raise UserError(f"{path}: the header row is not valid CSV ({error}); fix the first line") from None
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise UserError(f"{path}: the header row names {', '.join(map(repr, repeated))} more than once, so its "
                        "rows are ambiguous; rename or remove the repeated column")
    return header


def _is_utf8(data):
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _mark_invalid_utf8(data):
    """(marker, data): every invalid byte replaced by a character the file does not hold, so pyarrow can
    parse the rest and the rows that held one can be found; the marker is U+FFFD where that is free."""
    text = data.decode("utf-8", "surrogateescape")
    marker = next(char for char in ("\ufffd", *map(chr, range(0xE000, 0xF900))) if char not in text)
    return marker, re.sub("[\udc80-\udcff]", marker, text).encode("utf-8")


def _read_parquet(data, fields, path):
    try:
        table = pq.ParquetFile(pa.BufferReader(data)).read()
    except (pa.ArrowInvalid, OSError) as error:
        raise UserError(f"{path}: not a readable Parquet file ({error}); replace or remove the file") from None
    repeated = sorted({name for name in table.column_names if name in fields and table.column_names.count(name) > 1})
    if repeated:
        raise UserError(f"{path}: the schema names {', '.join(map(repr, repeated))} more than once, so its rows "
                        "are ambiguous; rewrite the file with one column of each name")
    n = table.num_rows
    columns = {}
    malformed = np.zeros(n, dtype=bool)
    for name in fields:
        if name not in table.column_names:
            continue
        column = table.column(name)
        # Dates and timestamps are judged like JSON/CSV text, by the same parser.
        if pa.types.is_temporal(column.type):
            column = column.cast(pa.string())
        # Some writers store text as plain binary; it is text when it is UTF-8.
        if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
            try:
                column = column.cast(pa.string())
            except pa.ArrowInvalid:  # a value that is not UTF-8 makes its row malformed, as in JSON and CSV
                values = column.to_pylist()
                malformed |= np.array([value is not None and not _is_utf8(value) for value in values], dtype=bool)
                columns[name] = [value if value is None else value.decode("utf-8", "replace") for value in values]
                continue
        columns[name] = column.to_pylist()
    return RawRows(_frame(range(1, n + 1), [None] * n, malformed, columns, fields),
                   set(table.column_names) - set(fields))
