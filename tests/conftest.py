"""Tiny raw datasets the tests write themselves, with one row of every bad kind planted."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent

GOOD_UA = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1"

IMPRESSION_LINES = [
    # kept: 3 shown items, one bad entry (no is_order) -> bad_item; an unknown field is ignored
    json.dumps({"dt": "2024-03-02", "ranking_id": "r1", "customer_id": 1, "user_agent": f"  {GOOD_UA} ",
                "app_version": "9.1",
                "impressions": [{"item_id": 10, "is_order": False}, {"item_id": 11}, {"item_id": 12, "is_order": True}]}),
    # the same ranking again: both good shown items are exact duplicates
    json.dumps({"dt": "2024-03-02", "ranking_id": "r1", "customer_id": 1, "user_agent": GOOD_UA,
                "impressions": [{"item_id": 10, "is_order": False}, {"item_id": 11}, {"item_id": 12, "is_order": True}]}),
    '{"dt": "2024-03-03", "ranking_id": "r2", "customer_id": 2',                      # malformed
    json.dumps({"dt": "2024-03-03", "ranking_id": "r3", "user_agent": None,
                "impressions": [{"item_id": 1, "is_order": False}]}),                  # missing:customer_id
    json.dumps({"dt": "2024-03-03", "ranking_id": "r4", "customer_id": -4, "user_agent": "",
                "impressions": []}),                                                   # bad_id:customer_id
    json.dumps({"dt": "2024-02-30", "ranking_id": "r5", "customer_id": 5, "user_agent": "",
                "impressions": []}),                                                   # bad_time:dt
    json.dumps({"dt": "2024-03-03", "ranking_id": "r6", "customer_id": 6, "user_agent": "x",
                "impressions": "10,11"}),                                              # bad_impressions
    # kept, empty user agent stays "", entry with a string item id is bad_item
    json.dumps({"dt": "2024-03-03", "ranking_id": "r7", "customer_id": 7, "user_agent": None,
                "impressions": [{"item_id": "x", "is_order": False}, {"item_id": 13, "is_order": False}]}),
]

CLICK_LINES = [
    json.dumps({"dt": "2024-03-01", "customer_id": 1, "item_id": 10, "click_time": "2024-03-01T10:00:00+02:00"}),
    json.dumps({"dt": "2024-03-01", "customer_id": 1, "item_id": 10, "click_time": "2024-03-01T08:00:00Z"}),  # same instant
    "not json",                                                                                # malformed
    json.dumps({"dt": "2024-03-01", "customer_id": 1, "click_time": "2024-03-01T10:00:00"}),   # missing:item_id
    json.dumps({"dt": "2024-03-01", "customer_id": 1, "item_id": 0, "click_time": "2024-03-01T10:00:00"}),  # bad_id:item_id
    json.dumps({"dt": "2024-03-01", "customer_id": 1, "item_id": 3, "click_time": "yesterday"}),  # bad_time:click_time
]

CART_CSV = """dt,customer_id,config_id,simple_id,occur_at
2024-03-01,2,20,,2024-03-01T09:30:00.123456
2024-03-01,2,20,201,2024-03-01T09:30:00.123456-01:00
2024-03-01,2,20,201,oops,extra
2024-03-01,,20,201,2024-03-01T09:30:00
2024-03-01,2,abc,201,2024-03-01T09:30:00
2024-03-01,2,21,201,2024-13-01T09:30:00
"""


def write_jsonl(path, lines, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)


@pytest.fixture
def raw_dir(tmp_path):
    """Every source, in every format, with one row of every bad kind; see EXPECTED."""
    raw = tmp_path / "raw"
    write_jsonl(raw / "impressions" / "2024-03-02.jsonl", IMPRESSION_LINES[:2])
    write_jsonl(raw / "impressions" / "2024-03-03.jsonl.gz", IMPRESSION_LINES[2:], gz=True)
    write_jsonl(raw / "clicks" / "2024-03-01.jsonl", CLICK_LINES)
    (raw / "add_to_carts").mkdir()
    (raw / "add_to_carts" / "2024-03-01.csv").write_text(CART_CSV)
    (raw / "previous_orders").mkdir()
    pq.write_table(pa.table({"order_date": ["2024-02-28", "2024-02-28", None, "28/02/2024"],
                             "customer_id": [1, 1, 3, 3], "config_id": [12, 12, 12, 12]}),
                   raw / "previous_orders" / "orders.parquet")
    (raw / "previous_orders" / "_SUCCESS").write_text("")  # ignored: starts with _
    return raw


EXPECTED_ACCOUNTING = {
    "impressions.rankings": {"rows_in": 8, "kept": 3, "set_aside": {
        "malformed": 1, "missing:customer_id": 1, "bad_id:customer_id": 1, "bad_time:dt": 1, "bad_impressions": 1}},
    "impressions.shown_items": {"rows_in": 8, "kept": 3, "set_aside": {"bad_item": 3}, "duplicates_dropped": 2},
    "clicks": {"rows_in": 6, "kept": 2, "set_aside": {
        "malformed": 1, "missing:item_id": 1, "bad_id:item_id": 1, "bad_time:click_time": 1},
        "duplicates_dropped": 0, "exact_duplicates_kept": 1},
    "add_to_carts": {"rows_in": 6, "kept": 2, "set_aside": {
        "malformed": 1, "missing:customer_id": 1, "bad_id:config_id": 1, "bad_time:occur_at": 1},
        "duplicates_dropped": 0, "exact_duplicates_kept": 0},
    "previous_orders": {"rows_in": 4, "kept": 2, "set_aside": {"missing:order_date": 1, "bad_time:order_date": 1},
                        "duplicates_dropped": 0, "exact_duplicates_kept": 1},
}


def run_script(script, *args, env=None, check=True, timeout=300):
    """Run a top-level script as a user would, with the repository's interpreter."""
    result = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def cleaned_data(tmp_path_factory):
    """raw -> merged -> repartitioned -> cleaned on generated data, once per test session."""
    from recpipe.synthetic import generate
    root = tmp_path_factory.mktemp("pipeline")
    generate(root / "raw", customers=400, items=300, days=18, actions_per_customer=80, seed=3)
    for script, *args in (("merge_and_clean.py", "--raw", root / "raw"), ("repartition.py", "--buckets", "3"),
                          ("parse_ua_strings.py",)):
        run_script(script, *args, "--data", root / "data", "--workers", "2")
    return root


@pytest.fixture(scope="session")
def processed_data(cleaned_data, tmp_path_factory):
    """cleaned_data carried on through preprocess.py, in a copy of its own: (data, preprocessors)."""
    import shutil
    root = tmp_path_factory.mktemp("processed")
    shutil.copytree(cleaned_data / "data", root / "data")
    run_script("preprocess.py", "--data", root / "data", "--preprocessors", root / "preprocessors",
               "--max-history", "60", "--workers", "2")
    return root / "data", root / "preprocessors"
