"""merge_and_clean.py end to end on tiny planted data: accounting, quarantine, atomicity, determinism."""

import gzip
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

from conftest import (EXPECTED_ACCOUNTING, ROOT, assert_accounting_is_what_was_planted, listing, run_in_process,
                      run_joined, run_script, write_jsonl, write_planted_raw)

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


def test_merge_small_raw_folder_runs_on_threads_of_the_script_with_the_same_rows(planted, tmp_path):
    """Without cluster flags, a small raw folder is cleaned by a LocalCluster in merge_and_clean.py's own
    process, and gives what the planted run's worker process gave."""
    _, first_data, raw = planted
    result = run_in_process("merge_and_clean.py", "--raw", raw, "--data", tmp_path / "data")
    first_line = result.stdout.splitlines()[0]
    assert first_line.startswith("Dask: LocalCluster in this process") and f"{raw}/ holds" in first_line, first_line
    first, second = merged_rows(first_data), merged_rows(tmp_path / "data")
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
    assert_accounting_is_what_was_planted(accounting, expected)


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


def _peak_rss_since_reset(reset=False):
    """On a worker: its peak resident memory (VmHWM) in bytes; `reset` starts the peak again from now."""
    import re
    if reset:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")  # Linux: reset the peak RSS
    with open("/proc/self/status") as file:
        status = file.read()
    return {name: int(re.search(rf"{name}:\s+(\d+) kB", status).group(1)) * 1024 for name in ("VmHWM", "VmRSS")}


def test_merge_gzip_bomb_of_blank_lines_stays_within_a_chunk(raw_dir, session_cluster, tmp_path):
    """64 MiB of line ends in a 65 KB .gz once made a worker grow to 3.3 GiB in 57 s. Blank lines are no
    rows: they are counted and dropped a chunk at a time, and no worker grows by half of what this one
    (128 MiB in 130 KB) decompresses to, whatever its size (25 MiB here, with 64 MiB or 256 MiB)."""
    from distributed import Client

    from recpipe.merge import clean_file
    bomb, blank_mib = raw_dir / "clicks" / "2024-03-02.jsonl.gz", 128
    with gzip.open(bomb, "wb", compresslevel=9) as file:
        file.write(b'{"dt": "2024-03-02", "customer_id": 9, "item_id": 90, "click_time": "2024-03-02T10:00:00"}\n')
        for _ in range(blank_mib):
            file.write(b"\n" * 2**20)
        file.write(b" \t\r\n" * 1000 + b"not json\n")
    assert bomb.stat().st_size < 200_000
    before = listing(tmp_path)
    with Client(session_cluster) as client:
        # Each worker cleans a small file first: what the first task imports is not the bomb's memory.
        client.run(clean_file, str(raw_dir / "clicks" / "2024-03-01.jsonl"), "clicks", 0, str(tmp_path / "warm"), 1)
        at_start = client.run(_peak_rss_since_reset, True)
        started = time.monotonic()
        run_joined(session_cluster, "merge_and_clean.py", "--raw", raw_dir, "--data", tmp_path / "data")
        seconds = time.monotonic() - started
        at_end = client.run(_peak_rss_since_reset)
    growth = max(at_end[worker]["VmHWM"] - at_start[worker]["VmRSS"] for worker in at_end)
    assert growth < blank_mib // 2 * 2**20, (at_start, at_end)
    assert seconds < 30
    clicks = json.loads((tmp_path / "data" / "merged" / "_stage.json").read_text())["accounting"]["clicks"]
    planted = EXPECTED_ACCOUNTING["clicks"]
    assert clicks["rows_in"] == planted["rows_in"] + 2
    assert clicks["kept"] == planted["kept"] + 1
    assert clicks["set_aside"] == {**planted["set_aside"], "malformed": planted["set_aside"]["malformed"] + 1}
    assert clicks["rows_in"] == clicks["kept"] + sum(clicks["set_aside"].values()) + clicks["duplicates_dropped"]
    quarantine = read_table(tmp_path / "data" / "merged" / "_quarantine" / "clicks")
    assert quarantine[quarantine.source_file.str.endswith(bomb.name)].row.tolist() == [blank_mib * 2**20 + 1000 + 2]
    assert {name for name in set(listing(tmp_path)) - set(before) if not name.startswith("warm")} <= {
        name for name in listing(tmp_path) if name.startswith("data")}


