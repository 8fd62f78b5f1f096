"""preprocess.py end to end on generated data, after every earlier stage: the one test of all stages."""

import argparse
import datetime as dt
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, listing, one_line, run_in_process, run_joined, run_main
from recpipe import preprocess, stages
from recpipe.histories import history_windows, padded, timelines
from recpipe.preprocess import LeakError, check_histories, check_timelines, in_sample

# What a run that starts its own LocalCluster (a killed one, a refusal) is given; runs that join the session's
# cluster (run_joined: 2 workers as well) are given none, since a joined scheduler ignores them.
CLUSTER = ["--workers", "2"]


def read(path):
    return ds.dataset(path, format="parquet", partitioning="hive").to_table().to_pandas()


def processed_content(data):
    return {str(p.relative_to(data)): p.read_bytes() for p in sorted((data / "processed").rglob("*.parquet"))}


@pytest.fixture(scope="module")
def default_run(session_cluster, cleaned_data, tmp_path_factory):
    """cleaned_data through preprocess.py with every default, once for this module: (data, preprocessors).
    Tests copy both before running anything on them."""
    root = tmp_path_factory.mktemp("default-preprocess")
    shutil.copytree(cleaned_data / "data", root / "data")
    run_joined(session_cluster, "preprocess.py", "--data", root / "data", "--preprocessors", root / "pre")
    return root / "data", root / "pre"


