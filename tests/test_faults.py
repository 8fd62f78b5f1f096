"""Faults at run time: a full disk, a read-only output folder, a Dask worker killed mid-stage.

Each run ends with one line on stderr and no traceback (exit 74: the output could not be
written; 75: the cluster failed), or with the complete new output; never with a partial
one, and never with a staging folder left behind.

The full disk and the read-only folder are real: a small tmpfs and a read-only bind mount,
made inside a user + mount namespace (`unshare -Urm`), so they need no privileges on the
host and vanish with the namespace. Root ignores permission bits, so chmod could not
stand in for a read-only folder.
"""

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import psutil
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, run_joined

# Every fault here needs processes of its own: killed workers, a lost scheduler, a disk that fills up.
pytestmark = pytest.mark.processes

DEADLINE = 180  # seconds; generous, the runs take about 10 s on 2 shared cores


@pytest.fixture(scope="module")
def generated(session_cluster, tmp_path_factory):
    """Generated raw data (119 files: one pass-1 task each) and a complete merged/ made from it."""
    from recpipe.synthetic import generate
    root = tmp_path_factory.mktemp("faults")
    generate(root / "raw", customers=300, items=200, days=18, actions_per_customer=20, seed=7)
    run_joined(session_cluster, "merge_and_clean.py", "--raw", root / "raw", "--data", root / "reference")
    return root / "raw", root / "reference"


def file_hashes(folder):
    """{relative path: sha256} of every file under a folder, the manifest included."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def sha256sum_listing(path):
    """`sha256sum` output as file_hashes() gives it: {relative path: sha256}."""
    return {name.removeprefix("./"): digest
            for digest, name in (line.split(maxsplit=1) for line in path.read_text().splitlines())}


def stage_rows(stage_dir):
    """Every Parquet file's rows, by relative path."""
    return {str(path.relative_to(stage_dir)): pq.read_table(path).to_pandas()
            for path in sorted(stage_dir.rglob("*.parquet"))}


