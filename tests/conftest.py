"""Tiny raw datasets the tests write themselves, with one row of every bad kind planted;
one LocalCluster for the session's in-process stage runs (`session_cluster`, `run_joined`);
an external Dask cluster (`external_cluster`), and one with TLS as docs/cluster.md sets it up
(`start_external_cluster(home, tls=make_certificates(home))`)."""

import argparse
import contextlib
import gzip
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent

GOOD_UA = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1"

IMPRESSION_LINES = [
    # kept: 3 shown items, one bad entry (no is_order) -> bad_item; an unknown field is ignored
    json.dumps({"dt": "2024-03-02", "ranking_id": "r1", "customer_id": 1, "user_agent": f"  {GOOD_UA} ",
                "app_version": "9.1",
                "impressions": [{"item_id": 10, "is_order": False}, {"item_id": 11}, {"item_id": 12, "is_order": True}]}),
    # the same ranking again: both good shown items are exact duplicates
    json.dumps({"dt": "2024-03-02", "ranking_id": "r1", "customer_id": 1, "user_agent": GOOD_UA,
                "impressions": [{"item_id": 10, "is_order": False}, {"item_id": 11}, {"item_id": 12, "is_order": True}]}),
    '{"dt": "2024-03-03", "ranking_id": "r2", "customer_id": 2',                      # malformed
    json.dumps({"dt": "2024-03-03", "ranking_id": "r3", "user_agent": None,
                "impressions": [{"item_id": 1, "is_order": False}]}),                  # missing:customer_id
    json.dumps({"dt": "2024-03-03", "ranking_id": "r4", "customer_id": -4, "user_agent": "",
                "impressions": []}),                                                   # bad_id:customer_id
    json.dumps({"dt": "2024-02-30", "ranking_id": "r5", "customer_id": 5, "user_agent": "",
                "impressions": []}),                                                   # bad_time:dt
    json.dumps({"dt": "2024-03-03", "ranking_id": "r6", "customer_id": 6, "user_agent": "x",
                "impressions": "10,11"}),                                              # bad_impressions
    # kept, empty user agent stays "", entry with a string item id is bad_item
    json.dumps({"dt": "2024-03-03", "ranking_id": "r7", "customer_id": 7, "user_agent": None,
                "impressions": [{"item_id": "x", "is_order": False}, {"item_id": 13, "is_order": False}]}),
]

CLICK_LINES = [
    json.dumps({"dt": "2024-03-01", "customer_id": 1, "item_id": 10, "click_time": "2024-03-01T10:00:00+02:00"}),
    json.dumps({"dt": "2024-03-01", "customer_id": 1, "item_id": 10, "click_time": "2024-03-01T08:00:00Z"}),  # same instant
    "not json",                                                                                # malformed
    json.dumps({"dt": "2024-03-01", "customer_id": 1, "click_time": "2024-03-01T10:00:00"}),   # missing:item_id
    json.dumps({"dt": "2024-03-01", "customer_id": 1, "item_id": 0, "click_time": "2024-03-01T10:00:00"}),  # bad_id:item_id
    json.dumps({"dt": "2024-03-01", "customer_id": 1, "item_id": 3, "click_time": "yesterday"}),  # bad_time:click_time
]

CART_CSV = """dt,customer_id,config_id,simple_id,occur_at
2024-03-01,2,20,,2024-03-01T09:30:00.123456
2024-03-01,2,20,201,2024-03-01T09:30:00.123456-01:00
2024-03-01,2,20,201,oops,extra
2024-03-01,,20,201,2024-03-01T09:30:00
2024-03-01,2,abc,201,2024-03-01T09:30:00
2024-03-01,2,21,201,2024-13-01T09:30:00
"""


def write_jsonl(path, lines, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)


@pytest.fixture
def raw_dir(tmp_path):
    """Every source, in every format, with one row of every bad kind; see EXPECTED."""
    return write_planted_raw(tmp_path)


