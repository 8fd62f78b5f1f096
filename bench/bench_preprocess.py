"""Benchmark preprocess.py: its three layouts against each other, at a scale and at twice that scale,
and its histories against the same histories in DuckDB.

    .venv/bin/python bench/bench_preprocess.py --customers 200000 --actions-per-customer 100 --scales 1 \
        --report preprocess_layouts
    .venv/bin/pip install -r bench/requirements.txt       # DuckDB, for the comparison below
    .venv/bin/python bench/bench_preprocess.py --customers 200000 --actions-per-customer 100 --scales 1 2 \
        --layouts compact

For each scale (a multiple of --customers), prepares cleaned/ with the pipeline's own
stages (reused when present), then for each of --layouts (default: timeline, compact, wide)
measures preprocess.py --layout (wall time, peak memory of all processes and of the largest
single process: a worker), the bytes of processed/ and the history entries it stores per
example. When DuckDB is installed and the compact layout is among them, it also runs
bench/duckdb_histories.py (the SQL window-function version of the history computation, on
the same cleaned/ Parquet, in its own process) against bench/histories_only.py (our history
computation alone, same input and output as the query), and checks that both give the same
history lengths and action types for every (customer, day). Saves bench/results/preprocess.json.
"""

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from measure import ROOT, add_data_arguments, ensure_raw, ensure_stage, run_measured, run_stage, save_report

sys.path.insert(0, str(ROOT))
from recpipe import encoders  # noqa: E402  (the repository root is not on the path of a bench/ script)


def prepare(args, customers):
    scaled = argparse.Namespace(**{**vars(args), "customers": customers,
                                   "work": f"{args.work}-{customers}"})
    raw, parameters = ensure_raw(scaled)
    data = Path(scaled.work) / "data"
    ensure_stage(scaled, "merged", ["merge_and_clean.py", "--raw", raw, "--data", data])
    ensure_stage(scaled, "repartitioned", ["repartition.py", "--data", data, "--buckets", args.buckets])
    ensure_stage(scaled, "cleaned", ["parse_ua_strings.py", "--data", data])
    return data, parameters


def histories_agree(processed, duckdb_file):
    """Same (customer, day) keys and, per key, the same items and action types in the same order.

    Our items are encoded; DuckDB's raw ids go through the same fitted encoder first.
    Both sides are sorted by key and compared as flat arrays (no loop over rows).
    """
    def sorted_by_key(table):
        table = table.set_column(table.schema.get_field_index("dt"), "dt", pc.cast(table.column("dt"), pa.string()))
        return table.sort_by([("customer_id", "ascending"), ("dt", "ascending")])

    columns = ["customer_id", "dt", "actions", "action_types"]
    ours = sorted_by_key(pa.concat_tables([
        ds.dataset(processed / split / "histories", format="parquet", partitioning="hive").to_table(columns=columns)
        .cast(pa.schema([("customer_id", pa.int64()), ("dt", pa.string()), ("actions", pa.list_(pa.int64())),
                         ("action_types", pa.list_(pa.int8()))]))
        for split in ("train", "val", "test")]))
    theirs = sorted_by_key(ds.dataset(duckdb_file).to_table(columns=columns))
    item_encoder = encoders.load(processed / encoders.FITTED)[0]["cat_item"]

    def flat(table, name):
        return pc.list_flatten(table.column(name)).to_numpy()

    return (ours.num_rows == theirs.num_rows
            and ours.column("customer_id").equals(theirs.column("customer_id"))
            and ours.column("dt").equals(theirs.column("dt"))
            and pc.list_value_length(ours.column("actions")).equals(pc.list_value_length(theirs.column("actions")))
            and np.array_equal(flat(ours, "action_types"), flat(theirs, "action_types").astype(np.int8))
            and np.array_equal(flat(ours, "actions"), item_encoder.transform(flat(theirs, "actions"))))


