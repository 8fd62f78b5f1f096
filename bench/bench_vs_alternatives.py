"""Our pipeline against the same job written by others, on the same raw files, at one or more scales.

    .venv/bin/pip install -r bench/requirements.txt
    .venv/bin/python bench/bench_vs_alternatives.py                            # 5.5M actions
    .venv/bin/python bench/bench_vs_alternatives.py --actions 5.5M 20M 100M    # the scale run, with a plot
    .venv/bin/python bench/bench_vs_alternatives.py --peers textbook --actions 2.5M 5M 10M

--peers timeline (the default): peers a skilled engineer would write on one machine. For each scale it
1. generates raw data with generate_data.py into WORK-<actions>/data/raw (--actions /
   --actions-per-customer customers; reused when data of the same parameters is already there);
   a generator that fails (out of memory) is recorded, and the scale skipped;
2. runs, one after another, each in its own process tree, measured (wall time, peak RSS summed over
   the tree; bench/measure.py):
   - ours, as a user runs it: `merge_and_clean.py --data D`, then repartition.py, parse_ua_strings.py
     and preprocess.py (the timeline layout), each its own process with default flags
     (--preprocessors D/preprocessors, so that the repository's preprocessors/ is left alone);
   - bench/duckdb_timeline.py (an ASOF join, --threads) and bench/polars_timeline.py (streaming
     engine, join_asof, --threads): raw files in, the same timeline layout out;
   a run that fails (out of memory) is recorded with its exit status, not raised;
3. checks each peer's examples and histories against ours on every key, in a child process
   (bench/check_alternative.py --layout timeline);
4. prints a table (ours stage by stage) and saves bench/results/vs_peers.json and
   bench/results/vs_peers.png (time and peak memory against the number of actions).

--peers textbook: the older comparison, one training row per shown item with its 1000-long,
0-padded history out, partitioned by day: `pipeline.py run --layout wide` against
bench/spark_pipeline.py (a PySpark window-function pipeline, local[2]) and bench/duckdb_pipeline.py
(one DuckDB SQL script, a window query); checks that the three give the same history for every
(day, customer) and the same rows per day; saves bench/results/vs_alternatives.json (and .png with
several scales). Its default is 5M actions, about 11 minutes.
"""

import argparse
import json
import multiprocessing
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from check_alternative import check_timeline
from measure import ROOT, ensure_raw, run_measured, save_report

sys.path.insert(0, str(ROOT))
from recpipe import encoders  # noqa: E402  (the repository root is not on the path of a bench/ script)

SYSTEMS = ("ours", "spark", "duckdb")
STAGES = ("merge_and_clean.py", "repartition.py", "parse_ua_strings.py", "preprocess.py")
PEERS = {"duckdb_timeline": "bench/duckdb_timeline.py", "polars_timeline": "bench/polars_timeline.py"}


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


def run_textbook(args, actions):
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


def measured(name, command):
    """Run one command in its own process tree; its seconds and peak memory, and how it failed if it did."""
    command = [str(part) for part in command]
    print(f"\n##### {name}: {' '.join(command)}", flush=True)
    result = run_measured(command, cwd=ROOT)
    record = {"seconds": round(result["seconds"], 1), "peak_rss_gib": round(result["peak_rss_bytes"] / 2**30, 2),
              "peak_process_rss_gib": round(result["peak_process_rss_bytes"] / 2**30, 2),
              "returncode": result["returncode"]}
    if result["returncode"] != 0:  # -9: killed, most often by the kernel for memory
        record["failure"] = result["output"].strip().splitlines()[-5:]
    return record


def generated(args, data, actions):
    """Generate raw data into DATA/raw unless data of the same parameters is there: (raw, parameters, record)."""
    raw = data / "raw"
    wanted = {"customers": max(1, actions // args.actions_per_customer), "items": args.items, "days": args.days,
              "actions_per_customer": args.actions_per_customer, "seed": args.seed}
    recorded = raw / "_generated.json"
    if recorded.exists() and json.loads(recorded.read_text())["parameters"].items() >= wanted.items():
        return raw, wanted, {"reused": True}
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in wanted.items()]
    return raw, wanted, measured("generate_data.py", [sys.executable, "generate_data.py", "--out", raw, *flags])