def write_planted_raw(root):
    """raw_dir's content under `root`/raw; returns that folder."""
    raw = root / "raw"
    write_jsonl(raw / "impressions" / "2024-03-02.jsonl", IMPRESSION_LINES[:2])
    write_jsonl(raw / "impressions" / "2024-03-03.jsonl.gz", IMPRESSION_LINES[2:], gz=True)
    write_jsonl(raw / "clicks" / "2024-03-01.jsonl", CLICK_LINES)
    (raw / "add_to_carts").mkdir()
    (raw / "add_to_carts" / "2024-03-01.csv").write_text(CART_CSV)
    (raw / "previous_orders").mkdir()
    pq.write_table(pa.table({"order_date": ["2024-02-28", "2024-02-28", None, "28/02/2024"],
                             "customer_id": [1, 1, 3, 3], "config_id": [12, 12, 12, 12]}),
                   raw / "previous_orders" / "orders.parquet")
    (raw / "previous_orders" / "_SUCCESS").write_text("")  # ignored: starts with _
    return raw


EXPECTED_ACCOUNTING = {
    "impressions.rankings": {"rows_in": 8, "kept": 3, "set_aside": {
        "malformed": 1, "missing:customer_id": 1, "bad_id:customer_id": 1, "bad_time:dt": 1, "bad_impressions": 1}},
    "impressions.shown_items": {"rows_in": 8, "kept": 3, "set_aside": {"bad_item": 3}, "duplicates_dropped": 2},
    "clicks": {"rows_in": 6, "kept": 2, "set_aside": {
        "malformed": 1, "missing:item_id": 1, "bad_id:item_id": 1, "bad_time:click_time": 1},
        "duplicates_dropped": 0},
    "add_to_carts": {"rows_in": 6, "kept": 2, "set_aside": {
        "malformed": 1, "missing:customer_id": 1, "bad_id:config_id": 1, "bad_time:occur_at": 1},
        "duplicates_dropped": 0},
    "previous_orders": {"rows_in": 4, "kept": 2, "set_aside": {"missing:order_date": 1, "bad_time:order_date": 1},
                        "duplicates_dropped": 0},
}
# What repartition.py counts of the planted actions: a click and an order repeated exactly (the click at the
# same instant in two offsets); the two kept carts differ in their time (one is an hour later).
EXPECTED_EXACT_DUPLICATE_ACTIONS = {"clicks": 1, "add_to_carts": 0, "previous_orders": 1}


DEAD_PID = 2**22 + 12345  # above pid_max's default, so never a live process


def temporary_folder(parent, name, pid=DEAD_PID, kind="staging", marked=True):
    """A staging (or retired) folder of `name` as a run with `pid` on this host leaves it: with the
    marker recpipe.folders writes into what it makes, unless `marked` is False (a look-alike)."""
    from recpipe import folders
    host = os.uname().nodename
    folder = parent / f".{name}.{kind}-{host}-{pid}"
    (folder / "actions").mkdir(parents=True)
    (folder / "actions" / "part.parquet").write_bytes(b"half written")
    if marked:
        (folder / folders.MARKER).write_text(json.dumps({"made_by": "recpipe", "host": host, "pid": pid}))
    return folder


BREAKAGES = ["truncated", "a list", "bad finished_at", "no parameters", "a deleted file"]


def break_stage(stage_dir, breakage):
    """Damage a published stage folder as a careless hand or a bad copy would (one of BREAKAGES)."""
    path = stage_dir / "_stage.json"
    manifest = json.loads(path.read_text())
    if breakage == "truncated":
        path.write_text(path.read_text()[:100])
    elif breakage == "a list":
        path.write_text("[]")
    elif breakage == "bad finished_at":
        path.write_text(json.dumps({**manifest, "finished_at": "soon"}))
    elif breakage == "no parameters":
        path.write_text(json.dumps({key: value for key, value in manifest.items() if key != "parameters"}))
    else:
        sorted(stage_dir.rglob("*.parquet"))[0].unlink()


def broken_stage_line(stage_dir, breakage, script):
    """(start, end) of the one line a reader of a stage broken by `breakage` prints."""
    if breakage == "a deleted file":
        return (f"error: {stage_dir}/ is not as {script} published it: 1 file missing: ",
                f"run `python pipeline.py run --from {stage_dir.name}` (or {script}) to make it again")
    return (f"error: {stage_dir / '_stage.json'}: not a manifest that {script} wrote (",
            f"delete {stage_dir}/ yourself and run {script} again")


