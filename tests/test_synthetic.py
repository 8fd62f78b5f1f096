"""The synthetic raw data: deterministic, as docs/data.md (Raw input) lays it out, with its signal and its accounting.

The checks read the written files back with their own small reader (json, csv, pyarrow),
not with recpipe's, so that they hold the generator to the contract independently.
"""

import collections
import csv
import gzip
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from conftest import (assert_accounting_is_what_was_planted, assert_exact_duplicates_are_what_was_planted, one_line,
                      run_in_process, run_joined)
from recpipe import stage
from recpipe.synthetic import generate
from recpipe.synthetic.sources import BACKFILL_ORDERS

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("impressions", "clicks", "add_to_carts", "previous_orders")

# Every defect kind each source must carry (docs/data.md, Cleaning); bad_item is counted per shown item.
KINDS = {
    "impressions": {"malformed", "missing:dt", "missing:ranking_id", "missing:customer_id", "missing:impressions",
                    "bad_id:customer_id", "bad_time:dt", "bad_impressions"},
    "clicks": {"malformed", "missing:dt", "missing:customer_id", "missing:item_id", "missing:click_time",
               "bad_id:customer_id", "bad_id:item_id", "bad_time:dt", "bad_time:click_time"},
    "add_to_carts": {"malformed", "missing:dt", "missing:customer_id", "missing:config_id", "missing:occur_at",
                     "bad_id:customer_id", "bad_id:config_id", "bad_time:dt", "bad_time:occur_at"},
    "previous_orders": {"malformed", "missing:order_date", "missing:customer_id", "missing:config_id",
                        "bad_id:customer_id", "bad_id:config_id", "bad_time:order_date"},
}
SIZES = {"customers": 300, "items": 400, "days": 8, "actions_per_customer": 150, "seed": 1}
# About 168 actions and shown items a customer of SIZES: blocks of 29 customers, 11 blocks.
SMALL_BLOCK_ROWS = 5000


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "raw"
    generate(out, **SIZES)
    return out


@pytest.fixture(scope="module")
def blocks(tmp_path_factory):
    """SIZES made in many blocks of customers, as a million customers are (in blocks of about 2 M rows)."""
    out = tmp_path_factory.mktemp("blocks") / "raw"
    generate(out, **SIZES, block_rows=SMALL_BLOCK_ROWS)
    return out


# ---------------------------------------------------------------- a small independent reader


def _bytes(path):
    data = path.read_bytes()
    return gzip.decompress(data) if path.name.endswith(".gz") else data


def _files(raw, source):
    return sorted(path for path in (raw / source).iterdir() if not path.name.startswith(("_", ".")))


def _records(path):
    """(rows in the file, the rows that decode as dicts); malformed lines are left out of the latter."""
    if path.name.endswith(".parquet"):
        rows = pq.read_table(path).to_pylist()
        return len(rows), rows
    text = _bytes(path).decode("utf-8")
    if ".csv" in path.name:
        reader = csv.DictReader(io.StringIO(text), restkey="_extra", restval=None)
        rows = list(reader)
        return len(rows), [row for row in rows if "_extra" not in row and None not in row.values()]
    lines = [line for line in text.split("\n") if line]
    decoded = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            decoded.append(record)
    return len(lines), decoded


def _contents(out):
    return {str(path.relative_to(out)): path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()}


def _frame(raw, source):
    """Every decodable row of a source as object columns, so that ints stay ints beside nulls and "abc"."""
    records = [record for path in _files(raw, source) for record in _records(path)[1]]
    columns = dict.fromkeys(name for record in records for name in record)
    return pd.DataFrame({name: pd.Series([record.get(name) for record in records], dtype=object) for name in columns})


