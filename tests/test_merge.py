"""merge_and_clean.py end to end on tiny planted data: accounting, quarantine, atomicity, determinism."""

import json

import pandas as pd
import pyarrow.parquet as pq

from conftest import EXPECTED_ACCOUNTING, run_script

CLUSTER = ["--workers", "1", "--threads-per-worker", "2"]


def read_table(path):
    return pq.read_table(path).to_pandas()


def test_merge_accounting_balances_and_matches_planted_rows(raw_dir, tmp_path):
    result = run_script("merge_and_clean.py", "--raw", raw_dir, "--data", tmp_path / "data", *CLUSTER)
    manifest = json.loads((tmp_path / "data" / "merged" / "_stage.json").read_text())
    assert manifest["accounting"] == EXPECTED_ACCOUNTING
    assert "Dask dashboard: http" in result.stdout
    assert "ignored unknown fields of impressions: app_version" in result.stdout


def test_merge_quarantines_every_bad_kind_with_its_reason(raw_dir, tmp_path):
    run_script("merge_and_clean.py", "--raw", raw_dir, "--data", tmp_path / "data", *CLUSTER)
    quarantine = read_table(tmp_path / "data" / "merged" / "_quarantine")
    reasons = quarantine.groupby("reason").size().to_dict()
    expected = {}
    for counts in EXPECTED_ACCOUNTING.values():
        for reason, n in counts["set_aside"].items():
            expected[reason] = expected.get(reason, 0) + n
    assert reasons == expected
    malformed_click = quarantine[(quarantine.reason == "malformed") & quarantine.source_file.str.contains("clicks")]
    assert malformed_click.raw.tolist() == ["not json"]
    assert malformed_click.row.tolist() == [3]


def test_merge_writes_canonical_actions_in_utc(raw_dir, tmp_path):
    run_script("merge_and_clean.py", "--raw", raw_dir, "--data", tmp_path / "data", *CLUSTER)
    actions = read_table(tmp_path / "data" / "merged" / "actions")
    assert str(actions.occurred_at.dtype) == "datetime64[us, UTC]"
    clicks = actions[actions.action_type == 1]
    assert clicks.occurred_at.tolist() == [pd.Timestamp("2024-03-01T08:00:00Z")] * 2
    carts = actions[actions.action_type == 2]
    assert carts.occurred_at.tolist() == [pd.Timestamp("2024-03-01T09:30:00.123456Z"),
                                          pd.Timestamp("2024-03-01T10:30:00.123456Z")]
    orders = actions[actions.action_type == 3]
    assert orders.occurred_at.tolist() == [pd.Timestamp("2024-02-28T00:00:00Z")] * 2
    assert orders.item_id.tolist() == [12, 12]
