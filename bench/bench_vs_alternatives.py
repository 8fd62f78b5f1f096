"""Our pipeline against the same job in PySpark and in DuckDB, on the same raw files, at one or more scales.

    .venv/bin/pip install -r bench/requirements.txt
    .venv/bin/python bench/bench_vs_alternatives.py                          # 5M actions, ~11 minutes
    .venv/bin/python bench/bench_vs_alternatives.py --actions 2.5M 5M 10M    # the scale run, with a plot

The job: raw files in (generate_data.py's, 2% bad rows planted), one training row per shown
item with its 1000-long, 0-padded history out, partitioned by day. For each scale it

1. generates raw data with generate_data.py (--actions / --actions-per-customer customers;
   reused when data of the same parameters is already under --work);
2. runs, each in its own process tree, measured (wall time, peak RSS summed over the tree):
   - ours: `pipeline.py run --layout wide` (the four ETL stages, a LocalCluster of 2 workers);
   - bench/spark_pipeline.py: a PySpark window-function pipeline (local[2]);
   - bench/duckdb_pipeline.py: one DuckDB SQL script (2 threads);
3. checks that the three give the same history (items and action types, in order) for
   every (day, customer), and the same number of rows per day;
4. prints one table and saves bench/results/vs_alternatives.json (and, with several scales,
   bench/results/vs_alternatives.png: time and peak memory against the number of actions).
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from measure import ROOT, ensure_raw, run_measured, save_report

sys.path.insert(0, str(ROOT))
from recpipe import encoders  # noqa: E402  (the repository root is not on the path of a bench/ script)

SYSTEMS = ("ours", "spark", "duckdb")


def count(text):
    """5M, 10M, 2.5M, 500k, 200000 -> an int."""
    text = text.strip().lower()
    scale = {"k": 10**3, "m": 10**6}.get(text[-1], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def commands(raw, work, threads):
    data = work / "ours"
    return {
        "ours": [sys.executable, "pipeline.py", "run", "--raw", raw, "--data", data,
                 "--preprocessors", data / "preprocessors", "--layout", "wide", "--workers", threads],
        "spark": [sys.executable, "bench/spark_pipeline.py", raw, work / "spark", "--cores", threads],
        "duckdb": [sys.executable, "bench/duckdb_pipeline.py", raw, work / "duckdb", "--threads", threads],
    }


def day_folders(system, work):
    """{day: folder of that day's files} for one system's output."""
    if system == "ours":
        folders = (work / "ours" / "processed").glob("*/dt=*")
    else:
        folders = (work / system).glob("dt=*")
    return {folder.name[3:]: folder for folder in sorted(folders)}


def day_histories(folder, item_encoder=None):
    """A day's histories, one per customer, sorted by customer: (customer ids, lengths, items, action types).

    Rows of the same customer and day share one history; the padding (0) is cut off. Raw
    item ids (the alternatives') go through our fitted encoder, so they compare with ours.
    """
    table = ds.dataset(folder, format="parquet").to_table(columns=["customer_id", "actions", "action_types"])
    customers = table.column("customer_id").to_numpy()
    order = np.argsort(customers, kind="stable")
    unique, first = np.unique(customers[order], return_index=True)
    rows = pa.array(order[first])
    width = table.schema.field("actions").type.list_size if pa.types.is_fixed_size_list(
        table.schema.field("actions").type) else None

    def padded(name, dtype):
        lists = table.column(name).take(rows).combine_chunks()
        values = pc.list_flatten(lists).to_numpy(zero_copy_only=False).astype(dtype)
        return values.reshape(len(unique), width or (len(values) // max(len(unique), 1)))

    items, types = padded("actions", np.int64), padded("action_types", np.int8)
    kept = items != 0
    items = items[kept]
    if item_encoder is not None:
        items = item_encoder.transform(items)
    return unique, kept.sum(axis=1), items, types[kept], table.num_rows


def histories_agree(work):
    """Whether every system has the same days, rows per day, and history for every (day, customer)."""
    item_encoder = encoders.load(work / "ours" / "processed" / encoders.FITTED)[0]["cat_item"]
    days = {system: day_folders(system, work) for system in SYSTEMS}
    report = {"days": len(days["ours"]), "disagreements": []}
    if any(days[system].keys() != days["ours"].keys() for system in SYSTEMS):
        report["disagreements"].append({system: sorted(days[system]) for system in SYSTEMS})
        return report
    for day, folder in days["ours"].items():
        ours = day_histories(folder)
        for system in ("spark", "duckdb"):
            theirs = day_histories(days[system][day], item_encoder)
            if not all(np.array_equal(a, b) for a, b in zip(ours, theirs)):
                report["disagreements"].append({"day": day, "system": system, "rows": [ours[4], theirs[4]],
                                                "customers": [len(ours[0]), len(theirs[0])]})
    return report


def run_scale(args, actions):
    customers = max(1, actions // args.actions_per_customer)
    work = Path(f"{args.work}-{actions}")
    scaled = argparse.Namespace(customers=customers, items=args.items, days=args.days,
                                actions_per_customer=args.actions_per_customer, seed=args.seed, work=work)
    raw, parameters = ensure_raw(scaled)
    measured = {}
    for system, command in commands(raw, work, str(args.threads)).items():
        shutil.rmtree(work / system, ignore_errors=True)  # every system starts from the raw files
        print(f"\n##### {system}: {' '.join(map(str, command))}", flush=True)
        result = run_measured([str(part) for part in command], cwd=ROOT)
        if result["returncode"] != 0:
            raise SystemExit(f"{system} failed with status {result['returncode']}")
        measured[system] = {"seconds": round(result["seconds"], 1),
                            "peak_rss_gib": round(result["peak_rss_bytes"] / 2**30, 2),
                            "peak_process_rss_gib": round(result["peak_process_rss_bytes"] / 2**30, 2)}
    agreement = histories_agree(work)
    expected = json.loads((raw / "_generated.json").read_text())["expected"]
    return {"raw_action_rows": sum(expected[source]["rows_in"] for source in ("clicks", "add_to_carts",
                                                                             "previous_orders")),
            "raw_shown_items": expected["impressions"]["shown_items_in"],
            "raw_bytes": sum(path.stat().st_size for path in raw.rglob("*") if path.is_file()),
            "parameters": parameters, "systems": measured,
            "spark_over_ours_time": round(measured["spark"]["seconds"] / measured["ours"]["seconds"], 2),
            "duckdb_over_ours_time": round(measured["duckdb"]["seconds"] / measured["ours"]["seconds"], 2),
            "histories_agree": not agreement["disagreements"], "agreement": agreement}


def print_table(runs):
    print(f"\n{'actions':>12} {'system':<8}{'seconds':>10}{'peak GiB':>10}{'largest proc GiB':>18}"
          f"{'time / ours':>13}{'agree':>7}")
    for run in runs:
        ours = run["systems"]["ours"]["seconds"]
        for system, measured in run["systems"].items():
            print(f"{run['actions']:>12,} {system:<8}{measured['seconds']:>10.1f}{measured['peak_rss_gib']:>10.2f}"
                  f"{measured['peak_process_rss_gib']:>18.2f}{measured['seconds'] / ours:>12.2f}x"
                  f"{'yes' if run['histories_agree'] else 'NO':>7}")


def plot(runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (times, memory) = plt.subplots(1, 2, figsize=(10, 4))
    actions = [run["actions"] / 1e6 for run in runs]
    for system in SYSTEMS:
        times.plot(actions, [run["systems"][system]["seconds"] for run in runs], "o-", label=system)
        memory.plot(actions, [run["systems"][system]["peak_rss_gib"] for run in runs], "o-", label=system)
    times.set(xlabel="actions (millions)", ylabel="wall time (s)", title="end to end, raw to padded rows")
    memory.set(xlabel="actions (millions)", ylabel="peak RSS, whole process tree (GiB)", title="peak memory")
    for axes in (times, memory):
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--actions", type=count, nargs="+", default=[count("5M")],
                        help="actions to generate, one run per value (2.5M 5M 10M)")
    parser.add_argument("--actions-per-customer", type=int, default=100)
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--days", type=int, default=18)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="cores each system may use")
    parser.add_argument("--work", default="/tmp/recpipe-vs", help="raw data and outputs go to WORK-<actions>/")
    args = parser.parse_args()

    runs = []
    for actions in args.actions:
        runs.append({"actions": actions, **run_scale(args, actions)})
        print_table(runs)
    save_report("vs_alternatives", {"command": " ".join(sys.argv), "runs": runs})
    if len(runs) > 1:
        plot(runs, ROOT / "bench" / "results" / "vs_alternatives.png")
    if not all(run["histories_agree"] for run in runs):
        raise SystemExit("the systems' histories disagree: see agreement in bench/results/vs_alternatives.json")


if __name__ == "__main__":
    main()
