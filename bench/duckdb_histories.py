"""The history computation as most people would write it: a SQL window over a join, in DuckDB.

    .venv/bin/python bench/duckdb_histories.py DATA_DIR OUT.parquet [--lookback-days 365] [--max-history 1000]

Reads DATA_DIR/cleaned/ (the same input preprocess.py reads) and writes one row per
(customer_id, dt) with impressions in train/val/test: the customer's actions in
[dt - lookback, dt), most recent first (occurred_at, action_type, item_id descending),
the first max_history of them, as lists of item ids and action types.
"""

import argparse

import duckdb

QUERY = """
COPY (
  WITH keys AS (
    SELECT DISTINCT customer_id, dt FROM read_parquet('{cleaned}/impressions/*/*.parquet')
    WHERE split IN ('train', 'val', 'test')
  ),
  windowed AS (
    SELECT k.customer_id, k.dt, a.item_id, a.action_type,
           row_number() OVER (PARTITION BY k.customer_id, k.dt
                              ORDER BY a.occurred_at DESC, a.action_type DESC, a.item_id DESC) AS recency
    FROM keys k
    JOIN read_parquet('{cleaned}/actions/*/*.parquet') a
      ON a.customer_id = k.customer_id
     AND a.occurred_at < k.dt::TIMESTAMPTZ
     AND a.occurred_at >= k.dt::TIMESTAMPTZ - INTERVAL {lookback} DAY
  )
  SELECT k.customer_id, k.dt,
         coalesce(list(w.item_id ORDER BY w.recency) FILTER (WHERE w.recency IS NOT NULL), []) AS actions,
         coalesce(list(w.action_type ORDER BY w.recency) FILTER (WHERE w.recency IS NOT NULL), []) AS action_types
  FROM keys k LEFT JOIN windowed w
    ON w.customer_id = k.customer_id AND w.dt = k.dt AND w.recency <= {max_history}
  GROUP BY k.customer_id, k.dt
) TO '{out}' (FORMAT parquet)
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--lookback-days", type=int, default=365)
    parser.add_argument("--max-history", type=int, default=1000)
    args = parser.parse_args()
    connection = duckdb.connect()
    connection.execute("SET TimeZone = 'UTC'")  # dates become midnight UTC (docs/data.md)
    connection.execute(QUERY.format(cleaned=f"{args.data}/cleaned", lookback=args.lookback_days,
                                    max_history=args.max_history, out=args.out))


if __name__ == "__main__":
    main()
