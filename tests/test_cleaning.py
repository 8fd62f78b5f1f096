"""The cleaning rules (docs/data.md) on tiny literal frames, and through merge_and_clean.py where a rule stops it."""

import datetime as dt
import random

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from conftest import IMPRESSION_LINES, listing, one_line, run_joined, write_jsonl, write_planted_raw
from recpipe.cleaning import (PYTHON_WHITESPACE, _typed_dates, _typed_times, clean_actions, clean_impressions,
                              drop_duplicate_impressions, parse_dates, parse_ids, parse_timestamps, split_days,
                              strip_text, validate)
from recpipe.cli import UserError


def rows(source_fields, *records):
    """A RawRows-shaped frame from literal records (dicts of field values)."""
    frame = pd.DataFrame({"row": np.arange(1, len(records) + 1), "raw": [None] * len(records),
                          "malformed": [False] * len(records)})
    for name in source_fields:
        frame[name] = pd.Series([record.get(name) for record in records], dtype=object)
    return frame


CLICK_FIELDS = ("dt", "customer_id", "item_id", "click_time")


def test_parse_ids_accepts_positive_integers_and_digit_strings_only():
    ids, valid = parse_ids(strip_text(pd.Series([7, " 8 ", "+9", 0, -1, "abc", 3.0, True, None, 2**63, 2**63 - 1],
                                                dtype=object)))
    assert valid.tolist() == [True, True, True, False, False, False, False, False, False, False, True]
    assert ids[valid].tolist() == [7, 8, 9, 2**63 - 1]


def test_strip_text_of_only_text_strips_as_python_does():
    values = pd.Series(["a", " b", "c\u00a0", "\u3000d\t", "\u00e9", None, "2024-03-01T10:00:00Z", "x\n", ""],
                       dtype=object)
    assert strip_text(values).tolist() == [value.strip() if value is not None else None for value in values]


def test_strip_text_strips_text_that_utf8_cannot_encode():
    assert strip_text(pd.Series([" \ud800 ", "a "], dtype=object)).tolist() == ["\ud800", "a"]


def test_parse_ids_of_only_text_matches_whole_values():
    ids, valid = parse_ids(pd.Series(["12", "12\n", "+3", "1 2", "\u0661\u0662", None, "x12"], dtype=object))
    assert valid.tolist() == [True, False, True, False, False, False, False]
    assert ids[valid].tolist() == [12, 3]


def test_parse_dates_of_only_text_rejects_a_trailing_newline():
    assert parse_dates(pd.Series(["2024-03-01", "2024-03-01\n", None], dtype=object)).isna().tolist() == [False, True, True]


def test_parse_dates_is_strict_yyyy_mm_dd():
    parsed = parse_dates(strip_text(pd.Series(["2024-03-01", "2024-3-1", "2024-02-30", " 2024-03-02 ", 20240301],
                                              dtype=object)))
    assert parsed.isna().tolist() == [False, True, True, False, True]
    assert parsed[0] == pd.Timestamp("2024-03-01T00:00:00Z")


def test_parse_timestamps_converts_offsets_to_utc_and_treats_naive_as_utc():
    parsed = parse_timestamps(pd.Series(
        ["2024-03-01T10:00:00+02:00", "2024-03-01T08:00:00Z", "2024-03-01T08:00:00", "2024-03-01 03:00:00-05:00",
         "yesterday", 1709280000], dtype=object))
    assert parsed[:4].tolist() == [pd.Timestamp("2024-03-01T08:00:00Z")] * 4
    assert parsed[4:].isna().all()  # an epoch number is not ISO 8601
    assert str(parsed.dtype) == "datetime64[us, UTC]"


def test_validate_reports_the_first_problem_only():
    frame = rows(CLICK_FIELDS,
                 {"dt": "2024-03-01", "item_id": -1, "click_time": "nope"},          # missing customer_id first
                 {"dt": "bad", "customer_id": 1, "item_id": -1, "click_time": "x"},  # bad_id before bad_time
                 {"dt": "2024-03-01", "customer_id": "", "item_id": 1, "click_time": "2024-03-01"})  # "" is missing
    reasons, _ = validate(frame, "clicks")
    assert reasons.tolist() == ["missing:customer_id", "bad_id:item_id", "missing:customer_id"]


