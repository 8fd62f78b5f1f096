"""repartition.py: stable customer buckets, sorted buckets, sized row groups, atomic re-runs."""

import json

import numpy as np
import pytest
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from conftest import listing, run_in_process, run_joined
from recpipe import schemas, stage, tables
from recpipe.repartition import bucket_of
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
    assert manifest["parameters"]["buckets"] == 4
    assert set(manifest["row_group_mib_in_memory"]) == {"actions", "impressions"}


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
    assert manifest["accounting"] == {"actions": {"rows_in": 0, "kept": 0}, "impressions": {"rows_in": 0, "kept": 0}}
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
