"""repartition.py: stable customer buckets, sorted buckets, sized row groups, atomic re-runs."""

import json

import numpy as np
import pytest
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from conftest import EXPECTED_EXACT_DUPLICATE_ACTIONS, listing, run_in_process, run_joined
from recpipe import schemas, stage, tables
from recpipe.cli import UserError
from recpipe.repartition import (bucket_of, choose_buckets, cut_by_bucket, exact_duplicate_actions,
                                  merged_bytes_in_memory, read_piece)
from recpipe.tables import read_parts, write_sized

CLUSTER = ["--workers", "1", "--threads-per-worker", "2"]


def splitmix64_finalizer(x):
    """The textbook algorithm on Python integers, to hold the vectorized one to."""
    mask = 2**64 - 1
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


def test_repartition_bucket_of_is_splitmix64_and_pinned():
    ids = [1, 2, 3, 1000, 2**62, 2**63 - 1]
    assert bucket_of(ids, 1000).tolist() == [splitmix64_finalizer(i) % 1000 for i in ids]
    # Pinned: a change here would move customers between buckets of existing data.
    assert bucket_of(ids[:5], 16).tolist() == [5, 10, 0, 7, 5]


def test_repartition_bucket_of_spreads_sequential_ids_evenly():
    counts = np.bincount(bucket_of(np.arange(1, 160_001), 16), minlength=16)
    assert counts.min() > 9_000 and counts.max() < 11_000


def test_repartition_write_sized_makes_row_groups_near_the_target(tmp_path):
    table = pa.table({"customer_id": np.arange(400_000, dtype=np.int64),
                      "item_id": np.arange(400_000, dtype=np.int64)})  # 6.1 MiB in memory
    sizes = write_sized(table, tmp_path / "t", table.schema, row_group_mb=1)
    assert [round(size / 2**20, 2) for size in sizes[:-1]] == [1.0] * 6
    files = sorted((tmp_path / "t").glob("*.parquet"))
    assert read_parts(tmp_path / "t", table.schema).equals(table)  # order kept
    groups = [pq.ParquetFile(f).metadata.row_group(i).num_rows for f in files
              for i in range(pq.ParquetFile(f).metadata.num_row_groups)]
    assert groups == [65_536] * 6 + [400_000 - 6 * 65_536]


def read_buckets(stage_dir, table):
    frames = []
    for folder in sorted((stage_dir / table).glob("bucket=*")):
        frame = read_parts(folder, getattr(schemas, table.upper())).to_pandas()
        frame["bucket"] = int(folder.name.split("=")[1])
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def test_repartition_buckets_customers_and_sorts_each_bucket(session_cluster, raw_dir, tmp_path):
    data = tmp_path / "data"
    run_joined(session_cluster, "merge_and_clean.py", "--raw", raw_dir, "--data", data)
    result = run_joined(session_cluster, "repartition.py", "--data", data, "--buckets", "4")
    assert "row groups in memory" in result.stdout
    actions = read_buckets(data / "repartitioned", "actions")
    assert (actions.bucket == bucket_of(actions.customer_id, 4)).all()
    for _, bucket in actions.groupby("bucket"):
        keys = bucket[["customer_id", "occurred_at"]]
        assert keys.equals(keys.sort_values(["customer_id", "occurred_at"]).reset_index(drop=True)
                           .set_axis(keys.index))
    merged = pq.read_table(data / "merged" / "actions").to_pandas()
    columns = ["customer_id", "item_id", "action_type", "occurred_at"]
    pd.testing.assert_frame_equal(merged.sort_values(columns).reset_index(drop=True),
                                  actions[columns].sort_values(columns).reset_index(drop=True))
    impressions = read_buckets(data / "repartitioned", "impressions")
    assert (impressions.bucket == bucket_of(impressions.customer_id, 4)).all()
    manifest = json.loads((data / "repartitioned" / "_stage.json").read_text())
    assert manifest["accounting"]["impressions"] == {"rows_in": 3, "kept": 3}
    assert manifest["accounting"]["actions"] == {"rows_in": 6, "kept": 6, "exact_duplicates_kept": 2}
    assert manifest["exact_duplicate_actions"] == EXPECTED_EXACT_DUPLICATE_ACTIONS
    assert "exact duplicates kept (repeated actions are signal): 2" in result.stdout
    assert manifest["parameters"]["buckets"] == 4
    assert manifest["buckets_chosen"] == {"buckets": 4,
                                          "why": "given: --buckets, or what pipeline.py kept from the last run"}
    assert set(manifest["row_group_mib_in_memory"]) == {"actions", "impressions"}