def test_clean_actions_gives_orders_midnight_utc_of_their_date():
    frame = rows(("order_date", "customer_id", "config_id"),
                 {"order_date": "2024-02-28", "customer_id": 1, "config_id": 12})
    actions, set_aside = clean_actions(frame, "previous_orders", "orders.parquet")
    assert actions.to_dict("records") == [{"customer_id": 1, "item_id": 12, "action_type": 3,
                                           "occurred_at": pd.Timestamp("2024-02-28T00:00:00Z")}]
    assert set_aside.empty


def test_clean_actions_keeps_optional_simple_id_missing_but_rejects_a_bad_one():
    fields = ("dt", "customer_id", "config_id", "simple_id", "occur_at")
    frame = rows(fields,
                 {"dt": "2024-03-01", "customer_id": 1, "config_id": 2, "simple_id": "", "occur_at": "2024-03-01"},
                 {"dt": "2024-03-01", "customer_id": 1, "config_id": 2, "simple_id": "x", "occur_at": "2024-03-01"})
    actions, set_aside = clean_actions(frame, "add_to_carts", "carts.csv")
    assert len(actions) == 1
    assert set_aside[["row", "reason"]].to_dict("records") == [{"row": 2, "reason": "bad_id:simple_id"}]
    assert '"simple_id":"x"' in set_aside.raw[0]


def test_clean_impressions_keeps_the_ranking_and_sets_aside_bad_entries_alone():
    frame = rows(("dt", "ranking_id", "customer_id", "user_agent", "impressions"),
                 {"dt": "2024-03-01", "ranking_id": " r1 ", "customer_id": 5, "user_agent": None,
                  "impressions": [{"item_id": 1, "is_order": False}, {"item_id": 2, "is_order": "yes"},
                                  "junk", {"item_id": 4, "is_order": True}]})
    shown, rankings_set_aside, items_set_aside = clean_impressions(frame, "f.jsonl")
    assert shown[["item_id", "position", "is_order"]].to_dict("records") == [
        {"item_id": 1, "position": 0, "is_order": False}, {"item_id": 4, "position": 3, "is_order": True}]
    assert shown.ranking_id.tolist() == ["r1", "r1"]
    assert shown.user_agent.tolist() == ["", ""]
    assert shown.dt.tolist() == [dt.date(2024, 3, 1)] * 2
    assert rankings_set_aside.empty
    assert items_set_aside.reason.tolist() == ["bad_item", "bad_item"]
    assert '"position":1' in items_set_aside.raw[0]


def test_drop_duplicate_impressions_keeps_the_first_of_the_same_key():
    shown = pd.DataFrame({"dt": [dt.date(2024, 3, 1)] * 3, "ranking_id": ["r"] * 3, "customer_id": [1] * 3,
                          "item_id": [9, 9, 9], "position": [0, 0, 1], "is_order": [False, True, False]})
    kept, dropped = drop_duplicate_impressions(shown)
    assert dropped == 1
    assert kept[["position", "is_order"]].to_dict("records") == [{"position": 0, "is_order": False},
                                                                  {"position": 1, "is_order": False}]


def test_split_days_counts_calendar_days_back_from_the_latest():
    days = [dt.date(2024, 3, d) for d in (1, 2, 3, 5, 6, 7)]  # 4 March is missing
    assert split_days(days, test_days=1, val_days=2, train_days=2) == {
        dt.date(2024, 3, 1): "unused", dt.date(2024, 3, 2): "unused", dt.date(2024, 3, 3): "train",
        dt.date(2024, 3, 5): "val", dt.date(2024, 3, 6): "val", dt.date(2024, 3, 7): "test"}