def test_merge_file_of_several_blocks_writes_the_rows_of_one(tmp_path, monkeypatch):
    """A gzipped file cleaned a few hundred bytes at a time (a piece per block, named after it) gives the rows,
    reasons and accounting of the same file cleaned whole."""
    from conftest import CLICK_LINES, IMPRESSION_LINES

    from recpipe.merge import clean_file
    monkeypatch.setattr("recpipe.raw._CHUNK_BYTES", 100)
    for source, lines in (("impressions", IMPRESSION_LINES), ("clicks", CLICK_LINES)):
        path = tmp_path / "raw" / source / "f.jsonl.gz"
        write_jsonl(path, [line for line in lines * 5 for line in (line, "")], gz=True)
        whole = clean_file(str(path), source, 3, str(tmp_path / source / "whole"), block_bytes=None)
        cut = clean_file(str(path), source, 3, str(tmp_path / source / "cut"), block_bytes=300)
        assert whole == cut
        whole_files = sorted(p.relative_to(tmp_path / source / "whole")
                             for p in (tmp_path / source / "whole").rglob("*.parquet"))
        cut_files = sorted(p.relative_to(tmp_path / source / "cut") for p in (tmp_path / source / "cut").rglob("*.parquet"))
        assert all(p.name.startswith(("00003.", f"{source}-00003.", "part-00003.")) for p in whole_files)
        assert len(cut_files) > len(whole_files) and all("00003-000" in p.name for p in cut_files)
        for folder in {p.parent for p in whole_files}:
            pd.testing.assert_frame_equal(
                pd.concat([read_table(tmp_path / source / "whole" / p) for p in whole_files if p.parent == folder],
                          ignore_index=True),
                pd.concat([read_table(tmp_path / source / "cut" / p) for p in cut_files if p.parent == folder],
                          ignore_index=True))


def parquet_rows(folder):
    """(names, rows): the Parquet files under `folder`, sorted by path, and their rows one after another."""
    paths = sorted(folder.rglob("*.parquet"))
    names = [str(path.relative_to(folder)) for path in paths]
    return names, (pd.concat([read_table(path) for path in paths], ignore_index=True) if paths else pd.DataFrame())


def grouped_and_alone(tmp_path, source, files, **options):
    """clean_files of `files` (name -> bytes) as one group numbered 4, and each file by clean_file alone:
    (the group's result, the group's output folder, each file's report alone, each file's output folder)."""
    from recpipe.merge import clean_file, clean_files
    paths = []
    for name, data in files.items():
        path = tmp_path / "raw" / source / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        paths.append(str(path))
    group = clean_files(paths, source, 4, str(tmp_path / "group"), **options)
    alone = [clean_file(path, source, 4 + i, str(tmp_path / f"alone-{i}")) for i, path in enumerate(paths)]
    assert group["extra_fields"] == sorted(set().union(*(report.pop("extra_fields") for report in alone)))
    return group, tmp_path / "group", alone, [tmp_path / f"alone-{i}" for i in range(len(paths))]


def jsonl_bytes(lines, gz=False):
    data = ("\n".join(lines) + "\n").encode()
    return gzip.compress(data, mtime=0) if gz else data


def test_merge_group_of_small_files_writes_one_file_of_their_rows_in_raw_order(tmp_path):
    """Three click files, three formats, cleaned by one task: one actions file and one quarantine file,
    holding what each file alone writes, one file after another; each file accounted for on its own, its
    set-aside rows under its own name and row numbers."""
    from conftest import CLICK_LINES
    csv = ("dt,customer_id,item_id,click_time\n2024-03-04,4,40,2024-03-04T10:00:00\n"
           "2024-03-04,4,x,2024-03-04T10:00:00\n2024-03-04,5,50,2024-03-04T11:00:00Z\n").encode()
    group, out, alone, alone_outs = grouped_and_alone(tmp_path, "clicks", {
        "a.jsonl": jsonl_bytes(CLICK_LINES), "b.csv": csv, "c.jsonl.gz": jsonl_bytes(CLICK_LINES[::-1], gz=True)})
    assert group["reports"] == alone
    assert [report["rows_in"] for report in group["reports"]] == [6, 3, 6]
    names, rows = parquet_rows(out)
    assert names == ["_quarantine/clicks/part-00004.parquet", "actions/clicks-00004.parquet"]
    for folder in ("actions", "_quarantine"):
        pd.testing.assert_frame_equal(parquet_rows(out / folder)[1],
                                      pd.concat([parquet_rows(o / folder)[1] for o in alone_outs], ignore_index=True))
    quarantine = parquet_rows(out / "_quarantine")[1]
    assert [(name.rsplit("/", 1)[-1], row) for name, row in zip(quarantine.source_file, quarantine.row)] == [
        ("a.jsonl", 3), ("a.jsonl", 4), ("a.jsonl", 5), ("a.jsonl", 6), ("b.csv", 2),
        ("c.jsonl.gz", 1), ("c.jsonl.gz", 2), ("c.jsonl.gz", 3), ("c.jsonl.gz", 4)]


