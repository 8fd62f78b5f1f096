"""The Dask client every script computes on: an existing scheduler, or a LocalCluster sized to this machine."""

import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import CancelledError
from pathlib import Path

import dask
import psutil
from dask.utils import parse_bytes
from distributed import Client, KilledWorker, LocalCluster, WorkerPlugin, as_completed, progress
from distributed.comm.core import CommClosedError

from recpipe.cli import ClusterError, OutputError, UserError, output_failure


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
    """Yield a Client for the script's whole run and close what we started afterwards.

    A failure inside the block that is the cluster's or the disk's, not the code's,
    leaves as one clear line (see `explain_failure`), and the closing of a broken
    cluster is kept quiet: its log lines would bury that line under tracebacks.
    """
    with contextlib.ExitStack() as stack:
        client = _start(args, stack)
        try:
            yield client
        except (UserError, OutputError, ClusterError):
            raise
        except Exception as error:  # not KeyboardInterrupt or SystemExit (SIGTERM): they unwind as they are
            explained = explain_failure(error, client, args)
            if explained is None:
                raise
            logging.disable(logging.CRITICAL)
            try:
                stack.close()
            finally:
                logging.disable(logging.NOTSET)
            raise explained from error


def _start(args, stack):
    if args.scheduler:
        try:
            client = Client(args.scheduler, timeout="10s")
        except OSError as error:
            raise UserError(
                f"could not reach the Dask scheduler at --scheduler {args.scheduler} ({error}); "
                "start one with `dask scheduler` or leave --scheduler and $DASK_SCHEDULER_ADDRESS unset "
                "to use a LocalCluster"
            ) from None
        stack.enter_context(client)
        _ship_package(client)
        workers = len(client.scheduler_info(n_workers=-1)["workers"])
        print(f"Dask: joined scheduler {args.scheduler} ({workers} workers)")
        print(f"Dask dashboard: {client.dashboard_link}", flush=True)
        return client

    workers, memory_limit = local_cluster_size(args.workers, args.memory_limit)
    # Dask's statistical profiler samples every worker thread's stack each 10 ms; on our
    # Python-heavy cleaning tasks that cost 28% of merge_and_clean's time (43 s -> 31 s).
    # The dashboard's Profile page stays empty; everything else on it works.
    with dask.config.set({"distributed.worker.profile.enabled": False}):
        cluster = stack.enter_context(LocalCluster(
            n_workers=workers,
            threads_per_worker=args.threads_per_worker,
            memory_limit=memory_limit,
            processes=True,
            silence_logs=logging.ERROR,
            # Dask warns at length when 8787 is taken; asking for a free port (:0) keeps the log clean.
            dashboard_address=":8787" if _port_free(8787) else ":0",
        ))
    client = stack.enter_context(Client(cluster))
    # The scheduler runs in this process: its log of a task failed by dying workers would
    # repeat, once per task, what the KilledWorker that reaches the client says.
    scheduler_log = logging.getLogger("distributed.scheduler")
    scheduler_log.addFilter(_not_reported_by_client)
    stack.callback(scheduler_log.removeFilter, _not_reported_by_client)
    client.register_plugin(QuietLocalWorkers())
    print(f"Dask: LocalCluster with {workers} workers x {args.threads_per_worker} threads, "
          f"{memory_limit / 2**30:.1f} GiB each")
    print(f"Dask dashboard: {client.dashboard_link}", flush=True)
    return client


class QuietLocalWorkers(WorkerPlugin):
    """Keep a LocalCluster's workers from repeating on the script's terminal what the script says once.

    - A task's exception reaches the client, which reports it: one line for a full disk or
      a user error, the traceback for a bug. The worker's "Compute Failed" log would print
      it once more per failed task (120 tracebacks when the disk fills during
      merge_and_clean.py). An external cluster's workers keep their logs.
    - Ctrl-C sends SIGINT to the workers too, and each would print a KeyboardInterrupt
      traceback from its event loop. They ignore it: the script, interrupted, closes them.
    """

    name = "recpipe-quiet-local-workers"

    def setup(self, worker):
        logging.getLogger("distributed.worker").addFilter(_not_reported_by_client)
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def _not_reported_by_client(record):
    """False for the log records of task failures that reach the client as exceptions."""
    message = str(record.msg)
    return not (message.startswith("Compute Failed") or "marked as failed because" in message)


def explain_failure(error, client, args):
    """An OutputError or ClusterError saying in one line what happened to a stage, or None if
    `error` is neither a full disk / read-only folder nor a failure of the cluster itself.

    - distributed.KilledWorker: every worker that ran a task died while running it
      (`distributed.scheduler.allowed-failures` + 1 times; Dask reschedules a dead worker's
      tasks until then). The usual cause is memory: a worker past its limit is killed by
      its nanny, or by the kernel's OOM killer.
    - the scheduler connection lost: Dask cancels every future with reason
      "scheduler-connection-lost"; a comm closed mid-call is a CommClosedError.

    The stage's `publish` block is inside this one, so when this runs nothing was published.
    """
    data = getattr(args, "data", None)
    previous = (f"nothing was published, the previous output in {Path(data).resolve()}/ was left as it was"
                if data is not None else "nothing was published")
    if isinstance(error, KilledWorker):
        last = getattr(error.last_worker, "address", error.last_worker)
        runs = error.allowed_failures + 1
        return ClusterError(
            f"Dask workers died while running task {_task_name(error.task)!r}: it ran {runs} "
            f"time{'s' if runs > 1 else ''} and each time its worker died (the last was {last}); workers are "
            f"killed most often for running out of memory, so check --memory-limit (or the external "
            f"workers' memory) and the worker logs; {previous}")
    lost = (isinstance(error, CancelledError) and getattr(error, "reason", None) == "scheduler-connection-lost") \
        or isinstance(error, CommClosedError) or client.status not in ("running", "newly-created")
    if lost:
        return ClusterError(
            f"lost the connection to the Dask scheduler at {client.scheduler.address} while the stage ran "
            f"(the scheduler stopped or died, or the network failed): check that it runs and its log; {previous}")
    if isinstance(error, CancelledError):
        return ClusterError(
            f"the Dask scheduler cancelled task {_task_name(getattr(error, 'key', '?'))!r} "
            f"(reason: {getattr(error, 'reason', 'unknown')}); check the scheduler's log; {previous}")
    message = output_failure(error, folder=data)
    return OutputError(message) if message is not None else None


def _task_name(key):
    return "-".join(map(str, key)) if isinstance(key, tuple) else str(key)


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
    # Every task has ended before a failure is raised here: the stage then removes its
    # staging folder, and a task still running (one whose finished result was lost with a
    # dead worker is run again) would write into it again. Future.exception() waits for
    # that rerun; it returns, not raises, for a failed or cancelled task.
    for future in futures:
        future.exception()
    # result() re-raises a task's exception here, in the client, with its traceback
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
