"""Shared by the benchmarks: generated inputs, and a command's wall time and peak memory.

Peak memory is that of the command's whole process tree.

The tree matters: a LocalCluster's workers are child processes, and their memory is
most of a stage's footprint. RSS is sampled every 0.1 s, summed over the tree (peak
of the sum), and also reported per process (the largest single process: a worker).
"""

import datetime as dt
import json
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def run_measured(command, cwd=None, env=None, interval=0.1):
    """Run `command`; return {'seconds', 'peak_rss_bytes', 'peak_process_rss_bytes', 'returncode', 'output'}."""
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks = {"tree": 0, "process": 0}
    done = threading.Event()

    def sample():
        root = psutil.Process(process.pid)
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                rss = []
                for member in tree:
                    try:
                        rss.append(member.memory_info().rss)
                    except psutil.Error:
                        pass
                peaks["tree"] = max(peaks["tree"], sum(rss))
                peaks["process"] = max(peaks["process"], max(rss, default=0))
            except psutil.Error:
                pass
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = []
    for line in process.stdout:
        output.append(line)
        sys.stdout.write(line)
    process.wait()
    done.set()
    sampler.join()
    return {"seconds": time.monotonic() - started, "peak_rss_bytes": peaks["tree"],
            "peak_process_rss_bytes": peaks["process"], "returncode": process.returncode, "output": "".join(output)}


def add_data_arguments(parser):
    parser.add_argument("--customers", type=int, default=50000)
    parser.add_argument("--items", type=int, default=20000)
    parser.add_argument("--days", type=int, default=18)
    parser.add_argument("--actions-per-customer", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="/tmp/recpipe-bench", help="where raw data and stage output go")


def ensure_raw(args):
    """Generate raw data under args.work/raw unless data of the same parameters is already there."""
    raw = Path(args.work) / "raw"
    wanted = {"customers": args.customers, "items": args.items, "days": args.days,
              "actions_per_customer": args.actions_per_customer, "seed": args.seed}
    generated = raw / "_generated.json"
    recorded = json.loads(generated.read_text())["parameters"] if generated.exists() else {}
    if any(recorded.get(name) != value for name, value in wanted.items()):
        flags = [f"--{name.replace('_', '-')}={value}" for name, value in wanted.items()]
        run_stage(["generate_data.py", "--out", raw, *flags])
    return raw, wanted


def ensure_stage(args, stage, command):
    """Run a stage's script unless args.work/data/<stage> exists (a previous benchmark made it)."""
    if not (Path(args.work) / "data" / stage / "_stage.json").exists():
        run_stage(command)


def run_stage(command):
    """Run one of the repository's scripts (measured); stop the benchmark if it fails."""
    result = run_measured([sys.executable, *map(str, command)], cwd=ROOT)
    if result["returncode"] != 0:
        raise SystemExit(f"{command[0]} failed with status {result['returncode']}")
    return result


def save_report(name, report):
    """Print a report and save it as bench/results/<name>.json, with the date and the machine."""
    report = {"date": dt.date.today().isoformat(),
              "machine": f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
                         f"{platform.platform()}", **report}
    out = ROOT / "bench" / "results" / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
