"""The whole job of our pipeline, raw files in, training rows out, written as DuckDB SQL (a benchmark competitor).

    .venv/bin/python bench/duckdb_pipeline.py RAW OUT [--threads 2] [--memory-limit 16GB] [--lookback-days 365]
        [--max-history 1000] [--test-days 1] [--val-days 1] [--train-days 14]

Reads RAW/{impressions,clicks,add_to_carts,previous_orders}/ (JSON Lines, CSV, Parquet, any of them
gzipped; names starting with '_' or '.' are skipped), applies the cleaning rules (docs/data.md,
Cleaning) and docs/decisions.md's decisions for merge_and_clean.py, splits the impression days (docs/data.md,
The split), builds every (customer, day)'s history (docs/data.md, The action stream and histories) and
writes one row per kept shown item of a train/val/test day:

    OUT/dt=YYYY-MM-DD/*.parquet
        customer_id BIGINT, ranking_id VARCHAR, item_id BIGINT, position BIGINT, is_order BOOLEAN,
        split VARCHAR, actions BIGINT[max_history], action_types TINYINT[max_history]

`actions` are raw item ids, most recent first, right-padded with 0, `action_types` parallel to them.
SQL does the work; Python only lists the files and assembles the queries. Stands alone: nothing
from recpipe is imported. OUT is built beside itself and renamed into place (replacing it).

How the raw rows are read (one reader per format, every field as its text, stripped, so that one
set of parsing macros judges every format alike; the impressions list stays JSON):
  - JSON Lines: read_json(newline_delimited, fields typed VARCHAR, ignore_errors): a JSON value
    comes out as its text (12 and "12" both as '12', 3.5 as '3.5', true as 'true'), and a line that
    is not a JSON object with every field NULL, so it fails the required-field check;
  - CSV: read_csv(header, all_varchar, union_by_name, ignore_errors): a row with too many or too few
    values is skipped; an empty value is NULL, i.e. missing;
  - Parquet: read_parquet(union_by_name), fields cast to VARCHAR, the impressions list to_json().
Raw order (for "the first of exact duplicate shown items is kept") is the file's place in the sorted
list of files, then the reader's WITH ORDINALITY (or Parquet's file_row_number).

Where DuckDB's JSON reader is more lenient than the pipeline's (orjson), which no generated data
exercises: a UTF-8 byte-order mark loses a file's first line here (the pipeline skips the mark); a
key repeated in one object takes its first value here (the last there); NaN and trailing commas are
accepted here (malformed there).
"""

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import duckdb

FIELDS = {  # required fields, and the optional ones, per source (docs/data.md, Raw input)
    "impressions": ("dt", "ranking_id", "customer_id", "user_agent", "impressions"),
    "clicks": ("dt", "customer_id", "item_id", "click_time"),
    "add_to_carts": ("dt", "customer_id", "config_id", "simple_id", "occur_at"),
    "previous_orders": ("order_date", "customer_id", "config_id"),
}
OPTIONAL = {"user_agent", "simple_id"}
IDS = {"customer_id", "item_id", "config_id", "simple_id"}
DATES = {"dt", "order_date"}
TIMESTAMPS = {"click_time", "occur_at"}
ACTION_SOURCES = {  # action_type, item field, time field (an order's time is midnight UTC of its date)
    "clicks": (1, "item_id", "click_time"),
    "add_to_carts": (2, "config_id", "occur_at"),
    "previous_orders": (3, "config_id", "order_date"),
}

# What Python's str.strip() removes (the pipeline strips every text value before judging it).
WHITESPACE = " || ".join(f"chr({code})" for code in range(sys.maxunicode + 1) if chr(code).isspace())

