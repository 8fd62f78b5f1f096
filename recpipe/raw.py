"""Reading raw sources (docs/data.md, Raw input) into rows, one file, or one byte range of a file, at a time.

Two ways, one result:

- `read_rows`, the reference: every format turned into the same shape, a `RawRows` frame of
  plain Python values (object columns), so that the validation rules exist once, in
  cleaning.py, whatever the file format was. A JSON line is decoded on its own, so a line
  that does not decode is marked `malformed` here and loses only itself.
- `read_block`, the fast path merge_and_clean uses: Arrow decodes whole blocks into typed
  columns, and only the rows it cannot read, or that cleaning's typed rules do not plainly
  take, are turned into RawRows frames the reference way (`Block`); `read_files` reads several
  small files of one source into the same blocks, each row keeping its file and row number.
"""

import codecs
import contextlib
import csv
import io
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from isal import igzip, isal_zlib  # ISA-L's gzip: the same streams, gunzipped about 3x as fast as zlib
import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from recpipe import storage
from recpipe.cli import UserError

# Each source's fields, in the order of docs/data.md (Raw input); validation reports the first failing field.
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
    name = storage.name(path).lower()
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
    if storage.is_url(raw_dir):
        source_dir, files = _list_objects(raw_dir, source)
    else:
        source_dir, files = _list_folder(raw_dir, source)
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


def _not_a_folder(source_dir, what="a file"):
    return UserError(f"raw source {source_dir} is {what}, not a folder: a source is a folder of raw files; move the "
                     f"file into a folder of that name, as {source_dir}/<name>.jsonl (or .csv, .parquet, optionally .gz)")


def _list_folder(raw_dir, source):
    source_dir = Path(raw_dir) / source
    if not source_dir.is_dir():
        if Path(raw_dir).exists() and not Path(raw_dir).is_dir():
            raise UserError(f"--raw {raw_dir} is a file, not a folder: point --raw at the folder that holds "
                            f"{', '.join(name + '/' for name in SOURCES)}")
        if source_dir.exists():
            raise _not_a_folder(source_dir, "a file" if source_dir.is_file() else "a named pipe, socket or device")
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
    return source_dir, files


def _list_objects(raw_url, source):
    """(the source's URL, its objects) in object storage: a "folder" there is a prefix, and one below the
    source is refused as a sub-folder is."""
    source_dir = storage.path(raw_url) / source
    try:
        if not source_dir.is_dir():
            storage.require_bucket(raw_url, "--raw")
            if source_dir.is_file():
                raise _not_a_folder(source_dir, "an object")
            raise UserError(f"raw source {source_dir}/ is missing: every run needs {', '.join(SOURCES)} under --raw "
                            f"{raw_url}")
        files = []
        for entry in sorted(source_dir.fs.ls(source_dir.path, detail=True), key=lambda entry: entry["name"]):
            path = source_dir / storage.name(entry["name"])
            if storage.name(entry["name"]).startswith((".", "_")) or entry["name"].rstrip("/") == source_dir.path:
                continue  # the prefix's own marker object, or a name to skip
            if entry["type"] == "directory":
                raise UserError(f"{path}/: a folder inside {source_dir}/; only the objects directly in a source "
                                "folder are read: move them up, or prefix the folder's name with _ to keep it unread")
            files.append(path)
    except UserError:
        raise
    except Exception as error:  # the store's library: no credentials, an unreachable endpoint, access denied
        raise storage.failure(error, source_dir) from None
    return source_dir, files


def list_raw_files(raw_dir):
    """{source: its data files, sorted} for every source under `raw_dir`; a UserError names an unusable one."""
    return {source: list_source_files(raw_dir, source) for source in SOURCES}


@dataclass
class RawRows:
    """One raw file's rows: `frame` has `row` (1-based), `raw`, `malformed` and one object column per field;
    `text_bytes`, the size of the file's text (read_rows)."""

    frame: pd.DataFrame
    extra_fields: set = field(default_factory=set)
    text_bytes: int = 0


def read_rows(path, source):
    """Read one raw file of `source` into RawRows; a file that cannot be read at all is a UserError."""
    fields = FIELDS[source]
    data = _read_whole(path)
    fmt = file_format(path)
    if fmt == ".jsonl":
        rows = _read_json_lines(data, fields)
    elif fmt == ".csv":
        rows = _read_csv(data, fields, path)
    else:
        rows = _read_parquet(data, fields, path)
    rows.text_bytes = len(data)
    return rows


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
    lines = data.split(b"\n")
    rows = [number for number, line in enumerate(lines, start=1) if line.strip()]
    return _json_rows(rows, [lines[number - 1] for number in rows], fields)


def _json_rows(rows, lines, fields):
    """RawRows of non-blank JSON lines and their row numbers, each line decoded on its own (orjson, in C):
    one malformed line must not take its neighbours with it. Everything after decoding is columnar."""
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
    decoded = _decode_csv(data, fields, path)
    good = _csv_frame(decoded, np.ones(len(decoded.rows), dtype=bool), fields)
    frame = pd.concat([good, decoded.invalid], ignore_index=True).sort_values("row", kind="stable", ignore_index=True)
    return RawRows(frame, decoded.extra_fields)


