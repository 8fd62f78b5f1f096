"""The cluster helper: LocalCluster sizing, a dashboard that really serves and stays on this machine unless
asked, clear errors for every cluster flag, a LocalCluster no other process can join, an external cluster
with TLS as docs/cluster.md sets it up, progress lines in a log."""

import argparse
import contextlib
import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
import types
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import dask
import psutil
import pytest
from conftest import ROOT, listing, make_certificates, one_line, run_in_process, run_script, start_external_cluster

from recpipe import cluster
from recpipe.cli import UserError


def parse(*argv):
    parser = argparse.ArgumentParser()
    cluster.add_arguments(parser)
    return parser.parse_args(argv)


def listening_sockets(root=None):
    """(pid, ip, port) of every TCP socket listening in a process (default: this one) and its children
    (workers, nannies)."""
    root = root or psutil.Process()
    found = []
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            found += [(process.pid, c.laddr.ip, c.laddr.port) for c in process.net_connections(kind="tcp")
                      if c.status == psutil.CONN_LISTEN]
    return found


@pytest.fixture
def silent_server():
    """A port that accepts connections (the kernel completes them) and never says a word, as a web server does."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


def test_cluster_local_size_shares_three_quarters_of_memory():
    workers, memory_limit = cluster.local_cluster_size(workers=2)
    assert workers == 2
    assert memory_limit == int(psutil.virtual_memory().total * 0.75 / 2)
    assert cluster.local_cluster_size(workers=1, memory_limit="2GiB") == (1, 2 * 2**30)


def test_cluster_local_size_gives_each_default_worker_at_least_the_minimum(monkeypatch):
    """64 cores and 8 GiB: one worker per core would get 96 MiB each."""
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(total=8 * 2**30))
    assert cluster.local_cluster_size() == (24, 256 * 2**20)
    with pytest.raises(UserError, match="--workers 64: .* 96.00 MiB each, less than the 256 MiB .* at most 24"):
        cluster.local_cluster_size(workers=64)


@pytest.mark.parametrize("workers, memory_limit, message", [
    (0, None, "--workers 0"), (1, "lots", "--memory-limit 'lots' is not a size"),
    (1, "1kB", "--memory-limit '1kB' is less than the 256 MiB a Dask worker needs")],
    ids=["workers-0", "memory-lots", "memory-1kB"])
def test_cluster_local_size_rejects_bad_flags(workers, memory_limit, message):
    with pytest.raises(UserError, match=message):
        cluster.local_cluster_size(workers=workers, memory_limit=memory_limit)


@pytest.mark.parametrize("argv, message", [
    (["--workers", "0"], "argument --workers: must be at least 1, got 0"),
    (["--workers", "-1"], "argument --workers: must be at least 1, got -1"),
    (["--workers", "two"], "argument --workers: 'two' is not a whole number"),
    (["--threads-per-worker", "0"], "argument --threads-per-worker: must be at least 1, got 0"),
    (["--memory-limit", "0.5"], "argument --memory-limit: '0.5' is less than the 256 MiB"),
    (["--memory-limit", "99999TiB"], "argument --memory-limit: '99999TiB' is more than this machine's "
                                     f"{cluster.format_bytes(psutil.virtual_memory().total)} of memory; give each "
                                     "worker at most that, or leave --memory-limit out"),
    (["--dashboard-address", "8787"], "argument --dashboard-address: '8787' is not [HOST]:PORT; write it like "
                                      "127.0.0.1:8787 (this machine only) or :8787 (every interface)"),
    (["--dashboard-address", "tcp://127.0.0.1:8787"], "argument --dashboard-address: 'tcp://127.0.0.1:8787' is not"),
    (["--dashboard-address", ":65536"], "argument --dashboard-address: ':65536' is not [HOST]:PORT"),
], ids=["workers-0", "workers--1", "workers-two", "threads-0", "memory-0.5", "memory-99999TiB", "dashboard-8787",
        "dashboard-url", "dashboard-port-65536"])
def test_cluster_flags_reject_bad_values_naming_the_flag(capsys, argv, message):
    with pytest.raises(SystemExit) as exit:
        parse(*argv)
    assert exit.value.code == 2
    assert message in capsys.readouterr().err.splitlines()[-1]


def test_cluster_scheduler_flag_defaults_to_environment(monkeypatch):
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://10.0.0.1:8786")
    assert parse().scheduler == "tcp://10.0.0.1:8786"


@pytest.mark.parametrize("address, message", [
    ("tcp://127.0.0.1:9", "could not reach the Dask scheduler at --scheduler tcp://127.0.0.1:9 (Timed out trying "
                          "to connect to tcp://127.0.0.1:9 after 1 s); start one with `dask scheduler`"),
    ("tcp://127.0.0.1:{silent}", "no Dask scheduler answered at --scheduler tcp://127.0.0.1:{silent}: something "
                                 "there accepted the connection but did not answer as one within 2 s"),
    ("tcp://127.0.0.1:99999", "--scheduler tcp://127.0.0.1:99999 is not a Dask scheduler address: it needs a host "
                              "and a port (1-65535); give the address `dask scheduler` prints"),
    ("tls://127.0.0.1:9", "--scheduler tls://127.0.0.1:9: a tls:// scheduler admits only clients holding a "
                          "certificate its cluster's CA signed, and Dask's configuration names no "
                          "distributed.comm.tls.ca-file and no distributed.comm.tls.client.cert; set "
                          "$DASK_DISTRIBUTED__COMM__TLS__CA_FILE, $DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT and "
                          "$DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY to the PEM files"),
], ids=["unreachable", "silent-server", "port-out-of-range", "tls-unconfigured"])
def test_cluster_scheduler_that_cannot_be_joined_is_a_user_error(monkeypatch, silent_server, address, message):
    """Timeouts shortened from 10 s + 10 s to 1 s + 1 s; a silent server hung Dask's client forever."""
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT", 1)
    monkeypatch.setattr(cluster, "HANDSHAKE_TIMEOUT", 1)
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    address, message = address.format(silent=silent_server), message.format(silent=silent_server)
    with dask.config.set(UNCONFIGURED), pytest.raises(UserError) as error, \
            cluster.connect(parse("--scheduler", address)):
        pass
    assert message in str(error.value)