def test_merge_group_of_impression_files_writes_a_piece_per_day_named_after_its_first_file(tmp_path):
    from conftest import IMPRESSION_LINES
    group, out, alone, alone_outs = grouped_and_alone(tmp_path, "impressions", {
        "a.jsonl": jsonl_bytes(IMPRESSION_LINES[:2]), "b.jsonl.gz": jsonl_bytes(IMPRESSION_LINES[2:], gz=True),
        "c.jsonl": jsonl_bytes(IMPRESSION_LINES[::-1])})
    assert group["reports"] == alone
    assert group["extra_fields"] == ["app_version"]
    assert [report["days"] for report in group["reports"]] == [
        [pd.Timestamp("2024-03-02").date()], [pd.Timestamp("2024-03-03").date()],
        [pd.Timestamp("2024-03-02").date(), pd.Timestamp("2024-03-03").date()]]
    names, _ = parquet_rows(out)
    assert names == ["_quarantine/impressions/part-00004.parquet", "_scratch/impressions/2024-03-02/00004.parquet",
                     "_scratch/impressions/2024-03-03/00004.parquet"]
    for day in ("2024-03-02", "2024-03-03"):
        folder = f"_scratch/impressions/{day}"
        pd.testing.assert_frame_equal(parquet_rows(out / folder)[1],
                                      pd.concat([parquet_rows(o / folder)[1] for o in alone_outs], ignore_index=True))


def test_merge_group_writes_a_piece_per_block_of_text_and_the_same_rows(tmp_path, monkeypatch):
    """Block-bounded memory: a group cleaned 200 bytes of text at a time writes what it cleaned every
    block or so, numbered pieces in raw order, and the rows of the group written at once."""
    from conftest import CLICK_LINES

    from recpipe.merge import clean_files
    monkeypatch.setattr("recpipe.raw._CHUNK_BYTES", 100)
    paths = []
    for name in "abcde":
        paths.append(str(tmp_path / "raw" / "clicks" / f"{name}.jsonl"))
        write_jsonl(tmp_path / "raw" / "clicks" / f"{name}.jsonl", CLICK_LINES * 2)
    cut = clean_files(paths, "clicks", 4, str(tmp_path / "cut"), block_bytes=200)
    whole = clean_files(paths, "clicks", 4, str(tmp_path / "whole"))
    assert cut == whole
    names = parquet_rows(tmp_path / "cut" / "actions")[0]
    assert len(names) > len(paths) and names == [f"clicks-00004-{n:05d}.parquet" for n in range(len(names))]
    assert parquet_rows(tmp_path / "whole" / "actions")[0] == ["clicks-00004.parquet"]
    for folder in ("actions", "_quarantine"):
        pd.testing.assert_frame_equal(parquet_rows(tmp_path / "cut" / folder)[1],
                                      parquet_rows(tmp_path / "whole" / folder)[1])


def test_plan_tasks_groups_consecutive_small_files_of_a_source_up_to_the_group_bytes():
    from recpipe.merge import Part, plan_tasks
    raw_files = {"impressions": ["i0", "i1"], "clicks": ["c0", "c1", "c2", "c3", "c4", "c5", "c6"],
                 "add_to_carts": [], "previous_orders": ["o0"]}
    sizes = {"i0": 10, "i1": 10, "c0": 40, "c1": 60, "c2": 150, "c3": 30, "c4": 500, "c5": 20, "c6": 20, "o0": 1}
    parts = {("clicks", 4): [Part(0, 0, 250, 1), Part(1, 250, 500, 42)]}
    assert plan_tasks(raw_files, sizes, parts, 100) == [
        ("impressions", [0, 1], None),
        ("clicks", [0, 1], None),  # 40 + 60 is at most 100
        ("clicks", [2], None),  # larger than a group, alone
        ("clicks", [3], None),  # the next file is read in ranges: the group ends before it
        ("clicks", [4], parts[("clicks", 4)][0]), ("clicks", [4], parts[("clicks", 4)][1]),
        ("clicks", [5, 6], None),
        ("previous_orders", [0], None),
    ]


def test_merge_split_refusal_names_the_grouped_file_that_holds_the_lone_day(raw_dir, session_cluster, tmp_path):
    from conftest import IMPRESSION_LINES
    write_jsonl(raw_dir / "impressions" / "2024-03-04.jsonl", [IMPRESSION_LINES[0].replace("2024-03-02", "2034-03-10")])
    result = run_joined(session_cluster, "merge_and_clean.py", "--raw", raw_dir, "--data", tmp_path / "data",
                        check=False)
    assert result.returncode == 2
    assert "(" + str(raw_dir / "impressions" / "2024-03-04.jsonl") + ")" in result.stderr
    assert "2024-03-02.jsonl" not in result.stderr and "2024-03-03.jsonl.gz" not in result.stderr
