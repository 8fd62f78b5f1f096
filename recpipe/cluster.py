"""The Dask client every script computes on: an existing scheduler, or a LocalCluster sized to this machine."""

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from concurrent.futures import CancelledError
from pathlib import Path

import dask
import psutil
from dask.utils import format_bytes, parse_bytes
from distributed import Client, KilledWorker, LocalCluster, WorkerPlugin, as_completed, progress
from distributed.comm import connect as open_comm
from distributed.comm.addressing import parse_address, parse_host_port, unparse_address
from distributed.comm.core import CommClosedError, FatalCommClosedError
from distributed.core import Status
from distributed.scheduler import Scheduler
from distributed.security import Security
from distributed.utils import format_dashboard_link

from recpipe import storage
from recpipe.cli import ClusterError, OutputError, UserError, output_failure


# A Dask worker with pandas and PyArrow loaded holds about 180 MiB before any data, and Dask
# pauses a worker at 80% of its limit: below 256 MiB one could hardly run a task.
MIN_WORKER_MEMORY = 256 * 2**20
MIN_WORKER_MEMORY_TEXT = "256 MiB"

# Seconds for a --scheduler to accept a connection (else it is unreachable), and then more for it
# to answer as a Dask scheduler: whatever else listens there (a dashboard, a web server) keeps
# the connection open without a word, and Dask's client would wait on it forever.
CONNECT_TIMEOUT = 10
HANDSHAKE_TIMEOUT = 10

# The LocalCluster's dashboard shows the scheduler's address and the workers' folders and
# logs; it stays on this machine unless --dashboard-address opens it.
DEFAULT_DASHBOARD = ("127.0.0.1", 8787)

# The schedulers whose dashboard link this process has printed: each is said once.
_ANNOUNCED = set()

# The credentials of each LocalCluster this process runs, by its scheduler's address: made for
# that run (Security.temporary) and held in memory only, so that no other process, another
# user's least of all, can join it (loopback is no boundary on a shared machine). The stages
# of `pipeline.py run` join its cluster with them.
_LOCAL_CREDENTIALS = {}

# Dask's configuration for a client's TLS credentials, and the variables that set it.
TLS_CONFIG = {"distributed.comm.tls.ca-file": "DASK_DISTRIBUTED__COMM__TLS__CA_FILE",
              "distributed.comm.tls.client.cert": "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT",
              "distributed.comm.tls.client.key": "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY"}
_TLS_FIX = ("set $DASK_DISTRIBUTED__COMM__TLS__CA_FILE, $DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT and "
            "$DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY to the PEM files of the cluster's CA certificate and of a "
            "client certificate and key that CA signed (docs/cluster.md)")


def add_arguments(parser):
    group = parser.add_argument_group("cluster")
    group.add_argument(
        "--scheduler",
        default=os.environ.get("DASK_SCHEDULER_ADDRESS"),
        metavar="ADDRESS",
        help="join an existing Dask scheduler, e.g. tls://HOST:8786 with the certificates that "
        "$DASK_DISTRIBUTED__COMM__TLS__CA_FILE, ..._CLIENT__CERT and ..._CLIENT__KEY name (docs/cluster.md), "
        "or tcp://127.0.0.1:8786 "
        "(default: $DASK_SCHEDULER_ADDRESS, else a LocalCluster on this machine, which only this run can join)",
    )
    group.add_argument("--workers", type=_at_least_one, default=None,
                       help=f"LocalCluster worker processes (default: one per core, fewer if that left a worker "
                       f"under {MIN_WORKER_MEMORY_TEXT})")
    group.add_argument("--threads-per-worker", type=_at_least_one, default=None,
                       help="LocalCluster threads per worker (default: 1)")
    group.add_argument(
        "--memory-limit",
        type=_memory_limit_flag,
        default=None,
        help=f"LocalCluster memory per worker, e.g. 8GiB, at least {MIN_WORKER_MEMORY_TEXT} and at most this "
        "machine's memory (default: 75%% of this machine's memory, shared out)",
    )
    group.add_argument(
        "--dashboard-address",
        type=_dashboard_flag,
        default=None,
        metavar="[HOST]:PORT",
        help="where the LocalCluster's dashboard listens (default: 127.0.0.1:8787, this machine only, "
        "or a free port if 8787 is taken); :8787 opens it on every interface, for other machines to see. "
        "An existing --scheduler serves its own dashboard: see `dask scheduler --dashboard-address`",
    )


