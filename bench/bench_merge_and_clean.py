"""Benchmark merge_and_clean.py: raw rows per second and peak memory, on generated data.

    .venv/bin/python bench/bench_merge_and_clean.py --customers 50000 --actions-per-customer 100

Generates raw data with generate_data.py into --work (reused when its parameters
match), runs merge_and_clean.py on it as a user would (LocalCluster defaults), and
prints and saves (bench/results/merge_and_clean.json) the figures the README quotes.
"""

import argparse
import datetime as dt
import json
import platform
import sys
from pathlib import Path

import psutil

from measure import run_measured

ROOT = Path(__file__).resolve().parent.parent


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=50000)
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--days", type=int, default=18)
    parser.add_argument("--actions-per-customer", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="/tmp/recpipe-bench", help="where raw data and stage output go")
    args = parser.parse_args()

    work = Path(args.work)
    raw = work / "raw"
    generated = raw / "_generated.json"
    wanted = {"customers": args.customers, "items": args.items, "days": args.days,
              "actions_per_customer": args.actions_per_customer, "seed": args.seed}
    if not generated.exists() or json.loads(generated.read_text())["parameters"] != wanted:
        generation = run_measured([sys.executable, "generate_data.py", "--out", raw,
                                   *[f"--{k.replace('_', '-')}={v}" for k, v in wanted.items()]], cwd=ROOT)
        assert generation["returncode"] == 0, "generate_data.py failed"

    result = run_measured([sys.executable, "merge_and_clean.py", "--raw", raw, "--data", work / "data"], cwd=ROOT)
    assert result["returncode"] == 0, "merge_and_clean.py failed"
    manifest = json.loads((work / "data" / "merged" / "_stage.json").read_text())
    accounting = manifest["accounting"]
    action_rows = sum(accounting[s]["rows_in"] for s in ("clicks", "add_to_carts", "previous_orders"))
    raw_rows = action_rows + accounting["impressions.rankings"]["rows_in"]
    report = {
        "date": dt.date.today().isoformat(),
        "machine": f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.platform()}",
        "parameters": wanted,
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
    }
    out = ROOT / "bench" / "results" / "merge_and_clean.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