def test_repartition_exact_duplicate_actions_counts_repeats_of_every_column_per_action_type():
    at = pd.Timestamp("2024-03-01T10:00:00Z")
    second = pd.Timedelta(seconds=1)
    # Sorted as repartition sorts: customer, time, action type, item.
    actions = pa.Table.from_pandas(pd.DataFrame({
        "customer_id": [1, 1, 1, 1, 1, 1, 2, 2, 2],
        "item_id": [10, 10, 10, 11, 10, 10, 10, 10, 10],
        "action_type": [1, 1, 1, 1, 3, 1, 3, 3, 3],
        "occurred_at": [at, at, at, at, at, at + second, at, at, at],
    }), schema=schemas.ACTIONS, preserve_index=False)
    # Row 2 and 3 repeat row 1; rows 4-6 each differ from the one before in one column; 8 and 9 repeat 7.
    assert exact_duplicate_actions(actions) == {1: 2, 3: 2}
    assert exact_duplicate_actions(actions.slice(0, 1)) == {}
    assert exact_duplicate_actions(actions.slice(3, 4)) == {}


def test_repartition_without_buckets_derives_them_and_records_the_number_and_why(session_cluster, raw_dir, tmp_path):
    data = tmp_path / "data"
    run_joined(session_cluster, "merge_and_clean.py", "--raw", raw_dir, "--data", data)
    result = run_joined(session_cluster, "repartition.py", "--data", data)  # 2 workers of 1 thread
    manifest = stage.read_manifest(data / "repartitioned")
    # A few rows: one bucket would hold them, and each of the 2 threads gets one.
    assert manifest["parameters"]["buckets"] == 2
    assert manifest["buckets_chosen"]["buckets"] == 2
    assert manifest["buckets_chosen"]["why"].startswith("derived: merged/ takes 0.00 GiB in memory; 1 for memory")
    assert f"buckets: 2 ({manifest['buckets_chosen']['why']})" in result.stdout
    actions = read_buckets(data / "repartitioned", "actions")
    assert set(actions.bucket) <= {0, 1} and (actions.bucket == bucket_of(actions.customer_id, 2)).all()


GIB = 2**30


def test_repartition_choose_buckets_keeps_a_bucket_within_a_share_of_a_thread_memory():
    # 4 GiB per thread: a bucket may take 1/20 of it, 204.8 MiB; 10 GiB needs 50 of them.
    buckets, why = choose_buckets(10 * GIB, [(8 * GIB, 2)], row_group_mb=64)
    assert buckets == 50
    assert why.startswith("derived: merged/ takes 10.00 GiB in memory; 50 for memory (a bucket at most 1/20 of "
                          "4.00 GiB per worker thread), 8 for the threads")
    # The smallest share of any worker bounds them all; the count is a multiple of the 3 threads.
    assert choose_buckets(10 * GIB, [(16 * GIB, 1), (4 * GIB, 2)], row_group_mb=64)[0] == 102


def test_repartition_choose_buckets_gives_every_thread_a_few_buckets_no_smaller_than_a_row_group():
    assert choose_buckets(int(0.48 * GIB), [(9 * GIB, 1), (9 * GIB, 1)], row_group_mb=64)[0] == 8  # 4 per thread
    assert choose_buckets(int(0.48 * GIB), [(9 * GIB, 1), (9 * GIB, 1)], row_group_mb=128)[0] == 4  # 3, rounded up
    assert choose_buckets(10 * 2**20, [(9 * GIB, 1), (9 * GIB, 1)], row_group_mb=64)[0] == 2  # one per thread
    assert choose_buckets(0, [(9 * GIB, 16)], row_group_mb=64)[0] == 16


def test_repartition_choose_buckets_assumes_4_gib_a_thread_for_workers_without_a_limit():
    buckets, why = choose_buckets(10 * GIB, [(None, 1)], row_group_mb=64)
    assert buckets == 50 and "(assumed: no worker has a memory limit)" in why


def test_repartition_choose_buckets_refuses_a_cluster_without_workers_or_too_many_buckets():
    with pytest.raises(UserError, match="the cluster has no workers, and --buckets is derived from their memory"):
        choose_buckets(GIB, [], row_group_mb=64)
    with pytest.raises(UserError, match=r"--buckets would be 100,000, more than the 99,999 allowed \(derived: "):
        choose_buckets(5000 * GIB, [(1 * GIB, 1)], row_group_mb=64)


def publish_merged(data, user_agent, files=2, rows=1000):
    """A merged/ of `files` impression files of `rows` rows each, every row with `user_agent`, and one actions file."""
    with stage.publish(data, "merged", {}, []) as run:
        tables.write(schemas.ACTIONS.empty_table(), run.path / "actions" / "part-0.parquet")
        for day in range(files):
            impressions = pa.table({"dt": pa.array(np.full(rows, 19_800 + day), pa.int32()).cast(pa.date32()),
                                    "ranking_id": [f"r{i % 50}" for i in range(rows)],
                                    "customer_id": np.arange(rows, dtype=np.int64), "user_agent": [user_agent] * rows,
                                    "item_id": np.arange(rows, dtype=np.int64), "is_order": np.zeros(rows, bool),
                                    "position": np.arange(rows, dtype=np.int32), "split": ["train"] * rows},
                                   schema=schemas.IMPRESSIONS)
            tables.write(impressions, run.path / "impressions" / f"part-{day}.parquet")
        run.accounting = {}
    return stage.open_stage(data, "merged"), files * impressions.nbytes