# Validation macros over one field's stripped text (JSON values are read as their text: 12 and "12"
# both become '12', 3.5 becomes '3.5', true 'true'). An id is an integer 1 .. 2^63-1 written in digits
# (so floats and booleans are not ids); a date is strict YYYY-MM-DD; a timestamp is ISO 8601, an offset
# converted to UTC, none meaning UTC; years 1-9999. Each returns NULL where the value is not valid.
MACROS = rf"""
CREATE OR REPLACE MACRO strip(s) AS  -- trim() with a character list is slow: only where an end may need it
    CASE WHEN regexp_matches(s, '^[!-~](.*[!-~])?$') THEN s ELSE trim(s, {WHITESPACE}) END;
CREATE OR REPLACE MACRO parse_id(s) AS
    CASE WHEN regexp_full_match(s, '\+?[0-9]{{1,19}}') AND try_cast(s AS BIGINT) >= 1 THEN try_cast(s AS BIGINT) END;
CREATE OR REPLACE MACRO parse_date(s) AS
    CASE WHEN regexp_full_match(s, '[0-9]{{4}}-[0-9]{{2}}-[0-9]{{2}}') AND NOT starts_with(s, '0000')
         THEN try_cast(s AS DATE) END;
CREATE OR REPLACE MACRO parse_timestamp(s) AS
    CASE WHEN regexp_full_match(s, '[0-9]{{4}}-[0-9]{{2}}-[0-9]{{2}}([T ][0-9]{{2}}:[0-9]{{2}}(:[0-9]{{2}}([.,][0-9]+)?)?)?'
                                   '(Z|[+-][0-9]{{2}}(:?[0-9]{{2}})?)?')
              AND NOT starts_with(s, '0000')
         THEN try_cast(s AS TIMESTAMPTZ) END;
CREATE OR REPLACE MACRO in_calendar(t) AS
    CASE WHEN t BETWEEN TIMESTAMPTZ '0001-01-01 00:00:00+00' AND TIMESTAMPTZ '9999-12-31 23:59:59.999999+00'
         THEN t END;
"""


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def file_format(path):
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    suffix = Path(name).suffix
    return {".json": "jsonl", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}.get(suffix)


def source_files(raw, source):
    folder = raw / source
    if not folder.is_dir():
        fail(f"raw source {folder}/ is missing")
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and not any(part.startswith((".", "_")) for part in p.relative_to(folder).parts))
    if not files:
        fail(f"raw source {folder}/ is empty")
    for path in files:
        if file_format(path) is None:
            fail(f"{path}: unknown format (.jsonl, .json, .csv or .parquet, optionally .gz)")
    return files


def sql_list(paths):
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


def raw_rows(con, source, files):
    """SQL of one source's raw rows: file_index and row_index (raw order), s_<field> (stripped text,
    NULL where absent) for every field but `impressions`, which stays JSON (f_impressions)."""
    fields = FIELDS[source]
    every = sql_list(files)
    by_format = {}
    for path in files:
        by_format.setdefault(file_format(path), []).append(path)
    parts = []
    for fmt, paths in sorted(by_format.items()):
        listed = sql_list(paths)
        if fmt == "jsonl":
            # A line that is not a JSON object comes out with every field NULL, so it fails the checks.
            types = ", ".join(f"'{f}': '{'JSON' if f == 'impressions' else 'VARCHAR'}'" for f in fields)
            scan = (f"read_json({listed}, format = 'newline_delimited', columns = {{{types}}}, "
                    "ignore_errors = true) WITH ORDINALITY")
            row, have = "ordinality", set(fields)
        else:
            if fmt == "csv":  # a row with too many or too few values is skipped; an empty value is NULL
                scan = (f"read_csv({listed}, header = true, all_varchar = true, union_by_name = true, "
                        "ignore_errors = true, null_padding = false, delim = ',', quote = '\"', escape = '\"') "
                        "WITH ORDINALITY")
                row = "ordinality"
            else:
                scan = f"read_parquet({listed}, union_by_name = true, file_row_number = true)"
                row = "file_row_number"
            have = {name for name, *_ in con.execute(f"DESCRIBE SELECT * FROM {scan}").fetchall()}
        values = []
        for f in fields:
            if f not in have:
                values.append(f"NULL::{'JSON' if f == 'impressions' else 'VARCHAR'} AS {prefix(f)}{f}")
            elif f == "impressions":
                values.append(f'"{f}"::JSON AS f_{f}' if fmt == "jsonl" else f'to_json("{f}") AS f_{f}')
            else:
                values.append(f'strip("{f}"::VARCHAR) AS s_{f}')
        parts.append(f"SELECT list_position({every}, filename) AS file_index, {row} AS row_index, "
                     f"{', '.join(values)} FROM {scan}")
    return "\nUNION ALL\n".join(parts)