@dataclass
class DecodedCsv:
    """A CSV file read by Arrow: `table` (every column as text) with the data `rows` it came from and which
    of them held invalid UTF-8 (`malformed`); `invalid`, RawRows frame of the lines that are not rows."""

    table: pa.Table
    rows: np.ndarray
    malformed: np.ndarray
    invalid: pd.DataFrame
    extra_fields: set


def _csv_frame(decoded, mask, fields):
    """RawRows frame of the decoded rows where `mask`: CSV has no raw line to keep, only text fields."""
    table = decoded.table.filter(pa.array(mask)) if not mask.all() else decoded.table
    columns = {name: table.column(name).to_pylist() for name in fields if name in table.column_names}
    return _frame(decoded.rows[mask], [None] * table.num_rows, decoded.malformed[mask], columns, fields)


def _decode_csv(data, fields, path, rows=None, rest_first=1):
    """DecodedCsv of `data`, a header line and its rows. `rows`, where given, numbers the first len(rows)
    records (read_blocks leaves out the blank lines it numbered); the records after them are numbered on
    from `rest_first`, as they come, a line of spaces taking a number and an empty line none."""
    no_rows = np.zeros(0, dtype=np.int64)
    first = _NON_BLANK.search(data)
    if first is None:
        return DecodedCsv(pa.table({}), no_rows, no_rows.astype(bool), _frame([], [], [], {}, fields), set())
    start = max(data.rfind(b"\n", 0, first.start()), data.rfind(b"\r", 0, first.start())) + 1
    if start:  # blank lines before the header
        data = data[start:]
    end = _LINE_END.search(data)
    header = _csv_header(data[:end.start()] if end else data, path)
    if end is None or not _NON_BLANK.search(data, end.end()):  # the header alone (pyarrow refuses one with no line end)
        return DecodedCsv(pa.table({}), no_rows, no_rows.astype(bool), _frame([], [], [], {}, fields),
                          set(header) - set(fields))
    marker = None
    if not (data.isascii() or _is_utf8(data)):
        marker, data = _mark_invalid_utf8(data)
    invalid, blank = [], []

    def set_aside(row):
        if row.text.strip(BLANK):
            invalid.append(row)
        else:  # a line of spaces is blank, as in JSON Lines; only its number is kept
            blank.append(row.number)
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
    bad_rows = np.array(sorted(row.number - 1 for row in invalid), dtype=np.int64)
    good_rows = np.arange(1, table.num_rows + len(invalid) + len(blank) + 1)
    good_rows = good_rows[~np.isin(good_rows, np.concatenate([bad_rows, np.array(blank, dtype=np.int64) - 1]))]
    if rows is not None or rest_first != 1:
        bad_rows, good_rows = _renumber(bad_rows, rows, rest_first), _renumber(good_rows, rows, rest_first)
    malformed = np.zeros(table.num_rows, dtype=bool)
    if marker is not None:  # a row with invalid UTF-8 anywhere is malformed, like a JSON line with it
        for column in table.columns:
            malformed |= pc.match_substring(column, marker).to_numpy(zero_copy_only=False)
        table = pa.table([pc.replace_substring(column, marker, "\ufffd") for column in table.columns],
                         names=table.column_names)
    bad_text = [row.text for row in sorted(invalid, key=lambda row: row.number)]
    if marker is not None:
        bad_text = [text.replace(marker, "\ufffd") for text in bad_text]
    bad = _frame(bad_rows, bad_text, [True] * len(invalid), {}, fields)
    return DecodedCsv(table, good_rows.astype(np.int64), malformed, bad, set(table.column_names) - set(fields))


def _renumber(ordinals, rows, rest_first):
    """The row numbers of pyarrow's 1-based record `ordinals`: `rows` for the first records, then on from
    `rest_first`."""
    rows = np.zeros(0, dtype=np.int64) if rows is None else rows
    inside = ordinals <= len(rows)
    return np.where(inside, rows[np.minimum(ordinals, len(rows)) - 1] if len(rows) else 0,
                    rest_first + ordinals - len(rows) - 1).astype(np.int64)


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
    table = _parquet_table(data, fields, path)
    return RawRows(_parquet_frame(table, np.arange(1, table.num_rows + 1), fields),
                   set(table.column_names) - set(fields))


def _parquet_table(data, fields, path):
    try:
        table = pq.ParquetFile(pa.BufferReader(data)).read()
    except (pa.ArrowInvalid, OSError) as error:
        raise UserError(f"{path}: not a readable Parquet file ({error}); replace or remove the file") from None
    repeated = sorted({name for name in table.column_names if name in fields and table.column_names.count(name) > 1})
    if repeated:
        raise UserError(f"{path}: the schema names {', '.join(map(repr, repeated))} more than once, so its rows "
                        "are ambiguous; rewrite the file with one column of each name")
    return table


def _parquet_frame(table, rows, fields):
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
    return _frame(rows, [None] * n, malformed, columns, fields)


