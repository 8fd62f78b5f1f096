"""Stage mechanics: atomic publishing, manifests, refusing a missing input, explicit schemas."""

import json
import shutil

import pandas as pd
import pyarrow as pa
import pytest

from conftest import BREAKAGES, DEAD_PID, break_stage, broken_stage_line, listing, one_line, run_main, temporary_folder
from recpipe import stage, stages, tables
from recpipe.cli import UserError

SCHEMA = pa.schema([("customer_id", pa.int64())])


def publish_rows(data_dir, n, parameters=None):
    with stage.publish(data_dir, "merged", parameters or {}, []) as run:
        tables.write_table(pd.DataFrame({"customer_id": range(n)}), run.path / "actions" / "part.parquet", SCHEMA)
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
            tables.write_table(pd.DataFrame({"customer_id": [1]}), run.path / "actions" / "part.parquet", SCHEMA)
            raise ValueError("boom")
    assert stage.read_manifest(tmp_path / "merged")["tables"]["actions"]["rows"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_stage_refuses_to_publish_unbalanced_accounting(tmp_path):
    with pytest.raises(RuntimeError, match="does not balance"):
        with stage.publish(tmp_path, "merged", {}, []) as run:
            run.accounting = {"clicks": {"rows_in": 3, "kept": 1, "set_aside": {"malformed": 1}}}
    assert not (tmp_path / "merged").exists()


def test_stage_open_stage_names_the_script_to_run(tmp_path):
    with pytest.raises(UserError, match="merged/ is missing: run merge_and_clean.py first"):
        stage.open_stage(tmp_path, "merged")
    (tmp_path / "merged").mkdir()
    with pytest.raises(UserError, match="incomplete"):
        stage.open_stage(tmp_path, "merged")


def test_stage_removes_staging_left_by_a_killed_run_and_nothing_without_its_marker(tmp_path):
    leftover = temporary_folder(tmp_path, "merged")
    look_alike = temporary_folder(tmp_path, "merged", pid=DEAD_PID + 1, marked=False)
    publish_rows(tmp_path, 1)
    assert not leftover.exists()
    assert look_alike.exists() and (look_alike / "actions" / "part.parquet").read_bytes() == b"half written"


def test_stage_write_table_refuses_a_column_of_the_wrong_type(tmp_path):
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        tables.write_table(pd.DataFrame({"customer_id": ["abc"]}), tmp_path / "t.parquet", SCHEMA)


def test_stage_write_sized_files_read_back_in_write_order(tmp_path):
    table = pa.table({"customer_id": list(range(4000))})
    tables.write_sized(table, tmp_path / "t", table.schema, row_group_mb=0.0001)  # 13 rows a group, 16 a file
    names = sorted(p.name for p in (tmp_path / "t").glob("*.parquet"))
    assert len(names) > 10 and names[:2] == ["part-00000.parquet", "part-00001.parquet"]
    assert tables.read_parts(tmp_path / "t", table.schema).equals(table)


def test_stage_write_sized_keeps_an_empty_table_as_an_empty_file(tmp_path):
    tables.write_sized(SCHEMA.empty_table(), tmp_path / "t", SCHEMA, row_group_mb=64)
    assert tables.read_parts(tmp_path / "t", SCHEMA).num_rows == 0
    assert [p.name for p in (tmp_path / "t").iterdir()] == ["part-00000.parquet"]


def test_stage_read_parts_names_an_unreadable_file(tmp_path):
    (tmp_path / "part-00000.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError, match="part-00000.parquet: not a readable table"):
        tables.read_parts(tmp_path, SCHEMA)


@pytest.mark.parametrize("text, problem", [
    ('{"stage": "merged", "param', "not readable as JSON"),
    ("[]", "a JSON list, not an object"),
    ({"finished_at": "yesterday"}, "'finished_at' is \"yesterday\", not a date and time"),
    ({"parameters": None}, "'parameters' is null, not an object"),
    ({"tables": {"actions": {"rows": "3", "files": 1, "bytes": 1}}},
     "'tables.actions.rows' is \"3\", not a count (a whole number, 0 or more)"),
    ({"accounting": {"clicks": {"rows_in": 2, "kept": True}}}, "'accounting.clicks.kept' is true, not a count"),
    ({"files": {"actions/part.parquet": {"rows": 2}}}, "no 'files[\"actions/part.parquet\"].bytes'"),
    ({"lineage": {"raw": "abc"}}, "'lineage.raw' is \"abc\", not an object"),
    ({"parameters": {"train_days": 1.5}}, "'parameters.train_days' must be an integer, got 1.5"),
    ({"parameters": {"val_days": -1}}, "'parameters.val_days' must be at least 0, got -1"),
])
def test_stage_read_manifest_names_a_broken_manifest_and_the_fix(tmp_path, text, problem):
    publish_rows(tmp_path, 2)
    path = tmp_path / "merged" / "_stage.json"
    if isinstance(text, dict):
        text = json.dumps({**json.loads(path.read_text()), **text})
    path.write_text(text)
    with pytest.raises(UserError) as refused:
        stage.read_manifest(tmp_path / "merged")
    assert str(refused.value).startswith(f"{path}: not a manifest that merge_and_clean.py wrote ({problem}")
    assert str(refused.value).endswith(f"delete {tmp_path / 'merged'}/ yourself and run merge_and_clean.py again")


def test_stage_damage_names_missing_changed_and_unlisted_files(tmp_path):
    with stage.publish(tmp_path, "merged", {}, []) as run:
        for name in ("a", "b", "c"):
            tables.write_table(pd.DataFrame({"customer_id": range(3)}), run.path / "actions" / f"{name}.parquet", SCHEMA)
    folder = tmp_path / "merged"
    manifest = stage.read_manifest(folder)
    assert stage.damage(folder, manifest) is None and stage.damage(folder, manifest, full=True) is None
    assert manifest["files"]["actions/a.parquet"]["rows"] == 3
    (folder / "actions" / "a.parquet").unlink()
    tables.write_table(pd.DataFrame({"customer_id": range(4)}), folder / "actions" / "b.parquet", SCHEMA)
    (folder / "notes.txt").write_text("mine")
    assert stage.damage(folder, manifest) == ("1 file missing: actions/a.parquet; 1 file changed (size or rows): "
                                              "actions/b.parquet; 1 file not written by the stage: notes.txt")


def test_stage_damage_full_finds_a_change_that_keeps_sizes_and_rows(tmp_path):
    publish_rows(tmp_path, 3)
    folder = tmp_path / "merged"
    path = folder / "actions" / "part.parquet"
    data = bytearray(path.read_bytes())
    data[4] ^= 0xFF  # inside the first data page: the footer, its row count and the size stay
    path.write_bytes(bytes(data))
    manifest = stage.read_manifest(folder)
    assert stage.damage(folder, manifest) is None
    assert "differ from the fingerprint recorded when it was published" in stage.damage(folder, manifest, full=True)


def test_stage_publish_refuses_to_replace_a_folder_it_did_not_write_and_leaves_it(tmp_path):
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "mine.csv").write_text("a,b\n")
    before = listing(tmp_path)
    with pytest.raises(UserError, match=rf"refusing to replace {tmp_path / 'merged'}/: it has no _stage.json"):
        publish_rows(tmp_path, 1)
    publish_rows(tmp_path / "ok", 1)
    (tmp_path / "ok" / "merged" / "actions" / "extra.parquet").write_bytes(b"mine")
    with pytest.raises(UserError, match="it holds what merge_and_clean.py did not write: actions/extra.parquet"):
        publish_rows(tmp_path / "ok", 1)
    assert {name: size for name, size in listing(tmp_path).items() if not name.startswith("ok")} == before


@pytest.mark.parametrize("breakage", BREAKAGES)
@pytest.mark.parametrize("script, input_stage", [("repartition.py", "merged"), ("parse_ua_strings.py", "repartitioned"),
                                                 ("preprocess.py", "cleaned")])
def test_stage_every_stage_refuses_a_broken_or_damaged_input_in_one_line(cleaned_data, tmp_path, capsys, script,
                                                                         input_stage, breakage):
    data = tmp_path / "data"
    shutil.copytree(cleaned_data / "data", data)
    break_stage(data / input_stage, breakage)
    before = listing(tmp_path)
    status = run_main(script, "--data", data, *(["--preprocessors", tmp_path / "pre"] if script == "preprocess.py" else []))
    line = one_line(capsys.readouterr().err)
    assert status == 2
    start, end = broken_stage_line(data / input_stage, breakage, stages.BY_NAME[input_stage].script)
    assert line.startswith(start) and line.endswith(end), line
    assert listing(tmp_path) == before
