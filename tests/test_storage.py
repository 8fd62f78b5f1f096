"""Object storage: the pipeline reading raw files from s3:// and writing its stages there, on an S3-compatible server
(moto's, started here on loopback as a separate process), makes what it makes from and to local folders; a stage
there is committed by its manifest; URLs it cannot open are one line."""

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import DEAD_PID, ROOT, one_line, run_in_process, run_script, write_planted_raw
from recpipe import merge, pipeline, raw, stage, storage, tables

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


def merged_frames(merged):
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
    from_s3, s3_manifest = merged_frames(merged["s3"] / "merged")
    from_folder, folder_manifest = merged_frames(merged["folder"] / "merged")
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
    # File systems are cached by their arguments, and the stage's workers may be threads of this process.
    s3fs_class = type(fsspec.filesystem("s3"))
    s3fs_class.clear_instance_cache()
    try:
        result = run_in_process("merge_and_clean.py", "--raw", raw_url, "--data", tmp_path / "data", check=False)
    finally:
        s3fs_class.clear_instance_cache()
    assert result.returncode == 2
    where, _, cause = message.partition("*")
    line = one_line(result.stderr)
    assert line.startswith(f"error: {where}") and cause in line
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("script, environment, message", [
    ("repartition.py", {}, "s3://no-such-bucket/data/merged: the bucket (or container) s3://no-such-bucket/ does not "
                           "exist"),
    ("train.py", {"AWS_ENDPOINT_URL": "http://127.0.0.1:{closed}", "AWS_MAX_ATTEMPTS": "1"},
     "s3://no-such-bucket/data/processed: cannot be read: the endpoint cannot be reached"),
    ("pipeline.py", {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
                     "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"},
     "--data s3://no-such-bucket/data: cannot be read: no credentials found"),
])
def test_storage_a_data_url_that_cannot_be_opened_is_one_line(s3, monkeypatch, script, environment, message):
    for name, value in environment.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value.format(closed=free_port()))
    # File systems are cached by their arguments: one made before (or during) this test read the environment then.
    s3fs_class = type(fsspec.filesystem("s3"))
    s3fs_class.clear_instance_cache()
    argv = ["status", "--raw", f"s3://{BUCKET}/raw"] if script == "pipeline.py" else []
    try:
        result = run_in_process(script, *argv, "--data", "s3://no-such-bucket/data", check=False)
    finally:
        s3fs_class.clear_instance_cache()
    assert result.returncode == 2
    assert one_line(result.stderr).startswith(f"error: {message}")


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


def publish_rows(data, rows, fail=False):
    """Publish merged/ under `data` holding one table of `rows` rows; `fail`: raise once its file is written."""
    with stage.publish(data, "merged", {}, []) as run:
        tables.write_table(pd.DataFrame({"customer_id": range(rows)}), run.path / "actions" / "part.parquet",
                           pa.schema([("customer_id", pa.int64())]))
        run.accounting = {"clicks": {"rows_in": rows, "kept": rows}}
        if fail:
            raise RuntimeError("stopped midway")
    return run


def objects(prefix):
    """The names of every object under a prefix of the bucket, relative to it."""
    return sorted(name.removeprefix(f"{BUCKET}/{prefix}/") for name in fsspec.filesystem("s3").find(f"{BUCKET}/{prefix}"))


def test_storage_a_stage_on_s3_is_committed_by_its_manifest_and_replaces_only_the_version_it_names(s3):
    """Publishing on object storage renames nothing: each run writes a version folder of its own, the manifest
    written last names it, and the version it replaced goes only after that; a run that fails leaves the
    previous version as it was, and nothing of its own."""
    data = f"s3://{BUCKET}/versions"
    first = publish_rows(data, 3).published["version"]
    assert objects("versions/merged") == ["_stage.json", f"{first}/.recpipe-staging", f"{first}/actions/part.parquet"]
    with pytest.raises(RuntimeError, match="stopped midway"):
        publish_rows(data, 5, fail=True)
    assert objects("versions/merged") == ["_stage.json", f"{first}/.recpipe-staging", f"{first}/actions/part.parquet"]
    opened = stage.open_stage(data, "merged")
    assert str(opened.path) == f"{data}/merged/{first}" and opened.manifest["tables"]["actions"]["rows"] == 3

    second = publish_rows(data, 5).published["version"]
    assert second != first
    assert objects("versions/merged") == ["_stage.json", f"{second}/.recpipe-staging", f"{second}/actions/part.parquet"]
    assert tables.read(stage.open_stage(data, "merged").path / "actions" / "part.parquet").num_rows == 5


