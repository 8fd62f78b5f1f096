"""The job of our four scripts as one DuckDB script on one machine, written the fast way (a benchmark peer).

    .venv/bin/python bench/duckdb_timeline.py RAW OUT [--threads 2] [--lookback-days 365]
        [--max-history 1000] [--test-days 1] [--val-days 1] [--train-days 14]

Raw files in (docs/data.md, Raw input), the timeline layout out (docs/data.md, Layouts), raw ids:

    OUT/timelines.parquet  customer_id BIGINT, actions BIGINT[] (item ids), action_types TINYINT[]:
                           each customer's actions oldest first, ascending (occurred_at, action_type,
                           item_id), cut to what its histories reach; one row per customer with examples
    OUT/examples.parquet   dt DATE, split VARCHAR, customer_id BIGINT, ranking_id VARCHAR, item_id BIGINT,
                           position INTEGER, is_order BOOLEAN, history_end INTEGER, history_length INTEGER:
                           one row per kept shown item of a train/val/test day

An example's history is actions[history_end - history_length : history_end] of its customer's
timeline, read backwards: every action in [D - lookback, D), most recent first, at most
--max-history (docs/data.md, The history rule). No join of shown items to actions: each action
gets its place in its customer's sorted run, and an ASOF join finds, per (customer, day), how many
of the customer's actions come before that midnight, and before the midnight lookback days earlier.

Reading and the cleaning rules are bench/duckdb_pipeline.py's (its readers and parsing macros,
imported): the same rows are kept. What this script leaves out, and our pipeline does: user agents,
encoders, the scaler and the num_* features, manifests, atomic publishing, partitioned output.
"""

import argparse
import shutil
import time
from pathlib import Path

import duckdb

from duckdb_pipeline import (ACTION_SOURCES, DATES, FIELDS, IDS, MACROS, OPTIONAL, TIMESTAMPS, raw_rows,
                             source_files)


def kept_rows(con, source, files):
    """SQL of a source's kept rows: file_index, row_index, p_<field> (parsed), f_impressions.

    Every field is parsed once, in a materialized CTE: a filter on parsed columns would otherwise
    be pushed below the projection and parse every field twice.
    """
    parsed, kept = [], []
    for f in FIELDS[source]:
        if f == "impressions":
            parsed.append("f_impressions")
            kept.append("json_type(f_impressions) = 'ARRAY'")
            continue
        parse = ("parse_id({})" if f in IDS else "parse_date({})" if f in DATES
                 else "in_calendar(parse_timestamp({}))" if f in TIMESTAMPS else "nullif({}, '')")
        parsed.append(f"{parse.format(f's_{f}')} AS p_{f}, s_{f}")
        kept.append(f"(p_{f} IS NOT NULL OR coalesce(s_{f}, '') = '')" if f in OPTIONAL else f"p_{f} IS NOT NULL")
    return (f"WITH parsed AS MATERIALIZED (SELECT file_index, row_index, {', '.join(parsed)} "
            f"FROM ({raw_rows(con, source, files)}))\nSELECT * FROM parsed WHERE {' AND '.join(kept)}")