def _ids(values):
    """Positive integer ids (JSON ints or CSV digit strings); NaN where invalid."""
    def parse(value):
        if type(value) is int:
            return value if value > 0 else None
        if isinstance(value, str) and re.fullmatch(r"[0-9]+", value.strip()):
            return int(value) or None
        return None
    return pd.to_numeric(pd.Series([parse(value) for value in values], dtype=object), errors="coerce")


def _dates(values):
    text = pd.Series([value if isinstance(value, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", value) else None
                      for value in values], dtype=object)
    return pd.to_datetime(text, format="%Y-%m-%d", utc=True, errors="coerce")


def _timestamps(values):
    text = pd.Series([value if isinstance(value, str) and value else None for value in values], dtype=object)
    return pd.to_datetime(text, format="ISO8601", utc=True, errors="coerce")


def _actions(raw):
    """The valid clicks, add-to-carts and orders: customer_id, item_id, action (name), occurred_at (UTC)."""
    parts = []
    for source, item, when, parse in (("clicks", "item_id", "click_time", _timestamps),
                                      ("add_to_carts", "config_id", "occur_at", _timestamps),
                                      ("previous_orders", "config_id", "order_date", _dates)):
        frame = _frame(raw, source)
        part = pd.DataFrame({"customer_id": _ids(frame.get("customer_id")), "item_id": _ids(frame.get(item)),
                             "occurred_at": parse(frame.get(when)).to_numpy(), "action": source})
        parts.append(part.dropna())
    return pd.concat(parts, ignore_index=True)


def _shown_items(raw):
    """One row per valid shown item of a valid ranking: customer_id, day, item_id, is_order, user_agent."""
    rows = []
    for record in _frame(raw, "impressions").to_dict("records"):
        entries = record.get("impressions")
        if not isinstance(entries, list) or not isinstance(record.get("ranking_id"), str):
            continue
        for entry in entries:
            if type(entry.get("item_id")) is int and type(entry.get("is_order")) is bool:
                rows.append({"customer_id": record.get("customer_id"), "dt": record.get("dt"),
                             "item_id": entry["item_id"], "is_order": entry["is_order"]})
    shown = pd.DataFrame(rows)
    shown["customer_id"] = _ids(shown["customer_id"])
    shown["day"] = _dates(shown["dt"])
    return shown.dropna(subset=["customer_id", "day"])


# ---------------------------------------------------------------- tests


def test_synthetic_same_seed_gives_identical_bytes(tmp_path):
    small = {"customers": 60, "items": 80, "days": 4, "actions_per_customer": 20}
    contents = _contents
    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(first, seed=3, **small)
    generate(second, seed=4, **small)
    generate(second, seed=3, **small)  # its own earlier output is replaced, not merged into
    generate(other, seed=4, **small)
    assert contents(first) == contents(second)
    assert len(contents(first)) > 20
    differing = [name for name, data in contents(first).items() if contents(other).get(name) != data]
    assert len(differing) > 10
    assert not list(tmp_path.glob(".*"))  # no staging or old folders left beside the output


def test_synthetic_same_seed_and_block_size_give_identical_bytes(tmp_path):
    small = {"customers": 60, "items": 80, "days": 4, "actions_per_customer": 20, "seed": 3}
    summary = generate(tmp_path / "a", **small, block_rows=300)["summary"]  # 28.8 rows a customer: 6 blocks of 10
    generate(tmp_path / "b", **small, block_rows=300)
    generate(tmp_path / "one", **small)
    first, second, one = _contents(tmp_path / "a"), _contents(tmp_path / "b"), _contents(tmp_path / "one")
    assert first == second
    # The block size is part of the data, so the parameters say which one made it.
    parameters = {name: json.loads(files["_generated.json"])["parameters"]["customers_per_block"]
                  for name, files in (("blocks", first), ("one", one))}
    assert parameters == {"blocks": 10, "one": 60}
    assert first.keys() == one.keys()
    assert len([name for name in first if first[name] != one[name]]) > 20
    # 2% bad rows of the whole source (rounded once, not per block of 140 clicks), or one of every kind if more.
    for source in SOURCES:
        kinds = len(KINDS[source]) + (source == "impressions")  # bad_item as well
        rows = summary["rows"][source] - summary["duplicate_rows"][source]
        assert summary["bad_rows"][source] == max(kinds, round(0.02 * rows)), source


def test_synthetic_writes_every_source_in_a_mix_of_formats(raw):
    def suffixes(source):
        return {"".join(Path(path.name).suffixes[-2:]) if path.name.endswith(".gz") else path.suffix
                for path in _files(raw, source)}

    assert suffixes("impressions") == {".jsonl", ".jsonl.gz", ".parquet"}
    assert suffixes("clicks") == {".jsonl.gz"}
    assert suffixes("add_to_carts") == {".csv", ".csv.gz"}
    assert suffixes("previous_orders") == {".parquet", ".jsonl"}
    impression_days = [path.name.split(".")[0] for path in _files(raw, "impressions")]
    assert impression_days == [str(np.datetime64("2024-03-01") + day) for day in range(SIZES["days"])]
    assert _files(raw, "impressions")[-3].suffix == ".parquet"  # the last-but-two day
    assert len(_files(raw, "clicks")) == SIZES["days"] + 28
    assert (raw / "_generated.json").is_file()


def test_synthetic_activity_is_heavy_tailed(raw):
    actions = _actions(raw)
    per_customer = actions.groupby("customer_id").size()
    assert per_customer.max() > 1000  # beyond the pipeline's history cap
    assert per_customer.max() > 5 * per_customer.mean()
    shares = actions["action"].value_counts(normalize=True)
    assert 0.6 < shares["clicks"] < 0.75
    assert 0.15 < shares["add_to_carts"] < 0.25


def test_synthetic_order_rate_is_higher_for_recently_engaged_items(raw):
    shown = _shown_items(raw).reset_index(drop=True)
    actions = _actions(raw)
    engaged = actions[actions["action"] != "previous_orders"]
    pairs = shown.reset_index().merge(engaged[["customer_id", "item_id", "occurred_at"]],
                                      on=["customer_id", "item_id"])
    window = (pairs["occurred_at"] >= pairs["day"] - pd.Timedelta(days=14)) & (pairs["occurred_at"] < pairs["day"])
    shown["recent"] = shown.index.isin(pairs.loc[window, "index"])
    rates = shown.groupby("recent")["is_order"].mean()
    assert 0.1 < shown["recent"].mean() < 0.7
    assert rates[True] > 4 * rates[False]
    assert 0.15 < rates[True] < 0.35 and rates[False] < 0.05


@pytest.mark.parametrize("dataset", ["raw", "blocks"])
def test_synthetic_accounting_matches_the_files(dataset, request):
    raw = request.getfixturevalue(dataset)
    generated = json.loads((raw / "_generated.json").read_text())
    assert set(generated) == {"parameters", "expected", "files"}
    assert generated["files"] == sorted(str(path.relative_to(raw)) for path in raw.rglob("*")
                                        if path.is_file() and path.name != "_generated.json")
    assert {key: generated["parameters"][key] for key in SIZES} == SIZES
    expected = generated["expected"]
    assert set(expected) == set(SOURCES)
    for source in SOURCES:
        counts = [_records(path)[0] for path in _files(raw, source)]
        rows_in = expected[source]["rankings_in" if source == "impressions" else "rows_in"]
        assert rows_in == sum(counts), source
        quarantined = expected[source]["rankings_quarantined" if source == "impressions" else "quarantined"]
        assert set(quarantined) == KINDS[source], source
        assert 0.01 < sum(quarantined.values()) / rows_in < 0.04, source

    # Repeated lines in the files are the planted duplicates, and every one is counted.
    def repeats(source):
        lines = collections.Counter()
        for path in _files(raw, source):
            if path.suffix == ".parquet" or path.name.endswith(".parquet"):
                rows = [json.dumps(row, sort_keys=True) for row in pq.read_table(path).to_pylist()]
            elif "csv" in path.name:
                header, *rows = [line for line in _bytes(path).decode().split("\n") if line]
                rows = [row for row in rows if row.count(",") == header.count(",")]
            else:  # only lines that decode: a constant "not json" line may repeat by chance
                rows = [json.dumps(record) for record in _records(path)[1]]
            seen = set()
            for row in rows:
                if row in seen:
                    lines[row] += 1
                seen.add(row)
        return lines

    impressions = expected["impressions"]
    repeated_rankings = repeats("impressions")
    assert sum(repeated_rankings.values()) > 0
    repeated_items = sum(count * len(json.loads(row)["impressions"]) for row, count in repeated_rankings.items())
    assert impressions["shown_items_duplicates"] == repeated_items
    assert impressions["shown_items_quarantined"]["bad_item"] > 0
    assert set(impressions["shown_items_quarantined"]) == {"bad_item"}
    assert impressions["shown_items_in"] > 5 * impressions["rankings_in"]
    for source in ("clicks", "add_to_carts"):
        planted = sum(repeats(source).values())
        assert 0 < planted <= expected[source]["exact_duplicates"]
    assert expected["previous_orders"]["exact_duplicates"] > 0  # the same item ordered twice on a day
    # A few hundred backfilled orders in all, however many blocks the customers came in.
    assert 200 <= _records(raw / "previous_orders" / "backfill.jsonl")[0] <= BACKFILL_ORDERS


def test_synthetic_blocks_hold_their_own_customers_one_after_the_other(blocks):
    """Customers first..first + customers_per_block - 1 are one block's; a file holds its blocks' rows in turn (a
    Parquet file a row group each), and each block draws its own rows, not a copy of another's."""
    per_block = json.loads((blocks / "_generated.json").read_text())["parameters"]["customers_per_block"]
    n_blocks = -(-SIZES["customers"] // per_block)
    assert n_blocks >= 8
    seen = set()
    for source in SOURCES:
        for path in _files(blocks, source):
            ids = _ids([record.get("customer_id") for record in _records(path)[1]]).dropna().astype(int)
            assert ids.between(1, SIZES["customers"]).all(), path
            block = (ids - 1) // per_block
            assert block.is_monotonic_increasing, path
            seen.update(block)
    assert seen == set(range(n_blocks))
    impressions_parquet = [path for path in _files(blocks, "impressions") if path.suffix == ".parquet"]
    assert pq.ParquetFile(impressions_parquet[0]).num_row_groups == n_blocks  # every block ranks every day

    clicks = _frame(blocks, "clicks")
    clicks = pd.DataFrame({"customer_id": _ids(clicks["customer_id"]), "item_id": _ids(clicks["item_id"]),
                           "click_time": clicks["click_time"]}).dropna()
    block = (clicks["customer_id"] - 1) // per_block
    clicks["customer_id"] -= block * per_block  # the same numbers in every block, had each drawn block 0's rows
    rows = [set(map(tuple, clicks[block == number].to_numpy().tolist())) for number in (0, 1)]
    assert rows[0] and rows[1] and not rows[0] & rows[1]


def test_synthetic_blocks_accounting_is_what_merge_and_clean_and_repartition_find(blocks, session_cluster, tmp_path):
    run_joined(session_cluster, "merge_and_clean.py", "--raw", blocks, "--data", tmp_path / "data")
    run_joined(session_cluster, "repartition.py", "--data", tmp_path / "data")
    accounting = json.loads((tmp_path / "data" / "merged" / "_stage.json").read_text())["accounting"]
    expected = json.loads((blocks / "_generated.json").read_text())["expected"]
    assert_accounting_is_what_was_planted(accounting, expected)
    assert_exact_duplicates_are_what_was_planted(stage.read_manifest(tmp_path / "data" / "repartitioned"), expected)


def test_synthetic_click_offsets_are_the_same_instant(raw):
    clicks = _frame(raw, "clicks")
    valid = clicks[_ids(clicks["customer_id"]).notna() & _ids(clicks["item_id"]).notna()]
    when = _timestamps(valid["click_time"])
    day = _dates(valid["dt"])
    ok = when.notna().to_numpy() & day.notna().to_numpy()
    text = valid["click_time"][ok]
    offset = text.str.contains(r"[+-]\d\d:\d\d$")
    assert 0.05 < offset.mean() < 0.15
    assert 0.1 < text.str.endswith("Z").mean() < 0.3
    assert text.str.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d)?").all()
    # dt is the UTC day, so it agrees with the converted time even where the local day differs.
    assert (when[ok].dt.floor("D").to_numpy() == day[ok].to_numpy()).all()
    local_day = text[offset].str.slice(0, 10).to_numpy()
    assert (local_day != valid["dt"][ok][offset].to_numpy()).any()


def test_synthetic_user_agents_are_mostly_stable_per_customer(raw):
    rankings = _frame(raw, "impressions")
    rankings = rankings[_ids(rankings["customer_id"]).notna()]
    agent = rankings["user_agent"]
    blank = agent.isna() | agent.map(lambda value: isinstance(value, str) and not value.strip())
    assert 0.01 < blank.mean() < 0.08
    kept = rankings[~blank]
    assert kept["user_agent"].nunique() > 100
    top_share = kept.groupby("customer_id")["user_agent"].agg(lambda values: values.value_counts(normalize=True).iloc[0])
    assert top_share.median() >= 0.8


@pytest.mark.processes
def test_synthetic_generate_data_cli(tmp_path):
    out = tmp_path / "raw"
    result = subprocess.run([sys.executable, str(ROOT / "generate_data.py"), "--out", str(out), "--customers", "40",
                             "--items", "50", "--days", "3", "--actions-per-customer", "10", "--seed", "2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "bad rows planted" in result.stdout
    parameters = json.loads((out / "_generated.json").read_text())["parameters"]
    assert parameters["customers"] == 40 and parameters["days"] == 3 and parameters["seed"] == 2
    assert {path.name for path in out.iterdir()} == {*SOURCES, "_generated.json"}


@pytest.mark.processes
@pytest.mark.parametrize("occupant", ["raw logs", "a stage folder"])
def test_synthetic_generate_data_replaces_only_what_it_generated(tmp_path, occupant):
    """`generate_data.py --out data` used to replace the whole data folder (every stage, the real logs)."""
    out = tmp_path / "out"
    generate(out, customers=5, items=5, days=2, actions_per_customer=2, seed=1)
    generate(out, customers=6, items=5, days=2, actions_per_customer=2, seed=1)  # its own folder: replaced
    assert json.loads((out / "_generated.json").read_text())["parameters"]["customers"] == 6
    (out / "clicks" / "mine.jsonl" if occupant == "raw logs" else out / "merged").mkdir()
    before = {str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")}
    result = subprocess.run([sys.executable, str(ROOT / "generate_data.py"), "--out", str(out), "--customers", "5"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    extra = "clicks/mine.jsonl" if occupant == "raw logs" else "merged"
    assert result.stderr.strip().splitlines() == [
        f"error: refusing to replace {out}/: it holds {extra}, which the generator did not write, so this project "
        "cannot tell that it wrote it; point --out at a new or empty folder, or at one generate_data.py wrote"]
    assert {str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")} == before


def test_synthetic_generate_data_refuses_a_url_for_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_in_process("generate_data.py", "--out", "s3://bucket/raw", check=False)
    assert result.returncode == 2
    assert one_line(result.stderr).startswith("error: --out s3://bucket/raw: a s3:// URL, and --out is a folder on this machine")
    assert list(tmp_path.iterdir()) == []