def run_timeline(args, actions):
    """One scale of --peers timeline: generate, ours stage by stage, each peer, the exactness check."""
    work = Path(f"{args.work}-{actions}")
    data = work / "data"
    raw, parameters, generation = generated(args, data, actions)
    run = {"actions": actions, "parameters": parameters, "generate": generation, "stages": {}, "systems": {}}
    if generation.get("returncode", 0) != 0:
        return run
    expected = json.loads((raw / "_generated.json").read_text())["expected"]
    run.update(raw_action_rows=sum(expected[source]["rows_in"] for source in ("clicks", "add_to_carts",
                                                                                "previous_orders")),
               raw_shown_items=expected["impressions"]["shown_items_in"],
               raw_bytes=sum(path.stat().st_size for path in raw.rglob("*") if path.is_file()))
    for folder in ("merged", "repartitioned", "cleaned", "processed", "preprocessors"):
        shutil.rmtree(data / folder, ignore_errors=True)  # every run starts from the raw files
    for stage in STAGES:
        extra = ["--preprocessors", data / "preprocessors"] if stage == "preprocess.py" else []
        run["stages"][stage] = measured(stage, [sys.executable, stage, "--data", data, *extra])
        if run["stages"][stage]["returncode"] != 0:
            break
    ours_ok = len(run["stages"]) == len(STAGES) and all(s["returncode"] == 0 for s in run["stages"].values())
    run["systems"]["ours"] = {"seconds": round(sum(s["seconds"] for s in run["stages"].values()), 1),
                              "peak_rss_gib": max(s["peak_rss_gib"] for s in run["stages"].values()),
                              "peak_process_rss_gib": max(s["peak_process_rss_gib"] for s in run["stages"].values()),
                              "returncode": 0 if ours_ok else 1}
    for peer, script in PEERS.items():
        shutil.rmtree(work / peer, ignore_errors=True)
        run["systems"][peer] = measured(peer, [sys.executable, script, raw, work / peer, "--threads", args.threads])
        if ours_ok and run["systems"][peer]["returncode"] == 0:
            results = checked_apart(work / peer, data)
            run["systems"][peer]["exact"] = all(ok is not False for ok, _ in results.values())
            run["systems"][peer]["check"] = {name: detail for name, (_, detail) in results.items()}
            print(f"{peer} against ours: " + "; ".join(f"{name} {'ok' if ok else 'info' if ok is None else 'DIFFERS'}"
                                                    for name, (ok, _) in results.items()), flush=True)
    return run