def test_storage_what_a_killed_run_left_on_s3_is_reported_and_removed(s3):
    """A version folder no manifest names, marked by a process that is gone: `status` lists it, readers never
    see it, `clean leftovers` deletes it; one marked by a live process, or not marked at all, is left alone."""
    data = f"s3://{BUCKET}/leftovers"
    publish_rows(data, 3)
    store = fsspec.filesystem("s3")
    host = socket.gethostname()
    killed, running = f"v20260101T000000000000-{host}-{DEAD_PID}", f"v20260101T000000000001-{host}-{os.getppid()}"
    for version, pid in ((killed, DEAD_PID), (running, os.getppid())):  # the parent: a live process
        store.pipe(f"{BUCKET}/leftovers/merged/{version}/.recpipe-staging",
                   json.dumps({"made_by": "recpipe", "host": host, "pid": pid}).encode())
        store.pipe(f"{BUCKET}/leftovers/merged/{version}/actions/part.parquet", b"half written")
    found = {leftover.path.name: leftover for leftover in stage.leftovers(data, "merged")}
    assert found.keys() == {killed, running}
    assert found[killed].abandoned and not found[running].abandoned
    assert stage.open_stage(data, "merged").manifest["tables"]["actions"]["rows"] == 3  # the committed version only

    status = run_in_process("pipeline.py", "status", "--data", data, "--raw", f"s3://{BUCKET}/raw",
                            "--preprocessors", f"{data}/preprocessors")
    assert f"temporary folder {data}/merged/{killed} " in status.stdout and "left by a killed run" in status.stdout
    cleaned = run_in_process("pipeline.py", "clean", "leftovers", "--data", data, "--raw", f"s3://{BUCKET}/raw",
                             "--preprocessors", f"{data}/preprocessors")
    assert cleaned.stdout.strip() == f"deleted {data}/merged/{killed}/, left by a killed run"
    assert not any(name.startswith(killed) for name in objects("leftovers/merged"))
    assert any(name.startswith(running) for name in objects("leftovers/merged"))


def test_storage_a_prefix_the_pipeline_did_not_write_is_not_replaced(s3):
    store = fsspec.filesystem("s3")
    store.pipe(f"{BUCKET}/foreign/merged/notes.txt", b"someone's notes")
    result = run_in_process("merge_and_clean.py", "--raw", f"s3://{BUCKET}/raw", "--data", f"s3://{BUCKET}/foreign",
                            check=False)
    assert result.returncode == 2
    assert one_line(result.stderr).startswith(f"error: refusing to replace s3://{BUCKET}/foreign/merged/: it has no "
                                              "_stage.json")
    assert objects("foreign") == ["merged/notes.txt"]


@pytest.mark.processes
def test_storage_a_stage_killed_midway_on_s3_leaves_the_previous_version_readable(s3, tmp_path):
    """merge_and_clean.py SIGKILLed (its LocalCluster with it) while it writes a new version of merged/ on S3: the
    manifest still names the previous version, which reads as before; what the killed run wrote is a version no
    manifest names, which the next run removes."""
    data = f"s3://{BUCKET}/killed"
    run_in_process("merge_and_clean.py", "--raw", f"s3://{BUCKET}/raw", "--data", data, "--scheduler", s3[2])
    previous = stage.open_stage(data, "merged")
    manifest = fsspec.filesystem("s3").cat(f"{BUCKET}/killed/merged/_stage.json")

    process = subprocess.Popen([sys.executable, "merge_and_clean.py", "--raw", f"s3://{BUCKET}/raw", "--data", data],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not [name for name in objects("killed/merged")
                   if not name.startswith(previous.manifest["version"]) and "/actions/" in name]:
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)

    assert fsspec.filesystem("s3").cat(f"{BUCKET}/killed/merged/_stage.json") == manifest
    reopened = stage.open_stage(data, "merged")
    assert reopened.path == previous.path
    pd.testing.assert_frame_equal(merged_table(reopened, "actions"), merged_table(previous, "actions"))
    left = [leftover for leftover in stage.leftovers(data, "merged")]
    assert len(left) == 1 and left[0].abandoned

    rerun = run_in_process("merge_and_clean.py", "--raw", f"s3://{BUCKET}/raw", "--data", data, "--scheduler", s3[2])
    assert f"removed {left[0].path}, left behind by a killed run" in rerun.stdout
    version = stage.open_stage(data, "merged").manifest["version"]
    assert {name.split("/")[0] for name in objects("killed/merged")} == {"_stage.json", version}


def merged_table(opened, name):
    where, filesystem = storage.arrow(opened.path / name)
    return pq.read_table(where, filesystem=filesystem).to_pandas()


