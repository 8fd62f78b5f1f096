"""merge_and_clean.py end to end on tiny planted data: accounting, quarantine, atomicity, determinism."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import EXPECTED_ACCOUNTING, ROOT, run_in_process, run_joined, run_script, write_planted_raw

# The planted run's own LocalCluster: a shape other than the session cluster's 2 workers x 1 thread,
# which test_merge_twice_gives_identical_rows_in_identical_order compares it with.
CLUSTER = ["--workers", "1", "--threads-per-worker", "2"]


def read_table(path):
    return pq.read_table(path).to_pandas()


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """conftest's planted raw data merged once, in this process on a LocalCluster of its own (1 worker x 2
    threads, which prints its dashboard link): (the run's result, its --data, its --raw), for tests that
    only read them."""
    root = tmp_path_factory.mktemp("planted")
    raw = write_planted_raw(root)
    result = run_in_process("merge_and_clean.py", "--raw", raw, "--data", root / "data", *CLUSTER)
    return result, root / "data", raw


def test_merge_accounting_balances_and_matches_planted_rows(planted):
    result, data, _ = planted
    manifest = json.loads((data / "merged" / "_stage.json").read_text())
    assert manifest["accounting"] == EXPECTED_ACCOUNTING
    assert "Dask dashboard: http" in result.stdout
    assert "ignored unknown fields of impressions: app_version" in result.stdout


def test_merge_quarantines_every_bad_kind_with_its_reason(planted):
    quarantine = read_table(planted[1] / "merged" / "_quarantine")
    reasons = quarantine.groupby("reason").size().to_dict()
    expected = {}
    for counts in EXPECTED_ACCOUNTING.values():
        for reason, n in counts["set_aside"].items():
            expected[reason] = expected.get(reason, 0) + n
    assert reasons == expected
    malformed_click = quarantine[(quarantine.reason == "malformed") & quarantine.source_file.str.contains("clicks")]
    assert malformed_click.raw.tolist() == ["not json"]
    assert malformed_click.row.tolist() == [3]


def test_merge_writes_canonical_actions_in_utc(planted):
    actions = read_table(planted[1] / "merged" / "actions")
    assert str(actions.occurred_at.dtype) == "datetime64[us, UTC]"
    clicks = actions[actions.action_type == 1]
    assert clicks.occurred_at.tolist() == [pd.Timestamp("2024-03-01T08:00:00Z")] * 2
    carts = actions[actions.action_type == 2]
    assert carts.occurred_at.tolist() == [pd.Timestamp("2024-03-01T09:30:00.123456Z"),
                                          pd.Timestamp("2024-03-01T10:30:00.123456Z")]
    orders = actions[actions.action_type == 3]
    assert orders.occurred_at.tolist() == [pd.Timestamp("2024-02-28T00:00:00Z")] * 2
    assert orders.item_id.tolist() == [12, 12]


def merged_rows(data_dir):
    """Every table of merged/ as frames, in file order: what 'identical rows in identical order' compares."""
    merged = data_dir / "merged"
    return {str(path.relative_to(merged)): read_table(path) for path in sorted(merged.rglob("*.parquet"))}


def test_merge_twice_gives_identical_rows_in_identical_order(planted, session_cluster, tmp_path):
    """The planted run (1 worker x 2 threads) and a run of the same raw folder on 2 workers x 1 thread."""
    _, first_data, raw = planted
    run_joined(session_cluster, "merge_and_clean.py", "--raw", raw, "--data", tmp_path / "b")
    first, second = merged_rows(first_data), merged_rows(tmp_path / "b")
    assert first.keys() == second.keys()
    for name in first:
        pd.testing.assert_frame_equal(first[name], second[name])


def test_merge_labels_splits_by_day(raw_dir, session_cluster, tmp_path):
    run_joined(session_cluster, "merge_and_clean.py", "--raw", raw_dir, "--data", tmp_path / "data", "--test-days", "1",
               "--val-days", "0", "--train-days", "0")
    impressions = read_table(tmp_path / "data" / "merged" / "impressions")
    assert impressions.groupby("split").dt.unique().map(list).to_dict() == {
        "test": [pd.Timestamp("2024-03-03").date()], "unused": [pd.Timestamp("2024-03-02").date()]}
    assert impressions.position.tolist() == [0, 2, 1]  # r1 keeps positions 0 and 2 around its bad entry


@pytest.mark.parametrize("breakage, message", [
    (lambda raw: shutil.rmtree(raw / "clicks"), "clicks/ is missing"),
    (lambda raw: [p.unlink() for p in (raw / "clicks").iterdir()], "clicks/ is empty"),
    (lambda raw: (raw / "clicks" / "more.xml").write_text("<x/>"), "more.xml: unknown format"),
    (lambda raw: (raw / "clicks" / "2024-03-01.jsonl").write_text("\n"), "clicks/ holds no rows"),
])
def test_merge_bad_source_stops_and_leaves_merged_as_it_was(raw_dir, planted, session_cluster, tmp_path, breakage,
                                                            message):
    data = tmp_path / "data"
    shutil.copytree(planted[1], data)
    before = (data / "merged" / "_stage.json").read_text()
    breakage(raw_dir)
    result = run_joined(session_cluster, "merge_and_clean.py", "--raw", raw_dir, "--data", data, check=False)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert (data / "merged" / "_stage.json").read_text() == before
    assert sorted(p.name for p in data.iterdir()) == ["merged"]


@pytest.mark.processes
def test_merge_runs_on_an_external_scheduler_and_workers(planted, tmp_path, external_cluster):
    """A `dask scheduler` and two `dask worker`s on loopback, the workers started outside the repository;
    the same rows as the planted run's, of the same raw folder, on a LocalCluster."""
    _, local_data, raw = planted
    external = run_script("merge_and_clean.py", "--raw", raw, "--data", tmp_path / "external",
                          env=external_cluster.env)
    assert f"joined scheduler {external_cluster.address} (2 workers)" in external.stdout
    external_rows, local_rows = merged_rows(tmp_path / "external"), merged_rows(local_data)
    assert external_rows.keys() == local_rows.keys()
    for name in local_rows:
        pd.testing.assert_frame_equal(external_rows[name], local_rows[name])


@pytest.fixture(scope="module")
def generated_raw(tmp_path_factory):
    """A generated dataset big enough (about 120 files, 200k rows) that a run can be killed midway."""
    from recpipe.synthetic import generate
    raw = tmp_path_factory.mktemp("generated") / "raw"
    generate(raw, customers=3000, items=2000, days=18, actions_per_customer=60, seed=1)
    return raw


@pytest.fixture(scope="module")
def generated_merged(generated_raw, session_cluster, tmp_path_factory):
    """merged/ of generated_raw, made once: the previous output the kill tests start from."""
    data = tmp_path_factory.mktemp("generated-merged") / "data"
    run_joined(session_cluster, "merge_and_clean.py", "--raw", generated_raw, "--data", data)
    return data


def test_merge_accounting_matches_what_the_generator_planted(generated_raw, generated_merged):
    accounting = json.loads((generated_merged / "merged" / "_stage.json").read_text())["accounting"]
    expected = json.loads((generated_raw / "_generated.json").read_text())["expected"]
    impressions = expected["impressions"]
    assert accounting["impressions.rankings"]["rows_in"] == impressions["rankings_in"]
    assert accounting["impressions.rankings"]["set_aside"] == impressions["rankings_quarantined"]
    assert accounting["impressions.shown_items"]["rows_in"] == impressions["shown_items_in"]
    assert accounting["impressions.shown_items"]["set_aside"] == impressions["shown_items_quarantined"]
    assert accounting["impressions.shown_items"]["duplicates_dropped"] == impressions["shown_items_duplicates"]
    for source in ("clicks", "add_to_carts", "previous_orders"):
        assert accounting[source]["rows_in"] == expected[source]["rows_in"]
        assert accounting[source]["set_aside"] == expected[source]["quarantined"]
        assert accounting[source]["exact_duplicates_kept"] == expected[source]["exact_duplicates"]


@pytest.mark.processes
@pytest.mark.parametrize("signal_number", [signal.SIGKILL, signal.SIGTERM])
def test_merge_killed_midway_leaves_the_previous_output(generated_raw, generated_merged, session_cluster, tmp_path,
                                                        signal_number):
    data = tmp_path / "data"
    shutil.copytree(generated_merged, data)
    previous = merged_rows(data)
    manifest = (data / "merged" / "_stage.json").read_text()

    # The whole process group: a SIGKILLed client would otherwise leave its LocalCluster workers running.
    process = subprocess.Popen([sys.executable, "merge_and_clean.py", "--raw", generated_raw, "--data", data],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(data.glob(".merged.staging-*/actions/*.parquet")):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    os.killpg(process.pid, signal_number)
    process.wait(timeout=60)
    assert process.returncode != 0

    assert (data / "merged" / "_stage.json").read_text() == manifest
    staging_left = list(data.glob(".merged.staging-*"))
    assert staging_left if signal_number == signal.SIGKILL else not staging_left
    # The run that cleans up after the killed one puts no signal under test: it joins the session's cluster.
    result = run_joined(session_cluster, "merge_and_clean.py", "--raw", generated_raw, "--data", data)
    assert not list(data.glob(".merged.staging-*"))
    if signal_number == signal.SIGKILL:
        assert "left behind by a killed run" in result.stdout
    rerun = merged_rows(data)
    assert rerun.keys() == previous.keys()
    for name in previous:
        pd.testing.assert_frame_equal(rerun[name], previous[name])