def assert_same_rows(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        pd.testing.assert_frame_equal(actual[name], expected[name])


def one_line(stderr):
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def in_namespace(script):
    """Run a shell script as root of a new user + mount namespace; skip where there is none."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("needs unshare (util-linux) to mount a tmpfs or a read-only bind mount without privileges")
    probe = subprocess.run([unshare, "-Urm", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"this machine allows no user + mount namespace (unshare -Urm: {probe.stderr.strip()})")
    result = subprocess.run([unshare, "-Urm", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True,
                            timeout=DEADLINE)
    assert result.returncode == 0, f"namespace script failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_faults_disk_full_is_one_line_and_keeps_the_previous_output(generated, tmp_path):
    raw, reference = generated
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir()
    out.mkdir()
    q = shlex.quote
    data = disk / "data"
    # The disk holds the previous merged/, then is filled up but for 16 KiB: room for a
    # few of the new run's files, not for a second copy of the stage.
    in_namespace(f"""
        set -e
        mount -t tmpfs -o size=8m tmpfs {q(str(disk))}
        mkdir {q(str(data))}
        cp -a {q(str(reference / "merged"))} {q(str(data / "merged"))}
        dd if=/dev/zero of={q(str(disk / "filler"))} bs=4k 2>/dev/null || true
        truncate -s -16K {q(str(disk / "filler"))}
        (cd {q(str(data))} && find . -type f | sort | xargs sha256sum) > {q(str(out / "before"))}
        set +e
        {q(sys.executable)} merge_and_clean.py --raw {q(str(raw))} --data {q(str(data))} --workers 2 \
            > {q(str(out / "stdout"))} 2> {q(str(out / "stderr"))}
        echo $? > {q(str(out / "status"))}
        set -e
        (cd {q(str(data))} && find . -type f | sort | xargs sha256sum) > {q(str(out / "after"))}
        ls -A {q(str(data))} > {q(str(out / "listing"))}
    """)
    stderr = (out / "stderr").read_text()
    assert int((out / "status").read_text()) == 74, f"{(out / 'stdout').read_text()}\n{stderr}"
    line = one_line(stderr)
    assert line.startswith(f"error: no space left on device while writing {data}/: free space on the disk "
                           f"that holds {data}/ or point --data at one with room"), line
    assert line.endswith(f"nothing was published, the previous output in {data}/ was left as it was"), line
    before, after = sha256sum_listing(out / "before"), sha256sum_listing(out / "after")
    assert before == {f"merged/{name}": digest for name, digest in file_hashes(reference / "merged").items()}
    assert after == before
    assert (out / "listing").read_text().split() == ["merged"]  # no staging folder left


def test_faults_read_only_output_is_one_line_and_keeps_the_previous_output(generated, tmp_path):
    raw, reference = generated
    data, out = tmp_path / "data", tmp_path / "out"
    out.mkdir()
    shutil.copytree(reference / "merged", data / "merged")
    before = file_hashes(data)
    q = shlex.quote
    in_namespace(f"""
        set -e
        mount --bind {q(str(data))} {q(str(data))}
        mount -o remount,bind,ro {q(str(data))}
        set +e
        {q(sys.executable)} merge_and_clean.py --raw {q(str(raw))} --data {q(str(data))} --workers 2 \
            > {q(str(out / "stdout"))} 2> {q(str(out / "stderr"))}
        echo $? > {q(str(out / "status"))}
    """)
    stderr = (out / "stderr").read_text()
    assert int((out / "status").read_text()) == 74, f"{(out / 'stdout').read_text()}\n{stderr}"
    line = one_line(stderr)
    assert line.startswith(f"error: read-only file system: cannot write {data}/.merged."), line  # its lock or staging
    assert f"make {data}/ writable or point --data at a folder that is" in line
    assert line.endswith(f"nothing was published, the previous output in {data}/ was left as it was"), line
    assert file_hashes(data) == before
    assert sorted(path.name for path in data.iterdir()) == ["merged"]


def raised_from(error, cause):
    error.__cause__ = cause
    return error


@pytest.mark.parametrize("error, expected", [
    # PyArrow's text when it carries no errno, and the errno it carries (26.0)
    (OSError("Error writing bytes to file. Detail: [errno 28] No space left on device"),
     "no space left on device while writing /d/: free space on the disk that holds /d/"),
    (OSError(30, "Failed to open local file '/d/.merged.staging-h-1/a.parquet'. Detail: [errno 30] Read-only file system"),
     "read-only file system: cannot write /d/.merged.staging-h-1/a.parquet: make /d/ writable"),
    (OSError(122, "Disk quota exceeded"), "disk quota exceeded while writing /d/"),
    (OSError(27, "File too large"), "file too large for its file system"),
    # shutil.copytree gathers its failures in a shutil.Error
    (shutil.Error([("/d/x", "/p/.staging/x", "[Errno 28] No space left on device: '/p/.staging/x'")]),
     "no space left on device while writing /p/.staging/x: free space on the disk that holds /p/.staging/x"),
    (raised_from(RuntimeError("a task failed"), OSError(28, "No space left on device")),
     "no space left on device while writing /d/"),
    (FileNotFoundError(2, "No such file or directory", "/d/x"), None),
    (ValueError("Permission denied"), None),  # only OSErrors and PyArrow's errors are judged by their text
])
def test_faults_output_failure_reads_errno_from_errno_text_or_cause(error, expected):
    from recpipe.cli import output_failure
    message = output_failure(error, folder="/d")
    if expected is None:
        assert message is None
    else:
        assert message.startswith(expected), message


def start_stage(raw, data, env, flags=()):
    """merge_and_clean.py in the background, in its own session (so a failed test can stop it all)."""
    log = data.parent / "run.log"
    process = subprocess.Popen([sys.executable, "merge_and_clean.py", "--raw", str(raw), "--data", str(data), *flags],
                               cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    return process, log


def wait_for_staged_output(process, data):
    """Block until the run's staging folder holds a written file: the stage is under way, most tasks to come."""
    deadline = time.monotonic() + DEADLINE
    while not list(data.glob(".merged.staging-*/actions/*.parquet")):
        assert process.poll() is None, f"the run ended before a worker could be killed: {process.stderr.read()}"
        assert time.monotonic() < deadline, "the run wrote nothing in its staging folder in time"
        time.sleep(0.02)


def stop(process):
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_faults_worker_killed_midway_is_rescheduled_and_publishes_all_rows(generated, external_cluster, tmp_path):
    """SIGKILL one of two external workers mid-stage: Dask reruns its tasks elsewhere (or on the
    worker its nanny restarts), and the published output is the reference's, file for file."""
    raw, reference = generated
    data = tmp_path / "data"
    shutil.copytree(reference / "merged", data / "merged")
    previous_manifest = (data / "merged" / "_stage.json").read_text()
    assert external_cluster.wait_for_workers(2) == 2
    process, log = start_stage(raw, data, external_cluster.env)
    try:
        wait_for_staged_output(process, data)
        victim = external_cluster.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        _, stderr = process.communicate(timeout=DEADLINE)
    finally:
        stop(process)
    assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE
    assert process.returncode == 0, f"{log.read_text()}\n{stderr}"
    manifest = json.loads((data / "merged" / "_stage.json").read_text())
    assert (data / "merged" / "_stage.json").read_text() != previous_manifest  # published anew
    assert manifest["accounting"] == json.loads((reference / "merged" / "_stage.json").read_text())["accounting"]
    # Rerun tasks rewrote the files their killed attempt had begun: no extra, partial or duplicate
    # file, and every file byte for byte the reference's (the stage writes deterministically).
    published = {name: digest for name, digest in file_hashes(data / "merged").items() if name != "_stage.json"}
    expected = {name: digest for name, digest in file_hashes(reference / "merged").items() if name != "_stage.json"}
    assert published == expected
    assert_same_rows(stage_rows(data / "merged"), stage_rows(reference / "merged"))
    assert sorted(path.name for path in data.iterdir()) == ["merged"]
    assert external_cluster.wait_for_workers(2) == 2  # the nanny restarted it: the cluster is whole for later tests
    nanny_logs = "".join((external_cluster.home / f"worker-{n}.log").read_text() for n in (1, 2))
    assert f"Worker process {victim} was killed by signal 9" in nanny_logs


def test_faults_workers_dying_past_allowed_failures_is_one_line_and_keeps_the_previous_output(generated, tmp_path):
    """With distributed.scheduler.allowed-failures 0, a task whose worker dies is not retried:
    the stage fails with KilledWorker, said in one line, and publishes nothing."""
    raw, reference = generated
    data = tmp_path / "data"
    shutil.copytree(reference / "merged", data / "merged")
    before = file_hashes(data)
    env = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}
    process, log = start_stage(raw, data, env, ["--workers", "2"])  # worker processes, not threads, to kill
    try:
        wait_for_staged_output(process, data)
        workers = [child for child in psutil.Process(process.pid).children()
                   if any("spawn_main" in part for part in child.cmdline())]  # LocalCluster's worker processes
        assert len(workers) == 2
        workers[0].kill()
        _, stderr = process.communicate(timeout=DEADLINE)
    finally:
        stop(process)
    assert process.returncode == 75, f"{log.read_text()}\n{stderr}"
    line = one_line(stderr)
    assert line.startswith("error: Dask workers died while running task 'clean-"), line
    assert "check --memory-limit" in line
    assert line.endswith(f"nothing was published, the previous output in {data}/ was left as it was"), line
    assert file_hashes(data) == before
    assert sorted(path.name for path in data.iterdir()) == ["merged"]