# ---------------------------------------------------------------------------------------------
# The fast path: whole blocks decoded by Arrow (C++) into typed columns.
#
# read_rows above is the reference: every row as plain Python values, judged by cleaning.validate.
# read_block gives the same rows split in two: `table`, those Arrow decoded into the types a valid
# row has (TYPES), which cleaning can judge column by column without a Python object per value;
# and `rest`, every other row exactly as read_rows gives it. A row whose typed values turn out not
# to be plainly valid is handed back through `Block.as_rows` and judged the reference way too.

def _typed(name):
    if name == "impressions":
        return pa.list_(pa.struct([("item_id", pa.int64()), ("is_order", pa.bool_())]))
    return pa.int64() if name in ("customer_id", "item_id", "config_id", "simple_id") else pa.string()


TYPES = {source: pa.schema([(name, _typed(name)) for name in fields]) for source, fields in FIELDS.items()}

# A JSON line goes to Arrow only if it looks like one object whose fields have the types above.
# The screen only saves work: a line that passes it and still does not decode, or decodes into
# more than one row, is found by halving its block and read line by line. What it must catch is
# what Arrow accepts and orjson does not: NaN and Infinity, and nesting deeper than orjson's limit.
_WS = r"[ \t\r]*"
_NOT_FOR_ARROW = "|".join([
    rf"^{_WS}[^ \t\r{{]", rf"^{_WS}\{{{_WS}[^ \t\r\"}}]", rf"[^ \t\r\n}}]{_WS}\n?$",  # not one object
    "NaN|Infinity",
    # a value of another type than TYPES says (null is any type's)
    rf'"(customer_id|item_id|config_id|simple_id)"{_WS}:{_WS}([^-0-9n \t\r]|-?[0-9]+[^0-9 \t\r,}}])',
    rf'"(dt|ranking_id|user_agent|click_time|occur_at|order_date)"{_WS}:{_WS}[^"n \t\r]',
    rf'"impressions"{_WS}:{_WS}[^\[n \t\r]', rf'"is_order"{_WS}:{_WS}[^tfn \t\r]',
])
_MAX_BRACKETS = 500  # orjson decodes at most 1024 levels; a line with fewer brackets cannot be deeper
_DECODE_BYTES = 4 << 20  # Arrow decodes this much at a time: a block that fails is halved, and no more is lost
# A task holds at most about this much of a raw file's text at once, and this many of its rows: the
# bound on its memory, whatever the lines (see read_blocks). 32 MiB is the byte range a large
# uncompressed file is cut into (merge.SPLIT_BYTES), so no range is cut again by bytes; 2^21 rows
# is more than 32 MiB holds of any valid row (the shortest, "2024-03-01,12,34", is 17 bytes), so
# only a file of tiny lines (each one malformed, at about 500 bytes of memory) is cut by rows.
BLOCK_BYTES = 32 << 20
BLOCK_ROWS = 1 << 21
_CHUNK_BYTES = 1 << 20  # read, gunzipped and rid of blank lines this much at a time


@dataclass
class Block:
    """The rows of a raw file, or of a byte range of one, as the fast path reads them.

    `table` holds the rows Arrow decoded, with columns typed as TYPES says (CSV: all text), and
    `rows` their row numbers; `rest` is a RawRows frame of all other rows, as read_rows gives them;
    `text_bytes`, the size of the text they were read from (Parquet: the file's).
    """

    table: pa.Table
    rows: np.ndarray
    rest: pd.DataFrame
    extra_fields: set
    as_rows: object  # mask over `table` -> RawRows frame of those rows, as read_rows gives them
    text_bytes: int = 0

    @property
    def rows_in(self):
        return self.table.num_rows + len(self.rest)


def read_block(path, source, start=0, end=None, first_row=1, header=None):
    """Read a raw file, or the lines that start in its bytes [start, end), into one Block.

    `first_row` is the row number of the first of those lines (see `count_rows`); a CSV range
    after the first gets the file's `header` line. A file that cannot be read at all is a UserError.
    """
    (block, _), = read_blocks(path, source, start, end, first_row, header, block_bytes=None)
    return block


def read_blocks(path, source, start=0, end=None, first_row=1, header=None, block_bytes=BLOCK_BYTES,
                block_rows=BLOCK_ROWS):
    """Yield (Block, whether it is the last) for a raw file, or for the lines that start in its bytes
    [start, end) (as read_block), one Block of at most about `block_bytes` of text and `block_rows` rows
    at a time (None: all in one), so that what a task holds is bounded by the block, not by the file.

    The text is read, and gunzipped, a chunk at a time, and the blank lines of each chunk are counted and
    dropped at once: they are no rows, and a file of nothing else (a gzip bomb of line ends) costs no more
    memory than its first chunk. A line is never cut: one longer than a block is a block of its own. A CSV
    file is cut only before its first quote or carriage return (a quoted value may hold a line end): from
    there on it is one block.
    """
    fmt = file_format(path)
    if fmt == ".parquet":
        yield _parquet_block(_read_whole(path), source, path), True
        return
    chunks = _file_chunks(path) if end is None else _chunks_of(_read_lines(path, start, end))
    lines = (_JsonLines if fmt == ".jsonl" else _CsvLines)(first_row, header)
    for text, last in _cut_blocks(chunks, lines, block_bytes, block_rows):
        yield _text_block(text, fmt, source, path), last


