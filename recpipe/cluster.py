"""The Dask client every script computes on: an existing scheduler, or a LocalCluster sized to this machine."""

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import dask
import psutil
from dask.utils import parse_bytes
from distributed import Client, LocalCluster, as_completed, progress

from recpipe.cli import UserError


def add_arguments(parser):
    group = parser.add_argument_group("cluster")
    group.add_argument(
        "--scheduler",
        default=os.environ.get("DASK_SCHEDULER_ADDRESS"),
        metavar="ADDRESS",
        help="join an existing Dask scheduler, e.g. tcp://127.0.0.1:8786 "
        "(default: $DASK_SCHEDULER_ADDRESS, else a LocalCluster on this machine)",
    )
    group.add_argument("--workers", type=int, default=None, help="LocalCluster worker processes (default: one per core)")
    group.add_argument("--threads-per-worker", type=int, default=1, help="LocalCluster threads per worker (default: 1)")
    group.add_argument(
        "--memory-limit",
        default=None,
        help="LocalCluster memory per worker, e.g. 8GiB (default: 75%% of this machine's memory, shared out)",
    )


def local_cluster_size(workers=None, memory_limit=None):
    """Workers default to one per core; together they may use three quarters of the machine's memory.

    The quarter left over is for the client, the scheduler and the page cache the
    Parquet reads live on.
    """
    if workers is None:
        workers = os.cpu_count() or 1
    if workers < 1:
        raise UserError(f"--workers {workers}: needs at least 1 worker")
    if memory_limit is None:
        return workers, int(psutil.virtual_memory().total * 0.75 / workers)
    try:
        return workers, parse_bytes(memory_limit)
    except ValueError:
        raise UserError(f"--memory-limit {memory_limit!r}: not a size; write it like 8GiB or 4000MB") from None


@contextlib.contextmanager
def connect(args):
    """Yield a Client for the script's whole run and close what we started afterwards."""
    if args.scheduler:
        try:
            client = Client(args.scheduler, timeout="10s")
        except OSError as error:
            raise UserError(
                f"could not reach the Dask scheduler at --scheduler {args.scheduler} ({error}); "
                "start one with `dask scheduler` or leave --scheduler and $DASK_SCHEDULER_ADDRESS unset "
                "to use a LocalCluster"
            ) from None
        with client:
            _ship_package(client)
            workers = len(client.scheduler_info(n_workers=-1)["workers"])
            print(f"Dask: joined scheduler {args.scheduler} ({workers} workers)")
            print(f"Dask dashboard: {client.dashboard_link}", flush=True)
            yield client
        return

    workers, memory_limit = local_cluster_size(args.workers, args.memory_limit)
    # Dask's statistical profiler samples every worker thread's stack each 10 ms; on our
    # Python-heavy cleaning tasks that cost 28% of merge_and_clean's time (43 s -> 31 s).
    # The dashboard's Profile page stays empty; everything else on it works.
    with dask.config.set({"distributed.worker.profile.enabled": False}):
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=args.threads_per_worker,
            memory_limit=memory_limit,
            processes=True,
            silence_logs=logging.ERROR,
            # Dask warns at length when 8787 is taken; asking for a free port (:0) keeps the log clean.
            dashboard_address=":8787" if _port_free(8787) else ":0",
        )
    with cluster, Client(cluster) as client:
        print(f"Dask: LocalCluster with {workers} workers x {args.threads_per_worker} threads, "
              f"{memory_limit / 2**30:.1f} GiB each")
        print(f"Dask dashboard: {client.dashboard_link}", flush=True)
        yield client


def wait_with_progress(futures, label):
    """Block until every future is done, showing progress; return their results in order.

    On a terminal this is Dask's progress bar; in a log (CI, nohup) it prints a line
    per tenth of the tasks, since a bar redrawn with carriage returns is unreadable there.
    """
    futures = list(futures)
    if not futures:
        return []
    started = time.monotonic()
    if sys.stdout.isatty():
        print(label)
        progress(futures)
        print()
    else:
        step = max(1, len(futures) // 10)
        for done, _ in enumerate(as_completed(futures), start=1):
            if done % step == 0 or done == len(futures):
                print(f"{label}: {done}/{len(futures)} tasks done ({time.monotonic() - started:.1f}s)", flush=True)
    # gather re-raises a task's exception here, in the client, with its traceback
    return [future.result() for future in futures]


def _ship_package(client):
    """Send this checkout's recpipe to the cluster's workers, which may have been started anywhere.

    Registered as a plugin, so workers that join later get it too. The workers still
    need the packages of requirements.txt installed.
    """
    package = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as tmp:
        archive = shutil.make_archive(str(Path(tmp) / package.name), "zip", root_dir=package.parent,
                                      base_dir=package.name)
        client.upload_file(archive)


def _port_free(port):
    import socket

    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0
