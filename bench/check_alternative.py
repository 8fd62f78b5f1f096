"""Check an alternative pipeline's output against our pipeline's, exactly: the wide rows of
bench/duckdb_pipeline.py or bench/spark_pipeline.py, or the timeline layout of bench/duckdb_timeline.py
or bench/polars_timeline.py.

    .venv/bin/python bench/check_alternative.py RAW OUT DATA [--max-history 1000]
    .venv/bin/python bench/check_alternative.py --layout timeline RAW OUT DATA

RAW: the raw folder both ran on (only named in the report); DATA: our pipeline's --data folder
after its four scripts (processed/ in the same layout, made with the same --lookback-days /
--max-history / split flags as the alternative; the wide check also reads merged/).

Wide (the default): OUT/dt=YYYY-MM-DD/*.parquet with customer_id, ranking_id, item_id, position,
is_order, split, actions (raw item ids, padded with 0 to --max-history), action_types. Checks:
  schema       the column types and that every list is exactly --max-history long;
  examples     the rows (dt, customer_id, ranking_id, item_id, position) equal merged/impressions'
               rows of train/val/test days, and so do is_order and split, row by row;
  padding      every (dt, customer_id) has one history on all its rows; zeros only at the end, in
               actions and action_types alike;
  histories    per (dt, customer_id), the history with padding stripped equals processed/'s: items
               through our fitted item encoder, and action types, in order.

Timeline: OUT/timelines.parquet (customer_id, actions: raw item ids, action_types) and
OUT/examples.parquet (dt, split, customer_id, ranking_id, item_id, position, is_order, history_end,
history_length), against processed/timelines/ and processed/<split>/examples/. Checks:
  schema       the column types;
  examples     the rows (split, dt, customer_id, ranking_id, item, position, is_order) equal ours,
               row by row, the item and position through our fitted encoders (ours stores only those);
  windows      every (dt, customer_id) has one (history_end, history_length) on all its rows, and
               a window that lies inside its customer's timeline;
  histories    per (dt, customer_id), the history read out of the timeline (history_length equal,
               items through our item encoder, and action types, in order) equals ours read out of ours.
It also says, for information, whether the timelines themselves are ours (they may be cut otherwise).
Exit status 0 when all agree, 1 otherwise.
"""

import argparse
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from recpipe import encoders  # noqa: E402  (the repository root is not on the path of a bench/ script)

KEY = ["dt", "customer_id", "ranking_id", "item_id", "position"]
TIMELINE_SCHEMAS = {
    "timelines": {"customer_id": pa.int64(), "actions": pa.list_(pa.int64()), "action_types": pa.list_(pa.int8())},
    "examples": {"dt": pa.date32(), "split": pa.string(), "customer_id": pa.int64(), "ranking_id": pa.string(),
                 "item_id": pa.int64(), "position": pa.int32(), "is_order": pa.bool_(), "history_end": pa.int32(),
                 "history_length": pa.int32()},
}
EXAMPLE_ROW = "split, dt, customer_id, ranking_id, cat_item, cat_position, is_order"


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


def plain(arrow_type):
    """The type with Arrow's large and view variants (Polars writes those) read as the plain one."""
    if pa.types.is_large_string(arrow_type) or pa.types.is_string_view(arrow_type):
        return pa.string()
    if pa.types.is_large_list(arrow_type) or pa.types.is_list_view(arrow_type) or pa.types.is_list(arrow_type):
        return pa.list_(plain(arrow_type.value_type))
    return arrow_type


def read_out(timelines, customer, end, length):
    """Each key's history read out of its customer's timeline, most recent first.

    timelines: customer_id, actions, action_types; the keys: numpy arrays of customer_id,
    history_end and history_length. Returns (items, action types) of all keys one after another,
    and per key whether its window lies inside its customer's timeline (the others read as empty).
    """
    customers = timelines.column("customer_id").to_numpy()
    order = np.argsort(customers, kind="stable")
    place = np.minimum(np.searchsorted(customers[order], customer), max(len(order) - 1, 0))
    row = order[place] if len(order) else np.zeros(len(customer), np.int64)
    actions = timelines.column("actions").combine_chunks()
    types = timelines.column("action_types").combine_chunks()
    offsets = actions.offsets.to_numpy()
    inside = ((customers[row] == customer) & (length >= 0) & (end >= length)
              & (end <= offsets[row + 1] - offsets[row])) if len(order) else np.zeros(len(customer), bool)
    length = np.where(inside, length, 0)
    starts = np.zeros(len(length) + 1, np.int64)
    np.cumsum(length, out=starts[1:])
    taken = np.repeat(offsets[row] + end - 1, length) - (np.arange(starts[-1]) - np.repeat(starts[:-1], length))
    return actions.values.to_numpy()[taken], types.values.to_numpy()[taken], inside