def _text_block(text, fmt, source, path):
    """The Block of a Text of JSON Lines or CSV (`path` names the file in an error)."""
    if fmt == ".jsonl":
        block = _json_block(text.data, source, text.rows)
        block.text_bytes = len(text.data)
        return block
    fields = FIELDS[source]
    decoded = _decode_csv(text.data, fields, path, text.rows, text.rest_first)
    fast = ~decoded.malformed
    table = pa.table({name: decoded.table.column(name) if name in decoded.table.column_names
                      else pa.nulls(decoded.table.num_rows, pa.string()) for name in fields})
    return Block(table.filter(pa.array(fast)), decoded.rows[fast],
                 pd.concat([decoded.invalid, _csv_frame(decoded, ~fast, fields)], ignore_index=True)
                 .sort_values("row", kind="stable", ignore_index=True),
                 decoded.extra_fields, lambda mask, decoded=decoded, fast=fast:
                 _csv_frame(_subset(decoded, fast), mask, fields), len(text.data))


# ---------------------------------------------------------------------------------------------
# Several small files read as one: a landing zone of a file per source and hour must cost what
# its bytes cost, not the fixed cost of decoding and cleaning a block per file.
#
# The rows of consecutive files of one source are numbered with a row key, the file's place among
# them times 2^40 plus the row's number in the file: so the keys sort the rows in raw order, and
# `split_row_keys` gives each row's file and its number in that file back.

ROW_KEY_BITS = 40


def split_row_keys(keys):
    """(each row's place among the files read together, its row number in its file) of row keys."""
    keys = np.asarray(keys, dtype=np.int64)
    return keys >> ROW_KEY_BITS, keys & ((1 << ROW_KEY_BITS) - 1)


def read_files(paths, source, block_bytes=BLOCK_BYTES, block_rows=BLOCK_ROWS):
    """Yield (Block, whether it is the last) for consecutive raw files of one source, their rows numbered by
    row key (see split_row_keys; a file alone keeps its row numbers), as if they were one file read by
    read_blocks: one Block of at most about `block_bytes` of text and `block_rows` rows at a time.

    The text of consecutive JSON Lines files is decoded as one text, and that of consecutive CSV files
    with the same header line under it once, up to a file's first quote or carriage return (from there
    on its lines, as they came, end the text: a quoted value may hold a line end). The Blocks of texts
    that a file ends (a Parquet file, a CSV file of another header, one with a quote) are joined into one
    Block where their columns have the same types, within the same bounds.
    """
    yield from _Files(source, block_bytes, block_rows).read(paths)


class _Files:
    """read_files' state: the text being gathered (`run`) and the Blocks waiting to be joined."""

    def __init__(self, source, block_bytes, block_rows):
        self.source, self.block_bytes, self.block_rows = source, block_bytes, block_rows
        self.run, self.waiting = None, []

    def read(self, paths):
        for position, path in enumerate(paths):
            first_key = position << ROW_KEY_BITS
            fmt = file_format(path)
            last_file = position == len(paths) - 1
            if fmt == ".parquet":
                yield from self._end_run()
                yield from self._add(_parquet_block(_read_whole(path), self.source, path, first_key + 1),
                                     more=not last_file)
                continue
            lines = (_JsonLines if fmt == ".jsonl" else _CsvLines)(1)
            joined = False  # whether this file's lines go into the run yet (a CSV file's header is found first)
            for kept, rows, more in _line_pieces(_file_chunks(path), lines):
                if not joined and (fmt == ".jsonl" or lines.header is not None):
                    yield from self._join(fmt, lines.header, path)
                    joined = True
                if joined:
                    self.run.add(kept, rows + first_key)
                    if lines.tail is None and (more or not last_file) and self._full(self.run.size, self.run.count):
                        yield from self._end_run()
                        self.run = _Run(fmt, lines.header, path)
            if not joined and fmt == ".csv" and lines.header is not None:  # a header alone, found at the end
                yield from self._join(fmt, lines.header, path)
                joined = True
            if joined and lines.tail is not None:  # the rest of the file as it came: nothing can follow it
                self.run.tail, self.run.rest_first = lines.tail, first_key + lines.rest_first
                yield from self._end_run(more=not last_file)
        yield from self._end_run(more=False)
        if self.waiting:
            yield _joined(self.waiting), True

    def _full(self, size, count):
        """Whether this much text, with the Blocks waiting, makes a block."""
        waiting_size = sum(block.text_bytes for block in self.waiting)
        waiting_count = sum(block.rows_in for block in self.waiting)
        return self.block_bytes is not None and (size + waiting_size >= self.block_bytes
                                                 or count + waiting_count >= self.block_rows)

    def _join(self, fmt, header, path):
        """Put a file's lines after the run's, or end the run and start one with this file."""
        if fmt == ".csv":
            _csv_header(header, path)  # a header that is not CSV names its own file
        if self.run is not None and self.run.takes(fmt, header):
            self.run.files.append(path)
            return
        yield from self._end_run()
        self.run = _Run(fmt, header, path)

    def _end_run(self, more=True):
        if self.run is not None:
            block = self.run.block(self.source)
            self.run = None
            yield from self._add(block, more)

    def _add(self, block, more):
        """Wait with `block` for more to join it; yield what waited once it makes a block and `more` input
        follows (the last Block is the one the end yields)."""
        if self.waiting and not block.table.schema.equals(self.waiting[0].table.schema):
            yield _joined(self.waiting), False
            self.waiting = []
        self.waiting.append(block)
        if more and self._full(0, 0):
            yield _joined(self.waiting), False
            self.waiting = []