def checked_apart(out, data):
    """check_timeline in a child process, so that the tables it loads (7.5 GiB at 100 M actions) are given back
    to the system before the next peer runs, instead of staying in this process and starving that peer."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(check_timeline, out, data).result()


def print_peers_table(runs):
    print(f"\n{'actions':>12} {'system':<22}{'seconds':>10}{'peak GiB':>10}{'largest proc GiB':>18}"
          f"{'time / ours':>13}{'exact':>7}")
    for run in runs:
        if "returncode" in run["generate"] and run["generate"]["returncode"] != 0:
            print(f"{run['actions']:>12,} generate_data.py failed with status {run['generate']['returncode']}")
            continue
        ours = max(run["systems"]["ours"]["seconds"], 0.1)
        rows = [(f"  {stage}", stage_run, "") for stage, stage_run in run["stages"].items()]
        rows += [(system, record, record.get("exact", "")) for system, record in run["systems"].items()]
        for name, record, exact in rows:
            status = "" if record["returncode"] == 0 else f"  failed ({record['returncode']})"
            print(f"{run['actions']:>12,} {name:<22}{record['seconds']:>10.1f}{record['peak_rss_gib']:>10.2f}"
                  f"{record['peak_process_rss_gib']:>18.2f}{record['seconds'] / ours:>12.2f}x"
                  f"{({True: 'yes', False: 'NO'}.get(exact, '')):>7}{status}")


def print_table(runs):
    print(f"\n{'actions':>12} {'system':<8}{'seconds':>10}{'peak GiB':>10}{'largest proc GiB':>18}"
          f"{'time / ours':>13}{'agree':>7}")
    for run in runs:
        ours = run["systems"]["ours"]["seconds"]
        for system, measured in run["systems"].items():
            print(f"{run['actions']:>12,} {system:<8}{measured['seconds']:>10.1f}{measured['peak_rss_gib']:>10.2f}"
                  f"{measured['peak_process_rss_gib']:>18.2f}{measured['seconds'] / ours:>12.2f}x"
                  f"{'yes' if run['histories_agree'] else 'NO':>7}")


def plot(runs, path, systems=SYSTEMS, title="end to end, raw to padded rows"):
    """Time and peak memory against actions, one line per system; a failed run is left out of its line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, (times, memory) = plt.subplots(1, 2, figsize=(10, 4))
    generated = [run for run in runs if run["generate"].get("returncode", 0) == 0] if "generate" in runs[0] else runs
    for system in systems:
        done = [run for run in generated if run["systems"].get(system, {}).get("returncode", 0) == 0
                and system in run["systems"]]
        failed = [f"{run['actions'] / 1e6:g}M" for run in generated if run not in done]
        label = system + (f" (failed at {', '.join(failed)})" if failed else "")
        actions = [run.get("raw_action_rows", run["actions"]) / 1e6 for run in done]  # as generated, bad rows too
        times.plot(actions, [run["systems"][system]["seconds"] for run in done], "o-", label=label)
        memory.plot(actions, [run["systems"][system]["peak_rss_gib"] for run in done], "o-", label=label)
    if len(generated) < len(runs):
        figure.suptitle("generate_data.py failed at " + ", ".join(f"{run['actions'] / 1e6:g}M" for run in runs
                                                                  if run not in generated))
    times.set(xlabel="raw action rows (millions)", ylabel="wall time (s)", title=title)
    memory.set(xlabel="raw action rows (millions)", ylabel="peak RSS, whole process tree (GiB)", title="peak memory")
    for axes in (times, memory):
        axes.set_ylim(bottom=0)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", choices=("timeline", "textbook"), default="timeline",
                        help="timeline: skilled one-machine DuckDB and Polars scripts against our four scripts; "
                             "textbook: PySpark and DuckDB window queries against `pipeline.py run --layout wide`")
    parser.add_argument("--actions", type=count, nargs="+",
                        help="actions to generate, one run per value (default 5.5M for timeline, 5M for textbook)")
    parser.add_argument("--actions-per-customer", type=int, default=100)
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--days", type=int, default=18)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2,
                        help="cores each system may use (timeline: each peer's; ours runs with its defaults, "
                             "a LocalCluster sized to the machine)")
    parser.add_argument("--work", default="/tmp/recpipe-vs", help="raw data and outputs go to WORK-<actions>/")
    args = parser.parse_args()
    if args.peers == "timeline":
        return main_timeline(args)

    runs = []
    for actions in args.actions or [count("5M")]:
        runs.append({"actions": actions, **run_textbook(args, actions)})
        print_table(runs)
    save_report("vs_alternatives", {"command": " ".join(sys.argv), "runs": runs})
    if len(runs) > 1:
        plot(runs, ROOT / "bench" / "results" / "vs_alternatives.png")
    if not all(run["histories_agree"] for run in runs):
        raise SystemExit("the systems' histories disagree: see agreement in bench/results/vs_alternatives.json")


def main_timeline(args):
    runs = []
    for actions in args.actions or [count("5.5M")]:
        runs.append(run_timeline(args, actions))
        print_peers_table(runs)
        save_report("vs_peers", {"command": " ".join(sys.argv), "cpus": os.cpu_count(), "runs": runs})
    plot(runs, ROOT / "bench" / "results" / "vs_peers.png",
         systems=("ours", *PEERS), title="raw files to the timeline layout")
    if not all(record.get("exact", True) for run in runs for record in run["systems"].values()):
        raise SystemExit("a peer's output differs from ours: see check in bench/results/vs_peers.json")


if __name__ == "__main__":
    main()
