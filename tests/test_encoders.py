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


def test_encoders_load_names_the_missing_file(tmp_path):
    with pytest.raises(UserError, match="fit.json is missing: run preprocess.py first"):
        encoders.load(tmp_path)