def build(con, files, args):
    t, v, n = args.test_days, args.val_days, args.train_days
    # Shown items of kept rankings; a bad entry keeps its place; of exact duplicates the first in raw order.
    con.execute(f"""
    CREATE TEMP TABLE shown AS
    WITH entries AS MATERIALIZED (
      SELECT file_index, row_index, dt, ranking_id, customer_id, position::INTEGER AS position,
             parse_id(strip(entry ->> '$.item_id')) AS item_id, json_type(entry -> '$.is_order') AS order_type,
             entry ->> '$.is_order' = 'true' AS is_order
      FROM (SELECT file_index, row_index, p_dt AS dt, p_ranking_id AS ranking_id, p_customer_id AS customer_id,
                   unnest(range(len(entries))) AS position, unnest(entries) AS entry
            FROM (SELECT *, f_impressions::JSON[] AS entries
                  FROM ({kept_rows(con, "impressions", files["impressions"])})))
    )
    SELECT dt, ranking_id, customer_id, item_id, position, arg_min(is_order, row(file_index, row_index)) AS is_order
    FROM entries WHERE item_id IS NOT NULL AND order_type = 'BOOLEAN'
    GROUP BY dt, ranking_id, customer_id, item_id, position""")
    # The split: calendar days counted back from the latest day with a kept shown item.
    con.execute(f"""
    CREATE TEMP TABLE examples AS
    SELECT *, CASE WHEN age < {t} THEN 'test' WHEN age < {t + v} THEN 'val' ELSE 'train' END AS split
    FROM (SELECT *, (SELECT max(dt) FROM shown) - dt AS age FROM shown) WHERE age < {t + v + n}""")

    # The action stream of the customers with examples, each action at its place in its customer's run.
    stream = "\nUNION ALL\n".join(
        f"SELECT p_customer_id AS customer_id, p_{item} AS item_id, {code}::TINYINT AS action_type, "
        f"p_{when}::TIMESTAMPTZ AS occurred_at FROM ({kept_rows(con, source, files[source])})"
        for source, (code, item, when) in ACTION_SOURCES.items())
    con.execute(f"""
    CREATE TEMP TABLE actions AS
    SELECT *, (row_number() OVER (PARTITION BY customer_id ORDER BY occurred_at, action_type, item_id) - 1)::INTEGER
              AS place
    FROM ({stream}) WHERE customer_id IN (SELECT customer_id FROM examples)""")
    # through: how many of the customer's actions happened on or before that (UTC) day.
    con.execute("""
    CREATE TEMP TABLE daily AS
    SELECT customer_id, occurred_at::DATE AS day, max(place) + 1 AS through FROM actions GROUP BY ALL""")
    # A (customer, day)'s history: its actions before D, less those before D - lookback, at most max_history.
    con.execute(f"""
    CREATE TEMP TABLE windows AS
    SELECT w.customer_id, w.dt, w.stop, least(w.stop - coalesce(before.through, 0), {args.max_history}) AS length
    FROM (SELECT k.customer_id, k.dt, coalesce(d.through, 0) AS stop
          FROM (SELECT DISTINCT customer_id, dt FROM examples) k
          ASOF LEFT JOIN daily d ON k.customer_id = d.customer_id AND k.dt > d.day) w
    ASOF LEFT JOIN daily before ON w.customer_id = before.customer_id AND w.dt - {args.lookback_days} > before.day""")
    # A timeline reaches from its earliest history's oldest action to its latest history's newest.
    con.execute("""
    CREATE TEMP TABLE reach AS
    SELECT customer_id, min(stop - length) AS first, max(stop) AS stop FROM windows GROUP BY customer_id""")


def write(con, out):
    con.execute(f"""
    COPY (SELECT r.customer_id,
                 coalesce(list(a.item_id ORDER BY a.place) FILTER (a.place IS NOT NULL), []) AS actions,
                 coalesce(list(a.action_type ORDER BY a.place) FILTER (a.place IS NOT NULL), []) AS action_types
          FROM reach r LEFT JOIN actions a
            ON a.customer_id = r.customer_id AND a.place >= r.first AND a.place < r.stop
          GROUP BY r.customer_id ORDER BY r.customer_id)
    TO '{out}/timelines.parquet' (FORMAT parquet)""")
    con.execute(f"""
    COPY (SELECT e.dt, e.split, e.customer_id, e.ranking_id, e.item_id, e.position, e.is_order,
                 (w.stop - r.first)::INTEGER AS history_end, w.length::INTEGER AS history_length
          FROM examples e JOIN windows w USING (customer_id, dt) JOIN reach r USING (customer_id)
          ORDER BY e.dt, e.customer_id, e.ranking_id, e.position)
    TO '{out}/examples.parquet' (FORMAT parquet)""")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("raw")
    parser.add_argument("out")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lookback-days", type=int, default=365)
    parser.add_argument("--max-history", type=int, default=1000)
    parser.add_argument("--test-days", type=int, default=1)
    parser.add_argument("--val-days", type=int, default=1)
    parser.add_argument("--train-days", type=int, default=14)
    args = parser.parse_args()
    started = time.perf_counter()

    raw, out = Path(args.raw), Path(args.out)
    files = {source: source_files(raw, source) for source in FIELDS}
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")  # a date is midnight UTC; a timestamp without offset is UTC
    con.execute(f"SET threads = {int(args.threads)}")
    con.execute(MACROS)
    build(con, files, args)
    built = time.perf_counter()
    write(con, out)
    examples, keys = con.execute("SELECT (SELECT count(*) FROM examples), (SELECT count(*) FROM windows)").fetchone()
    print(f"duckdb_timeline: {examples:,} examples, {keys:,} (customer, day) histories, to {out}/ in "
          f"{time.perf_counter() - started:.1f} s (reading to windows {built - started:.1f} s)")


if __name__ == "__main__":
    main()