def measure_layout(data, layout):
    """preprocess.py --layout `layout` on data/cleaned/: its time, memory, and what it stored."""
    run = run_stage(["preprocess.py", "--data", data, "--preprocessors", data / "preprocessors", "--layout", layout])
    processed = data / "processed"
    manifest = json.loads((processed / "_stage.json").read_text())
    return {"seconds": round(run["seconds"], 1),
            "stage_seconds": manifest["seconds"],
            "histories_and_writing_pass_seconds": float(re.findall(
                rf"computing histories, writing the {layout} layout: \d+/\d+ tasks done \(([\d.]+)s\)",
                run["output"])[-1]),
            "peak_rss_gib_all_processes": round(run["peak_rss_bytes"] / 2**30, 2),
            "peak_rss_gib_largest_process": round(run["peak_process_rss_bytes"] / 2**30, 2),
            "processed_mib": round(sum(path.stat().st_size for path in processed.rglob("*.parquet")) / 2**20, 1),
            "history_entries_per_example": manifest["history_entries_per_example"],
            "examples": sum(manifest["rows_per_split"].values())}


def compare_with_duckdb(data):
    """Our history computation alone and DuckDB's window query on the same cleaned/, and whether they agree
    (with the compact processed/ in data/)."""
    histories_only = run_measured([sys.executable, "bench/histories_only.py", data, data / "histories_only"], cwd=ROOT)
    if histories_only["returncode"] != 0:
        raise SystemExit("bench/histories_only.py failed")
    duckdb_out = data / "duckdb_histories.parquet"
    duckdb = run_measured([sys.executable, "bench/duckdb_histories.py", data, duckdb_out], cwd=ROOT)
    if duckdb["returncode"] != 0:
        raise SystemExit("the DuckDB query failed")
    return {"duckdb_seconds": round(duckdb["seconds"], 1),
            "duckdb_peak_rss_gib": round(duckdb["peak_rss_bytes"] / 2**30, 2),
            "our_histories_only_seconds": round(histories_only["seconds"], 1),
            "our_histories_only_peak_rss_gib_all_processes": round(histories_only["peak_rss_bytes"] / 2**30, 2),
            "duckdb_over_our_histories_only_time": round(duckdb["seconds"] / histories_only["seconds"], 2),
            "histories_agree": histories_agree(data / "processed", duckdb_out)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--buckets", type=int, default=16)
    parser.add_argument("--layouts", nargs="+", default=["timeline", "compact", "wide"],
                        choices=["timeline", "compact", "wide"])
    parser.add_argument("--report", default="preprocess", help="saved as bench/results/REPORT.json")
    args = parser.parse_args()
    with_duckdb = importlib.util.find_spec("duckdb") is not None and "compact" in args.layouts
    if not with_duckdb:
        print("DuckDB is not installed (or the compact layout not asked for): no comparison with it")

    runs = []
    for scale in args.scales:
        data, parameters = prepare(args, args.customers * scale)
        actions = ds.dataset(data / "cleaned" / "actions", format="parquet").count_rows()
        shown = ds.dataset(data / "cleaned" / "impressions", format="parquet").count_rows()
        run = {"scale": scale, "parameters": parameters, "actions": actions, "shown_items": shown, "layouts": {}}
        # The compact layout last: the DuckDB comparison reads its processed/.
        for layout in sorted(args.layouts, key=lambda name: name == "compact"):
            run["layouts"][layout] = measure_layout(data, layout)
        if with_duckdb:
            run.update(compare_with_duckdb(data))
            run["duckdb_over_preprocess_time"] = round(run["duckdb_seconds"] / run["layouts"]["compact"]["seconds"], 2)
        layouts = run["layouts"]
        if "timeline" in layouts and "compact" in layouts:
            run["compact_over_timeline"] = {
                "history_entries_per_example": round(layouts["compact"]["history_entries_per_example"]
                                                     / layouts["timeline"]["history_entries_per_example"], 2),
                "processed_bytes": round(layouts["compact"]["processed_mib"] / layouts["timeline"]["processed_mib"], 2),
                "seconds": round(layouts["compact"]["seconds"] / layouts["timeline"]["seconds"], 2)}
        runs.append(run)
        print(json.dumps(run, indent=2), flush=True)
    if len(runs) > 1:
        for later in runs[1:]:
            later["growth_vs_first"] = {"data": round(later["actions"] / runs[0]["actions"], 2), **{
                f"{layout}_seconds": round(later["layouts"][layout]["seconds"] / runs[0]["layouts"][layout]["seconds"], 2)
                for layout in later["layouts"]}}
    save_report(args.report, {"command": " ".join(["bench/bench_preprocess.py", *sys.argv[1:]]), "runs": runs})


if __name__ == "__main__":
    main()