def _joined(blocks):
    """One Block of the rows of `blocks`, in order (their tables' columns have the same types)."""
    if len(blocks) == 1:
        return blocks[0]
    sizes = np.cumsum([0] + [block.table.num_rows for block in blocks]).tolist()

    def as_rows(mask):
        return pd.concat([block.as_rows(mask[start:stop]) for block, start, stop in zip(blocks, sizes, sizes[1:])],
                         ignore_index=True)

    return Block(pa.concat_tables([block.table for block in blocks]), np.concatenate([b.rows for b in blocks]),
                 pd.concat([block.rest for block in blocks], ignore_index=True),
                 set().union(*(block.extra_fields for block in blocks)), as_rows,
                 sum(block.text_bytes for block in blocks))


class _Run:
    """The text of consecutive files of one format (CSV: under one header) to be decoded as one."""

    def __init__(self, fmt, header, path):
        self.fmt, self.header = fmt, header if fmt == ".csv" else None
        self.files = [path]  # the first names the text in an error
        self.pieces, self.rows, self.size, self.count = [], [], 0, 0
        self.tail, self.rest_first = None, 1

    def takes(self, fmt, header):
        return self.fmt == fmt and self.header == (header if fmt == ".csv" else None) and self.tail is None

    def add(self, kept, rows):
        if len(kept):
            self.pieces.append(kept)
            self.rows.append(rows)
            self.size, self.count = self.size + len(kept), self.count + len(rows)

    def text(self):
        rows = np.concatenate(self.rows) if self.rows else _NO_ROWS
        if self.fmt == ".jsonl":
            return Text(b"".join(self.pieces), rows)
        return Text(b"".join([self.header, b"\n", *self.pieces, *(self.tail or [])]), rows, self.rest_first)

    def block(self, source):
        try:
            return _text_block(self.text(), self.fmt, source, self.files[0])
        except UserError:
            if len(self.files) < 2:
                raise
        for path in self.files:  # refused together: read each alone, so that the message names its file
            for _ in read_blocks(path, source, block_bytes=None):
                pass
        raise AssertionError(f"{self.files[0]} and the files after it were refused together, but not alone")


def _subset(decoded, mask):
    return DecodedCsv(decoded.table.filter(pa.array(mask)), decoded.rows[mask], decoded.malformed[mask],
                      decoded.invalid, decoded.extra_fields)


@contextlib.contextmanager
def _reading(path):
    """A raw file that cannot be read or gunzipped, or an object storage error, as one line naming it."""
    try:
        yield
    except (OSError, EOFError, isal_zlib.error) as error:
        raise UserError(f"{path}: cannot be read or decompressed ({error}); replace or remove the file") from None
    except Exception as error:  # object storage's own errors
        if not storage.is_url(path):
            raise
        raise storage.failure(error, path) from None


def _read_whole(path):
    """The bytes of a raw file, gunzipped, without a leading byte order mark (it names the encoding; it is
    not part of the first row)."""
    with _reading(path):
        data = storage.path(path).read_bytes()
        if storage.name(path).lower().endswith(".gz"):
            data = igzip.decompress(data)
    return data.removeprefix(codecs.BOM_UTF8)


def _read_lines(path, start, end):
    """The whole lines that start in bytes [start, end) of an uncompressed file (a line starts at 0 or after \\n)."""
    try:
        with storage.path(path).open("rb") as file:
            if start:
                file.seek(start - 1)
                before = file.read(1)
                data = file.read(end - start)
                if before != b"\n":  # a line that started before `start` is the previous range's
                    cut = data.find(b"\n")
                    data = b"" if cut < 0 else data[cut + 1:]
                    if cut < 0:
                        return data
            else:
                data = file.read(end)
            if data and not data.endswith(b"\n"):  # the last line runs on past `end`
                rest = bytearray()
                while chunk := file.read(1 << 16):
                    cut = chunk.find(b"\n")
                    if cut >= 0:
                        rest += chunk[:cut + 1]
                        break
                    rest += chunk
                data += bytes(rest)
    except OSError as error:
        raise UserError(f"{path}: cannot be read ({error}); replace or remove the file") from None
    if start == 0 and data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    return data


def _file_chunks(path):
    """The bytes of a whole raw file, gunzipped, _CHUNK_BYTES at a time, without a leading byte order mark."""
    with _reading(path), storage.path(path).open("rb") as file:
        stream = igzip.GzipFile(fileobj=file, mode="rb") if storage.name(path).lower().endswith(".gz") else file
        chunk = stream.read(max(_CHUNK_BYTES, len(codecs.BOM_UTF8))).removeprefix(codecs.BOM_UTF8)
        while chunk or (chunk := stream.read(_CHUNK_BYTES)):
            yield chunk
            chunk = stream.read(_CHUNK_BYTES)


def _chunks_of(data):
    for start in range(0, len(data), _CHUNK_BYTES):
        yield data[start:start + _CHUNK_BYTES]


