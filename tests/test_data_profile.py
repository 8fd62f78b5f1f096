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


def drawn_profile(max_history=1000, reasons=37):
    """A profile as `data_profile.profile` returns it, with a tenth of the histories at the cap and
    `reasons` reasons of rows set aside."""
    counts = [0] * (max_history + 1)
    counts[3], counts[40], counts[max_history] = 500, 400, 100
    split = {"examples": 1000, "label_rate": 0.1, "unknown_item_share": 0.01, "bot_share": 0.01}
    return {"splits": {name: split for name in ("train", "val", "test")},
            "days": [{"split": "train", "dt": f"2024-03-{day:02}", **split} for day in range(1, 17)],
            "history_length": {"max_history": max_history, "counts": counts, "quantiles": {"p99": max_history}},
            "browser_families": {"Mobile Safari UI/WKWebView with a very long name": 0.6, "Chrome": 0.4},
            "set_aside": {"previous_orders": {f"bad_time:order_date_{i}": i + 1 for i in range(reasons)}}}


def test_data_profile_draws_the_histories_at_the_cap():
    figure = data_profile.draw(drawn_profile())
    history = figure.axes[1]
    bars = {round(patch.get_x() + patch.get_width() / 2): patch.get_height() for patch in history.patches}
    assert bars[1000] == 100  # its own bar, wide enough to see
    assert sum(patch.get_height() for patch in history.patches) == 1000  # every example in some bar
    assert "at the cap (1000): 100" in [text.get_text() for text in history.get_legend().get_texts()]


def test_data_profile_draws_the_label_rate_from_zero_and_names_every_axis():
    figure = data_profile.draw(drawn_profile())
    rate = next(ax for ax in figure.axes if ax.get_ylabel() == "label rate (is_order)")
    assert rate.get_ylim()[0] == 0
    for ax in figure.axes:
        assert ax.get_ylabel() or ax.get_xlabel(), ax.get_title()


def test_data_profile_says_how_many_reasons_it_folds_into_one_bar():
    figure = data_profile.draw(drawn_profile(reasons=37))
    set_aside = figure.axes[5]
    labels = [label.get_text() for label in set_aside.get_yticklabels()]
    assert set_aside.get_title() == "rows set aside, by reason (37 reasons)"
    assert labels[0] == "25 other reasons" and len(labels) == 13
    assert sum(patch.get_width() for patch in set_aside.patches) == sum(range(1, 38))  # no row left out
    assert all(len(label) <= data_profile.LABEL_CHARS for label in labels)