def listing(folder):
    """{relative path: size (files) or None (folders)} of everything under a folder, itself excluded:
    what a command touched shows up as a difference."""
    folder = Path(folder)
    return {str(path.relative_to(folder)): (path.lstat().st_size if not path.is_dir() else None)
            for path in sorted(folder.rglob("*"))}


def run_main(script, *args):
    """Run a top-level script's main(argv) in this process, as pipeline.py does; its exit status.
    Its output is in pytest's capsys."""
    import importlib
    try:
        importlib.import_module(Path(script).stem).main([str(arg) for arg in args])
    except SystemExit as exited:
        return exited.code or 0
    return 0


def assert_accounting_is_what_was_planted(accounting, expected):
    """merged/_stage.json's accounting against generate_data's `expected` (_generated.json): every row in,
    set aside and duplicated, per source, as the generator planted it."""
    impressions = expected["impressions"]
    assert accounting["impressions.rankings"]["rows_in"] == impressions["rankings_in"]
    assert accounting["impressions.rankings"]["set_aside"] == impressions["rankings_quarantined"]
    assert accounting["impressions.shown_items"]["rows_in"] == impressions["shown_items_in"]
    assert accounting["impressions.shown_items"]["set_aside"] == impressions["shown_items_quarantined"]
    assert accounting["impressions.shown_items"]["duplicates_dropped"] == impressions["shown_items_duplicates"]
    for source in ("clicks", "add_to_carts", "previous_orders"):
        assert accounting[source]["rows_in"] == expected[source]["rows_in"], source
        assert accounting[source]["set_aside"] == expected[source]["quarantined"], source


def assert_exact_duplicates_are_what_was_planted(repartitioned_manifest, expected):
    """repartitioned/_stage.json's count of exact duplicate actions against generate_data's `expected`."""
    sources = ("clicks", "add_to_carts", "previous_orders")
    assert repartitioned_manifest["exact_duplicate_actions"] == {
        source: expected[source]["exact_duplicates"] for source in sources}
    assert repartitioned_manifest["accounting"]["actions"]["exact_duplicates_kept"] == sum(
        expected[source]["exact_duplicates"] for source in sources)


def one_line(stderr):
    """The single line a user error prints on stderr (asserting that it is one, without a traceback)."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def run_in_process(script, *args, check=True):
    """Run a top-level script's main(argv) in this process, as pipeline.py runs a stage: a
    CompletedProcess with its exit status and what it printed. For tests that put no signal or
    process boundary under test: it saves the 1.5-2 s a fresh interpreter spends on imports."""
    argv = [str(arg) for arg in args]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = run_main(script, *argv)
    result = subprocess.CompletedProcess([script, *argv], status, stdout.getvalue(), stderr.getvalue())
    if check and status != 0:
        raise AssertionError(f"{script} exited {status}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def session_cluster():
    """The address of one LocalCluster (2 workers), started as the scripts start theirs, that in-process
    stage runs join (`run_joined`) instead of each starting its own: 2.5-3 s a run on this machine.

    Its credentials are this run's, as a script's are (TLS, tls://127.0.0.1:PORT): a stage joining it
    in this process finds them in recpipe.cluster; a plain `distributed.Client(session_cluster)` in a
    test, in Dask's configuration, set here for the session.
    """
    import dask

    from recpipe import cluster
    args = argparse.Namespace(scheduler=None, workers=2, threads_per_worker=1, memory_limit=None,
                              dashboard_address=None)
    with cluster.connect(args) as client:
        security = cluster.security_for(client.scheduler.address)
        with dask.config.set({"distributed.comm.tls.ca-file": security.tls_ca_file,
                              "distributed.comm.tls.client.cert": security.tls_client_cert,
                              "distributed.comm.tls.client.key": security.tls_client_key}):
            yield client.scheduler.address


def run_joined(session_cluster, script, *args, check=True):
    """run_in_process on the session's LocalCluster (`session_cluster`, the fixture's value)."""
    return run_in_process(script, *args, "--scheduler", session_cluster, check=check)


def run_script(script, *args, env=None, check=True, timeout=300):
    """Run a top-level script as a user would, with the repository's interpreter."""
    result = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def cleaned_data(session_cluster, tmp_path_factory):
    """raw -> merged -> repartitioned -> cleaned on generated data, once per test session."""
    from recpipe.synthetic import generate
    root = tmp_path_factory.mktemp("pipeline")
    generate(root / "raw", customers=400, items=300, days=18, actions_per_customer=80, seed=3)
    for script, *args in (("merge_and_clean.py", "--raw", root / "raw"), ("repartition.py", "--buckets", "3"),
                          ("parse_ua_strings.py",)):
        run_joined(session_cluster, script, *args, "--data", root / "data")
    return root