@dataclass
class Text:
    """A block's text as _cut_blocks gives it: `data`, its non-blank lines (CSV: the header line first),
    and `rows`, their row numbers; a CSV's `data` may go on with lines as they came, rows numbered on
    from `rest_first` (see _decode_csv)."""

    data: bytes
    rows: np.ndarray
    rest_first: int = 1


_NOT_BLANK_BYTE = np.ones(256, dtype=bool)
_NOT_BLANK_BYTE[np.frombuffer(BLANK.encode(), np.uint8)] = False
_NO_ROWS = np.zeros(0, dtype=np.int64)


def _lines_of(text):
    """(starts, stops, not blank) of the lines of `text`, each ending in \\n."""
    buffer = np.frombuffer(text, np.uint8)
    stops = np.flatnonzero(buffer == 10) + 1
    starts = np.concatenate([[0], stops[:-1]])
    keep = _NOT_BLANK_BYTE[buffer[starts]]  # a line is blank only if it starts with a blank byte
    if not keep.all():
        keep = np.logical_or.reduceat(_NOT_BLANK_BYTE[buffer], starts)
    return starts, stops, keep


def _kept(text, starts, stops, keep):
    """The lines of `text` where `keep`, one after another."""
    if keep.all():
        return text
    return np.frombuffer(text, np.uint8)[np.repeat(keep, stops - starts)].tobytes()


class _JsonLines:
    """Turns whole lines of JSON Lines into (their non-blank lines, those lines' row numbers): every line,
    blank or not, is numbered."""

    tail = None  # JSON Lines are cut anywhere: no line is kept for later
    header = None

    def __init__(self, first_row, header=None):
        self.before = first_row - 1  # the lines before the next one

    def lines(self, text):
        if not text.strip():  # all blank: a bomb of line ends is counted, in C, and dropped
            self.before += text.count(b"\n") + (not text.endswith(b"\n"))
            return b"", _NO_ROWS
        if not text.endswith(b"\n"):  # the file's last line
            text += b"\n"
        starts, stops, keep = _lines_of(text)
        rows = np.flatnonzero(keep) + self.before + 1
        self.before += len(starts)
        return _kept(text, starts, stops, keep), rows

    def text(self, pieces, rows):
        return Text(b"".join(pieces), np.concatenate(rows) if rows else _NO_ROWS)


class _CsvLines:
    """The same for CSV, numbered as pyarrow numbers them: a line of spaces takes a row number, an empty line
    none. The header line is found first, after any blank lines, and put before each block's lines. From
    the first quote or carriage return on, the lines are kept as they came (`tail`), for pyarrow to split."""

    def __init__(self, first_row, header=None):
        self.before = first_row - 1
        self.header = header
        self.head = b""  # what was read while looking for the header: blank lines, then its start
        self.tail = None
        self.rest_first = 1

    def lines(self, text):
        if self.header is None:
            text = self._after_header(text)
        if self.tail is not None:
            self.tail.append(text)
            return b"", _NO_ROWS
        special = min([at for at in (text.find(b'"'), text.find(b"\r")) if at >= 0], default=-1)
        if special >= 0:  # that line and all after it are kept as they came
            cut = text.rfind(b"\n", 0, special) + 1
            text, self.tail = text[:cut], [text[cut:]]
        if not text.strip(b"\n"):  # only empty lines: no rows, no numbers
            kept, rows = b"", _NO_ROWS
        else:
            if not text.endswith(b"\n"):  # the file's last line
                text += b"\n"
            starts, stops, keep = _lines_of(text)
            numbered = stops - starts > 1
            rows = (np.cumsum(numbered) + self.before)[keep]
            self.before += int(numbered.sum())
            kept = _kept(text, starts, stops, keep)
        self.rest_first = self.before + 1
        return kept, rows

    def _after_header(self, text):
        """The text after the header line, once that is found (b"" until then)."""
        head = self.head + text
        first = _NON_BLANK.search(head)
        if first is None:  # blank lines: only the last one's start can be the header's
            self.head = head[max(head.rfind(b"\n"), head.rfind(b"\r")) + 1:]
            return b""
        start = max(head.rfind(b"\n", 0, first.start()), head.rfind(b"\r", 0, first.start())) + 1
        end = _LINE_END.search(head, first.start())
        if end is None or end.end() == len(head) and end.group() == b"\r":  # no line end yet, or \r and then \n?
            self.head = head[start:]
            return b""
        self.header, self.head = head[start:end.start()], b""
        return head[end.end():]

    def finish(self):
        """Once the text ended: a header line without a line end is the header still."""
        if self.header is None and _NON_BLANK.search(self.head):
            self.header = _LINE_END.split(self.head, 1)[0]

    def text(self, pieces, rows):
        if self.header is None:
            return Text(b"", _NO_ROWS)
        return Text(b"".join([self.header, b"\n", *pieces, *(self.tail or [])]),
                    np.concatenate(rows) if rows else _NO_ROWS, self.rest_first)


