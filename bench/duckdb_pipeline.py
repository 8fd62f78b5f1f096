"""The whole job of our pipeline, raw files in, training rows out, written as DuckDB SQL (a benchmark competitor).

    .venv/bin/python bench/duckdb_pipeline.py RAW OUT [--threads 2] [--memory-limit 16GB] [--lookback-days 365]
        [--max-history 1000] [--test-days 1] [--val-days 1] [--train-days 14]

Reads RAW/{impressions,clicks,add_to_carts,previous_orders}/ (JSON Lines, CSV, Parquet, any of them
gzipped; names starting with '_' or '.' are skipped), applies the SPEC's cleaning rules (section 4)
and the README's decisions for merge_and_clean.py, splits the impression days (section 5), builds every
(customer, day)'s history (section 6) and writes one row per kept shown item of a train/val/test day:

    OUT/dt=YYYY-MM-DD/*.parquet
        customer_id BIGINT, ranking_id VARCHAR, item_id BIGINT, position BIGINT, is_order BOOLEAN,
        split VARCHAR, actions BIGINT[max_history], action_types TINYINT[max_history]

`actions` are raw item ids, most recent first, right-padded with 0, `action_types` parallel to them.
SQL does the work; Python only lists the files and assembles the queries. Stands alone: nothing
from recpipe is imported. OUT is built beside itself and renamed into place (replacing it).

How the raw rows are read (one reader per format, every field kept as a JSON value, so that one set
of validation macros judges every format alike):
  - JSON Lines: read_json(newline_delimited, every field typed JSON, ignore_errors): a line that is
    not a JSON object comes out with every field NULL, so it fails the required-field check;
  - CSV: read_csv(header, all_varchar, union_by_name, ignore_errors): a row with too many or too few
    values is skipped; an empty value is NULL, i.e. missing;
  - Parquet: read_parquet(union_by_name), each field through to_json().
"""

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import duckdb