@pytest.fixture(scope="session")
def processed_data(session_cluster, cleaned_data, tmp_path_factory):
    """cleaned_data carried on through preprocess.py, in a copy of its own: (data, preprocessors)."""
    import shutil
    root = tmp_path_factory.mktemp("processed")
    shutil.copytree(cleaned_data / "data", root / "data")
    run_joined(session_cluster, "preprocess.py", "--data", root / "data", "--preprocessors", root / "preprocessors",
               "--max-history", "60")
    return root / "data", root / "preprocessors"


@pytest.fixture(scope="session")
def compact_data(session_cluster, processed_data, tmp_path_factory):
    """processed_data's cleaned/ through preprocess.py --layout compact, with the same flags: (data, preprocessors)."""
    import shutil
    root = tmp_path_factory.mktemp("compact")
    shutil.copytree(processed_data[0], root / "data", ignore=shutil.ignore_patterns("processed"))
    run_joined(session_cluster, "preprocess.py", "--data", root / "data", "--preprocessors", root / "preprocessors",
               "--max-history", "60", "--layout", "compact")
    return root / "data", root / "preprocessors"


class ExternalCluster:
    """A `dask scheduler` and `dask worker` processes (two by default) on loopback, as a user would start them.

    - `address`: the scheduler's address (tcp://127.0.0.1:PORT, or tls:// with TLS), for --scheduler;
    - `env`: os.environ with DASK_SCHEDULER_ADDRESS set to it and no PYTHONPATH, to run
      scripts against the cluster (`run_script(..., env=cluster.env)`), and with TLS the
      DASK_DISTRIBUTED__COMM__TLS__* variables docs/cluster.md has a client set;
    - `security`: the credentials of a client (None without TLS);
    - `home`: their working folder, with `scheduler.log`, `worker-1.log`, `worker-2.log`;
    - `scheduler_file`, `scheduler` (Popen), `workers` (the `dask worker` Popens: each
      is a nanny, which runs its Dask worker in a child process and restarts it if it dies);
    - `worker_pids()`: the pids of the worker processes proper, the ones that run tasks;
    - `wait_for_workers(n=2)`: block until n workers are connected (after a restart).
    """

    def __init__(self, address, home, scheduler, workers, env, tls=None):
        self.address, self.home, self.scheduler, self.workers = address, home, scheduler, workers
        self.scheduler_file = home / "scheduler.json"
        self.env = {**env, "DASK_SCHEDULER_ADDRESS": address, **client_tls_environment(tls)}
        self.security = None
        if tls is not None:
            from distributed.security import Security
            self.security = Security(tls_ca_file=str(tls / "ca.crt"), tls_client_cert=str(tls / "dask.crt"),
                                     tls_client_key=str(tls / "dask.key"), require_encryption=True)

    def worker_pids(self):
        import psutil
        pids = []
        for nanny in self.workers:
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(nanny.pid).children():
                    with contextlib.suppress(psutil.Error):
                        if any("spawn_main" in part for part in child.cmdline()):  # not multiprocessing's resource_tracker
                            pids.append(child.pid)
        return pids

    def wait_for_workers(self, n=2, timeout=120):
        import time

        from distributed import Client
        deadline = time.monotonic() + timeout
        while len(self.worker_pids()) < n:  # a nanny restarting its worker
            assert time.monotonic() < deadline, f"fewer than {n} Dask worker processes after {timeout} s"
            time.sleep(0.1)
        with Client(self.address, timeout="30s", security=self.security) as client:
            client.wait_for_workers(n, timeout=timeout)
            return len(client.scheduler_info(n_workers=-1)["workers"])