def _line_pieces(chunks, lines):
    """Yield (kept lines, their rows, whether more of the text follows) for the whole lines of each of
    `chunks` of a file's text, turned by `lines` (_JsonLines or _CsvLines)."""
    carry = []  # the start of a line whose end is in a later chunk
    chunks = iter(chunks)
    chunk = next(chunks, None)
    while chunk is not None:
        following = next(chunks, None)  # read ahead: whether a full block is the last
        cut = chunk.rfind(b"\n") + 1
        if following is None:
            cut = len(chunk)  # the last line may have no line end
        if not cut:
            carry.append(chunk)
        else:
            text = b"".join([*carry, chunk[:cut]]) if carry else chunk[:cut]
            carry = [chunk[cut:]] if cut < len(chunk) else []
            kept, kept_rows = lines.lines(text)
            yield kept, kept_rows, following is not None
        chunk = following
    if isinstance(lines, _CsvLines):
        lines.finish()


def _cut_blocks(chunks, lines, block_bytes, block_rows):
    """Yield (Text, whether it is the last) for `chunks` of a file's text, cut at line ends into blocks of
    about `block_bytes` and `block_rows` (None: one block)."""
    pieces, rows, size, count = [], [], 0, 0
    for kept, kept_rows, more in _line_pieces(chunks, lines):
        if len(kept):
            pieces.append(kept)
            rows.append(kept_rows)
            size, count = size + len(kept), count + len(kept_rows)
        if (block_bytes is not None and lines.tail is None and (size >= block_bytes or count >= block_rows)
                and more):
            yield lines.text(pieces, rows), False
            pieces, rows, size, count = [], [], 0, 0
    yield lines.text(pieces, rows), True


def _json_block(data, source, rows):
    """A Block of `data`, non-blank JSON lines each ending in \\n, numbered `rows`."""
    fields = FIELDS[source]
    buffer = np.frombuffer(data, np.uint8)
    stops = np.flatnonzero(buffer == 10) + 1
    starts = np.concatenate([[0], stops[:-1]]).astype(np.int64) if len(stops) else stops
    candidate = np.ones(len(starts), dtype=bool)
    if not data.isascii() and not _is_utf8(data):
        candidate = np.array([_is_utf8(data[start:stop]) for start, stop in zip(starts.tolist(), stops.tolist())],
                             dtype=bool)
    if (stops - starts > _MAX_BRACKETS).any():  # only a long line can nest that deep
        brackets = np.flatnonzero((buffer == ord("[")) | (buffer == ord("{")))
        candidate &= np.searchsorted(brackets, stops) - np.searchsorted(brackets, starts) <= _MAX_BRACKETS
    chosen = np.flatnonzero(candidate)
    text = _strings(*_gather(data, starts[chosen], stops[chosen]))
    candidate[chosen[true_where(pc.match_substring_regex(text, _NOT_FOR_ARROW))]] = False
    chosen = np.flatnonzero(candidate)
    tables, decoded = _decode_json(data, starts[chosen], stops[chosen], TYPES[source])
    in_table = np.zeros(len(starts), dtype=bool)
    in_table[chosen[decoded]] = True
    extra = set().union(*(table.column_names for table in tables)) - set(fields)
    table = (pa.concat_tables([t.select(list(fields)) for t in tables]) if tables
             else TYPES[source].empty_table())

    def line_rows(picked):
        return _json_rows(rows[picked].tolist(), [data[starts[i]:stops[i]].rstrip(b"\n") for i in picked.tolist()],
                          fields)

    rest = line_rows(np.flatnonzero(~in_table))
    table_lines = np.flatnonzero(in_table)
    return Block(table, rows[table_lines], rest.frame, extra | rest.extra_fields,
                 lambda mask: line_rows(table_lines[mask]).frame)


def true_where(array):
    """A NumPy mask of an Arrow boolean array, null read as False."""
    return pc.fill_null(array, False).to_numpy(zero_copy_only=False)


def _gather(data, starts, stops):
    """(bytes, offsets): the lines [starts, stops) of `data`, one after another, and where each begins."""
    offsets = np.concatenate([[0], np.cumsum(stops - starts)]).astype(np.int64)
    if not len(starts):
        return b"", offsets
    runs = np.flatnonzero(starts[1:] != stops[:-1]) + 1  # lines that do not follow on from the one before
    run_starts, run_stops = starts[np.concatenate([[0], runs])], stops[np.concatenate([runs - 1, [len(stops) - 1]])]
    if len(runs) == 0 and run_starts[0] == 0 and run_stops[0] == len(data):
        return data, offsets  # every line: a copy of a block's text costs as much as screening it
    view = memoryview(data)
    return b"".join(view[a:b] for a, b in zip(run_starts.tolist(), run_stops.tolist())), offsets


def _strings(data, offsets):
    return pa.LargeStringArray.from_buffers(len(offsets) - 1, pa.py_buffer(offsets), pa.py_buffer(data))


