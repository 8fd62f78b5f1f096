"""Benchmark merge_and_clean.py on one large uncompressed JSON Lines file: is it read by every worker?

    .venv/bin/python bench/bench_large_file.py --gib 1

Builds a raw folder whose clicks/ is a single file of about --gib GiB (the generated clicks of
bench_merge_and_clean.py's data, decompressed and repeated), with that data's other sources beside
it, runs merge_and_clean.py on it as a user would (LocalCluster defaults), and prints and saves
(bench/results/large_file.json) the ranges, the workers that read them, the time and the memory.
"""

import argparse
import gzip
import json
import re
import shutil
from pathlib import Path

from measure import add_data_arguments, ensure_raw, run_stage, save_report


def build_large_raw(raw, large, gib):
    """`large`/: `raw`'s impressions, add-to-carts and orders, and one clicks file of about `gib` GiB."""
    if large.exists():
        shutil.rmtree(large)
    for source in ("impressions", "add_to_carts", "previous_orders"):
        shutil.copytree(raw / source, large / source)
    clicks = b"".join(gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
                      for path in sorted((raw / "clicks").iterdir()))
    if not clicks.endswith(b"\n"):
        clicks += b"\n"
    (large / "clicks").mkdir(parents=True)
    with open(large / "clicks" / "all.jsonl", "wb") as out:
        written = 0
        while written < gib * 2**30:
            out.write(clicks)
            written += len(clicks)
    return written


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.add_argument("--gib", type=float, default=1.0, help="size of the clicks file (default: 1)")
    args = parser.parse_args()
    raw, parameters = ensure_raw(args)
    large, data = Path(args.work) / "raw-large", Path(args.work) / "data-large"
    clicks_bytes = build_large_raw(raw, large, args.gib)
    result = run_stage(["merge_and_clean.py", "--raw", large, "--data", data])
    ranges = re.search(r"reading 1 large file in (\d+) ranges", result["output"])
    workers = re.search(r"ranges were read by (\d+) worker", result["output"])
    manifest = json.loads((data / "merged" / "_stage.json").read_text())
    accounting = manifest["accounting"]
    rows = sum(accounting[s]["rows_in"] for s in ("clicks", "add_to_carts", "previous_orders"))
    rows += accounting["impressions.rankings"]["rows_in"]
    save_report("large_file", {
        "parameters": {**parameters, "gib": args.gib},
        "clicks_file_bytes": clicks_bytes,
        "ranges": int(ranges.group(1)) if ranges else None,
        "workers_reading_ranges": int(workers.group(1)) if workers else None,
        "raw_rows": rows,
        "script_seconds": round(result["seconds"], 1),
        "raw_rows_per_second": round(rows / result["seconds"]),
        "peak_rss_gib_all_processes": round(result["peak_rss_bytes"] / 2**30, 2),
        "peak_rss_gib_largest_process": round(result["peak_process_rss_bytes"] / 2**30, 2),
    })
    shutil.rmtree(large)
    shutil.rmtree(data)


if __name__ == "__main__":
    main()