def test_repartition_merged_bytes_in_memory_counts_every_file_with_the_strings_it_holds(tmp_path):
    """Parquet stores a repeated string once (a dictionary): a file's bytes say nothing of what it takes in memory."""
    for user_agent in ("", "x" * 2000):
        merged, taken = publish_merged(tmp_path / str(len(user_agent)), user_agent, files=3)
        assert abs(merged_bytes_in_memory(merged) - taken) <= 0.01 * taken, user_agent[:5]


def test_repartition_cut_by_bucket_writes_a_piece_per_bucket_present_read_back_whole(tmp_path):
    actions = pa.table({"customer_id": np.arange(1, 1001, dtype=np.int64), "item_id": np.arange(1000, dtype=np.int64),
                        "action_type": np.ones(1000, dtype=np.int8),
                        "occurred_at": pa.array(np.arange(1000), pa.timestamp("us", tz="UTC"))},
                       schema=schemas.ACTIONS)
    tables.write(actions, tmp_path / "merged.parquet")
    rows, ranges = cut_by_bucket(str(tmp_path / "merged.parquet"), "actions", str(tmp_path / "scratch" / "m.arrow"),
                                 buckets=7)
    assert rows == 1000 and sorted(ranges) == list(range(7))
    buckets = bucket_of(actions.column("customer_id"), 7)
    for bucket, (start, length) in ranges.items():
        # Each piece is its bucket's rows, in the merged file's order.
        assert read_piece(str(tmp_path / "scratch" / "m.arrow"), start, length).equals(
            actions.filter(pa.array(buckets == bucket)))


def test_repartition_twice_gives_identical_files(session_cluster, raw_dir, tmp_path):
    data = tmp_path / "data"
    run_joined(session_cluster, "merge_and_clean.py", "--raw", raw_dir, "--data", data)
    run_in_process("repartition.py", "--data", data, *CLUSTER)
    first = {p.relative_to(data): p.read_bytes() for p in (data / "repartitioned").rglob("*.parquet")}
    run_joined(session_cluster, "repartition.py", "--data", data)  # 2 workers of 1 thread
    second = {p.relative_to(data): p.read_bytes() for p in (data / "repartitioned").rglob("*.parquet")}
    assert first == second


def test_repartition_refuses_when_merged_is_missing(tmp_path):
    result = run_in_process("repartition.py", "--data", tmp_path, check=False)
    assert result.returncode == 2
    assert "merged/ is missing: run merge_and_clean.py first" in result.stderr
    assert "Traceback" not in result.stderr


def test_repartition_a_merged_stage_that_kept_no_rows_publishes_empty_tables(session_cluster, tmp_path):
    data = tmp_path / "data"
    with stage.publish(data, "merged", {}, []) as run:
        for table in ("actions", "impressions"):
            tables.write_table(getattr(schemas, table.upper()).empty_table().to_pandas(),
                               run.path / table / "part-0.parquet", getattr(schemas, table.upper()))
    run_joined(session_cluster, "repartition.py", "--data", data)
    manifest = json.loads((data / "repartitioned" / "_stage.json").read_text())
    assert manifest["accounting"] == {"actions": {"rows_in": 0, "kept": 0, "exact_duplicates_kept": 0},
                                      "impressions": {"rows_in": 0, "kept": 0}}
    assert not (data / "repartitioned" / "_scratch").exists()


@pytest.mark.parametrize("value, message", [("nan", "must be a finite number, got nan"),
                                            ("inf", "must be a finite number, got inf"),
                                            ("1e7", "must be at most 1048576, got 1e7"),
                                            ("0", "must be more than 0, got 0")])
def test_repartition_refuses_a_row_group_size_out_of_range_before_anything_runs(session_cluster, raw_dir, tmp_path,
                                                                                 value, message):
    """--row-group-mb nan and inf used to be tracebacks from inside the tasks, after merged/ was read."""
    data = tmp_path / "data"
    run_joined(session_cluster, "merge_and_clean.py", "--raw", raw_dir, "--data", data)
    before = listing(tmp_path)
    result = run_in_process("repartition.py", "--data", data, "--row-group-mb", value, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].endswith(f": error: argument --row-group-mb: {message}")  # after the usage
    assert listing(tmp_path) == before