def test_split_days_refuses_a_window_left_empty_while_older_days_have_impressions():
    days = [dt.date(2024, 3, d) for d in range(1, 21)]
    with pytest.raises(UserError) as refused:
        split_days([*days, dt.date(2034, 3, 10)], test_days=1, val_days=1, train_days=14,
                   files_by_day={dt.date(2034, 3, 10): ["raw/impressions/late.jsonl"]})
    assert str(refused.value).startswith(
        "the split counts back from the latest impression day, 2034-03-10, which leaves val (2034-03-09) and train "
        "(2034-02-23 to 2034-03-08) without impressions, though older days have them (the latest, 2024-03-20, "
        "3,642 days earlier): if 2034-03-10 is a mistaken date, correct or remove its rankings in the raw "
        "impressions (raw/impressions/late.jsonl); ")
    with pytest.raises(UserError, match="leaves val"):  # a train window wide enough to reach back is no way round
        split_days([*days, dt.date(2034, 3, 10)], test_days=1, val_days=1, train_days=5000)
    # Nothing older than the windows, or windows that each hold a day: labelled as before.
    assert set(split_days(days[:1], test_days=1, val_days=1, train_days=14).values()) == {"test"}
    assert split_days([dt.date(2024, 3, 1), dt.date(2024, 3, 3)], test_days=1, val_days=0, train_days=0) == {
        dt.date(2024, 3, 1): "unused", dt.date(2024, 3, 3): "test"}


def test_merge_refuses_a_far_future_impression_day_naming_it(raw_dir, session_cluster, tmp_path):
    """One ranking dated 2034 used to become the test split, with every real day unused, exit 0."""
    late = json.loads(IMPRESSION_LINES[0]) | {"dt": "2034-03-10", "ranking_id": "r-late"}
    write_jsonl(raw_dir / "impressions" / "late.jsonl", [json.dumps(late)])
    data = tmp_path / "data"
    data.mkdir()
    before = listing(tmp_path)
    result = run_joined(session_cluster, "merge_and_clean.py", "--raw", raw_dir, "--data", data, check=False)
    assert result.returncode == 2
    assert one_line(result.stderr).startswith(
        "error: the split counts back from the latest impression day, 2034-03-10, which leaves val (2034-03-09) "
        "and train (2034-02-23 to 2034-03-08) without impressions, though older days have them (the latest, "
        "2024-03-03, 3,659 days earlier): if 2034-03-10 is a mistaken date, correct or remove its rankings in the "
        f"raw impressions ({raw_dir / 'impressions' / 'late.jsonl'}); ")
    assert listing(tmp_path) == before  # nothing published, no staging folder left


def test_merge_reads_the_raw_folder_under_its_data_folder_by_default(session_cluster, tmp_path):
    """--raw used to default to ./data/raw whatever --data was: a second pipeline was made from the first's logs."""
    data = tmp_path / "data"
    write_planted_raw(data)  # data/raw
    run_joined(session_cluster, "merge_and_clean.py", "--data", data)
    manifest = json.loads((data / "merged" / "_stage.json").read_text())
    assert [entry["raw"] for entry in manifest["inputs"]] == [str(data / "raw")]
    assert manifest["accounting"]["clicks"]["rows_in"] == 6


def test_clean_impressions_keeps_text_and_entries_nested_deeper_than_orjson_writes():
    deep = 1
    for _ in range(300):  # orjson encodes at most 254 levels; a JSON line may hold up to 1024
        deep = [deep]
    frame = rows(("dt", "ranking_id", "customer_id", "user_agent", "impressions"),
                 {"dt": "2024-03-01", "ranking_id": "r1", "customer_id": 5, "user_agent": deep,
                  "impressions": [{"item_id": 1, "is_order": False}, {"item_id": deep, "is_order": True}]})
    shown, rankings_set_aside, items_set_aside = clean_impressions(frame, "f.jsonl")
    assert shown.user_agent.tolist() == ["[" * 300 + "1" + "]" * 300]
    assert rankings_set_aside.empty
    assert items_set_aside.reason.tolist() == ["bad_item"]
    assert items_set_aside.raw[0].endswith('"entry":{"item_id":' + "[" * 300 + "1" + "]" * 300 + ',"is_order":true}}')


