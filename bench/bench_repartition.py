"""Benchmark repartition.py: rows per second, peak memory and the row-group sizes it achieves.

    .venv/bin/python bench/bench_repartition.py --customers 50000 --actions-per-customer 100 --buckets 2

Reuses --work's generated raw data and merged/ when present (bench_merge_and_clean.py
makes them), then runs repartition.py as a user would and saves
bench/results/repartition.json.
"""

import argparse
import json
from pathlib import Path

from measure import add_data_arguments, ensure_raw, ensure_stage, run_stage, save_report


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--buckets", type=int, default=16)
    parser.add_argument("--row-group-mb", type=float, default=64)
    args = parser.parse_args()
    raw, parameters = ensure_raw(args)
    data = Path(args.work) / "data"
    ensure_stage(args, "merged", ["merge_and_clean.py", "--raw", raw, "--data", data])

    result = run_stage(["repartition.py", "--data", data, "--buckets", args.buckets,
                        "--row-group-mb", args.row_group_mb])
    manifest = json.loads((data / "repartitioned" / "_stage.json").read_text())
    rows = sum(counts["rows_in"] for counts in manifest["accounting"].values())
    save_report("repartition", {
        "parameters": {**parameters, "buckets": args.buckets, "row_group_mb": args.row_group_mb},
        "rows": rows,
        "bytes_written": sum(table["bytes"] for table in manifest["tables"].values()),
        "script_seconds": round(result["seconds"], 1),
        "stage_seconds": manifest["seconds"],
        "rows_per_second": round(rows / result["seconds"]),
        "peak_rss_gib_all_processes": round(result["peak_rss_bytes"] / 2**30, 2),
        "peak_rss_gib_largest_process": round(result["peak_process_rss_bytes"] / 2**30, 2),
        "row_group_mib_in_memory": manifest["row_group_mib_in_memory"],
    })


if __name__ == "__main__":
    main()
