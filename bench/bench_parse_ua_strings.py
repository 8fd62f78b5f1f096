"""Benchmark parse_ua_strings.py against the seed approach: pure-Python ua-parser on every row.

    .venv/bin/python bench/bench_parse_ua_strings.py --rows 5000000

Fabricates a published repartitioned/ under --work (reused when its parameters match):
--rows impression rows in --buckets customer buckets (rankings of 10 shown items), whose
user agents follow recpipe.synthetic: a pool of ~3000 distinct strings built from its
templates and version generator, each customer keeping one (a Zipf-like popularity over
the pool), 6% of rankings from a second device, ~3% empty, and 0.05% garbage (random
bytes read as latin-1, or a 10 KB string), each garbage string unique; plus --actions
action rows. Then measures:

  (a) parse_ua_strings.py end to end, as a user runs it (LocalCluster defaults): wall
      seconds and the peak RSS of its process tree (client, scheduler, workers);
  (b) the seed approach: ua_parser's pure-Python BasicResolver over load_builtins()
      (no cache, no native code), parsing every row, timed on a random sample of
      --sample rows and extrapolated to all rows. Parsing only: the seed's reading and
      writing are not counted, so the speed-up is a lower bound;
  (c) for scale, the native resolver applied row by row on the same sample (what the
      Rust resolver alone buys, without parsing each distinct string once).

Prints and saves bench/results/parse_ua_strings.json.
"""

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from measure import run_measured

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ua_parser  # noqa: E402

from recpipe import schemas, stage, tables, user_agents  # noqa: E402
from recpipe.synthetic.user_agents import _UA_TEMPLATES, _ua_values  # noqa: E402
from recpipe.repartition import BUCKET_HASH, bucket_of, bucket_name  # noqa: E402

ITEMS_PER_RANKING = 10
DAYS = 18


def user_agent_pool(rng, target=3000):
    """~`target` distinct real-looking user agents from synthetic's templates, in template weight."""
    weights = np.array([weight for weight, _ in _UA_TEMPLATES])
    pool = []
    for weight, template in _UA_TEMPLATES:
        variants = max(3, round(target * weight / weights.sum()))
        pool.extend(dict.fromkeys(template.format(**_ua_values(rng)) for _ in range(variants)))
    return list(dict.fromkeys(pool))