def client_tls_environment(tls):
    """The variables docs/cluster.md has a client of a TLS cluster set, for the certificates in folder `tls`
    (make_certificates'); none for None."""
    if tls is None:
        return {}
    return {"DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(tls / "ca.crt"),
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": str(tls / "dask.crt"),
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": str(tls / "dask.key")}


def make_certificates(home):
    """Run docs/cluster.md's block that makes a cluster's CA and certificate, as written, with `home` for
    $HOME; the folder it made them in ($HOME/.recpipe/tls)."""
    docs = (ROOT / "docs" / "cluster.md").read_text()
    block = re.search(r"<!-- tests/conftest.py make_certificates runs this block -->\n+```sh\n(.*?)```", docs,
                      re.DOTALL)
    assert block, "docs/cluster.md has no block for make_certificates"
    subprocess.run(["bash", "-e", "-c", block.group(1)], cwd=home, env={**os.environ, "HOME": str(home)},
                   check=True, capture_output=True, timeout=60)
    return home / ".recpipe" / "tls"


@contextlib.contextmanager
def start_external_cluster(home, tls=None, workers=2):
    """An ExternalCluster of `workers` workers whose scheduler runs in `home` and each worker in a folder of its
    own inside it (their logs land in `home`), stopped on exit. Everything listens on 127.0.0.1, dashboards
    too. With `tls`, a folder of make_certificates', they start with docs/cluster.md's --tls-* flags."""
    import time
    dask = Path(sys.executable).parent / "dask"
    scheduler_file = home / "scheduler.json"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DASK_SCHEDULER_ADDRESS")}
    tls_flags = [] if tls is None else ["--tls-ca-file", tls / "ca.crt", "--tls-cert", tls / "dask.crt",
                                        "--tls-key", tls / "dask.key"]
    logs = []

    def start(*argv, log, cwd=home):
        logs.append(open(home / log, "wb"))
        return subprocess.Popen([dask, *argv], cwd=cwd, env=env, stdout=logs[-1], stderr=subprocess.STDOUT)

    # A dashboard address without a host is every interface, a worker's (`dask worker`'s default) too.
    scheduler = start("scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", "127.0.0.1:0",
                      "--scheduler-file", scheduler_file, *tls_flags, log="scheduler.log")
    nannies = []
    try:
        deadline = time.monotonic() + 120
        address = None
        while address is None:
            assert scheduler.poll() is None, f"dask scheduler exited: {(home / 'scheduler.log').read_text()}"
            assert time.monotonic() < deadline, "dask scheduler did not write its scheduler file in 120 s"
            with contextlib.suppress(OSError, ValueError, KeyError):  # not there yet, or half written
                address = json.loads(scheduler_file.read_text())["address"]
            time.sleep(0.1)
        for n in range(1, workers + 1):  # each in a working folder of its own, as on machines of their own
            name = f"worker-{n}"
            (home / name).mkdir()
            nannies.append(start("worker", "--scheduler-file", scheduler_file, "--nthreads", "1", "--host", "127.0.0.1",
                                 "--dashboard-address", "127.0.0.1:0", "--memory-limit", "2GiB", "--name", name,
                                 *tls_flags, log=f"{name}.log", cwd=home / name))
        cluster = ExternalCluster(address, home, scheduler, nannies, env, tls)
        assert cluster.wait_for_workers(workers) == workers
        yield cluster
    finally:
        orphans = ExternalCluster("", home, scheduler, nannies, env).worker_pids()
        for process in [*nannies, scheduler]:
            process.terminate()
        for process in [*nannies, scheduler]:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pid in orphans:  # a worker whose nanny was killed would outlive it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        for log in logs:
            log.close()


@pytest.fixture(scope="session")
def external_cluster(tmp_path_factory):
    """An ExternalCluster for the whole session: `dask scheduler` plus two `dask worker --nthreads 1
    --memory-limit 2GiB` on 127.0.0.1, started outside the repository without PYTHONPATH (scripts
    ship recpipe to the workers themselves), stopped after the session. A test that kills a
    worker leaves it to its nanny to restart, and should `wait_for_workers()` before it ends;
    a test that stops the scheduler starts its own with `start_external_cluster(folder)`.
    """
    with start_external_cluster(tmp_path_factory.mktemp("external-cluster")) as cluster:
        yield cluster
