"""Stage mechanics: atomic publishing, manifests, refusing a missing input, explicit schemas."""

import json
import os

import pandas as pd
import pyarrow as pa
import pytest

from recpipe import stage
from recpipe.cli import UserError

SCHEMA = pa.schema([("customer_id", pa.int64())])


def publish_rows(data_dir, n, parameters=None):
    with stage.publish(data_dir, "merged", parameters or {}, []) as run:
        stage.write_table(pd.DataFrame({"customer_id": range(n)}), run.path / "actions" / "part.parquet", SCHEMA)
        run.accounting = {"clicks": {"rows_in": n, "kept": n}}
    return run


def test_stage_publish_writes_manifest_with_tables_and_accounting(tmp_path):
    publish_rows(tmp_path, 3, {"test_days": 1})
    manifest = json.loads((tmp_path / "merged" / "_stage.json").read_text())
    assert manifest["tables"]["actions"]["rows"] == 3
    assert manifest["parameters"] == {"test_days": 1}
    assert manifest["accounting"]["clicks"]["kept"] == 3
    assert manifest["code_version"]["source_sha256"]
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no staging left


def test_stage_failure_leaves_previous_output(tmp_path):
    publish_rows(tmp_path, 3)
    with pytest.raises(ValueError):
        with stage.publish(tmp_path, "merged", {}, []) as run:
            stage.write_table(pd.DataFrame({"customer_id": [1]}), run.path / "actions" / "part.parquet", SCHEMA)
            raise ValueError("boom")
    assert stage.read_manifest(tmp_path / "merged")["tables"]["actions"]["rows"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_stage_refuses_to_publish_unbalanced_accounting(tmp_path):
    with pytest.raises(RuntimeError, match="does not balance"):
        with stage.publish(tmp_path, "merged", {}, []) as run:
            run.accounting = {"clicks": {"rows_in": 3, "kept": 1, "set_aside": {"malformed": 1}}}
    assert not (tmp_path / "merged").exists()


def test_stage_require_stage_names_the_script_to_run(tmp_path):
    with pytest.raises(UserError, match="merged/ is missing: run merge_and_clean.py first"):
        stage.require_stage(tmp_path, "merged")
    (tmp_path / "merged").mkdir()
    with pytest.raises(UserError, match="incomplete"):
        stage.require_stage(tmp_path, "merged")


def test_stage_removes_staging_left_by_a_killed_run(tmp_path):
    dead_pid = 2**22 + 12345  # above pid_max's default, so never a live process
    leftover = tmp_path / f".merged.staging-{os.uname().nodename}-{dead_pid}"
    (leftover / "actions").mkdir(parents=True)
    publish_rows(tmp_path, 1)
    assert not leftover.exists()


def test_stage_write_table_refuses_a_column_of_the_wrong_type(tmp_path):
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        stage.write_table(pd.DataFrame({"customer_id": ["abc"]}), tmp_path / "t.parquet", SCHEMA)


def test_stage_write_sized_files_read_back_in_write_order(tmp_path):
    table = pa.table({"customer_id": list(range(4000))})
    stage.write_sized(table, tmp_path / "t", table.schema, row_group_mb=0.0001)  # 13 rows a group, 16 a file
    names = sorted(p.name for p in (tmp_path / "t").glob("*.parquet"))
    assert len(names) > 10 and names[:2] == ["part-00000.parquet", "part-00001.parquet"]
    assert stage.read_parts(tmp_path / "t", table.schema).equals(table)


def test_stage_write_sized_keeps_an_empty_table_as_an_empty_file(tmp_path):
    stage.write_sized(SCHEMA.empty_table(), tmp_path / "t", SCHEMA, row_group_mb=64)
    assert stage.read_parts(tmp_path / "t", SCHEMA).num_rows == 0
    assert [p.name for p in (tmp_path / "t").iterdir()] == ["part-00000.parquet"]


def test_stage_read_parts_names_an_unreadable_file(tmp_path):
    (tmp_path / "part-00000.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError, match="part-00000.parquet: not a readable table"):
        stage.read_parts(tmp_path, SCHEMA)