def _decode_json(data, starts, stops, schema):
    """(tables, indices): Arrow's reading of the lines [starts, stops), in pieces of about _DECODE_BYTES, and
    which lines it gave: all but those of a piece it refused that were still refused alone, after halving."""
    data, offsets = _gather(data, starts, stops)
    data = pa.py_buffer(data)  # its pieces are slices of it, not copies
    cuts = np.searchsorted(offsets, np.arange(_DECODE_BYTES, offsets[-1], _DECODE_BYTES))
    bounds = np.unique(np.concatenate([[0], cuts, [len(starts)]])).astype(np.int64)
    todo = list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))[::-1]
    tables, decoded = [], []
    while todo:
        first, last = todo.pop()
        table = _arrow_json(data[offsets[first]:offsets[last]], schema, last - first)
        if table is not None:
            tables.append(table)
            decoded.append(np.arange(first, last))
        elif last - first > 1:
            middle = (first + last) // 2
            todo += [(middle, last), (first, middle)]
    return tables, (np.concatenate(decoded) if decoded else np.zeros(0, dtype=np.int64))


def _arrow_json(data, schema, lines):
    try:
        table = pajson.read_json(pa.BufferReader(data), read_options=pajson.ReadOptions(
            use_threads=False, block_size=len(data) + 1), parse_options=pajson.ParseOptions(
            explicit_schema=schema, unexpected_field_behavior="infer"))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    if table.num_rows != lines:  # two objects on a line are not two rows
        return None
    if "impressions" in schema.names and table.schema.field("impressions").type != schema.field("impressions").type:
        table = table.set_column(table.schema.get_field_index("impressions"), "impressions",
                                 _entries_as_typed(table.column("impressions").combine_chunks()))
    return table


def _entries_as_typed(column):
    """The impressions list without the fields its entries carry beyond item_id and is_order."""
    entries = column.values
    typed = pa.StructArray.from_arrays([entries.field("item_id"), entries.field("is_order")],
                                       names=["item_id", "is_order"], mask=entries.is_null())
    return pa.ListArray.from_arrays(column.offsets, typed, mask=column.is_null())


def _parquet_block(data, source, path, first_row=1):
    """The Block of a Parquet file's bytes, its rows numbered from `first_row` (a row key, see read_files)."""
    fields = FIELDS[source]
    table = _parquet_table(data, fields, path)
    rows = np.arange(first_row, first_row + table.num_rows, dtype=np.int64)
    extra = set(table.column_names) - set(fields)
    present = [name for name in fields if name in table.column_names]
    if any(table.schema.field(name).type != _typed(name) for name in present):  # judged the reference way
        return Block(TYPES[source].empty_table(), rows[:0], _parquet_frame(table, rows, fields), extra,
                     lambda mask: _parquet_frame(table.slice(0, 0), rows[:0], fields), len(data))
    typed = pa.table({name: table.column(name) if name in present else pa.nulls(table.num_rows, _typed(name))
                      for name in fields})
    return Block(typed, rows, _parquet_frame(table.slice(0, 0), rows[:0], fields), extra,
                 lambda mask: _parquet_frame(table.filter(pa.array(mask)), rows[mask], fields), len(data))


# ---------------------------------------------------------------------------------------------
# Byte ranges: a large uncompressed JSON Lines or CSV file read by several tasks at once.
#
# A range [start, end) owns the lines that start in it (a line starts at 0 or after a \n), so
# every line is read once, by one task. The row numbers a range's rows get need the count of
# rows before it, which `count_rows` gives for each range, all at once, before they are read.

def can_split(path):
    """Whether `path` may be read in byte ranges: uncompressed JSON Lines or CSV."""
    return file_format(path) in (".jsonl", ".csv") and not storage.name(path).lower().endswith(".gz")


def byte_ranges(size, split_bytes):
    """The [start, end) ranges of about `split_bytes` that cover a file of `size` bytes."""
    bounds = list(range(0, size, split_bytes)) + [size]
    return list(zip(bounds[:-1], bounds[1:]))


def count_rows(path, start, end):
    """The lines of a file that start in [start, end), and how many are not empty (the CSV rows, the
    header aside): summed over the ranges before one, the row number its first line follows. Also
    whether the range holds a quote or a \r (a CSV with either is read whole: a quoted value may hold a
    line end), and, for the first range, the file's first line (a CSV's header)."""
    try:
        with storage.path(path).open("rb") as file:
            file.seek(max(start - 1, 0))
            # From the byte before `start` (is it a \n?) to one past `end` (is the line starting there empty?).
            data = file.read(end - start + 2 if start else end + 1)
    except OSError as error:
        raise UserError(f"{path}: cannot be read ({error}); replace or remove the file") from None
    buffer = np.frombuffer(data, np.uint8)
    first = start - 1 if start else 0  # the file position of data[0]
    line_starts = np.flatnonzero(buffer == 10) + 1 + first
    line_starts = line_starts[(line_starts >= start) & (line_starts < end)]
    if start == 0:
        line_starts = np.concatenate([[0], line_starts])
    at = line_starts - first
    inside = at < len(data)  # a \n at the file's very end starts no line
    non_empty = inside & (buffer[np.minimum(at, len(data) - 1)] != 10)
    first_line = None
    if start == 0:
        with storage.path(path).open("rb") as file:
            first_line = file.readline().removesuffix(b"\n").removeprefix(codecs.BOM_UTF8)
    span = data[start - first:end - first]
    return {"lines": int(inside.sum()), "rows": int(non_empty.sum()) - (start == 0), "quote": b'"' in span,
            "cr": b"\r" in span, "first_line": first_line}