FIELDS = {  # required fields, and the optional ones, per source (SPEC section 2)
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

# Validation macros over one field's JSON value. Python's str.strip() whitespace; an id is an integer
# 1 .. 2^63-1 given as a JSON integer or as a string of digits (floats and booleans are not ids); dates
# are strict YYYY-MM-DD; timestamps ISO 8601 (an offset converted to UTC, none meaning UTC), years 1-9999.
MACROS = r"""
CREATE OR REPLACE MACRO ws() AS chr(32) || chr(9) || chr(10) || chr(11) || chr(12) || chr(13);
CREATE OR REPLACE MACRO jtext(j) AS trim(j ->> '$', ws());
CREATE OR REPLACE MACRO present(j) AS
    j IS NOT NULL AND json_type(j) <> 'NULL' AND NOT (json_type(j) = 'VARCHAR' AND jtext(j) = '');
CREATE OR REPLACE MACRO raw_id(j) AS CASE
    WHEN json_type(j) IN ('UBIGINT', 'BIGINT') THEN try_cast(j::VARCHAR AS BIGINT)
    WHEN json_type(j) = 'VARCHAR' AND regexp_full_match(jtext(j), '\+?[0-9]{1,19}') THEN try_cast(jtext(j) AS BIGINT)
END;
CREATE OR REPLACE MACRO valid_id(j) AS CASE WHEN raw_id(j) >= 1 THEN raw_id(j) END;
CREATE OR REPLACE MACRO valid_date(j) AS CASE
    WHEN json_type(j) = 'VARCHAR' AND regexp_full_match(jtext(j), '[0-9]{4}-[0-9]{2}-[0-9]{2}')
         AND NOT starts_with(jtext(j), '0000')
    THEN try_cast(jtext(j) AS DATE)
END;
CREATE OR REPLACE MACRO parsed_ts(j) AS CASE
    WHEN json_type(j) = 'VARCHAR'
         AND regexp_full_match(jtext(j),
             '[0-9]{4}-[0-9]{2}-[0-9]{2}([T ][0-9]{2}:[0-9]{2}(:[0-9]{2}([.,][0-9]+)?)?)?(Z|[+-][0-9]{2}(:?[0-9]{2})?)?')
         AND NOT starts_with(jtext(j), '0000')
    THEN try_cast(jtext(j) AS TIMESTAMPTZ)
END;
CREATE OR REPLACE MACRO valid_ts(j) AS CASE
    WHEN parsed_ts(j) BETWEEN TIMESTAMPTZ '0001-01-01 00:00:00+00' AND TIMESTAMPTZ '9999-12-31 23:59:59.999999+00'
    THEN parsed_ts(j)
END;
CREATE OR REPLACE MACRO as_text(j) AS CASE WHEN json_type(j) = 'VARCHAR' THEN jtext(j) ELSE json(j)::VARCHAR END;
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
    """SQL of one source's raw rows: file_index, row_index (raw order) and f_<field> JSON for every field."""
    fields = FIELDS[source]
    every = sql_list(files)
    parts = []
    by_format = {}
    for path in files:
        by_format.setdefault(file_format(path), []).append(path)
    for fmt, paths in sorted(by_format.items()):
        listed = sql_list(paths)
        if fmt == "jsonl":
            columns = "{" + ", ".join(f"'{f}': 'JSON'" for f in fields) + "}"
            scan = (f"read_json({listed}, format = 'newline_delimited', columns = {columns}, ignore_errors = true) "
                    "WITH ORDINALITY")
            values = [f'"{f}" AS f_{f}' for f in fields]
            row = "ordinality"
        else:
            if fmt == "csv":
                scan = (f"read_csv({listed}, header = true, all_varchar = true, union_by_name = true, "
                        f"ignore_errors = true, null_padding = false, delim = ',', quote = '\"', escape = '\"') "
                        "WITH ORDINALITY")
                row = "ordinality"
            else:
                scan = f"read_parquet({listed}, union_by_name = true, file_row_number = true)"
                row = "file_row_number"
            have = {name for name, *_ in con.execute(f"DESCRIBE SELECT * FROM {scan}").fetchall()}
            values = [(f'to_json("{f}")' if f in have else "NULL::JSON") + f" AS f_{f}" for f in fields]
        parts.append(f"SELECT list_position({every}, filename) AS file_index, {row} AS row_index, "
                     f"{', '.join(values)} FROM {scan}")
    return "\nUNION ALL\n".join(parts)


def kept_condition(source):
    """The SQL condition for a raw row of `source` to be kept (README: which rows are set aside)."""
    terms = []
    for f in FIELDS[source]:
        col = f"f_{f}"
        if f not in OPTIONAL:
            terms.append(f"present({col})")
        if f in IDS:
            terms.append(f"(NOT present({col}) OR valid_id({col}) IS NOT NULL)")
        if f in DATES:
            terms.append(f"(NOT present({col}) OR valid_date({col}) IS NOT NULL)")
        if f in TIMESTAMPS:
            terms.append(f"(NOT present({col}) OR valid_ts({col}) IS NOT NULL)")
    if source == "impressions":
        terms.append("json_type(f_impressions) = 'ARRAY'")
    return "\n      AND ".join(terms)


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
          SELECT file_index, row_index, valid_date(f_dt) AS dt, as_text(f_ranking_id) AS ranking_id,
                 valid_id(f_customer_id) AS customer_id, f_impressions::JSON[] AS entries
          FROM ({raw_rows(con, "impressions", files["impressions"])})
          WHERE {kept_condition("impressions")}
        ),
        entries AS (
          SELECT file_index, row_index, dt, ranking_id, customer_id,
                 unnest(entries) AS entry, unnest(range(len(entries))) AS position
          FROM rankings
        )
        SELECT dt, ranking_id, customer_id, valid_id(entry -> '$.item_id') AS item_id, position,
               (entry ->> '$.is_order') = 'true' AS is_order
        FROM entries
        WHERE valid_id(entry -> '$.item_id') IS NOT NULL AND json_type(entry -> '$.is_order') = 'BOOLEAN'
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
            occurred = f"valid_date(f_{when})::TIMESTAMPTZ" if when in DATES else f"valid_ts(f_{when})"
            selects.append(f"""
          SELECT valid_id(f_customer_id) AS customer_id, valid_id(f_{item}) AS item_id,
                 {action_type}::TINYINT AS action_type, {occurred} AS occurred_at
          FROM ({raw_rows(con, source, files[source])})
          WHERE {kept_condition(source)}""")
        con.execute("CREATE TEMP TABLE actions AS " + "\nUNION ALL\n".join(selects))

        # Histories: every action in [D - lookback, D), most recent first, the first max_history.
        h = int(args.max_history)
        con.execute(f"""
        COPY (
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
          ),
          histories AS (
            SELECT customer_id, dt, list(item_id ORDER BY recency) AS actions,
                   list(action_type ORDER BY recency) AS action_types
            FROM windowed GROUP BY customer_id, dt
          )
          SELECT e.dt, e.customer_id, e.ranking_id, e.item_id, e.position::BIGINT AS position, e.is_order, e.split,
                 list_resize(coalesce(hi.actions, []::BIGINT[]), {h}, 0::BIGINT) AS actions,
                 list_resize(coalesce(hi.action_types, []::TINYINT[]), {h}, 0::TINYINT) AS action_types
          FROM examples e LEFT JOIN histories hi ON hi.customer_id = e.customer_id AND hi.dt = e.dt
        ) TO '{staging}' (FORMAT parquet, PARTITION_BY (dt))
        """)
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
          f"test {by_split.get('test', 0):,}; {n_actions:,} actions) to {out}/ in {seconds:.1f} s")


if __name__ == "__main__":
    main()