@pytest.mark.processes
def test_storage_workers_elsewhere_run_every_stage_on_s3_and_train_reads_it(
        s3, external_cluster, processed_data, cleaned_data, tmp_path):
    """`pipeline.py run --scheduler` on the session's `dask scheduler` and two `dask worker`s, each started in a
    folder of its own before this module set the endpoint, which they learn from --storage-options alone: the raw
    files, the stage folders and the preprocessors are all in the bucket, and no path is common to this process
    and the workers. From repartitioned/ on the stages are the bytes the stage scripts made on a LocalCluster
    from the same files in local folders (the session's data), with the same preprocessors; then train.py reads
    processed/ and the preprocessors from the bucket, `pipeline.py profile` writes its profile there, and
    `clean merged` deletes merged/'s objects."""
    endpoint = s3[0]
    fsspec.filesystem("s3").put(f"{cleaned_data / 'raw'}/", f"{BUCKET}/session/raw/", recursive=True)
    options = json.dumps({"endpoint_url": endpoint, "key": S3_ENV["AWS_ACCESS_KEY_ID"],
                          "secret": S3_ENV["AWS_SECRET_ACCESS_KEY"]})
    folders = ["--raw", f"s3://{BUCKET}/session/raw", "--data", f"s3://{BUCKET}/session/data",
               "--preprocessors", f"s3://{BUCKET}/session/preprocessors", "--storage-options", options]
    result = run_script("pipeline.py", "run", *folders, "--buckets", "3", "--max-history", "60",
                        "--scheduler", external_cluster.address)
    assert result.stdout.count(f"joined scheduler {external_cluster.address} (2 workers)") == 1  # said once
    assert result.stdout.count("Dask dashboard: ") == 1
    data = f"s3://{BUCKET}/session/data"
    for name in ("repartitioned", "cleaned", "processed"):
        assert stage.read_manifest(f"{data}/{name}")["output_sha256"] == \
            stage.read_manifest(processed_data[0] / name)["output_sha256"], name
    assert stage.read_manifest(f"{data}/merged")["accounting"] == \
        stage.read_manifest(processed_data[0] / "merged")["accounting"]
    assert fsspec.filesystem("s3").cat(f"{BUCKET}/session/preprocessors/encoders.json") == \
        (processed_data[1] / "encoders.json").read_bytes()
    assert not list(external_cluster.home.rglob("*.parquet"))  # the workers wrote nothing on their disks

    trained = run_script("train.py", "--data", data, "--preprocessors", f"s3://{BUCKET}/session/preprocessors",
                         "--epochs", "1", "--max-steps", "5", "--out", tmp_path / "run", "--storage-options", options)
    assert "test AUC" in trained.stdout
    config = (tmp_path / "run" / "config.json").read_text()
    assert json.loads(config)["processed"]["path"] == f"{data}/processed" and endpoint not in config

    run_in_process("pipeline.py", "profile", "--data", data, "--storage-options", options)
    profiled = json.loads(fsspec.filesystem("s3").cat(f"{BUCKET}/session/data/profile.json"))
    assert sum(split["examples"] for split in profiled["splits"].values()) == \
        sum(stage.read_manifest(f"{data}/processed")["rows_per_split"].values())
    status = run_in_process("pipeline.py", "status", *folders)
    assert status.stdout.count(" complete ") == 4
    run_in_process("pipeline.py", "clean", "merged", *folders)
    assert objects("session/data/merged") == []


IAM_BUCKET = "guarded"
# What each user may do, as AWS's managed AmazonS3ReadOnlyAccess words it (moto asks for s3:HeadBucket where AWS
# asks for s3:ListBucket); the writer may put but not delete.
READ = ["s3:Get*", "s3:List*", "s3:HeadBucket"]
USERS = {"admin": ["s3:*"], "reader": READ, "writer": [*READ, "s3:PutObject"]}


@pytest.fixture(scope="module")
def iam_s3(s3):
    """A second S3 endpoint that checks credentials as AWS does (moto's IAM authorization, switched on once the users
    are made): a user of each of USERS, with the actions it may take on every bucket; {user: --storage-options}."""
    import urllib.request
    with moto_server() as endpoint:
        iam = __import__("boto3").client("iam", endpoint_url=endpoint)
        options = {}
        for user, actions in USERS.items():
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
            key = iam.create_access_key(UserName=user)["AccessKey"]
            options[user] = {"endpoint_url": endpoint, "key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
        fsspec.filesystem("s3", **options["admin"]).mkdir(IAM_BUCKET)
        # From the next request on, every request is authorized against its user's policy (moto's "reset-auth").
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0",
                                                      headers={"Content-Type": "text/plain"})).read()
        yield options


