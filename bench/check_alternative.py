"""Check an alternative pipeline's output (bench/duckdb_pipeline.py, ...) against our pipeline's, exactly.

    .venv/bin/python bench/check_alternative.py RAW OUT DATA [--max-history 1000]

RAW: the raw folder both ran on (only named in the report); OUT: the alternative's output,
OUT/dt=YYYY-MM-DD/*.parquet with customer_id, ranking_id, item_id, position, is_order, split,
actions (raw item ids, padded with 0 to --max-history), action_types; DATA: our pipeline's --data
folder after `pipeline.py run` (merged/ and processed/ must both be there, with the same
--lookback-days / --max-history / split flags as the alternative).

Checks, each printed as one line:
  schema       the column types and that every list is exactly --max-history long;
  examples     the rows (dt, customer_id, ranking_id, item_id, position) equal merged/impressions'
               rows of train/val/test days, and so do is_order and split, row by row;
  padding      every (dt, customer_id) has one history on all its rows; zeros only at the end, in
               actions and action_types alike;
  histories    per (dt, customer_id), the history with padding stripped equals processed/'s: items
               through our fitted item encoder, and action types, in order.
Exit status 0 when all agree, 1 otherwise.
"""

import argparse
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from recpipe import encoders  # noqa: E402  (the repository root is not on the path of a bench/ script)

KEY = ["dt", "customer_id", "ranking_id", "item_id", "position"]


def check(raw, out, data, max_history):
    con = duckdb.connect()
    con.execute("SET threads = 2")
    theirs = f"read_parquet('{out}/*/*.parquet', hive_partitioning = true, hive_types = {{'dt': DATE}})"
    results = {}

    schema = dict(con.execute(f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM {theirs})").fetchall())
    wanted = {"customer_id": "BIGINT", "ranking_id": "VARCHAR", "item_id": "BIGINT", "position": "BIGINT",
              "is_order": "BOOLEAN", "split": "VARCHAR", "actions": "BIGINT[]", "action_types": "TINYINT[]",
              "dt": "DATE"}
    wrong_length = con.execute(f"SELECT count(*) FROM {theirs} WHERE len(actions) <> {max_history} "
                               f"OR len(action_types) <> {max_history}").fetchall()[0][0]
    results["schema"] = (schema == wanted and wrong_length == 0,
                         f"{schema if schema != wanted else 'types as wanted'}; {wrong_length} lists of another length")

    ours = f"read_parquet('{data}/merged/impressions/*.parquet') WHERE split IN ('train', 'val', 'test')"
    columns = ", ".join(KEY + ["is_order", "split"])
    only_theirs, only_ours, n_theirs, n_ours = con.execute(f"""
        SELECT (SELECT count(*) FROM (SELECT {columns} FROM {theirs} EXCEPT ALL SELECT {columns} FROM {ours})),
               (SELECT count(*) FROM (SELECT {columns} FROM {ours} EXCEPT ALL SELECT {columns} FROM {theirs})),
               (SELECT count(*) FROM {theirs}), (SELECT count(*) FROM {ours})""").fetchall()[0]
    results["examples"] = (only_theirs == 0 and only_ours == 0 and n_theirs == n_ours,
                           f"{n_theirs:,} rows against our {n_ours:,}; {only_theirs} only theirs, {only_ours} only ours")

    # One history per (dt, customer_id), padding stripped; zeros must be padding only.
    con.execute(f"""
        CREATE TEMP TABLE their_histories AS
        SELECT dt::VARCHAR AS dt, customer_id, count(DISTINCT (actions, action_types)) AS variants,
               any_value(list_filter(actions, lambda x: x <> 0)) AS actions,
               any_value(list_filter(action_types, lambda x: x <> 0)) AS action_types,
               bool_and(list_position(actions, 0) IS NULL
                        OR (list_filter(actions[list_position(actions, 0):], lambda x: x <> 0) = []
                            AND list_position(action_types, 0) = list_position(actions, 0)
                            AND list_filter(action_types[list_position(actions, 0):], lambda x: x <> 0) = [])) AS padded_ok
        FROM {theirs} GROUP BY ALL""")
    bad = con.execute("SELECT count(*) FILTER (variants <> 1), count(*) FILTER (NOT padded_ok) "
                      "FROM their_histories").fetchall()[0]
    results["padding"] = (bad == (0, 0), f"{bad[0]} keys with differing histories, {bad[1]} badly padded")

    theirs_table = con.sql("SELECT customer_id, dt, actions, action_types FROM their_histories "
                               "ORDER BY customer_id, dt").to_arrow_table()
    processed = Path(data) / "processed"
    ours_table = con.sql(f"""
        SELECT customer_id, dt::VARCHAR AS dt, actions, action_types
        FROM read_parquet('{processed}/*/histories/*/*.parquet', hive_partitioning = true,
                          hive_types = {{'dt': DATE}})
        ORDER BY customer_id, dt""").to_arrow_table()
    item_encoder = encoders.load(processed / encoders.FITTED)[0]["cat_item"]

    def flat(table, name):
        return pc.list_flatten(table.column(name)).to_numpy()

    same_keys = (ours_table.num_rows == theirs_table.num_rows
                 and ours_table.column("customer_id").equals(theirs_table.column("customer_id"))
                 and ours_table.column("dt").equals(theirs_table.column("dt")))
    same = (same_keys
            and pc.list_value_length(ours_table.column("actions")).equals(
                pc.list_value_length(theirs_table.column("actions")))
            and np.array_equal(flat(ours_table, "action_types"), flat(theirs_table, "action_types").astype(np.int8))
            and np.array_equal(flat(ours_table, "actions"), item_encoder.transform(flat(theirs_table, "actions"))))
    lengths = pc.list_value_length(theirs_table.column("actions")).to_numpy()
    results["histories"] = (bool(same), f"{theirs_table.num_rows:,} (customer, day) keys against our "
                            f"{ours_table.num_rows:,}; keys {'equal' if same_keys else 'DIFFER'}; "
                            f"mean length {lengths.mean() if len(lengths) else 0:.1f}, max {lengths.max(initial=0)}")
    print(f"checking {out} (made from {raw}) against {data}")
    for name, (ok, detail) in results.items():
        print(f"  {name:<10} {'ok' if ok else 'DIFFERS'}: {detail}")
    return all(ok for ok, _ in results.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("raw", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--max-history", type=int, default=1000)
    args = parser.parse_args()
    sys.exit(0 if check(args.raw, args.out, args.data, args.max_history) else 1)


if __name__ == "__main__":
    main()