def fabricate(data_dir, rows, buckets, customers, action_rows, seed):
    """Publish data_dir/repartitioned/ with impressions and actions as described in the docstring."""
    rng = np.random.default_rng(seed)
    pool = user_agent_pool(rng)
    popularity = 1.0 / np.arange(1, len(pool) + 1) ** 1.1
    popularity = rng.permutation(popularity / popularity.sum())  # popular strings anywhere in the pool

    rankings = -(-rows // ITEMS_PER_RANKING)
    activity = rng.lognormal(0.0, 1.5, customers)
    customer = rng.choice(np.arange(1, customers + 1), rankings, p=activity / activity.sum())
    day = rng.integers(0, DAYS, rankings)
    primary = rng.choice(len(pool), customers + 1, p=popularity)  # each customer's usual device
    agent = primary[customer]
    draw = rng.random(rankings)
    second_device = draw < 0.06
    agent[second_device] = rng.choice(len(pool), int(second_device.sum()), p=popularity)
    table = [*pool, ""]
    agent[(draw >= 0.06) & (draw < 0.092)] = len(pool)  # empty (null, empty and blank, stripped upstream)
    for ranking in np.flatnonzero(draw >= 0.9995):
        agent[ranking] = len(table)
        table.append(rng.bytes(int(rng.integers(16, 256))).decode("latin-1") if rng.random() < 0.5
                     else "Mozilla/5.0 (" + "Windows NT 10.0; " * int(rng.integers(590, 700)) + ")")
    table = pa.array(table, pa.string())

    bucket = bucket_of(customer, buckets)
    order = np.lexsort((np.arange(rankings), customer, day, bucket))  # as repartition.py sorts a bucket
    customer, day, agent, bucket = customer[order], day[order], agent[order], bucket[order]
    bounds = np.searchsorted(bucket, np.arange(buckets + 1))
    parameters = {"buckets": buckets, "row_group_mb": 64, "bucket_hash": BUCKET_HASH}
    with stage.publish(data_dir, "repartitioned", parameters, []) as run:
        written = 0
        for number in range(buckets):
            start, stop = bounds[number], bounds[number + 1]
            n = min((stop - start) * ITEMS_PER_RANKING, rows - written)
            of_row = start + np.arange(n) // ITEMS_PER_RANKING
            impressions = pa.table({
                "dt": pa.array((19783 + day[of_row]).astype(np.int32)).cast(pa.date32()),
                "ranking_id": pc.binary_join_element_wise(
                    "r", pa.array(of_row).cast(pa.string()), ""),
                "customer_id": customer[of_row],
                "user_agent": pa.DictionaryArray.from_arrays(pa.array(agent[of_row].astype(np.int32)),
                                                             table).cast(pa.string()),
                "item_id": rng.integers(1, 20_000, n),
                "is_order": rng.random(n) < 0.03,
                "position": (np.arange(n) % ITEMS_PER_RANKING).astype(np.int32),
                "split": pa.array(["train"] * n),
            }, schema=schemas.IMPRESSIONS)
            tables.write_sized(impressions, run.path / "impressions" / bucket_name(number), schemas.IMPRESSIONS, 64)
            written += int(n)
            m = action_rows // buckets
            actions = pa.table({
                "customer_id": np.sort(rng.integers(1, customers + 1, m)),
                "item_id": rng.integers(1, 20_000, m),
                "action_type": pa.array(rng.choice([1, 2, 3], m, p=[0.7, 0.2, 0.1]).astype(np.int8)),
                "occurred_at": pa.array(rng.integers(1_700_000_000, 1_711_000_000, m) * 1_000_000).cast(
                    schemas.TIMESTAMP),
            }, schema=schemas.ACTIONS)
            tables.write_sized(actions, run.path / "actions" / bucket_name(number), schemas.ACTIONS, 64)
        run.accounting = {"impressions": {"rows_in": written, "kept": written},
                          "actions": {"rows_in": m * buckets, "kept": m * buckets}}
        run.extra["fabricated_by"] = {"script": "bench/bench_parse_ua_strings.py", "pool": len(pool)}


def sample_user_agents(repartitioned, size, seed):
    """`size` user agents drawn uniformly from every impression row (so in their real frequency)."""
    files = sorted((repartitioned / "impressions").rglob("*.parquet"))
    agents = pa.concat_tables([pq.read_table(path, columns=["user_agent"]) for path in files]).column("user_agent")
    picks = np.random.default_rng(seed).choice(len(agents), size, replace=False)
    return agents.take(pa.array(picks)).to_pylist(), len(agents)


def time_row_by_row(parser, agents):
    started = time.perf_counter()
    for agent in agents:
        parser.parse(agent)
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5_000_000, help="impression rows")
    parser.add_argument("--buckets", type=int, default=16)
    parser.add_argument("--customers", type=int, default=200_000)
    parser.add_argument("--actions", type=int, default=2_000_000, help="action rows (copied unchanged)")
    parser.add_argument("--sample", type=int, default=20_000, help="rows the seed approach parses")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="/tmp/recpipe-bench-ua", help="where the fabricated stages go")
    args = parser.parse_args()

    data = Path(args.work) / "data"
    wanted = {"rows": args.rows, "buckets": args.buckets, "customers": args.customers, "actions": args.actions,
              "seed": args.seed}
    marker = Path(args.work) / "_fabricated.json"
    if not (data / "repartitioned" / "_stage.json").exists() or not marker.exists() \
            or json.loads(marker.read_text()) != wanted:
        started = time.monotonic()
        fabricate(data, args.rows, args.buckets, args.customers, args.actions, args.seed)
        marker.write_text(json.dumps(wanted))
        print(f"fabricated repartitioned/ in {time.monotonic() - started:.1f}s", flush=True)

    # (a) the stage, end to end
    result = run_measured([sys.executable, "parse_ua_strings.py", "--data", str(data)], cwd=ROOT)
    assert result["returncode"] == 0, "parse_ua_strings.py failed"
    manifest = stage.read_manifest(data / "cleaned")
    rows = manifest["accounting"]["impressions"]["rows_in"]

    # (b) the seed approach, and (c) the native resolver row by row, on the same sample
    sample, total = sample_user_agents(data / "repartitioned", args.sample, args.seed)
    assert total == rows
    seed_parser = ua_parser.Parser(ua_parser.BasicResolver(ua_parser.load_builtins()))
    seed_seconds = time_row_by_row(seed_parser, sample)
    native_parser = ua_parser.Parser(user_agents.resolver())
    native_seconds = time_row_by_row(native_parser, sample)
    seed_extrapolated = seed_seconds / len(sample) * rows
    native_extrapolated = native_seconds / len(sample) * rows

    summary = manifest["user_agents"]
    report = {
        "date": dt.date.today().isoformat(),
        "machine": f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
                   f"{platform.platform()}",
        "parameters": wanted,
        "parser": {key: manifest["parameters"][key] for key in ("ua_parser", "regexes", "resolver")},
        "impression_rows": rows,
        "action_rows": manifest["accounting"]["actions"]["rows_in"],
        "bytes_written": sum(table["bytes"] for table in manifest["tables"].values()),
        "stage": {
            "script_seconds": round(result["seconds"], 1),
            "stage_seconds": manifest["seconds"],
            "rows_per_second": round(rows / result["seconds"]),
            "distinct_per_bucket": summary["distinct"],
            "parsed": summary["parsed"],
            "parse_seconds_summed_over_tasks": summary["parse_seconds"],
            "parsed_per_second_per_core": summary["parsed_per_second"],
            "bots": summary["bots"],
            "missing": summary["missing"],
            "peak_rss_gib_all_processes": round(result["peak_rss_bytes"] / 2**30, 2),
            "peak_rss_gib_largest_process": round(result["peak_process_rss_bytes"] / 2**30, 2),
        },
        "seed_pure_python_row_by_row": {
            "how": f"ua_parser.BasicResolver(load_builtins()), no cache, parse() on each of {len(sample):,} rows "
                   f"sampled uniformly from all rows, one core; extrapolated to {rows:,} rows; parsing only",
            "sample_seconds": round(seed_seconds, 2),
            "us_per_row": round(seed_seconds / len(sample) * 1e6, 1),
            "extrapolated_seconds": round(seed_extrapolated),
        },
        "native_row_by_row": {
            "how": "the same sample through the native resolver, no cache; extrapolated the same way",
            "sample_seconds": round(native_seconds, 2),
            "us_per_row": round(native_seconds / len(sample) * 1e6, 1),
            "extrapolated_seconds": round(native_extrapolated, 1),
        },
        "speedup_vs_seed": round(seed_extrapolated / result["seconds"], 1),
    }
    out = ROOT / "bench" / "results" / "parse_ua_strings.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"\nparse_ua_strings.py: {result['seconds']:.1f}s end to end for {rows:,} rows; the seed approach "
          f"(pure-Python ua-parser on every row) would take ~{seed_extrapolated:,.0f}s "
          f"(extrapolated from {len(sample):,} rows): {report['speedup_vs_seed']}x faster")


if __name__ == "__main__":
    main()