# No TLS credentials in Dask's configuration (the session cluster's fixture puts its own there).
UNCONFIGURED = dict.fromkeys(cluster.TLS_CONFIG)


def test_cluster_tcp_address_of_a_tls_scheduler_says_to_give_tls(session_cluster):
    """The session's LocalCluster, as pipeline.py run's stages join it, but named tcp://."""
    plain = session_cluster.replace("tls://", "tcp://")
    with pytest.raises(UserError) as error, cluster.connect(parse("--scheduler", plain)):
        pass
    assert str(error.value).startswith(f"the Dask scheduler at --scheduler {plain} closed the connection as it "
                                       "opened (")
    assert f"a scheduler with TLS certificates takes tls:// addresses only: give {session_cluster}, and set " \
        in str(error.value)


@pytest.mark.processes
@pytest.mark.parametrize("flags, environment, message", [
    (["--scheduler", "foo"], {}, "error: --scheduler foo is not a Dask scheduler address: it needs a host and a "
                                 "port (1-65535); give the address `dask scheduler` prints, like tcp://HOST:8786, or "
                                 "leave --scheduler and $DASK_SCHEDULER_ADDRESS unset to use a LocalCluster"),
    ([], {"DASK_SCHEDULER_ADDRESS": "localhost"}, "error: DASK_SCHEDULER_ADDRESS=localhost is not a Dask scheduler "
                                                  "address: it needs a host and a port"),
    (["--scheduler", "inproc://x"], {}, "error: --scheduler inproc://x: an inproc:// address reaches only a "
                                        "scheduler inside the same process"),
    (["--threads-per-worker", "-2"], {}, "error: argument --threads-per-worker: must be at least 1, got -2"),
    (["--memory-limit=-5GiB"], {}, "error: argument --memory-limit: '-5GiB' is less than the 256 MiB a Dask worker "
                                   "needs"),
    (["--memory-limit", "1kB"], {}, "error: argument --memory-limit: '1kB' is less than the 256 MiB a Dask worker "
                                    "needs (with pandas and PyArrow loaded it holds about 180 MiB before any data); "
                                    "give each worker at least that, e.g. 4GiB"),
    (["--memory-limit", "lots"], {}, "error: argument --memory-limit: 'lots' is not a size; write it like 8GiB"),
    (["--memory-limit", "99999TiB"], {}, "error: argument --memory-limit: '99999TiB' is more than this machine's "),
], ids=["scheduler-foo", "env-localhost", "scheduler-inproc", "threads--2", "memory--5GiB", "memory-1kB",
        "memory-lots", "memory-99999TiB"])