def check_timeline(out, data):
    """{check: (ok, detail)} for a timeline-layout peer's OUT against our DATA/processed/ (module docstring)."""
    processed = Path(data) / "processed"
    fitted = encoders.load(processed / encoders.FITTED)[0]
    theirs = {name: pq.read_table(Path(out) / f"{name}.parquet") for name in TIMELINE_SCHEMAS}
    results = {}
    found = {name: {field.name: plain(field.type) for field in table.schema} for name, table in theirs.items()}
    wrong = {name: found[name] for name in TIMELINE_SCHEMAS if found[name] != TIMELINE_SCHEMAS[name]}
    results["schema"] = (not wrong, f"DIFFERS: {wrong}" if wrong else "types as wanted")
    if wrong:
        return results

    examples = theirs["examples"]
    examples = examples.append_column("cat_item", pa.array(fitted["cat_item"].transform(examples["item_id"])))
    examples = examples.append_column("cat_position", pa.array(fitted["cat_position"].transform(
        examples["position"].cast(pa.int64()))))
    con = duckdb.connect()
    con.execute("SET threads = 2")
    con.register("theirs", examples)
    con.execute(f"""
        CREATE TEMP VIEW ours AS
        SELECT regexp_extract(filename, '([^/]+)/examples/dt=', 1) AS split, dt, customer_id, ranking_id,
               cat_item, cat_position, is_order = 1 AS is_order, history_end, history_length
        FROM read_parquet('{processed}/*/examples/*/*.parquet', hive_partitioning = true, filename = true,
                          hive_types = {{'dt': DATE}})""")
    only_theirs, only_ours, n_theirs, n_ours = con.execute(f"""
        SELECT (SELECT count(*) FROM (SELECT {EXAMPLE_ROW} FROM theirs EXCEPT ALL SELECT {EXAMPLE_ROW} FROM ours)),
               (SELECT count(*) FROM (SELECT {EXAMPLE_ROW} FROM ours EXCEPT ALL SELECT {EXAMPLE_ROW} FROM theirs)),
               (SELECT count(*) FROM theirs), (SELECT count(*) FROM ours)""").fetchone()
    by_split = dict(con.execute("SELECT split, count(*) FROM theirs GROUP BY split").fetchall())
    results["examples"] = (only_theirs == 0 and only_ours == 0,
                           f"{n_theirs:,} rows {by_split} against our {n_ours:,}; {only_theirs} only theirs, "
                           f"{only_ours} only ours")

    def windows(table):
        return con.sql(f"""SELECT customer_id, dt, count(DISTINCT (history_end, history_length)) AS variants,
                                  any_value(history_end) AS history_end, any_value(history_length) AS history_length
                           FROM {table} GROUP BY customer_id, dt ORDER BY customer_id, dt""").to_arrow_table()

    keys = {"theirs": windows("theirs"), "ours": windows("ours")}
    ours_timelines = pq.read_table(processed / "timelines", columns=list(TIMELINE_SCHEMAS["timelines"]))
    timelines = {"theirs": theirs["timelines"], "ours": ours_timelines}
    variants = int(pc.sum(pc.not_equal(keys["theirs"]["variants"], 1)).as_py() or 0)
    same_keys = all(keys["ours"][name].equals(keys["theirs"][name]) for name in ("customer_id", "dt"))
    same, outside = same_keys and keys["ours"]["history_length"].equals(keys["theirs"]["history_length"]), 0
    # Read out in slices of keys, so that the histories in memory stay a few million actions whatever the size.
    step = 1 << 16
    for start in range(0, keys["theirs"].num_rows if same else 0, step):
        read = {}
        for side, table in keys.items():
            table = table.slice(start, step)
            read[side] = read_out(timelines[side], table["customer_id"].to_numpy(),
                                  table["history_end"].to_numpy().astype(np.int64),
                                  table["history_length"].to_numpy().astype(np.int64))
        outside += int((~read["theirs"][2]).sum())
        same = (same and np.array_equal(read["ours"][0], fitted["cat_item"].transform(read["theirs"][0]))
                and np.array_equal(read["ours"][1], read["theirs"][1]))
    results["windows"] = (outside == 0 and variants == 0,
                          f"{variants} keys with differing windows, {outside} windows outside their timeline")
    lengths = keys["theirs"]["history_length"].to_numpy()
    results["histories"] = (bool(same), f"{len(lengths):,} (customer, day) keys against our {len(keys['ours']):,}; "
                            f"keys {'equal' if same_keys else 'DIFFER'}; mean length "
                            f"{lengths.mean() if len(lengths) else 0:.1f}, max {lengths.max(initial=0)}")

    def flat(table):
        table = table.sort_by("customer_id")
        return (table["customer_id"].to_numpy(), pc.list_value_length(table["actions"]).to_numpy(),
                pc.list_flatten(table["action_types"]).to_numpy(), pc.list_flatten(table["actions"]).to_numpy())
    ours_flat, theirs_flat = flat(ours_timelines), flat(theirs["timelines"])
    theirs_flat = (*theirs_flat[:3], fitted["cat_item"].transform(theirs_flat[3]))
    identical = all(len(a) == len(b) and np.array_equal(a, b) for a, b in zip(ours_flat, theirs_flat))
    results["timelines"] = (None, f"{theirs['timelines'].num_rows:,} customers, {len(theirs_flat[3]):,} actions, "
                            f"against our {ours_timelines.num_rows:,} and {len(ours_flat[3]):,}: "
                            f"{'the same' if identical else 'cut otherwise (allowed)'}")
    return results


def report(out, raw, data, results):
    """Print one line per check (ok None: for information); whether all agree."""
    print(f"checking {out} (made from {raw}) against {data}")
    for name, (ok, detail) in results.items():
        print(f"  {name:<10} {'info' if ok is None else 'ok' if ok else 'DIFFERS'}: {detail}")
    return all(ok is not False for ok, _ in results.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("raw", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--layout", choices=("wide", "timeline"), default="wide", help="the layout OUT holds")
    parser.add_argument("--max-history", type=int, default=1000)
    args = parser.parse_args()
    if args.layout == "timeline":
        ok = report(args.out, args.raw, args.data, check_timeline(args.out, args.data))
    else:
        ok = check(args.raw, args.out, args.data, args.max_history)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