def guarded_objects(options, prefix):
    """{name: size} of every object under a prefix of the guarded bucket, as its admin lists them."""
    store = fsspec.filesystem("s3", **options["admin"], skip_instance_cache=True)
    return {name: info["size"] for name, info in store.find(f"{IAM_BUCKET}/{prefix}", detail=True).items()}


@pytest.fixture
def as_admin(iam_s3, monkeypatch):
    """This process reads and writes the guarded bucket as its admin until the test ends."""
    monkeypatch.setitem(fsspec.config.conf, "s3", dict(iam_s3["admin"]))


def test_storage_clean_with_credentials_that_may_not_delete_says_so_and_deletes_nothing(iam_s3, as_admin):
    """`clean merged` with read-only credentials: S3's DeleteObjects answers 200 with an error for each object, which
    s3fs's bulk delete drops; the command must say in one line what stayed and why, and exit 74 (not permitted)."""
    data = f"s3://{IAM_BUCKET}/clean"
    publish_rows(data, 3)
    with stage.publish(data, "repartitioned", {}, [stage.open_stage(data, "merged").entry()]) as run:
        tables.write_table(pd.DataFrame({"customer_id": [1]}), run.path / "actions" / "part.parquet",
                           pa.schema([("customer_id", pa.int64())]))
        run.accounting = {"actions": {"rows_in": 1, "kept": 1}}
    before = guarded_objects(iam_s3, "clean")
    result = run_in_process("pipeline.py", "clean", "merged", "--data", data, "--raw", f"s3://{IAM_BUCKET}/raw",
                            "--preprocessors", f"{data}/preprocessors",
                            "--storage-options", json.dumps(iam_s3["reader"]), check=False)
    assert result.returncode == 74, result.stdout + result.stderr
    line = one_line(result.stderr)
    assert line.startswith(f"error: could not delete 3 of 3 objects under {data}/merged/: AccessDenied (Access "
                           "Denied): these credentials may not delete there (e.g. "), line
    assert line.endswith("run this again with credentials that may delete there (on S3: s3:DeleteObject on the "
                         "prefix)")
    assert "deleted" not in result.stdout
    assert guarded_objects(iam_s3, "clean") == before


def test_storage_clean_leftovers_that_may_not_delete_says_so(iam_s3, as_admin):
    """`clean leftovers` with credentials that may write but not delete: it said "deleted" of a version it left."""
    data = f"s3://{IAM_BUCKET}/leftovers"
    publish_rows(data, 3)
    store = fsspec.filesystem("s3")
    killed = f"v20260101T000000000000-{socket.gethostname()}-{DEAD_PID}"
    store.pipe(f"{IAM_BUCKET}/leftovers/merged/{killed}/.recpipe-staging",
               json.dumps({"made_by": "recpipe", "host": socket.gethostname(), "pid": DEAD_PID}).encode())
    store.pipe(f"{IAM_BUCKET}/leftovers/merged/{killed}/actions/part.parquet", b"half written")
    before = guarded_objects(iam_s3, "leftovers")
    result = run_in_process("pipeline.py", "clean", "leftovers", "--data", data, "--raw", f"s3://{IAM_BUCKET}/raw",
                            "--preprocessors", f"{data}/preprocessors",
                            "--storage-options", json.dumps(iam_s3["writer"]), check=False)
    assert result.returncode == 74, result.stdout + result.stderr
    assert one_line(result.stderr).startswith(
        f"error: could not delete 2 of 2 objects under {data}/merged/{killed}/: AccessDenied (Access Denied): these "
        "credentials may not delete there")
    assert "deleted" not in result.stdout
    assert guarded_objects(iam_s3, "leftovers") == before


def merge_with_credentials(s3, raw_dir, data, credentials):
    """merge_and_clean.py from raw_dir to `data` on the session's S3 cluster with `credentials` as
    --storage-options, which are taken off its workers again afterwards. (The test monkeypatches
    fsspec.config.conf["s3"], so that what they set in this process is undone too.)"""
    from distributed import Client
    try:
        return run_in_process("merge_and_clean.py", "--raw", raw_dir, "--data", data, "--scheduler", s3[2],
                              "--storage-options", json.dumps(credentials), check=False)
    finally:
        with Client(s3[2]) as client, contextlib.suppress(ValueError):  # none when it stopped before sharing them
            client.unregister_worker_plugin("recpipe-storage-options")
            client.run(lambda: fsspec.config.conf.pop("s3", None))


