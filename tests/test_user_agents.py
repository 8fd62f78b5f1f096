"""parse_ua_strings.py: ua-parser's answers on real user agents, garbage and empty strings, one parse
per distinct string, row order, actions carried over, re-runs, a missing input."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import GOOD_UA, listing, one_line, run_in_process, run_joined
from recpipe import schemas, stage, tables, user_agents
from recpipe.cli import UserError

CLUSTER = ["--workers", "1", "--threads-per-worker", "2"]
FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "user_agents.json").read_text())
GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
GARBAGE = bytes(range(256)).decode("latin-1")
LONG = "Mozilla/5.0 (" + "Windows NT 10.0; " * 600 + ")"  # 10 KB, like the generator's
MISSING = dict(zip(user_agents.FIELDS, user_agents.MISSING))


def impressions(agents):
    """A table of impressions whose rows carry `agents`, one each."""
    n = len(agents)
    return pa.table({
        "dt": pa.array([19783] * n, pa.int32()).cast(pa.date32()),
        "ranking_id": [f"r{i}" for i in range(n)],
        "customer_id": np.arange(1, n + 1, dtype=np.int64),
        "user_agent": pa.array(agents, pa.string()),
        "item_id": np.arange(100, 100 + n, dtype=np.int64),
        "is_order": [i % 7 == 0 for i in range(n)],
        "position": pa.array([i % 10 for i in range(n)], pa.int32()),
        "split": ["train"] * n,
    }, schema=schemas.IMPRESSIONS)


def parsed_rows(agents):
    cleaned, _ = user_agents.parse_partition(impressions(agents))
    return cleaned.select(user_agents.FIELDS).to_pylist()


def test_user_agents_parse_upstream_test_cases():
    cases = FIXTURE["cases"]
    assert len(cases) >= 36 and any(c["expected"].get("device_family") == "Spider" for c in cases)
    for case, row in zip(cases, parsed_rows([case["user_agent"] for case in cases])):
        assert {field: row[field] for field in case["expected"]} == case["expected"], case["user_agent"]
        assert row["is_bot"] == (row["device_family"] == "Spider")


def test_user_agents_flag_crawlers_as_bots():
    rows = parsed_rows([GOOGLEBOT, GOOD_UA])
    assert [(row["device_family"], row["is_bot"]) for row in rows] == [("Spider", True), ("iPhone", False)]


def test_user_agents_empty_is_missing_and_garbage_is_other():
    rows = parsed_rows(["", "   ", "\t\n", None, GARBAGE, "x" * 10_240, LONG])
    assert rows[:4] == [MISSING] * 4
    for row in rows[4:]:
        assert row["browser_family"] == "Other" and row["device_family"] == "Other"
        assert row["browser_major"] is None and row["device_brand"] is None and row["is_bot"] is False
    assert rows[4]["os_family"] == "Other" and rows[5]["os_family"] == "Other"
    assert rows[6]["os_family"] == "Windows"  # what ua-parser finds in it; no family is null


def test_user_agents_strip_surrounding_whitespace_before_parsing():
    rows = parsed_rows([GOOD_UA, f"  {GOOD_UA}\t"])
    assert rows[0] == rows[1] and rows[0]["browser_family"] == "Mobile Safari"


@pytest.fixture
def parsed_calls(monkeypatch):
    """The strings the parser is called on, from an empty cache of parsed strings."""
    monkeypatch.setattr(user_agents, "_parsed", {})
    calls = []
    original = user_agents.parse_user_agent

    def counting(user_agent):
        calls.append(user_agent)
        return original(user_agent)

    monkeypatch.setattr(user_agents, "parse_user_agent", counting)
    return calls


def test_user_agents_parse_each_distinct_string_once(parsed_calls):
    rng = np.random.default_rng(0)
    agents = np.array([GOOD_UA, GOOGLEBOT, GARBAGE, ""], dtype=object)[rng.integers(0, 4, 10_000)]
    table = impressions(list(agents))
    table = pa.concat_tables([table.slice(0, 4000), table.slice(4000)])  # two part files: two chunks
    cleaned, stats = user_agents.parse_partition(table)
    assert sorted(parsed_calls) == sorted([GOOD_UA, GOOGLEBOT, GARBAGE])
    assert stats["distinct"] == 3 and stats["rows"] == 10_000
    assert stats["bots"] == int((agents == GOOGLEBOT).sum()) and stats["missing"] == int((agents == "").sum())
    families = np.array(cleaned.column("browser_family").to_pylist(), dtype=object)
    assert (families[agents == GOOD_UA] == "Mobile Safari").all()
    assert (families[agents == GOOGLEBOT] == "Googlebot").all()
    assert (families[agents == GARBAGE] == "Other").all()
    assert all(family is None for family in families[agents == ""])


def test_user_agents_a_string_parsed_for_one_bucket_is_not_parsed_again_for_the_next(parsed_calls):
    first, first_stats = user_agents.parse_partition(impressions([GOOD_UA, GOOGLEBOT, GOOD_UA]))
    second, second_stats = user_agents.parse_partition(impressions([GOOGLEBOT, GARBAGE, "", GOOGLEBOT]))
    assert sorted(parsed_calls) == sorted([GOOD_UA, GOOGLEBOT, GARBAGE])
    assert (first_stats["parsed"], second_stats["parsed"]) == (2, 1)
    assert (first_stats["distinct"], second_stats["distinct"]) == (2, 2)
    assert second.column("browser_family").to_pylist() == ["Googlebot", "Other", None, "Googlebot"]
    assert second.column("is_bot").to_pylist() == [True, False, False, True]


def test_user_agents_output_has_the_cleaned_schema_and_keeps_rows():
    table = impressions([GOOD_UA, "", GARBAGE, GOOGLEBOT])
    cleaned, _ = user_agents.parse_partition(table)
    assert cleaned.schema.equals(schemas.CLEANED_IMPRESSIONS)
    assert cleaned.select(schemas.IMPRESSIONS.names).equals(table)
    empty, stats = user_agents.parse_partition(schemas.IMPRESSIONS.empty_table())
    assert empty.schema.equals(schemas.CLEANED_IMPRESSIONS) and empty.num_rows == 0 and stats["distinct"] == 0


def test_user_agents_refuse_to_run_without_the_native_resolver(monkeypatch):
    monkeypatch.setattr(user_agents.ua_parser, "RegexResolver", None)
    with pytest.raises(UserError, match="ua-parser-rs"):
        user_agents.require_native_resolver()


# ---------------------------------------------------------------- the script end to end

AGENTS = [GOOD_UA, GOOGLEBOT, GARBAGE, LONG, "", "  ", *(case["user_agent"] for case in FIXTURE["cases"][:20])]
ROW_GROUP_MB = 0.001  # ~7 impression rows per row group, 16 groups per file: buckets of many part files


def fabricate_repartitioned(data_dir):
    """A published repartitioned/ of 3 buckets; returns its impressions per bucket, in order."""
    rng = np.random.default_rng(1)
    written = {}
    with stage.publish(data_dir, "repartitioned", {"buckets": 3, "row_group_mb": ROW_GROUP_MB}, []) as run:
        for bucket, n in enumerate([1500, 300, 40]):  # bucket 0: more than 10 part files
            name = f"bucket={bucket:05d}"
            table = impressions([AGENTS[i] for i in rng.integers(0, len(AGENTS), n)])
            table = table.set_column(1, "ranking_id", pa.array([f"{name}-r{i:05d}" for i in range(n)]))
            tables.write_sized(table, run.path / "impressions" / name, schemas.IMPRESSIONS, ROW_GROUP_MB)
            actions = pa.table({"customer_id": rng.integers(1, 50, 200), "item_id": rng.integers(1, 999, 200),
                                "action_type": pa.array(rng.integers(1, 4, 200), pa.int8()),
                                "occurred_at": pa.array(rng.integers(0, 10**15, 200)).cast(schemas.TIMESTAMP)})
            tables.write_sized(actions, run.path / "actions" / name, schemas.ACTIONS, ROW_GROUP_MB)
            written[name] = table
        rows = sum(table.num_rows for table in written.values())
        run.accounting = {"impressions": {"rows_in": rows, "kept": rows},
                          "actions": {"rows_in": 600, "kept": 600}}
    return written


def read_in_write_order(folder):
    files = sorted(folder.glob("part-*.parquet"), key=lambda path: int(path.stem.split("-")[1]))
    return pa.concat_tables([pq.read_table(path) for path in files])


def cleaned_tables(data_dir):
    cleaned = data_dir / "cleaned"
    return {str(folder.relative_to(cleaned)): read_in_write_order(folder)
            for folder in sorted(cleaned.glob("*/bucket=*"))}


@pytest.fixture(scope="module")
def two_runs(session_cluster, tmp_path_factory):
    """The script run twice on one fabricated repartitioned/; what each run wrote, and the input."""
    data = tmp_path_factory.mktemp("ua") / "data"
    written = fabricate_repartitioned(data)
    action_bytes = {str(path.relative_to(data / "repartitioned")): path.read_bytes()
                    for path in (data / "repartitioned" / "actions").rglob("*.parquet")}
    bucket_files = len(list((data / "repartitioned" / "impressions" / "bucket=00000").glob("*.parquet")))
    first = run_joined(session_cluster, "parse_ua_strings.py", "--data", data)
    first_tables = cleaned_tables(data)
    first_manifest = json.loads((data / "cleaned" / "_stage.json").read_text())
    run_joined(session_cluster, "parse_ua_strings.py", "--data", data)
    return {"data": data, "written": written, "action_bytes": action_bytes, "bucket_files": bucket_files,
            "stdout": first.stdout,
            "first": first_tables, "first_manifest": first_manifest, "second": cleaned_tables(data)}


def test_parse_ua_strings_publishes_cleaned_with_its_manifest(two_runs):
    manifest, written = two_runs["first_manifest"], two_runs["written"]
    rows = sum(table.num_rows for table in written.values())
    assert manifest["accounting"] == {"impressions": {"rows_in": rows, "kept": rows},
                                      "actions": {"rows_in": 600, "kept": 600}}
    assert manifest["inputs"][0]["stage"] == "repartitioned"
    assert manifest["parameters"]["row_group_mb"] == ROW_GROUP_MB
    assert manifest["tables"]["impressions"]["rows"] == rows
    distinct = sum(len({agent.strip() for agent in table.column("user_agent").to_pylist()} - {""})
                   for table in written.values())
    # Googlebot, FacebookBot and the like among the fixture's agents: ua-parser's device family "Spider"
    bots = sum(user_agents.parse_partition(table)[0].column("device_family").to_pylist().count("Spider")
               for table in written.values())
    assert bots >= sum(table.column("user_agent").to_pylist().count(GOOGLEBOT) for table in written.values()) > 0
    summary = manifest["user_agents"]
    assert (summary["distinct"], summary["bots"]) == (distinct, bots)
    # the session's workers may have parsed some of these strings for an earlier test
    assert 0 <= summary["parsed"] <= distinct and (summary["parsed_per_second"] is None) == (summary["parsed"] == 0)
    assert f"user agents: {distinct:,} distinct strings" in two_runs["stdout"]
    assert "parse_ua_strings.py -> cleaned/ done" in two_runs["stdout"]


def test_parse_ua_strings_keeps_each_buckets_row_order(two_runs):
    first = two_runs["first"]
    assert two_runs["bucket_files"] > 10  # part-10 sorts before part-2 as text
    for name, table in two_runs["written"].items():
        cleaned = first[f"impressions/{name}"]
        assert cleaned.schema.equals(schemas.CLEANED_IMPRESSIONS)
        assert cleaned.select(schemas.IMPRESSIONS.names).equals(table)
        expected = user_agents.parse_partition(table)[0]
        assert cleaned.select(user_agents.FIELDS).equals(expected.select(user_agents.FIELDS))


def test_parse_ua_strings_passes_actions_on_as_links_not_copies(two_runs):
    data = two_runs["data"]
    passed = {str(path.relative_to(data / "cleaned")): path for path in (data / "cleaned" / "actions").rglob("*.parquet")}
    assert passed.keys() == two_runs["action_bytes"].keys()
    for name, path in passed.items():
        assert path.read_bytes() == two_runs["action_bytes"][name]
        # one copy on disk: the file of repartitioned/ under a second name, not a second file
        assert os.stat(path).st_ino == os.stat(data / "repartitioned" / name).st_ino


def test_parse_ua_strings_twice_gives_identical_rows(two_runs):
    first, second = two_runs["first"], two_runs["second"]
    assert first.keys() == second.keys()
    for name in first:
        assert first[name].equals(second[name]), name


def test_parse_ua_strings_output_survives_deleting_repartitioned(two_runs):
    data = two_runs["data"]
    shutil.rmtree(data / "repartitioned")
    assert cleaned_tables(data).keys() == two_runs["second"].keys()
    for name, table in cleaned_tables(data).items():
        assert table.equals(two_runs["second"][name])


def test_parse_ua_strings_without_repartitioned_says_what_to_run(tmp_path):
    (tmp_path / "data").mkdir()
    result = run_in_process("parse_ua_strings.py", "--data", tmp_path / "data", *CLUSTER, check=False)
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert "repartitioned/ is missing, and so is merged/ before it" in line and "run merge_and_clean.py first" in line
    assert listing(tmp_path) == {"data": None}


def test_parse_ua_strings_with_a_data_folder_that_does_not_exist_says_so(tmp_path):
    result = run_in_process("parse_ua_strings.py", "--data", tmp_path / "data", *CLUSTER, check=False)
    assert result.returncode == 2
    assert f"--data {tmp_path / 'data'}: no such folder" in one_line(result.stderr)
    assert listing(tmp_path) == {}