def test_cluster_bad_flags_stop_a_script_with_one_line_and_write_nothing(raw_dir, tmp_path, flags, environment,
                                                                         message):
    (tmp_path / "data").mkdir()  # there or not, the stage may make it; nothing may land in it
    before = sorted(tmp_path.rglob("*"))
    env = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"} | environment
    result = run_script("merge_and_clean.py", "--raw", raw_dir, "--data", tmp_path / "data", *flags, env=env,
                        check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert message in result.stderr.splitlines()[-1]  # argparse prints its usage first
    assert sorted(tmp_path.rglob("*")) == before


def test_cluster_local_cluster_listens_on_loopback_only():
    """The scheduler, its dashboard, the workers and their nannies: none reachable from another machine."""
    with cluster.connect(parse("--workers", "2")) as client:
        sockets = listening_sockets()
        ports = {urllib.parse.urlparse(client.dashboard_link).port, int(client.scheduler.address.rpartition(":")[2])}
    assert {port for _, _, port in sockets} >= ports
    assert len({pid for pid, _, _ in sockets}) >= 3  # this process and two workers' (their nannies' are this one's)
    assert [s for s in sockets if not ipaddress.ip_address(s[1]).is_loopback] == []


@pytest.mark.processes
def test_cluster_a_script_and_its_workers_listen_on_loopback_only(raw_dir, tmp_path):
    """merge_and_clean.py as a user runs it: the dashboard it links, and everything else it and its workers
    listen on, cannot be reached from another machine (the dashboard used to listen on every interface)."""
    process = subprocess.Popen([sys.executable, "merge_and_clean.py", "--raw", str(raw_dir), "--data",
                                str(tmp_path / "data"), "--workers", "1"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    sockets, link = [], None
    for line in process.stdout:
        if line.startswith("Dask dashboard: "):  # the cluster is up, the stage is still to run
            link = urllib.parse.urlparse(line.split()[2])
            sockets = listening_sockets(psutil.Process(process.pid))
    assert process.wait(timeout=120) == 0
    assert link.hostname == "127.0.0.1" and link.port in {port for _, _, port in sockets}
    assert [s for s in sockets if not ipaddress.ip_address(s[1]).is_loopback] == []


def test_cluster_in_process_only_for_a_small_input_and_no_cluster_flags():
    small, large = 64 * 2**20, cluster.IN_PROCESS_MAX_BYTES + 1
    assert "cleaned/ holds 64.00 MiB" in cluster.in_process_reason(parse(), small, "cleaned")
    assert cluster.in_process_reason(parse(), large, "cleaned") is None
    for flags in (["--workers", "2"], ["--threads-per-worker", "1"], ["--memory-limit", "1GiB"],
                  ["--scheduler", "tcp://127.0.0.1:8786"]):
        assert cluster.in_process_reason(parse(*flags), small, "cleaned") is None, flags


def test_cluster_in_process_runs_tasks_on_threads_here_and_opens_no_port_beyond_loopback(capsys):
    with cluster.connect(parse(), "a test's reason") as client:
        sockets = listening_sockets()
        link = [line.split()[2] for line in capsys.readouterr().out.splitlines() if line.startswith("Dask dashboard: ")]
        with urllib.request.urlopen(link[0], timeout=30) as response:
            assert response.status == 200
        futures = [client.submit(os.getpid, pure=False) for _ in range(4)]
        assert set(cluster.wait_with_progress(futures, "asking")) == {os.getpid()}
        assert client.scheduler.address.startswith("inproc://")
    assert urllib.parse.urlparse(link[0]).hostname == "127.0.0.1"
    assert sockets and [s for s in sockets if not ipaddress.ip_address(s[1]).is_loopback] == []


def test_cluster_dashboard_falls_back_to_a_free_port_when_its_own_is_taken(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setattr(cluster, "DEFAULT_DASHBOARD", taken.getsockname())
        assert cluster._dashboard_address(None) == ("127.0.0.1", 0)


def test_cluster_dashboard_address_not_of_this_machine_fails_before_a_cluster_starts():
    with pytest.raises(UserError, match=r"--dashboard-address 192\.0\.2\.1:8787: cannot listen there \(.*\); "
                                        r"give an address of this machine"):
        cluster._dashboard_address("192.0.2.1:8787")  # TEST-NET-1: no machine's


def test_cluster_dashboard_address_flag_opens_it_and_the_link_serves(capsys):
    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    args = parse("--workers", "1", "--memory-limit", "1GiB", "--dashboard-address", f":{port}")
    with cluster.connect(args) as client:
        dashboard = [ip for _, ip, listening in listening_sockets() if listening == port]
        link = client.dashboard_link
        with urllib.request.urlopen(link, timeout=30) as response:
            assert response.status == 200
        futures = [client.submit(pow, n, 2) for n in range(5)]
        assert cluster.wait_with_progress(futures, "squaring") == [0, 1, 4, 9, 16]
    assert dashboard and all(ipaddress.ip_address(ip).is_unspecified for ip in dashboard)
    out = capsys.readouterr().out
    assert f"Dask dashboard: {link} (--dashboard-address :{port}: listening on every interface)" in out
    assert "squaring: 5/5 tasks done" in out and out.count("squaring:") == 1  # in a log, a quick phase: one line


def test_cluster_ships_the_package_without_what_only_the_generator_uses(tmp_path):
    with zipfile.ZipFile(cluster.package_archive(tmp_path)) as archive:
        names = archive.namelist()
    package = Path(cluster.__file__).parent
    modules = [f"recpipe/{path.relative_to(package).as_posix()}" for path in package.rglob("*.py")]
    # The generator is a subpackage: none of its modules is shipped, every other module is.
    assert "recpipe/synthetic/__init__.py" in modules and "recpipe/synthetic/sources.py" in modules
    assert sorted(names) == sorted(name for name in modules if not name.startswith("recpipe/synthetic/"))
    assert "recpipe/merge.py" in names


def test_cluster_joining_a_scheduler_of_this_process_leaves_its_imports_alone(session_cluster):
    """As pipeline.py run's stages join its LocalCluster: recpipe is not shipped there, since Dask would put
    the archive first on this process's sys.path and reload recpipe from it (without synthetic/)."""
    import recpipe
    package_path = list(recpipe.__path__)
    with cluster.connect(parse("--scheduler", session_cluster)) as client:
        assert client.submit(sum, [1, 2]).result() == 3
    assert list(recpipe.__path__) == package_path
    assert not [entry for entry in sys.path if Path(entry).name == "recpipe.zip"]
    from recpipe import synthetic  # still importable: the checkout's package, whole
    assert Path(synthetic.__file__).parent.parent == Path(recpipe.__file__).parent


def test_cluster_progress_line_comes_while_one_long_task_runs(session_cluster, monkeypatch, capsys):
    """In a log: a line each LOG_PROGRESS_SECONDS though no task has ended (a 9-minute gzip file said nothing)."""
    monkeypatch.setattr(cluster, "LOG_PROGRESS_SECONDS", 0.2)
    with cluster.connect(parse("--scheduler", session_cluster)) as client:
        assert cluster.wait_with_progress([client.submit(time.sleep, 1.2, pure=False)], "sleeping") == [None]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sleeping:")]
    assert len(lines) >= 3, lines
    assert all(line.startswith("sleeping: 0/1 tasks done (") for line in lines[:-1]), lines
    assert lines[-1].startswith("sleeping: 1/1 tasks done (")  # the closing line, and nothing after it


# Run by a second process: every way in it has to every listener of a cluster (scheduler, workers,
# nannies), each trying to run `id` there and write what it says into a file. "own" is the run's own
# credentials, read from files the test writes: the attack itself works, so the refusals are real.
ATTACK = r"""
import asyncio, json, sys
import cloudpickle
from distributed import Client
from distributed.core import rpc
from distributed.security import Security

targets, folder, own = json.loads(sys.argv[1])

def pwn(path):
    import subprocess
    with open(path, "w") as out:
        out.write(subprocess.run(["id"], capture_output=True, text=True).stdout)
    return "ran"

async def attempt(n, kind, address, way):
    scheme = "tcp" if way == "plain tcp" else "tls"
    address = scheme + "://" + address.partition("://")[2]
    security = {"plain tcp": Security(), "no credentials": Security(), "credentials of its own": Security.temporary(),
                "own": Security(require_encryption=True, **own)}[way]
    path = f"{folder}/{n}"
    try:
        if kind == "scheduler":
            async with Client(address, security=security, asynchronous=True, timeout="5s") as client:
                await client.submit(pwn, path, pure=False)
        else:
            async with rpc(address, connection_args=security.get_connection_args("client"), timeout=5) as remote:
                await asyncio.wait_for(remote.run(function=cloudpickle.dumps(pwn), args=cloudpickle.dumps((path,))), 10)
        return [n, kind, address, way, "ran"]
    except Exception as error:
        return [n, kind, address, way, f"refused ({type(error).__name__})"]

async def main():
    ways = ["plain tcp", "no credentials", "credentials of its own", "own"]
    tries = [(kind, address, way) for kind, address in targets for way in ways]
    print(json.dumps(await asyncio.gather(*(attempt(n, *a) for n, a in enumerate(tries)))))

asyncio.run(main())
"""


@pytest.mark.processes
def test_cluster_local_cluster_refuses_every_other_process(session_cluster, tmp_path):
    """The session's LocalCluster, started by cluster.connect as every script starts its own: another process
    reaches none of its listeners without this run's credentials (before, any local user ran code as ours)."""
    with cluster.connect(parse("--scheduler", session_cluster)) as client:
        workers = client.scheduler_info(n_workers=-1)["workers"]
    targets = [["scheduler", session_cluster]] + [[kind, address] for worker, info in workers.items()
                                                  for kind, address in (("worker", worker), ("nanny", info["nanny"]))]
    assert len(targets) == 5 and all(address.startswith("tls://127.0.0.1:") for _, address in targets)
    security = cluster.security_for(session_cluster)
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    own = {}
    for name in ("tls_ca_file", "tls_client_cert", "tls_client_key"):
        (keys / name).write_text(getattr(security, name))
        own[name] = str(keys / name)
    written = tmp_path / "written"
    written.mkdir()
    before = listing(tmp_path)
    attack = subprocess.run([sys.executable, "-c", ATTACK, json.dumps([targets, str(written), own])], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert attack.returncode == 0, attack.stderr
    outcomes = json.loads(attack.stdout)
    assert len(outcomes) == 20
    for n, kind, address, way, outcome in outcomes:
        assert (outcome == "ran") == (way == "own"), (kind, address, way, outcome)
    # Only the run's own credentials wrote anything: `id`'s output, from each of the five listeners.
    assert sorted(int(path.name) for path in written.iterdir()) == [n for n, *_, way, _ in outcomes if way == "own"]
    assert all(path.read_text().startswith("uid=") for path in written.iterdir())
    assert {path: size for path, size in listing(tmp_path).items() if not path.startswith("written/")} == before


@pytest.mark.processes
def test_cluster_external_tls_cluster_as_docs_set_it_up_runs_a_stage(raw_dir, tmp_path):
    """docs/cluster.md's certificates (its block, run as written), a `dask scheduler` and a `dask worker` with
    its --tls-* flags, and merge_and_clean.py joining through the client variables it names: every listener
    is on 127.0.0.1, the Dask ones tls://; the same script without the variables is one line, exit 2."""
    from distributed import Client
    home = tmp_path / "home"
    home.mkdir()
    tls = make_certificates(home)
    assert {path.name for path in tls.iterdir()} >= {"ca.crt", "ca.key", "dask.crt", "dask.key"}
    assert (tls.stat().st_mode & 0o077) == 0 and (tls / "dask.key").stat().st_mode & 0o077 == 0
    with start_external_cluster(home, tls=tls, workers=1) as external:
        processes = [psutil.Process(external.scheduler.pid), psutil.Process(external.workers[0].pid)]
        sockets = [s for process in processes for s in listening_sockets(process)]
        assert len(sockets) >= 5  # the scheduler and its dashboard, the nanny, the worker and its dashboard
        assert [s for s in sockets if not ipaddress.ip_address(s[1]).is_loopback] == []
        with Client(external.address, security=external.security, timeout="30s") as client:
            (worker, info), = client.scheduler_info(n_workers=-1)["workers"].items()
        assert [external.address[:16], worker[:16], info["nanny"][:16]] == ["tls://127.0.0.1:"] * 3

        data = tmp_path / "data"

        def outside_the_cluster():  # its logs grow as it runs
            return {path: size for path, size in listing(tmp_path).items() if not path.startswith("home")}

        before = outside_the_cluster()
        with dask.config.set(UNCONFIGURED):  # as a shell without the variables: this process's Dask has none
            refused = run_in_process("merge_and_clean.py", "--raw", raw_dir, "--data", data, "--scheduler",
                                     external.address, check=False)
        assert refused.returncode == 2
        assert one_line(refused.stderr).startswith(
            f"error: --scheduler {external.address}: a tls:// scheduler admits only clients holding a certificate "
            f"its cluster's CA signed, and Dask's configuration names no distributed.comm.tls.ca-file")
        assert outside_the_cluster() == before

        joined = run_script("merge_and_clean.py", "--raw", raw_dir, "--data", data, env=external.env)
        assert f"Dask: joined scheduler {external.address} (1 workers)" in joined.stdout
        assert (data / "merged" / "_stage.json").exists()
