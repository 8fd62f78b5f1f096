"""Raw files in object storage: merge_and_clean.py reading s3:// from an S3-compatible server (moto's, started
here on loopback as a separate process) gives what it gives from a local folder; URLs it cannot open are one line."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import fsspec
import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import one_line, run_in_process, run_script, write_planted_raw
from recpipe import merge, pipeline, raw, stage

BUCKET = "logs"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}


def free_port():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        return listener.getsockname()[1]


@contextlib.contextmanager
def moto_server():
    """moto's S3 server on a free port of 127.0.0.1, in its own process: its endpoint URL."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert server.poll() is None and time.monotonic() < deadline, "moto's server did not start"
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3 endpoint on loopback (moto_server), this process's environment pointing at it while the module
    runs, a bucket holding the planted raw files (every source and format, gzip, bad rows) under raw/, the same
    files in a local folder, and a LocalCluster whose workers were started with that environment:
    (endpoint, local raw, scheduler)."""
    from distributed import LocalCluster
    saved = {name: os.environ.get(name) for name in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    with moto_server() as endpoint:
        os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
        try:
            local = write_planted_raw(tmp_path_factory.mktemp("s3"))
            store = fsspec.filesystem("s3")
            store.mkdir(BUCKET)
            store.put(f"{local}/", f"{BUCKET}/raw/", recursive=True)
            with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                              dashboard_address="127.0.0.1:0") as cluster:
                yield endpoint, local, cluster.scheduler_address
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def tables(merged):
    """merged/'s tables as frames, the quarantine's source_file made relative to the raw folder or URL."""
    manifest = stage.read_manifest(merged)
    found = {name: pq.read_table(merged / name).to_pandas() for name in ("actions", "impressions", "_quarantine")}
    found["_quarantine"]["source_file"] = found["_quarantine"]["source_file"].str.replace(
        manifest["inputs"][0]["raw"] + "/", "", regex=False)
    return found, manifest


@pytest.fixture(scope="module")
def merged(s3, tmp_path_factory):
    """merge_and_clean.py run on the bucket's raw/ and on the local folder: {"s3": data, "folder": data}."""
    endpoint, local, scheduler = s3
    runs = {"s3": (f"s3://{BUCKET}/raw", tmp_path_factory.mktemp("from-s3")),
            "folder": (local, tmp_path_factory.mktemp("from-folder"))}
    for where, data in runs.values():
        run_in_process("merge_and_clean.py", "--raw", where, "--data", data, "--scheduler", scheduler)
    return {name: data for name, (_, data) in runs.items()}


def test_storage_merge_reads_raw_files_from_s3_as_from_a_local_folder(merged):
    from_s3, s3_manifest = tables(merged["s3"] / "merged")
    from_folder, folder_manifest = tables(merged["folder"] / "merged")
    assert s3_manifest["inputs"][0]["raw"] == f"s3://{BUCKET}/raw"
    assert s3_manifest["accounting"] == folder_manifest["accounting"]
    for name in from_folder:
        pd.testing.assert_frame_equal(from_s3[name], from_folder[name])
    assert from_folder["_quarantine"]["source_file"].str.startswith("clicks/").any()


def test_storage_objects_are_read_in_byte_ranges(s3, merged, tmp_path, capsys):
    """Uncompressed JSON Lines and CSV objects cut into 100-byte ranges (ranged reads of each object): the rows
    of reading each whole."""
    from distributed import Client
    with Client(s3[2]) as client:
        accounting = merge.merge_and_clean(client, raw.list_raw_files(f"s3://{BUCKET}/raw"), tmp_path, 1, 1, 14,
                                           split_bytes=100)[0]
    assert " ranges were read by " in capsys.readouterr().out
    assert accounting == stage.read_manifest(merged["folder"] / "merged")["accounting"]
    for name in ("actions", "impressions"):
        pd.testing.assert_frame_equal(pq.read_table(tmp_path / name).to_pandas(),
                                      pq.read_table(merged["folder"] / "merged" / name).to_pandas())


