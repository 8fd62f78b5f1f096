"""Benchmark repartition.py: rows per second, peak memory, the buckets it chose and the row-group sizes it achieves.

    .venv/bin/python bench/bench_repartition.py --customers 50000 --actions-per-customer 100 --runs 3
    .venv/bin/python bench/bench_repartition.py --runs 3 --against /tmp/older-checkout

Reuses --work's generated raw data and merged/ when present (bench_merge_and_clean.py
makes them), then runs repartition.py as a user would, --runs times, and saves
bench/results/repartition.json. Without --buckets the stage derives them, as it does for a
user. --against CHECKOUT runs that checkout's repartition.py too, on a copy of the same
merged/, alternately with this one's (this machine's speed drifts within minutes), and
records both and whether their outputs are the same bytes (output_sha256).
"""

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

from measure import ROOT, add_data_arguments, ensure_raw, ensure_stage, run_measured, save_report


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--buckets", type=int, default=None, help="default: what the stage derives")
    parser.add_argument("--row-group-mb", type=float, default=64)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--against", type=Path, default=None, help="another checkout to time alternately")
    args = parser.parse_args()
    raw, parameters = ensure_raw(args)
    data = Path(args.work) / "data"
    ensure_stage(args, "merged", ["merge_and_clean.py", "--raw", raw, "--data", data])
    checkouts = {"this": (ROOT, data)}
    if args.against:
        other = Path(args.work) / "against"
        shutil.rmtree(other, ignore_errors=True)
        shutil.copytree(data / "merged", other / "merged")
        checkouts["against"] = (args.against.resolve(), other)

    flags = ["--row-group-mb", args.row_group_mb] + (["--buckets", args.buckets] if args.buckets else [])
    runs = {name: [] for name in checkouts}
    for _ in range(args.runs):
        for name, (checkout, folder) in checkouts.items():
            result = run_measured([sys.executable, *map(str, [checkout / "repartition.py", "--data", folder, *flags])],
                                  cwd=checkout)
            if result["returncode"] != 0:
                raise SystemExit(f"{checkout / 'repartition.py'} failed with status {result['returncode']}")
            manifest = json.loads((folder / "repartitioned" / "_stage.json").read_text())
            runs[name].append({"script_seconds": round(result["seconds"], 2), "stage_seconds": manifest["seconds"],
                               "peak_rss_gib_all_processes": round(result["peak_rss_bytes"] / 2**30, 2),
                               "peak_rss_gib_largest_process": round(result["peak_process_rss_bytes"] / 2**30, 2)})

    manifest = json.loads((data / "repartitioned" / "_stage.json").read_text())
    rows = sum(counts["rows_in"] for counts in manifest["accounting"].values())
    median = statistics.median(run["script_seconds"] for run in runs["this"])
    report = {
        "parameters": {**parameters, "buckets": args.buckets, "row_group_mb": args.row_group_mb},
        "buckets_chosen": manifest.get("buckets_chosen", {"buckets": manifest["parameters"]["buckets"]}),
        "rows": rows,
        "bytes_written": sum(table["bytes"] for table in manifest["tables"].values()),
        "script_seconds_median": median,
        "rows_per_second": round(rows / median),
        "runs": runs["this"],
        "row_group_mib_in_memory": manifest["row_group_mib_in_memory"],
    }
    if args.against:
        theirs = json.loads((checkouts["against"][1] / "repartitioned" / "_stage.json").read_text())
        report["against"] = {"checkout": str(args.against), "runs": runs["against"],
                             "script_seconds_median": statistics.median(run["script_seconds"]
                                                                        for run in runs["against"]),
                             "same_output_sha256": theirs["output_sha256"] == manifest["output_sha256"]}
    save_report("repartition", report)


if __name__ == "__main__":
    main()
