"""Encoders and scaler: the index convention of docs/data.md, JSON round trips."""

import json

import numpy as np
import pandas as pd
import pytest

from recpipe import encoders
from recpipe.cli import UserError
from recpipe.encoders import CategoryEncoder, StandardScaler


def test_encoders_index_by_descending_frequency_ties_by_value_with_min_frequency():
    encoder = CategoryEncoder(min_frequency=2).fit(pd.Series({"b": 3, "a": 3, "c": 5, "rare": 1}))
    assert encoder.categories_ == ["c", "a", "b"]
    assert encoder.transform(["c", "a", "b", "rare", "never", None, ""]).tolist() == [2, 3, 4, 1, 1, 0, 0]
    assert encoder.size == 5


def test_encoders_fit_returns_self_and_round_trips_through_json(tmp_path):
    encoder = CategoryEncoder().fit(pd.Series({10: 4, 7: 9}))
    scaler = StandardScaler().fit({"num_x": (4, 10.0, 30.0), "num_const": (3, 6.0, 12.0)})
    encoders.save(tmp_path, {"cat_item": encoder}, scaler, {"parameters": {"min_frequency": 1}})
    assert json.loads((tmp_path / "encoders.json").read_text()) == {"cat_item": {"categories": [7, 10]}}
    loaded, loaded_scaler, _ = encoders.load(tmp_path)
    assert loaded["cat_item"].transform(np.array([7, 10, 3])).tolist() == [2, 3, 1]
    assert loaded_scaler.to_json() == {"num_x": {"mean": 2.5, "std": pytest.approx(np.sqrt(1.25))},
                                       "num_const": {"mean": 2.0, "std": 1.0}}


def test_encoders_scaler_uses_population_std_and_float32():
    scaler = StandardScaler().fit({"num_x": (2, 2.0, 10.0)})  # the values -1 and 3: mean 1, variance 4
    assert scaler.transform("num_x", [1.0, 3.0]).dtype == np.float32
    assert scaler.std_["num_x"] == 2.0


def fitted_folder(folder):
    encoders.save(folder, {"cat_item": CategoryEncoder().fit(pd.Series({10: 4, 7: 9}))},
                  StandardScaler().fit({"num_x": (4, 10.0, 30.0), "num_y": (4, 4.0, 8.0)}),
                  {"parameters": {"min_frequency": 1}, "categorical": ["cat_item"], "numeric": ["num_x", "num_y"]})
    return folder


def test_encoders_load_names_the_missing_file(tmp_path):
    fitted_folder(tmp_path)
    (tmp_path / "fit.json").unlink()
    with pytest.raises(UserError, match="fit.json is missing: run preprocess.py first"):
        encoders.load(tmp_path)
    with pytest.raises(UserError, match="fit.json is missing: run preprocess.py first"):
        encoders.fingerprint(tmp_path)


@pytest.mark.parametrize("edit", ["encoders.json", "scaler.json", "fit.json: a column left out",
                                  "fit.json: the columns reordered", "a byte moved from one file to the next"])
def test_encoders_fingerprint_changes_with_every_file_a_reader_trusts(tmp_path, edit):
    """fit.json was not hashed: an edited one (train.py builds its model from its column lists) passed as the
    preprocessors processed/ was made with."""
    folder = fitted_folder(tmp_path)
    before = encoders.fingerprint(folder)
    fit = json.loads((folder / "fit.json").read_text())
    if edit == "encoders.json":
        (folder / "encoders.json").write_text(json.dumps({"cat_item": {"categories": [10, 7]}}))
    elif edit == "scaler.json":
        scaler = json.loads((folder / "scaler.json").read_text())
        (folder / "scaler.json").write_text(json.dumps({**scaler, "num_x": {"mean": 0.0, "std": 1.0}}))
    elif edit == "fit.json: a column left out":
        (folder / "fit.json").write_text(json.dumps({**fit, "numeric": ["num_x"]}))
    elif edit == "fit.json: the columns reordered":
        (folder / "fit.json").write_text(json.dumps({**fit, "numeric": ["num_y", "num_x"]}))
    else:  # the same bytes in all, split differently: a hash of the files one after the other would not see it
        scaler = (folder / "scaler.json").read_bytes()
        (folder / "scaler.json").write_bytes(scaler + b"{")
        (folder / "fit.json").write_bytes((folder / "fit.json").read_bytes()[1:])
    after = encoders.fingerprint(folder)
    assert after != before
    with pytest.raises(UserError, match=r"was not fitted with processed/ \(their hashes differ: .*fit.json was "
                                        r"changed.*point --preprocessors at the folder it wrote"):
        encoders.load(folder, fitted_with=(before, "processed"))
    if not edit.startswith("a byte"):  # what it hashes is what it loads
        assert encoders.load(folder, fitted_with=(after, "processed"))[2]["numeric"] == json.loads(
            (folder / "fit.json").read_text())["numeric"]