@pytest.mark.parametrize("raw_url, environment, message", [
    ("foo://bucket/raw", {}, "foo://bucket/raw: foo:// is not a storage this pipeline reads"),
    ("s3://no-such-bucket/raw", {}, "--raw s3://no-such-bucket/raw: the bucket (or container) s3://no-such-bucket/ "
                                    "does not exist"),
    # Listings may come from this process's cache of earlier tests: the first request that fails names its object.
    (f"s3://{BUCKET}/raw", {"AWS_ENDPOINT_URL": "http://127.0.0.1:{closed}", "AWS_MAX_ATTEMPTS": "1"},
     f"s3://{BUCKET}/raw/impressions*: cannot be read: the endpoint cannot be reached"),
    (f"s3://{BUCKET}/raw", {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
                            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"},
     f"s3://{BUCKET}/raw/impressions*: cannot be read: no credentials found"),
])
def test_storage_a_url_that_cannot_be_opened_is_one_line(s3, tmp_path, monkeypatch, raw_url, environment, message):
    for name, value in environment.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value.format(closed=free_port()))
    result = run_in_process("merge_and_clean.py", "--raw", raw_url, "--data", tmp_path / "data", check=False)
    assert result.returncode == 2
    where, _, cause = message.partition("*")
    line = one_line(result.stderr)
    assert line.startswith(f"error: {where}") and cause in line
    assert not (tmp_path / "data").exists()


def test_storage_options_reach_this_process_and_every_worker(s3, merged, tmp_path, monkeypatch):
    """A bucket on a second endpoint that only --storage-options names: the environment, here and on the
    workers, points at the first, which has no such bucket."""
    from distributed import Client
    endpoint, local, scheduler = s3
    monkeypatch.setitem(fsspec.config.conf, "s3", {})  # what --storage-options sets here is undone after the test
    with moto_server() as second, Client(scheduler) as client:
        try:
            store = fsspec.filesystem("s3", endpoint_url=second)
            store.mkdir("elsewhere")
            store.put(f"{local}/", "elsewhere/raw/", recursive=True)
            run_in_process("merge_and_clean.py", "--raw", "s3://elsewhere/raw", "--data", tmp_path, "--scheduler",
                           scheduler, "--storage-options", json.dumps({"endpoint_url": second}))
        finally:
            client.unregister_worker_plugin("recpipe-storage-options")
            client.run(lambda: fsspec.config.conf.pop("s3", None))
    assert stage.read_manifest(tmp_path / "merged")["accounting"] == \
        stage.read_manifest(merged["folder"] / "merged")["accounting"]
    assert "endpoint_url" not in (tmp_path / "merged" / stage.MANIFEST).read_text()  # options are recorded nowhere


@pytest.mark.processes
def test_storage_workers_elsewhere_read_the_raw_files_from_s3_and_make_what_a_local_run_makes(
        s3, external_cluster, processed_data, cleaned_data, tmp_path):
    """`pipeline.py run --scheduler` on the session's `dask scheduler` and two `dask worker`s, started in a folder
    of their own before this module set the endpoint, which they learn from --storage-options alone: the four
    stages from s3:// make, from repartitioned/ on, the bytes the stage scripts made on a LocalCluster from the
    same files in a local folder (the session's data), and the same preprocessors. (merged/ differs only in
    its quarantine's source_file; test_merge runs merge_and_clean.py on an external cluster from a folder.)"""
    endpoint = s3[0]
    fsspec.filesystem("s3").put(f"{cleaned_data / 'raw'}/", f"{BUCKET}/session/", recursive=True)
    options = json.dumps({"endpoint_url": endpoint, "key": S3_ENV["AWS_ACCESS_KEY_ID"],
                          "secret": S3_ENV["AWS_SECRET_ACCESS_KEY"]})
    result = run_script("pipeline.py", "run", "--raw", f"s3://{BUCKET}/session", "--data", tmp_path / "data",
                        "--preprocessors", tmp_path / "pre", "--buckets", "3", "--max-history", "60",
                        "--scheduler", external_cluster.address, "--storage-options", options)
    assert result.stdout.count(f"joined scheduler {external_cluster.address} (2 workers)") == 1  # said once
    assert result.stdout.count("Dask dashboard: ") == 1
    for name in ("repartitioned", "cleaned", "processed"):
        assert stage.read_manifest(tmp_path / "data" / name)["output_sha256"] == \
            stage.read_manifest(processed_data[0] / name)["output_sha256"], name
    assert (tmp_path / "pre" / "encoders.json").read_bytes() == (processed_data[1] / "encoders.json").read_bytes()
    assert stage.read_manifest(tmp_path / "data" / "merged")["inputs"][0]["raw"] == f"s3://{BUCKET}/session"


def test_storage_status_sees_a_replaced_object(merged):
    """Last in this module: it changes an object of the bucket the other tests read."""
    url = f"s3://{BUCKET}/raw"
    assert pipeline.inspect(merged["s3"], url, {})[0].state == "complete"
    fsspec.filesystem("s3").pipe(f"{BUCKET}/raw/clicks/2024-03-01.jsonl", b"")
    state = pipeline.inspect(merged["s3"], url, {})[0]
    assert state.state == "stale" and state.reasons[0].startswith(f"the raw files under {url}/ changed")