def test_preprocess_all_stages_end_to_end(session_cluster, cleaned_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(cleaned_data / "data", data)
    # merged/ and repartitioned/ may be deleted once cleaned/ exists.
    shutil.rmtree(data / "merged")
    shutil.rmtree(data / "repartitioned")
    run_joined(session_cluster, "preprocess.py", "--data", data, "--preprocessors", tmp_path / "pre", "--max-history",
               "50")
    manifest = json.loads((data / "processed" / "_stage.json").read_text())
    impressions = manifest["accounting"]["impressions"]
    assert impressions["kept"] + sum(impressions["set_aside"].values()) == impressions["rows_in"]
    assert set(manifest["rows_per_split"]) == {"train", "val", "test"}

    assert manifest["parameters"]["layout"] == "timeline"  # the default
    examples = read(data / "processed" / "train" / "examples")
    assert [c for c in examples.columns if c != "dt"][-3:] == ["history_end", "history_length", "is_order"]
    assert examples.filter(like="cat_").dtypes.eq("int64").all()
    assert examples.filter(like="num_").dtypes.eq("float32").all()
    assert examples.history_length.max() == 50
    # Each example's window lies in its customer's one timeline row.
    timelines = read(data / "processed" / "timelines")
    joined = examples.merge(timelines, on="customer_id", how="left", validate="many_to_one")
    assert joined.actions.notna().all()
    assert (joined.history_end <= joined.actions.map(len)).all() and (joined.history_end >= joined.history_length).all()
    histories = [actions[end - length:end][::-1]
                 for actions, end, length in zip(joined.actions, joined.history_end, joined.history_length)]
    # The planted signal is visible through the encoded ids: shown and history items share one vocabulary.
    in_history = np.array([item in set(history) for item, history in zip(joined.cat_item, histories)])
    assert joined.is_order[in_history].mean() > 3 * joined.is_order[~in_history].mean()
    assert manifest["history_entries_per_example"] == round(timelines.actions.map(len).sum() / sum(
        manifest["rows_per_split"].values()), 2)

    encoders_json = json.loads((tmp_path / "pre" / "encoders.json").read_text())
    assert set(encoders_json) == {"cat_item", "cat_position", "cat_browser", "cat_os", "cat_device"}
    assert json.loads((tmp_path / "pre" / "fit.json").read_text())["parameters"]["max_history"] == 50


def test_preprocess_twice_gives_identical_output_and_preprocessors(default_run, tmp_path):
    data = tmp_path / "data"
    # The first run is default_run's (on the session's 2 workers); the second replaces processed/ in this copy of it.
    shutil.copytree(default_run[0], data)
    first = processed_content(data)
    (tmp_path / "b").mkdir()  # as in a clone: preprocessors/ holds the README saying what lands there
    (tmp_path / "b" / "README.md").write_text("What preprocess.py fits lands here.\n")
    # The second on a LocalCluster of its own, in this process with a thread per core (its input is small, and
    # no cluster flag is given): the output does not depend on the cluster's shape.
    second = run_in_process("preprocess.py", "--data", data, "--preprocessors", tmp_path / "b")
    assert "Dask: LocalCluster in this process, 1 worker x" in second.stdout
    assert processed_content(data) == first
    for name in ("encoders.json", "scaler.json", "fit.json"):
        assert (default_run[1] / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert sorted(path.name for path in (tmp_path / "b").iterdir()) == [
        "README.md", "encoders.json", "fit.json", "fitted_for.json", "scaler.json"]
    assert json.loads((tmp_path / "b" / "fitted_for.json").read_text()) == {"processed": str(data / "processed")}
    assert (tmp_path / "b" / "README.md").read_text() == "What preprocess.py fits lands here.\n"


def test_preprocess_wide_layout_pads_the_same_histories(session_cluster, cleaned_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(cleaned_data / "data", data)
    run_joined(session_cluster, "preprocess.py", "--data", data, "--preprocessors", tmp_path / "pre", "--max-history",
               "20", "--layout", "compact")
    compact = read(data / "processed" / "val" / "examples").merge(
        read(data / "processed" / "val" / "histories"), on=["customer_id", "dt"])
    run_joined(session_cluster, "preprocess.py", "--data", data, "--preprocessors", tmp_path / "pre", "--max-history",
               "20", "--layout", "wide")
    wide = read(data / "processed" / "val")
    assert len(wide) == len(compact)
    assert wide.actions.map(len).eq(20).all()
    schema = pq.read_schema(next((data / "processed" / "val").rglob("*.parquet")))
    for name, value_type in (("actions", pa.int64()), ("action_types", pa.int8())):
        assert schema.field(name).type == pa.list_(pa.field("element", value_type, nullable=False), 20)
        assert not schema.field(name).nullable
    key = ["customer_id", "ranking_id", "cat_position"]
    both = wide.merge(compact, on=key, suffixes=("_wide", ""))
    for padded_actions, actions in zip(both.actions_wide, both.actions):
        assert list(padded_actions) == list(actions) + [0] * (20 - len(actions))


def test_preprocess_timeline_histories_equal_the_compact_layouts_for_every_customer_and_day(processed_data,
                                                                                             compact_data):
    timeline, compact = processed_data[0] / "processed", compact_data[0] / "processed"
    timelines = read(timeline / "timelines").set_index("customer_id")
    compared = 0
    for split in ("train", "val", "test"):
        examples = read(timeline / split / "examples")
        histories = read(compact / split / "histories").set_index(["customer_id", "dt"])
        assert len(histories) == len(examples.drop_duplicates(["customer_id", "dt"]))
        for customer, day, end, length in examples[["customer_id", "dt", "history_end", "history_length"]].itertuples(
                index=False):
            expected = histories.loc[(customer, day)]
            row = timelines.loc[customer]
            assert list(row.actions[end - length:end][::-1]) == list(expected.actions)
            assert list(row.action_types[end - length:end][::-1]) == list(expected.action_types)
            compared += 1
        # Everything else about the examples is the same.
        other = read(compact / split / "examples")
        pd.testing.assert_frame_equal(examples.drop(columns=["history_end", "history_length"]), other)
    assert compared == sum(json.loads((timeline / "_stage.json").read_text())["rows_per_split"].values())
    sizes = {name: sum(p.stat().st_size for p in path.rglob("*.parquet")) for name, path in
             (("timeline", timeline), ("compact", compact))}
    assert sizes["timeline"] < sizes["compact"]


def test_preprocess_timeline_leak_guard_rejects_a_window_reaching_day_d():
    day = pd.Timestamp("2024-03-10")
    actions = pd.DataFrame({"customer_id": [7, 7, 7], "item_id": [1, 2, 3], "action_type": pd.array([1, 1, 1], "int8"),
                            "occurred_at": pd.to_datetime(["2024-03-08", "2024-03-09", "2024-03-10"], utc=True)})
    keys = pd.DataFrame({"customer_id": [7], "dt": [day.date()]})
    windows = history_windows(actions, keys, lookback_days=365, max_history=1000)
    customers, offsets, taken, history_end = timelines(windows)
    check_timelines(windows, customers, offsets, taken, history_end, 365, 1000, "bucket=00001")  # as computed: fine
    with pytest.raises(LeakError, match="customer 7 on 2024-03-10 holds an action outside"):
        planted = timelines(history_windows(actions.assign(occurred_at=actions.occurred_at - pd.Timedelta("1D")),
                                            keys, 365, 1000))  # windows that reach the action of day D
        check_timelines(windows, customers, planted[1], planted[2], planted[3], 365, 1000, "bucket=00001")
    with pytest.raises(LeakError, match="more than --max-history 1"):
        check_timelines(windows, customers, offsets, taken, history_end, 365, 1, "bucket=00001")


def test_preprocess_refuses_when_cleaned_is_missing(tmp_path):
    result = run_in_process("preprocess.py", "--data", tmp_path, check=False)  # refused before a cluster starts
    assert result.returncode == 2
    assert one_line(result.stderr).startswith(f"error: {tmp_path / 'cleaned'}/ is missing")  # and how to make it


def test_preprocess_leak_guard_rejects_an_action_from_day_d():
    day_us = pd.Timestamp("2024-03-10").value // 1000
    histories = pa.table({
        "customer_id": [7], "dt": pa.array([pd.Timestamp("2024-03-10").date()], pa.date32()),
        "history_items": [[1, 2]], "history_occurred_at": [[day_us, day_us - 1]],
    })
    with pytest.raises(LeakError, match="customer 7 on 2024-03-10"):
        check_histories(histories, lookback_days=365, max_history=1000, where="bucket=00001")
    with pytest.raises(LeakError, match="more than --max-history 1"):
        check_histories(histories, lookback_days=365, max_history=1, where="bucket=00001")


def test_preprocess_sample_is_seeded_and_about_the_fraction():
    ranking_ids = np.array([f"r{i // 10}" for i in range(20_000)], dtype=object)  # a ranking shows 10 items
    positions = np.arange(20_000) % 10
    first = in_sample(ranking_ids, positions, seed=0, fraction=0.2)
    assert (first == in_sample(ranking_ids, positions, seed=0, fraction=0.2)).all()
    assert (first != in_sample(ranking_ids, positions, seed=1, fraction=0.2)).any()
    assert 0.18 < first.mean() < 0.22
    with np.errstate(all="raise"):  # the largest seed --seed takes wraps without a warning on every worker
        assert 0.18 < in_sample(ranking_ids, positions, seed=2**64 - 1, fraction=0.2).mean() < 0.22
    # as the stage gives them, an Arrow column of two chunks: the same rows, each distinct id hashed once
    chunked = pa.chunked_array([ranking_ids[:7_000].tolist(), ranking_ids[7_000:].tolist()], pa.string())
    assert (in_sample(chunked, positions, seed=0, fraction=0.2) == first).all()


def test_stage_parameters_refuse_every_value_outside_their_range():
    """Every parameter of every stage, given text no flag should take, either refuses it or gets a value
    inside its declared range (a NaN passed every bound: it compares false)."""
    texts = ["nan", "inf", "-inf", "1e400", "-1", "0", "1.5", "x", "", str(2**64), str(10**30)]
    for stage in stages.STAGES:
        for parameter in stage.parameters:
            assert parameter.check(parameter.default) == parameter.default
            if parameter.choices:
                continue
            assert (parameter.low, parameter.above, parameter.high).count(None) < 3, parameter.name
            assert parameter.high is not None, f"{parameter.name} has no upper bound"
            for text in texts:
                try:
                    value = parameter.parse(text)
                except argparse.ArgumentTypeError:
                    continue
                assert math.isfinite(value) and type(value) is parameter.type, (parameter.name, text)
                assert parameter.low is None or value >= parameter.low, (parameter.name, text)
                assert parameter.above is None or value > parameter.above, (parameter.name, text)
                assert value <= parameter.high, (parameter.name, text)


def test_stage_parameter_check_takes_values_as_a_manifest_holds_them():
    seed, fraction, layout = (stages.BY_NAME["processed"].parameter(name) for name in ("seed", "sample_frac", "layout"))
    assert seed.check(2**64 - 1) == 2**64 - 1 and fraction.check(1) == 1.0 and type(fraction.check(1)) is float
    for parameter, value, message in [(seed, True, "must be an integer, got True"),
                                      (seed, 3.0, "must be an integer, got 3.0"),
                                      (seed, "3", "must be an integer, got '3'"),
                                      (seed, -1, "must be at least 0, got -1"),
                                      (fraction, float("nan"), "must be a finite number, got nan"),
                                      (fraction, None, "must be a number, got None"),
                                      (fraction, 0, "must be more than 0, got 0"),
                                      (layout, "tall", "must be one of timeline, compact, wide, got 'tall'")]:
        with pytest.raises(ValueError, match=f"^{message}$".replace("(", r"\(").replace(")", r"\)")):
            parameter.check(value)


@pytest.mark.parametrize("flag, value, message", [
    ("--sample-frac", "nan", "must be a finite number, got nan"),  # it used to publish empty encoders, exit 0
    ("--seed", "-1", "must be at least 0, got -1"),
    ("--lookback-days", "1e3", "'1e3' is not an integer"),
    ("--max-history", str(2**31), f"must be at most {2**31 - 1}, got {2**31}"),
], ids=["sample-frac-nan", "seed--1", "lookback-1e3", "max-history-2^31"])
def test_preprocess_refuses_a_flag_out_of_range_before_anything_runs(default_run, tmp_path, flag, value, message):
    data, pre = tmp_path / "data", tmp_path / "pre"
    shutil.copytree(default_run[0], data)
    shutil.copytree(default_run[1], pre)
    before = listing(tmp_path)
    result = run_in_process("preprocess.py", "--data", data, "--preprocessors", pre, flag, value, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].endswith(f": error: argument {flag}: {message}")  # argparse: after its usage
    assert listing(tmp_path) == before


def test_preprocess_refuses_a_sample_that_holds_no_train_example(session_cluster, default_run, tmp_path):
    data, pre = tmp_path / "data", tmp_path / "pre"
    shutil.copytree(default_run[0], data)
    shutil.copytree(default_run[1], pre)
    before = listing(tmp_path)
    result = run_joined(session_cluster, "preprocess.py", "--data", data, "--preprocessors", pre,
                        "--sample-frac", "1e-300", check=False)
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert line.startswith("error: --sample-frac 1e-300 sampled none of the ")
    assert line.endswith(" train examples, and encoders fitted on no rows would encode every value as unknown: "
                         "give a larger --sample-frac (default 0.2)")
    assert listing(tmp_path) == before


def test_preprocess_padded_right_pads_and_truncates():
    lists = pa.array([[5, 6, 7], [], [8]], pa.list_(pa.int64()))
    assert padded(lists, np.array([2, 0, 1]), 2, np.int64).tolist() == [[8, 0], [5, 6], [0, 0]]


@pytest.mark.processes
def test_preprocess_killed_midway_leaves_the_previous_output(default_run, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(default_run[0], data)  # processed/ and preprocessors/ of a run with the defaults
    shutil.copytree(default_run[1], tmp_path / "pre")
    previous = processed_content(data)
    # A process of its own, with its own LocalCluster: killing its process group kills its workers too.
    process = subprocess.Popen([sys.executable, "preprocess.py", "--data", data, "--preprocessors", tmp_path / "pre",
                                "--max-history", "7", *CLUSTER],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(data.glob(".processed.staging-*/*/examples/*/*.parquet")):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert processed_content(data) == previous
    assert json.loads((tmp_path / "pre" / "fit.json").read_text())["parameters"]["max_history"] == 1000


def test_preprocess_unusable_preprocessors_folder_is_refused_before_anything_is_published(cleaned_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(cleaned_data / "data", data, ignore=shutil.ignore_patterns("merged", "repartitioned"))
    (tmp_path / "a-file").write_text("")
    before = listing(tmp_path)
    result = run_in_process("preprocess.py", "--data", data, "--preprocessors", tmp_path / "a-file" / "pre",
                            *CLUSTER, check=False)  # refused before a cluster starts
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: cannot make {tmp_path / 'a-file' / 'pre'}/: a file stands where a folder above it should be; "
        "point --preprocessors at a new or empty folder, or at one preprocess.py wrote"]
    assert listing(tmp_path) == before  # processed/ was not published with preprocessors nobody can read


@pytest.mark.parametrize("target", ["data/raw", "data", "data/cleaned"])
def test_preprocess_refuses_a_preprocessors_folder_it_did_not_write_and_leaves_it(cleaned_data, tmp_path, capsys,
                                                                                   target):
    """`--preprocessors data/raw` used to replace the raw logs with three JSON files, and `--preprocessors data`
    every stage with them: such a folder is refused, before anything is computed or published."""
    data = tmp_path / "data"
    shutil.copytree(cleaned_data / "data", data, ignore=shutil.ignore_patterns("merged", "repartitioned"))
    shutil.copytree(cleaned_data / "raw", data / "raw")
    before = listing(tmp_path)
    status = run_main("preprocess.py", "--data", data, "--preprocessors", tmp_path / target)
    line = one_line(capsys.readouterr().err)
    assert status == 2
    if target == "data/cleaned":
        assert line == (f"error: --preprocessors {tmp_path / target} lies inside {data / 'cleaned'}/, a stage folder "
                        "that its stage replaces as a whole: choose a folder outside the stage folders")
    else:
        assert line.startswith(f"error: refusing to replace {tmp_path / target}/: it holds ")
        assert line.endswith("which preprocess.py does not write, so this project cannot tell that it wrote it; "
                             "point --preprocessors at a new or empty folder, or at one preprocess.py wrote")
    assert listing(tmp_path) == before


def test_preprocess_through_pipeline_refuses_a_preprocessors_folder_it_did_not_write(session_cluster, cleaned_data,
                                                                                        tmp_path):
    data = tmp_path / "data"
    shutil.copytree(cleaned_data / "data", data, ignore=shutil.ignore_patterns("merged", "repartitioned", "processed"))
    shutil.copytree(cleaned_data / "raw", tmp_path / "raw")
    before = listing(tmp_path)
    result = run_joined(session_cluster, "pipeline.py", "run", "--data", data, "--raw", tmp_path / "raw",
                        "--preprocessors", tmp_path / "raw", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[0].startswith(f"error: refusing to replace {tmp_path / 'raw'}/: it holds ")
    assert "preprocess.py failed (exit status 2)" in result.stderr.splitlines()[1]
    assert listing(tmp_path) == before


def test_preprocess_refuses_to_replace_the_preprocessors_another_processed_folder_was_made_with(default_run, tmp_path):
    """A second data folder preprocessed with the default --preprocessors used to replace the first one's,
    after which train.py refused the first."""
    data, pre = tmp_path / "second" / "data", tmp_path / "preprocessors"
    shutil.copytree(default_run[0], data, ignore=shutil.ignore_patterns("processed"))  # not preprocessed yet
    shutil.copytree(default_run[1], pre)  # fitted for default_run's processed/, which still records them
    before = listing(tmp_path)
    result = run_in_process("preprocess.py", "--data", data, "--preprocessors", pre, *CLUSTER, check=False)
    assert result.returncode == 2
    first = default_run[0] / "processed"
    assert one_line(result.stderr) == (
        f"error: refusing to replace {pre}/: it holds the preprocessors that {first}/ was made with, which train.py "
        f"needs to read it; point --preprocessors at a folder of its own for {data / 'processed'}/ (and give "
        f"train.py the same), or delete {pre}/ yourself if {first}/ is no longer used")
    assert listing(tmp_path) == before


def test_pipeline_run_refuses_another_folders_preprocessors_before_any_stage_runs(default_run, cleaned_data,
                                                                                    session_cluster, tmp_path):
    """The refusal comes first, not after parse_ua_strings.py has run only for preprocess.py to stop."""
    data, pre = tmp_path / "second" / "data", tmp_path / "preprocessors"
    shutil.copytree(default_run[0], data, ignore=shutil.ignore_patterns("processed", "cleaned"))
    shutil.copytree(default_run[1], pre)
    before = listing(tmp_path)
    result = run_joined(session_cluster, "pipeline.py", "run", "--data", data, "--raw", cleaned_data / "raw",
                        "--preprocessors", pre, check=False)
    assert result.returncode == 2
    assert one_line(result.stderr).startswith(f"error: refusing to replace {pre}/: it holds the preprocessors that "
                                              f"{default_run[0] / 'processed'}/ was made with")
    assert "parse_ua_strings" not in result.stdout
    assert listing(tmp_path) == before


def test_preprocess_replaces_preprocessors_whose_processed_folder_is_gone_or_this_one(default_run, tmp_path):
    from recpipe.preprocess import FITTED_FOR, fitted_for_another
    pre = tmp_path / "pre"
    shutil.copytree(default_run[1], pre)
    first = str(default_run[0] / "processed")
    assert fitted_for_another(pre, str(tmp_path / "data" / "processed")) == first
    assert fitted_for_another(pre, first) is None
    shutil.copytree(default_run[0] / "processed", tmp_path / "copy" / "processed")  # both copied together
    assert fitted_for_another(pre, str(tmp_path / "copy" / "processed")) is None
    (pre / FITTED_FOR).write_text(json.dumps({"processed": str(tmp_path / "gone" / "processed")}))
    assert fitted_for_another(pre, str(tmp_path / "data" / "processed")) is None
    (pre / "scaler.json").write_text("{}")  # no longer what the first processed/ records
    (pre / FITTED_FOR).write_text(json.dumps({"processed": first}))
    assert fitted_for_another(pre, str(tmp_path / "data" / "processed")) is None
    (pre / FITTED_FOR).write_text("[")
    assert fitted_for_another(pre, str(tmp_path / "data" / "processed")) is None


def test_preprocess_keys_are_the_distinct_customer_days_in_order_of_appearance():
    days = [dt.date(2024, 1, 2), dt.date(2024, 1, 2), dt.date(2024, 1, 2), dt.date(2024, 1, 1), dt.date(2024, 1, 1)]
    examples = pa.table({"customer_id": pa.array([5, 3, 5, 3, 2**62], pa.int64()), "dt": pa.array(days, pa.date32())})
    keys, key_of_example = preprocess._keys(examples)
    assert list(zip(keys["customer_id"], keys["dt"])) == [(5, days[0]), (3, days[0]), (3, days[3]), (2**62, days[3])]
    assert key_of_example.tolist() == [0, 1, 0, 2, 3]