def _at_least_one(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give 1 or more") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _worker_memory(text):
    """`text` in bytes, or ValueError: why it cannot be a worker's memory limit, worded to follow the flag's name."""
    try:
        size = parse_bytes(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a size; write it like 8GiB or 4000MB") from None
    if size < MIN_WORKER_MEMORY:
        raise ValueError(
            f"{text!r} is less than the {MIN_WORKER_MEMORY_TEXT} a Dask worker needs (with pandas and PyArrow "
            f"loaded it holds about 180 MiB before any data); give each worker at least that, e.g. 4GiB")
    total = psutil.virtual_memory().total
    if size > total:  # Dask would quietly cap it at that, and the limit would not be the one asked for
        raise ValueError(
            f"{text!r} is more than this machine's {format_bytes(total)} of memory; give each worker at most "
            f"that, or leave --memory-limit out to share three quarters of it among the workers")
    return size


def _memory_limit_flag(text):
    try:
        _worker_memory(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text  # as given: pipeline.py passes it on to the stage scripts


def _dashboard_flag(text):
    # A colon is required: Dask reads a bare "8787" as every interface, which no one should get by accident.
    host, colon, port = text.rpartition(":")
    if not colon or not (port.isascii() and port.isdigit()) or int(port) > 65535 or ":" in host or "/" in host:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not [HOST]:PORT; write it like 127.0.0.1:8787 (this machine only) "
            f"or :8787 (every interface)")
    return f"{host}:{int(port)}"


def local_cluster_size(workers=None, memory_limit=None):
    """Workers default to one per core; together they may use three quarters of the machine's memory.

    The quarter left over is for the client, the scheduler and the page cache the
    Parquet reads live on. By default there are no more workers than that memory gives
    MIN_WORKER_MEMORY each (a machine with many cores and little memory).
    """
    if workers is not None and workers < 1:
        raise UserError(f"--workers {workers}: needs at least 1 worker")
    if memory_limit is not None:
        try:
            return workers or os.cpu_count() or 1, _worker_memory(memory_limit)
        except ValueError as error:
            raise UserError(f"--memory-limit {error}") from None
    total = psutil.virtual_memory().total
    most = max(1, int(total * 0.75 // MIN_WORKER_MEMORY))
    if workers is None:
        workers = min(os.cpu_count() or 1, most)
    elif workers > most:
        raise UserError(
            f"--workers {workers}: three quarters of this machine's {format_bytes(total)} of memory shared by "
            f"{workers} workers is {format_bytes(total * 0.75 / workers)} each, less than the "
            f"{MIN_WORKER_MEMORY_TEXT} a Dask worker needs; use at most {most} --workers, "
            f"or set --memory-limit")
    return workers, int(total * 0.75 / workers)


# A stage whose tasks spend their time in Arrow and NumPy, which release the GIL, runs a LocalCluster's
# workers as threads of the script's own process when its input is at most this large: no worker process
# to start and no modules to import again (about a second of every such script on 2 cores), and no port
# open but the dashboard's. Above it, worker processes: a task that runs out of memory then costs a worker,
# which its nanny restarts and the failure is one line, not the whole script killed by the kernel; and the
# second saved no longer matters against the minutes the stage takes.
IN_PROCESS_MAX_BYTES = 2**30


def in_process_reason(args, input_bytes, folder):
    """Why a LocalCluster for a stage whose work releases the GIL runs in this process (the line the script
    prints), or None where it starts worker processes: a --scheduler, cluster flags that size worker
    processes, or an input of more than IN_PROCESS_MAX_BYTES."""
    if args.scheduler or args.workers is not None or args.threads_per_worker is not None \
            or args.memory_limit is not None or input_bytes > IN_PROCESS_MAX_BYTES:
        return None
    return (f"{folder}/ holds {format_bytes(input_bytes)}, and this stage's tasks release the GIL; worker "
            f"processes above {format_bytes(IN_PROCESS_MAX_BYTES)}, or with --workers")


@contextlib.contextmanager
def connect(args, in_process=None):
    """Yield a Client for the script's whole run and close what we started afterwards.

    `in_process`: in_process_reason's answer; a LocalCluster then runs its workers as threads here.
    A failure inside the block that is the cluster's or the disk's, not the code's,
    leaves as one clear line (see `explain_failure`), and the closing of a broken
    cluster is kept quiet: its log lines would bury that line under tracebacks.
    """
    with contextlib.ExitStack() as stack:
        client = _start_in_process(args, stack, in_process) if in_process and not args.scheduler else _start(args, stack)
        share_storage_options(client, args)
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
        client = stack.enter_context(_join(args.scheduler))
        _ship_package(client)
        if client.scheduler.address not in _ANNOUNCED:  # pipeline.py run: its stages join the cluster it started
            workers = len(client.scheduler_info(n_workers=-1)["workers"])
            print(f"Dask: joined scheduler {args.scheduler} ({workers} workers)")
            print(f"Dask dashboard: {client.dashboard_link}", flush=True)
            _ANNOUNCED.add(client.scheduler.address)
        return client

    workers, memory_limit = local_cluster_size(args.workers, args.memory_limit)
    dashboard_host, dashboard_port = _dashboard_address(args.dashboard_address)
    # TLS on loopback: with per-run credentials the scheduler, the workers and their nannies
    # accept only a peer holding this run's key (TLS both ways), and Dask picks tls:// for all
    # of them. The dashboard is a web page and stays plain HTTP, on 127.0.0.1 by default.
    security = Security.temporary()
    # Dask's statistical profiler samples every worker thread's stack each 10 ms; on our
    # Python-heavy cleaning tasks that cost 28% of merge_and_clean's time (43 s -> 31 s).
    # The dashboard's Profile page stays empty; everything else on it works.
    # Dask starts workers with MALLOC_TRIM_THRESHOLD_=65536, so that glibc hands freed memory back
    # at once; our tasks free and reallocate tens of MiB per block, and the page faults that
    # follow made merge_and_clean's tasks 15-20% slower than in a plain process pool. Freed memory
    # beyond 64 MiB per worker is still handed back.
    with dask.config.set({"distributed.worker.profile.enabled": False,
                          "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": 64 * 2**20}):
        cluster = stack.enter_context(LocalCluster(
            n_workers=workers,
            threads_per_worker=args.threads_per_worker or 1,
            memory_limit=memory_limit,
            processes=True,
            # Dask's own default too; said here so that the scheduler, workers and nannies
            # stay unreachable from other machines whatever a later Dask defaults to.
            host="127.0.0.1",
            silence_logs=logging.ERROR,
            dashboard_address=f"{dashboard_host}:{dashboard_port}",
            security=security,
        ))
    client = stack.enter_context(Client(cluster))  # with the cluster's credentials
    _LOCAL_CREDENTIALS[client.scheduler.address] = security
    stack.callback(_LOCAL_CREDENTIALS.pop, client.scheduler.address, None)
    # The scheduler runs in this process: its log of a task failed by dying workers would
    # repeat, once per task, what the KilledWorker that reaches the client says.
    scheduler_log = logging.getLogger("distributed.scheduler")
    scheduler_log.addFilter(_not_reported_by_client)
    stack.callback(scheduler_log.removeFilter, _not_reported_by_client)
    client.register_plugin(QuietLocalWorkers())
    _ANNOUNCED.add(client.scheduler.address)
    print(f"Dask: LocalCluster with {workers} workers x {args.threads_per_worker or 1} threads, "
          f"{memory_limit / 2**30:.1f} GiB each")
    _print_dashboard(client.dashboard_link, args.dashboard_address, dashboard_host)
    return client


def _print_dashboard(link, flag, host):
    if flag:  # it may be open to other machines: say so where the link is
        print(f"Dask dashboard: {link} (--dashboard-address {flag}: "
              f"listening on {host or 'every interface'})", flush=True)
    else:
        print(f"Dask dashboard: {link}", flush=True)


def _start_in_process(args, stack, reason):
    """A LocalCluster of one worker with a thread per core, in this process (see IN_PROCESS_MAX_BYTES)."""
    threads = os.cpu_count() or 1
    memory_limit = int(psutil.virtual_memory().total * 0.75)
    dashboard_host, dashboard_port = _dashboard_address(args.dashboard_address)
    # Its scheduler and worker talk through memory (inproc://): nothing listens for another process to
    # join. Dask's memory rules act on a worker by pausing it and, through its nanny, restarting it; a
    # worker in the script's own process has no nanny, and pausing it would stop the stage for good.
    with dask.config.set({"distributed.worker.profile.enabled": False,
                          "distributed.worker.memory.pause": False, "distributed.worker.memory.terminate": False,
                          "distributed.worker.memory.target": False, "distributed.worker.memory.spill": False}):
        cluster = stack.enter_context(LocalCluster(
            n_workers=1, threads_per_worker=threads, memory_limit=memory_limit, processes=False,
            silence_logs=logging.ERROR, dashboard_address=f"{dashboard_host}:{dashboard_port}",
            # A worker always serves its HTTP routes; without a host it would listen on every interface.
            worker_dashboard_address="127.0.0.1:0"))
    client = stack.enter_context(Client(cluster))
    client.register_plugin(QuietLocalWorkers())
    _ANNOUNCED.add(client.scheduler.address)
    print(f"Dask: LocalCluster in this process, 1 worker x {threads} threads ({reason})")
    # Dask would name the machine's address, which an in-memory scheduler has; the page is on dashboard_host.
    link = format_dashboard_link(dashboard_host or "127.0.0.1", cluster.scheduler.http_server.port)
    _print_dashboard(link, args.dashboard_address, dashboard_host)
    return client


def _dashboard_address(flag):
    """(host, port) for the LocalCluster's dashboard: --dashboard-address's, else 127.0.0.1:8787; port 0
    (any free one) where that port is taken, since Dask warns at length before doing the same.

    An empty host is every interface (Dask's reading of ":8787").
    """
    if flag is None:
        host, port = DEFAULT_DASHBOARD
    else:
        host, _, port = flag.rpartition(":")
        port = int(port)
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the dashboard's server does
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return host, 0
            raise UserError(
                f"--dashboard-address {flag}: cannot listen there ({error}); give an address of this "
                f"machine, like 127.0.0.1:8787 (this machine only) or :8787 (every interface)") from None
    return host, port


def _join(address):
    """A Client of the scheduler at `address`, or a UserError naming what is wrong with the address, the
    flag or environment variable it came from, and the fix; malformed addresses fail before any connection."""
    # Told by the value, not by how it reached us: pipeline.py passes the variable's on as --scheduler.
    given = (f"DASK_SCHEDULER_ADDRESS={address}" if address == os.environ.get("DASK_SCHEDULER_ADDRESS")
             else f"--scheduler {address}")
    fix = ("give the address `dask scheduler` prints, like tcp://HOST:8786, or leave --scheduler and "
           "$DASK_SCHEDULER_ADDRESS unset to use a LocalCluster")
    scheme, location = parse_address(address)
    if scheme == "inproc":
        raise UserError(f"{given}: an inproc:// address reaches only a scheduler inside the same process, "
                        f"and this script runs none; {fix}")
    if scheme in ("tcp", "tls"):  # what `dask scheduler` listens on; other schemes' checks are distributed's
        try:
            host, port = parse_host_port(location)
        except ValueError:
            host, port = None, None
        if not host or not isinstance(port, int) or not 0 < port < 65536:
            raise UserError(f"{given} is not a Dask scheduler address: it needs a host and a port (1-65535); {fix}")
    address = unparse_address(scheme, location)
    security = _client_security(address, scheme, given)
    try:
        _handshake(address, security)
        client = Client(address, security=security, timeout=f"{CONNECT_TIMEOUT}s")
    except TimeoutError:  # before OSError, of which it is one: see HANDSHAKE_TIMEOUT
        raise UserError(
            f"no Dask scheduler answered at {given}: something there accepted the connection but did not answer "
            f"as one within {CONNECT_TIMEOUT + HANDSHAKE_TIMEOUT} s (a dashboard's port? a scheduler's is "
            f"usually 8786); {fix}") from None
    except FatalCommClosedError as error:  # before OSError, of which it is one: the TLS handshake failed
        raise UserError(
            f"the Dask scheduler at {given} and this client refused each other's TLS certificates ({error}); "
            f"{_TLS_FIX}") from None
    except CommClosedError as error:
        if scheme != "tcp":
            raise UserError(f"the Dask scheduler at {given} closed the connection ({error}); {fix}") from None
        # A TLS listener drops a plain connection at its first bytes.
        raise UserError(
            f"the Dask scheduler at {given} closed the connection as it opened ({error}): a scheduler with TLS "
            f"certificates takes tls:// addresses only: give tls://{location}, and {_TLS_FIX}") from None
    except OSError as error:
        raise UserError(
            f"could not reach the Dask scheduler at {given} ({error}); "
            "start one with `dask scheduler` or leave --scheduler and $DASK_SCHEDULER_ADDRESS unset "
            "to use a LocalCluster"
        ) from None
    except Exception as error:  # distributed's word on an address it cannot use: UCX missing, tcp:// refused
        raise UserError(f"could not connect to the Dask scheduler at {given} "
                        f"({type(error).__name__}: {error}); {fix}") from None
    return client


def security_for(address):
    """The credentials a client of the scheduler at `address` joins with: those of the LocalCluster this
    process started there, else what Dask's configuration says (distributed.comm.tls.*, which the
    DASK_DISTRIBUTED__COMM__TLS__* variables set); none, for a plain tcp:// scheduler."""
    return _LOCAL_CREDENTIALS.get(address) or Security()


def _client_security(address, scheme, given):
    """security_for(address), or a UserError where a tls:// address finds no client certificate to use."""
    security = security_for(address)
    if scheme != "tls" or address in _LOCAL_CREDENTIALS:
        return security

    def named(key):
        variable = TLS_CONFIG[key]
        return f"${variable}" if variable in os.environ else key

    unset = [named(key) for key in ("distributed.comm.tls.ca-file", "distributed.comm.tls.client.cert")
             if not dask.config.get(key, None)]
    if unset:
        raise UserError(
            f"{given}: a tls:// scheduler admits only clients holding a certificate its cluster's CA signed, and "
            f"Dask's configuration names no {' and no '.join(unset)}; {_TLS_FIX}; a LocalCluster that another "
            f"script started admits that script alone")
    for key in TLS_CONFIG:
        path = dask.config.get(key, None)
        if path and "\n" not in path and not os.path.isfile(path):  # PEM text itself has lines
            raise UserError(f"{given}: {named(key)}={path} is not a file; {_TLS_FIX}")
    try:
        security.get_connection_args("client")  # loads them: a file that is not PEM fails here, in one line
    except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
        raise UserError(f"{given}: the TLS credentials that Dask's configuration names cannot be loaded "
                        f"({error}); {_TLS_FIX}") from None
    return security


def _handshake(address, security):
    """Connect to `address` with `security`'s credentials and exchange Dask's handshake, within
    CONNECT_TIMEOUT + HANDSHAKE_TIMEOUT.

    OSError if nothing accepts the connection in CONNECT_TIMEOUT (distributed's own message);
    TimeoutError if what accepted it does not answer as Dask does.
    """
    async def shake():
        comm = await open_comm(address, timeout=CONNECT_TIMEOUT, **security.get_connection_args("client"))
        await comm.close()

    async def bounded():
        try:
            await asyncio.wait_for(shake(), CONNECT_TIMEOUT + HANDSHAKE_TIMEOUT)
        except asyncio.TimeoutError:
            raise TimeoutError() from None

    asyncio.run(bounded())


class QuietLocalWorkers(WorkerPlugin):
    """Keep a LocalCluster's workers from repeating on the script's terminal what the script says once.

    - A task's exception reaches the client, which reports it: one line for a full disk or
      a user error, the traceback for a bug. The worker's "Compute Failed" log would print
      it once more per failed task (120 tracebacks when the disk fills during
      merge_and_clean.py). An external cluster's workers keep their logs.
    - Ctrl-C sends SIGINT to the workers too, and each would print a KeyboardInterrupt
      traceback from its event loop. They ignore it: the script, interrupted, closes them.
    - A heartbeat that was on its way when the cluster closed fails with a traceback
      ("Failed to communicate with scheduler during heartbeat") after the script's work is
      done. Only a closing worker's is dropped: a running worker's is a real fault.
    """

    name = "recpipe-quiet-local-workers"

    def setup(self, worker):
        def not_closing_noise(record):
            return not (str(record.msg).startswith("Failed to communicate with scheduler")
                        and worker.status != Status.running)

        log = logging.getLogger("distributed.worker")
        log.addFilter(_not_reported_by_client)
        log.addFilter(not_closing_noise)
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            signal.signal(signal.SIGINT, signal.SIG_IGN)


class StorageOptions(WorkerPlugin):
    """storage.configure on every worker, those that join later included. The options may hold secrets:
    they travel to the workers with the plugin and are written nowhere (not in a manifest, not in a log)."""

    def __init__(self, urls, options):
        self.urls, self.options = [str(url) for url in urls], options

    def setup(self, worker):
        storage.configure(self.urls, self.options)


def share_storage_options(client, args):
    """--storage-options for the URLs among the folders `args` gives, in this process and on every worker of
    the client's cluster."""
    urls = storage.urls(args)
    options = getattr(args, "storage_options", None)
    storage.configure(urls, options)
    if options and urls:
        client.register_plugin(StorageOptions(urls, options), name="recpipe-storage-options")


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
    previous = (f"nothing was published, the previous output in {storage.absolute(data)}/ was left as it was"
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
    name = "-".join(map(str, key)) if isinstance(key, tuple) else str(key)
    return re.sub(r"-[0-9a-f]{32}$", "", name)  # task_key's suffix says nothing to a person


def task_key(name):
    """A Dask key for one task: `name` (what the dashboard shows, e.g. clean-clicks-3) and a suffix of
    this call's own. A key names a result on the scheduler: a second run on the same client that
    reused a first run's keys could be handed that run's results while they are being released."""
    return f"{name}-{uuid.uuid4().hex}"


# In a log, a long phase says it is alive this often; a short one prints only its closing line.
LOG_PROGRESS_SECONDS = 30


def wait_with_progress(futures, label):
    """Block until every future is done, showing progress; return their results in order.

    On a terminal this is Dask's progress bar; in a log (CI, nohup) it prints a line when
    the phase ends and, while it runs, one every LOG_PROGRESS_SECONDS, whether or not a task
    ended meanwhile (one task may run for minutes): a bar redrawn with carriage returns is
    unreadable there, and a line per task buries everything else.
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
        done = 0
        ended = threading.Event()
        saying = threading.Lock()  # no line of the timer's after the closing one

        def say():
            print(f"{label}: {done}/{len(futures)} tasks done ({time.monotonic() - started:.1f}s)", flush=True)

        def every_while():
            while not ended.wait(LOG_PROGRESS_SECONDS):
                with saying:
                    if not ended.is_set():
                        say()

        timer = threading.Thread(target=every_while, name=f"progress of {label}", daemon=True)
        timer.start()
        try:
            for _ in as_completed(futures):
                done += 1
        finally:
            with saying:
                ended.set()
            timer.join()
        say()
    # Every task has ended before a failure is raised here: the stage then removes its
    # staging folder, and a task still running (one whose finished result was lost with a
    # dead worker is run again) would write into it again. Future.exception() waits for
    # that rerun; it returns, not raises, for a failed or cancelled task.
    for future in futures:
        future.exception()
    # result() re-raises a task's exception here, in the client, with its traceback
    return [future.result() for future in futures]


# What only generate_data.py and the tests use, the workers never run: names in recpipe/,
# a module's file or a subpackage's folder (all of it).
NOT_SHIPPED = {"synthetic"}


def _ship_package(client):
    """Send this checkout's recpipe to the cluster's workers, which may have been started anywhere.

    Registered as a plugin, so workers that join later get it too. The workers still
    need the packages of requirements.txt installed.

    Not to a scheduler that runs in this process (`pipeline.py run`'s LocalCluster, whose
    stages join it): Dask would put the archive first on this process's sys.path and reload
    recpipe from it, and that cluster's workers import recpipe from this checkout already.
    """
    if any(scheduler.address == client.scheduler.address for scheduler in Scheduler._instances):
        return
    with tempfile.TemporaryDirectory() as tmp:
        client.upload_file(str(package_archive(tmp)))


def package_archive(folder):
    """A zip of recpipe's modules as the workers get them (not NOT_SHIPPED, no caches), written in `folder`."""
    package = Path(__file__).resolve().parent
    archive = Path(folder) / f"{package.name}.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        # Recursive, so that a subpackage the workers need is not silently left out.
        for source in sorted(package.rglob("*.py")):
            relative = source.relative_to(package)
            if relative.parts[0] not in NOT_SHIPPED:
                zipped.write(source, f"{package.name}/{relative.as_posix()}")
    return archive
