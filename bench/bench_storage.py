"""Benchmark `pipeline.py run` from and to local folders and S3 (moto's server on loopback).

    .venv/bin/python bench/bench_storage.py

For the demo's size (generate_data.py's defaults) and about 5 M actions (--customers 50000
--actions-per-customer 100), generates the raw files (reused when their parameters match),
copies them into a bucket of an S3-compatible server started here on 127.0.0.1 (moto's, in
its own process), and runs the whole pipeline three times from scratch: everything in local
folders; --raw s3://bench/raw-<size> with the stages in local folders; and --raw, --data and
--preprocessors all in the bucket. Prints and saves (bench/results/storage.json) seconds and
peak memory of the pipeline's process tree (the server's own memory is reported apart).
"""

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from measure import ROOT, ensure_raw, run_measured, save_report

SIZES = {"demo": {"customers": 2000, "items": 5000, "actions_per_customer": 60},
         "5M": {"customers": 50000, "items": 20000, "actions_per_customer": 100}}


def start_server():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("moto's server did not start")
            time.sleep(0.1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/recpipe-bench-storage", help="where raw data and outputs go")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    args = parser.parse_args()
    server, endpoint = start_server()
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    os.environ.update({key: value for key, value in env.items() if key.startswith("AWS_")})
    import fsspec
    store = fsspec.filesystem("s3")
    store.mkdir("bench")
    results = {}
    try:
        for size in args.sizes:
            work = Path(args.work) / size
            raw, parameters = ensure_raw(argparse.Namespace(work=work, days=18, seed=0, **SIZES[size]))
            started = time.monotonic()
            store.put(f"{raw}/", f"bench/{size}/raw/", recursive=True)
            upload = time.monotonic() - started
            s3 = f"s3://bench/{size}"
            runs = {"local folder": (raw, work / "out-local"),
                    "S3 on loopback": (f"{s3}/raw", work / "out-s3"),
                    "everything in S3 on loopback": (f"{s3}/raw", f"{s3}/out")}
            for where, (raw_flag, out) in runs.items():
                if isinstance(out, Path):
                    shutil.rmtree(out, ignore_errors=True)
                argv = ["--raw", str(raw_flag), "--data", f"{out}/data", "--preprocessors", f"{out}/preprocessors"]
                run = run_measured([sys.executable, "pipeline.py", "run", *argv], cwd=ROOT, env=env)
                if run["returncode"] != 0:
                    raise SystemExit(f"pipeline.py run {' '.join(argv)} failed with status {run['returncode']}")
                results.setdefault(size, {"parameters": parameters, "upload_seconds": round(upload, 1)})[where] = {
                    "seconds": round(run["seconds"], 1),
                    "peak_rss_gib_all_processes": round(run["peak_rss_bytes"] / 2**30, 2),
                    "peak_rss_gib_largest_process": round(run["peak_process_rss_bytes"] / 2**30, 2),
                }
            results[size]["server_rss_gib"] = round(psutil.Process(server.pid).memory_info().rss / 2**30, 2)
    finally:
        server.terminate()
        server.wait(timeout=30)
    save_report("storage", results)


if __name__ == "__main__":
    main()