def test_faults_scheduler_lost_midway_is_one_line_and_keeps_the_previous_output(generated, tmp_path):
    """SIGKILL the scheduler of an external cluster mid-stage: one line, exit 75, merged/ as it was.

    Workers that lose their scheduler finish the task they are running, and it may write
    into the staging folder after the client removed it; that folder's owner is then dead,
    so the next run of the stage removes it, which is checked here.
    """
    from conftest import start_external_cluster
    from recpipe import folders
    raw, reference = generated
    data = tmp_path / "data"
    shutil.copytree(reference / "merged", data / "merged")
    before = file_hashes(data)
    home = tmp_path / "cluster"
    home.mkdir()
    with start_external_cluster(home) as cluster:
        process, log = start_stage(raw, data, cluster.env)
        try:
            wait_for_staged_output(process, data)
            cluster.scheduler.kill()
            _, stderr = process.communicate(timeout=DEADLINE)
        finally:
            stop(process)
    assert process.returncode == 75, f"{log.read_text()}\n{stderr}"
    line = one_line(stderr)
    assert line.startswith(f"error: lost the connection to the Dask scheduler at {cluster.address} while the "
                           "stage ran"), line
    assert line.endswith(f"nothing was published, the previous output in {data}/ was left as it was"), line
    assert file_hashes(data / "merged") == {name.removeprefix("merged/"): digest for name, digest in before.items()}
    folders.remove_abandoned(folders.leftovers(data.resolve(), "merged"))
    assert sorted(path.name for path in data.iterdir()) == ["merged"]