def test_storage_a_denied_write_is_called_a_write(iam_s3, s3, tmp_path, monkeypatch):
    """merge_and_clean.py with read-only credentials for --data: "cannot be written", not "cannot be read"; exit 74
    like a read-only folder."""
    monkeypatch.setitem(fsspec.config.conf, "s3", {})
    data = f"s3://{IAM_BUCKET}/denied"
    result = merge_with_credentials(s3, write_planted_raw(tmp_path), data, iam_s3["reader"])
    assert result.returncode == 74, result.stdout + result.stderr
    line = one_line(result.stderr)
    assert line.startswith(f"error: {data}/merged: cannot be written: access denied (")
    assert "may not write there" in line and "cannot be read" not in line, line
    assert guarded_objects(iam_s3, "denied") == {}


def test_storage_a_stage_that_may_write_but_not_delete_stops_saying_so(iam_s3, s3, tmp_path, monkeypatch):
    """merge_and_clean.py with credentials that may write but not delete: its scratch objects cannot be removed,
    so the version it wrote would not be what a stage writes; it stops in one line, exit 74, and the version it
    leaves is one no manifest names (status lists it, `clean leftovers` with other credentials removes it)."""
    monkeypatch.setitem(fsspec.config.conf, "s3", {})
    data = f"s3://{IAM_BUCKET}/scratch"
    result = merge_with_credentials(s3, write_planted_raw(tmp_path), data, iam_s3["writer"])
    assert result.returncode == 74, result.stdout + result.stderr
    line = one_line(result.stderr)
    assert line.startswith("error: could not delete "), line
    assert "these credentials may not delete there" in line
    left = guarded_objects(iam_s3, "scratch")
    assert left and f"{IAM_BUCKET}/scratch/merged/_stage.json" not in left


def test_storage_a_stage_size_counts_only_its_committed_version(s3):
    """`status` sizes merged/ by its manifest and the version it names: a killed run's version is listed (and sized)
    apart, as a leftover, not added to the stage."""
    data = f"s3://{BUCKET}/sizes"
    committed = publish_rows(data, 3).published
    store = fsspec.filesystem("s3")
    killed = f"v20260101T000000000000-{socket.gethostname()}-{DEAD_PID}"
    store.pipe(f"{BUCKET}/sizes/merged/{killed}/actions/part.parquet", b"x" * 5000)
    store.pipe(f"{BUCKET}/sizes/merged/{killed}/.recpipe-staging",
               json.dumps({"made_by": "recpipe", "host": socket.gethostname(), "pid": DEAD_PID}).encode())
    status = run_in_process("pipeline.py", "status", "--data", data, "--raw", f"s3://{BUCKET}/raw",
                            "--preprocessors", f"{data}/preprocessors")
    assert f"temporary folder {data}/merged/{killed} (0.0 MiB)" in status.stdout
    assert pipeline.inspect(data, f"s3://{BUCKET}/raw", {})[0].bytes == (
        store.info(f"{BUCKET}/sizes/merged/_stage.json")["size"]
        + sum(file["bytes"] for file in committed["files"].values())
        + store.info(f"{BUCKET}/sizes/merged/{committed['version']}/.recpipe-staging")["size"])


def test_storage_status_sees_a_replaced_object(merged):
    """Last in this module: it changes an object of the bucket the other tests read."""
    url = f"s3://{BUCKET}/raw"
    assert pipeline.inspect(merged["s3"], url, {})[0].state == "complete"
    fsspec.filesystem("s3").pipe(f"{BUCKET}/raw/clicks/2024-03-01.jsonl", b"")
    state = pipeline.inspect(merged["s3"], url, {})[0]
    assert state.state == "stale" and state.reasons[0].startswith(f"the raw files under {url}/ changed")


def test_storage_share_links_a_file_and_copies_where_no_link_can_be_made(tmp_path, monkeypatch):
    source = tmp_path / "a.parquet"
    source.write_bytes(b"PAR1 rows PAR1")
    storage.share(source, tmp_path / "linked" / "a.parquet")
    assert os.stat(tmp_path / "linked" / "a.parquet").st_ino == os.stat(source).st_ino

    def across_file_systems(source, target):
        raise OSError(errno.EXDEV, "Invalid cross-device link")
    monkeypatch.setattr(os, "link", across_file_systems)
    storage.share(source, tmp_path / "copied" / "a.parquet")
    copied = tmp_path / "copied" / "a.parquet"
    assert copied.read_bytes() == source.read_bytes() and os.stat(copied).st_ino != os.stat(source).st_ino