def test_parse_dates_and_timestamps_reject_years_outside_1_to_9999():
    dates = parse_dates(pd.Series(["0000-01-01", "0001-01-01", "9999-12-31"], dtype=object))
    assert dates.isna().tolist() == [True, False, False]
    times = parse_timestamps(pd.Series(["0001-01-01T00:00:00+01:00", "9999-12-31T23:00:00-02:00",
                                        "0001-01-01T00:00:00Z"], dtype=object))
    assert times.isna().tolist() == [True, True, False]
    frame = rows(("dt", "ranking_id", "customer_id", "user_agent", "impressions"),
                 {"dt": "0000-01-01", "ranking_id": "r", "customer_id": 1, "impressions": []})
    assert clean_impressions(frame, "f.jsonl")[1].reason.tolist() == ["bad_time:dt"]


def test_parse_timestamps_judges_a_row_whatever_its_neighbours():
    alone = parse_timestamps(pd.Series(["9999-03-01T10:00:00Z"], dtype=object))
    # one value with nanoseconds made pandas parse the column in ns, which cannot hold year 9999
    beside_nanoseconds = parse_timestamps(pd.Series(["9999-03-01T10:00:00Z", "2024-03-01T10:00:00.123456789"],
                                                    dtype=object))
    assert beside_nanoseconds.tolist() == [alone[0], pd.Timestamp("2024-03-01T10:00:00.123456Z")]
    assert str(beside_nanoseconds.dtype) == "datetime64[us, UTC]"


def test_clean_impressions_strips_a_shown_items_id_like_any_other_id():
    frame = rows(("dt", "ranking_id", "customer_id", "user_agent", "impressions"),
                 {"dt": "2024-03-01", "ranking_id": "r1", "customer_id": " 5 ",
                  "impressions": [{"item_id": " 13 ", "is_order": False}, {"item_id": "1 3", "is_order": False}]})
    shown, _, items_set_aside = clean_impressions(frame, "f.jsonl")
    assert shown[["customer_id", "item_id"]].to_dict("records") == [{"customer_id": 5, "item_id": 13}]
    assert items_set_aside.reason.tolist() == ["bad_item"]


def test_cleaning_python_whitespace_is_what_str_strip_removes():
    assert set(PYTHON_WHITESPACE) == {chr(code) for code in range(0x110000) if chr(code).isspace()}


def near_times(rng, count):
    """Timestamps of the plain layout and their near misses: each part at its limits, or just past them."""
    parts = [(["1678", "2024", "2261"], ["1677", "2262", "0000", "9999", "20x4"]), (["-"], ["/"]),
             (["01", "02", "12"], ["00", "13", "1"]), (["-"], [""]), (["01", "28", "29", "30", "31"], ["00", "32"]),
             (["T"], [" ", "t"]), (["00", "23"], ["24", "9"]), ([":"], ["-"]), (["00", "59"], ["60"]), ([":"], [""]),
             (["00", "59"], ["60", "5"]), (["", ".1", ".123456"], [".", ".1234567", ".12x"]),
             (["", "Z", "+05:30", "-05:30", "+23:59"], ["z", "+24:00", "+05:60", "+0530", "+05", " "])]
    return ["".join(rng.choice(good if rng.random() < 0.9 else bad) for good, bad in parts) for _ in range(count)]


def test_cleaning_typed_times_and_dates_agree_with_the_reference_parsers():
    rng = random.Random(7)
    times = near_times(rng, 20_000) + ["2024-02-29T23:59:59.999999-23:59", "2023-02-29T00:00:00", None, ""]
    microseconds, valid = _typed_times(pa.array(times, pa.string()))
    reference = parse_timestamps(pd.Series(times, dtype=object))
    assert valid.sum() > 1000  # the plain layout was reached, not only its misses
    assert (reference.notna().to_numpy() | ~valid).all()  # nothing the reference refuses is taken
    assert (microseconds[valid] == reference[valid].dt.tz_localize(None).to_numpy().astype(np.int64)).all()
    dates = [time[:10] for time in times if time] + ["2024-02-29 ", " 2024-02-29", "2024-2-29"]
    midnights, valid = _typed_dates(pa.array(dates, pa.string()))
    reference = parse_dates(pd.Series(dates, dtype=object))
    assert valid.sum() > 1000 and (reference.notna().to_numpy() | ~valid).all()
    assert (midnights[valid] == reference[valid].dt.tz_localize(None).to_numpy().astype(np.int64)).all()
