"""pipeline.py profile: what it counts, checked against processed/ read directly; what it may replace."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import listing, one_line, run_main
from recpipe import data_profile, stage


@pytest.fixture
def data(processed_data, tmp_path):
    """A copy of the session's processed data (with merged/): profile writes beside processed/."""
    shutil.copytree(processed_data[0], tmp_path / "data")
    return tmp_path / "data"


def examples(data, split):
    return pq.ParquetDataset(sorted((data / "processed" / split / "examples").rglob("*.parquet"))).read().to_pandas()


def test_data_profile_counts_what_processed_holds(data, capsys):
    assert run_main("pipeline.py", "profile", "--data", data) == 0
    assert f"wrote {data / 'profile.json'} and {data / 'profile.png'}" in capsys.readouterr().out
    profiled = json.loads((data / "profile.json").read_text())
    manifest = stage.read_manifest(data / "processed")
    assert {name: split["examples"] for name, split in profiled["splits"].items()} == manifest["rows_per_split"]
    train = examples(data, "train")
    assert profiled["splits"]["train"]["label_rate"] == pytest.approx(train.is_order.mean(), abs=1e-6)
    assert profiled["splits"]["train"]["unknown_item_share"] == pytest.approx((train.cat_item == 1).mean(), abs=1e-6)
    days = [day for day in profiled["days"] if day["split"] == "train"]
    assert sum(day["examples"] for day in days) == len(train) and [d["dt"] for d in days] == sorted(d["dt"] for d in days)
    # History lengths, from the timeline layout's exact windows.
    lengths = np.concatenate([examples(data, split).history_length.to_numpy() for split in ("train", "val", "test")])
    assert profiled["history_length"]["counts"] == np.bincount(lengths, minlength=61).tolist()
    assert sum(profiled["browser_families"].values()) == pytest.approx(1, abs=1e-4)
    accounting = stage.read_manifest(data / "merged")["accounting"]
    assert profiled["set_aside"]["clicks"] == accounting["clicks"]["set_aside"]
    png = (data / "profile.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_data_profile_replaces_its_own_profile_and_nothing_else(data, capsys):
    assert run_main("pipeline.py", "profile", "--data", data) == 0
    assert run_main("pipeline.py", "profile", "--data", data) == 0  # its own: replaced
    (data / "profile.png").write_bytes(b"a chart of yours")
    before = listing(data)
    capsys.readouterr()
    assert run_main("pipeline.py", "profile", "--data", data) == 2
    assert one_line(capsys.readouterr().err).startswith(f"error: {data / 'profile.png'} exists and is not the picture")
    assert listing(data) == before


def test_data_profile_after_merged_was_cleaned_away_has_no_set_aside_rows(data):
    shutil.rmtree(data / "merged")
    profiled = data_profile.profile(data)
    assert profiled["set_aside"] is None and profiled["splits"]["train"]["examples"] > 0