def prefix(field):
    return "f_" if field == "impressions" else "s_"


def cleaned_rows(con, source, files):
    """SQL of one source's kept rows (docs/decisions.md, merge_and_clean.py: which rows are set aside), with
    file_index, row_index, each field parsed once as p_<field>, and f_impressions."""
    parsed, kept = [], []
    for f in FIELDS[source]:
        if f == "impressions":
            kept.append("json_type(f_impressions) = 'ARRAY'")
            continue
        parse = ("parse_id" if f in IDS else "parse_date" if f in DATES else "in_calendar(parse_timestamp"
                 if f in TIMESTAMPS else None)
        if parse is None:  # text
            parsed.append(f"s_{f} AS p_{f}")
            if f not in OPTIONAL:
                kept.append(f"coalesce(s_{f}, '') <> ''")
            continue
        parsed.append(f"{parse}(s_{f}){')' if f in TIMESTAMPS else ''} AS p_{f}")
        # a required field must parse; an optional one may be missing, but must parse when present
        kept.append(f"p_{f} IS NOT NULL" if f not in OPTIONAL else f"(coalesce(s_{f}, '') = '' OR p_{f} IS NOT NULL)")
    extra = ", f_impressions" if source == "impressions" else ""
    return (f"SELECT * FROM (SELECT file_index, row_index, {', '.join(parsed)}{extra}, "
            f"{', '.join(f's_{f}' for f in FIELDS[source] if f != 'impressions')} "
            f"FROM ({raw_rows(con, source, files)}))\n        WHERE {' AND '.join(kept)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("raw", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-limit", default="16GB")
    parser.add_argument("--lookback-days", type=int, default=365)
    parser.add_argument("--max-history", type=int, default=1000)
    parser.add_argument("--test-days", type=int, default=1)
    parser.add_argument("--val-days", type=int, default=1)
    parser.add_argument("--train-days", type=int, default=14)
    args = parser.parse_args()
    started = time.perf_counter()

    raw, out = args.raw, args.out.resolve()
    files = {source: source_files(raw, source) for source in FIELDS}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    spill = out.parent / f".{out.name}.duckdb-tmp-{os.getpid()}"
    for path in (staging, spill):
        shutil.rmtree(path, ignore_errors=True)

    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")  # a date becomes midnight UTC; timestamps without offset are UTC
    con.execute(f"SET threads = {int(args.threads)}")
    con.execute(f"SET memory_limit = '{args.memory_limit}'")
    con.execute(f"SET temp_directory = '{spill}'")
    con.execute(MACROS)
    try:
        # Shown items: kept rankings, their good entries at the position shown, exact duplicates dropped
        # (the first in raw order, files sorted by path then row, is kept).
        con.execute(f"""
        CREATE TEMP TABLE shown AS
        WITH rankings AS (
          SELECT file_index, row_index, p_dt AS dt, p_ranking_id AS ranking_id, p_customer_id AS customer_id,
                 f_impressions::JSON[] AS entries
          FROM ({cleaned_rows(con, "impressions", files["impressions"])})
        ),
        entries AS (
          SELECT file_index, row_index, dt, ranking_id, customer_id, position,
                 parse_id(strip(entry ->> '$.item_id')) AS item_id, json_type(entry -> '$.is_order') AS order_type,
                 entry ->> '$.is_order' AS is_order
          FROM (SELECT *, unnest(entries) AS entry, unnest(range(len(entries))) AS position FROM rankings)
        )
        SELECT dt, ranking_id, customer_id, item_id, position, is_order = 'true' AS is_order
        FROM entries
        WHERE item_id IS NOT NULL AND order_type = 'BOOLEAN'
        QUALIFY row_number() OVER (PARTITION BY dt, ranking_id, customer_id, item_id, position
                                   ORDER BY file_index, row_index) = 1
        """)
        # The split: calendar days counted back from the latest impression day.
        t, v, n = args.test_days, args.val_days, args.train_days
        con.execute(f"""
        CREATE TEMP TABLE examples AS
        SELECT * FROM (
          SELECT *, CASE WHEN age < {t} THEN 'test' WHEN age < {t + v} THEN 'val'
                         WHEN age < {t + v + n} THEN 'train' END AS split
          FROM (SELECT *, (max(dt) OVER ()) - dt AS age FROM shown)
        ) WHERE split IS NOT NULL
        """)
        # The canonical action stream.
        selects = []
        for source, (action_type, item, when) in ACTION_SOURCES.items():
            occurred = f"p_{when}::TIMESTAMPTZ"  # an order's date: midnight UTC
            selects.append(f"""
          SELECT p_customer_id AS customer_id, p_{item} AS item_id,
                 {action_type}::TINYINT AS action_type, {occurred} AS occurred_at
          FROM ({cleaned_rows(con, source, files[source])})""")
        con.execute("CREATE TEMP TABLE actions AS " + "\nUNION ALL\n".join(selects))
        cleaned = time.perf_counter()

        # Histories: every action in [D - lookback, D), most recent first, the first max_history.
        h = int(args.max_history)
        con.execute(f"""
        CREATE TEMP TABLE histories AS
        WITH keys AS (SELECT DISTINCT customer_id, dt FROM examples),
        windowed AS (
          SELECT k.customer_id, k.dt, a.item_id, a.action_type,
                 row_number() OVER (PARTITION BY k.customer_id, k.dt
                                    ORDER BY a.occurred_at DESC, a.action_type DESC, a.item_id DESC) AS recency
          FROM keys k
          JOIN actions a
            ON a.customer_id = k.customer_id
           AND a.occurred_at < k.dt::TIMESTAMPTZ
           AND a.occurred_at >= (k.dt - {int(args.lookback_days)})::TIMESTAMPTZ
          QUALIFY recency <= {h}
        )
        SELECT customer_id, dt, list(item_id ORDER BY recency) AS actions,
               list(action_type ORDER BY recency) AS action_types
        FROM windowed GROUP BY customer_id, dt
        """)
        histories = time.perf_counter()
        # A row holds two padded lists (about 9 bytes per history slot). PARTITION_BY buffers 524,288 rows
        # per thread by default before flushing (4.5 GiB of such rows) and a Parquet row group 122,880 rows:
        # size both by bytes instead, about 16 MiB per thread's buffer and 128 MiB per row group.
        row_bytes = 9 * h + 64
        con.execute(f"SET partitioned_write_flush_threshold = {max(1024, (16 << 20) // row_bytes)}")
        row_group = max(1024, (128 << 20) // row_bytes)
        con.execute(f"""
        COPY (
          SELECT e.dt, e.customer_id, e.ranking_id, e.item_id, e.position::BIGINT AS position, e.is_order, e.split,
                 list_resize(coalesce(hi.actions, []::BIGINT[]), {h}, 0::BIGINT) AS actions,
                 list_resize(coalesce(hi.action_types, []::TINYINT[]), {h}, 0::TINYINT) AS action_types
          FROM examples e LEFT JOIN histories hi ON hi.customer_id = e.customer_id AND hi.dt = e.dt
        ) TO '{staging}' (FORMAT parquet, PARTITION_BY (dt), ROW_GROUP_SIZE {row_group})
        """)
        written = time.perf_counter()
        rows = con.execute("SELECT count(*) FROM examples").fetchone()[0]
        by_split = dict(con.execute("SELECT split, count(*) FROM examples GROUP BY split").fetchall())
        n_actions = con.execute("SELECT count(*) FROM actions").fetchone()[0]
        con.close()
        if not staging.exists():
            staging.mkdir()
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(spill, ignore_errors=True)
    seconds = time.perf_counter() - started
    print(f"duckdb_pipeline: wrote {rows:,} rows (train {by_split.get('train', 0):,}, val {by_split.get('val', 0):,}, "
          f"test {by_split.get('test', 0):,}; {n_actions:,} actions) to {out}/ in {seconds:.1f} s "
          f"(reading and cleaning {cleaned - started:.1f} s, "
          f"histories {histories - cleaned:.1f} s, writing {written - histories:.1f} s)")


if __name__ == "__main__":
    main()
