"""Benchmark merge_and_clean.py: raw rows per second and peak memory, on generated data.

    .venv/bin/python bench/bench_merge_and_clean.py --customers 50000 --actions-per-customer 100

Generates raw data with generate_data.py into --work (reused when its parameters
match), runs merge_and_clean.py on it as a user would (LocalCluster defaults), and
prints and saves (bench/results/merge_and_clean.json) the figures docs/benchmarks.md quotes.
"""

import argparse
import json
from pathlib import Path

from measure import add_data_arguments, ensure_raw, run_stage, save_report


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    args = parser.parse_args()
    raw, parameters = ensure_raw(args)
    data = Path(args.work) / "data"

    result = run_stage(["merge_and_clean.py", "--raw", raw, "--data", data])
    manifest = json.loads((data / "merged" / "_stage.json").read_text())
    accounting = manifest["accounting"]
    action_rows = sum(accounting[s]["rows_in"] for s in ("clicks", "add_to_carts", "previous_orders"))
    raw_rows = action_rows + accounting["impressions.rankings"]["rows_in"]
    save_report("merge_and_clean", {
        "parameters": parameters,
        "raw_bytes": manifest["inputs"][0]["bytes"],
        "raw_rows": raw_rows,
        "action_rows": action_rows,
        "ranking_rows": accounting["impressions.rankings"]["rows_in"],
        "shown_items_written": accounting["impressions.shown_items"]["kept"],
        "script_seconds": round(result["seconds"], 1),
        "stage_seconds": manifest["seconds"],
        "raw_rows_per_second": round(raw_rows / result["seconds"]),
        "peak_rss_gib_all_processes": round(result["peak_rss_bytes"] / 2**30, 2),
        "peak_rss_gib_largest_process": round(result["peak_process_rss_bytes"] / 2**30, 2),
    })


if __name__ == "__main__":
    main()
