"""Categorical encoders and the standard scaler (docs/data.md, Features), saved as readable JSON.

Index convention: 0 is padding / missing, 1 is unknown (not in the sample, or seen
fewer than `min_frequency` times), known values take 2, 3, … by descending
frequency, ties by value. Fitting takes counts (or moments) that the cluster computed
over the sample, so the client only ever holds one row per distinct value.
"""

import hashlib
import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from recpipe import storage
from recpipe.cli import UserError

MISSING, UNKNOWN = 0, 1
# processed/ keeps the encoders and scaler it was made with in this folder; --preprocessors gets a copy.
FITTED = "_preprocessors"


class CategoryEncoder:
    def __init__(self, min_frequency=1):
        self.min_frequency = min_frequency

    def fit(self, counts):
        """counts: a Series of occurrences indexed by value (missing values already left out)."""
        counts = counts[counts >= self.min_frequency]
        order = pd.DataFrame({"value": counts.index, "count": counts.to_numpy()})
        order = order.sort_values(["count", "value"], ascending=[False, True], kind="stable")
        self.categories_ = [_plain(value) for value in order["value"]]
        self._value_set = pa.array(self.categories_)
        return self

    def transform(self, values):
        """Values (Arrow or numpy array; null or "" for missing) -> int64 indices.

        The lookup is Arrow's hash join of the values against the categories, in C++.
        """
        values = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values, from_pandas=True)
        if len(self.categories_) and values.type != self._value_set.type:
            values = values.cast(self._value_set.type)
        found = pc.index_in(values, value_set=self._value_set) if len(self.categories_) else pa.nulls(len(values))
        indices = pc.fill_null(pc.add(found.cast(pa.int64()), 2), UNKNOWN)
        missing = pc.is_null(values)
        if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
            missing = pc.or_kleene(missing, pc.equal(values, ""))
        return pc.if_else(missing, MISSING, indices).to_numpy(zero_copy_only=False).astype(np.int64)

    @property
    def size(self):
        """Rows an embedding table needs: padding, unknown and every category."""
        return len(self.categories_) + 2

    def to_json(self):
        return {"categories": [_plain(value) for value in self.categories_]}

    @classmethod
    def from_json(cls, fitted, min_frequency=1):
        encoder = cls(min_frequency)
        encoder.categories_ = list(fitted["categories"])
        encoder._value_set = pa.array(encoder.categories_)
        return encoder


class StandardScaler:
    """Mean and population standard deviation per column; a constant column gets std 1.0."""

    def fit(self, moments):
        """moments: {column: (n, sum, sum of squares)} over the sample."""
        self.mean_, self.std_ = {}, {}
        for column, (n, total, total_sq) in moments.items():
            mean = total / n if n else 0.0
            variance = max(total_sq / n - mean * mean, 0.0) if n else 0.0
            std = math.sqrt(variance)
            self.mean_[column] = mean
            self.std_[column] = std if std > 1e-12 else 1.0
        return self

    def transform(self, column, values):
        return ((np.asarray(values, dtype=np.float64) - self.mean_[column]) / self.std_[column]).astype(np.float32)

    def to_json(self):
        return {column: {"mean": self.mean_[column], "std": self.std_[column]} for column in self.mean_}

    @classmethod
    def from_json(cls, fitted):
        scaler = cls()
        scaler.mean_ = {column: stats["mean"] for column, stats in fitted.items()}
        scaler.std_ = {column: stats["std"] for column, stats in fitted.items()}
        return scaler


def _plain(value):
    """numpy scalars -> Python, so that JSON holds plain numbers and strings."""
    return value.item() if isinstance(value, np.generic) else value


ENCODERS_FILE, SCALER_FILE, FIT_FILE = "encoders.json", "scaler.json", "fit.json"
README_FILE = "README.md"  # the repository's preprocessors/README.md: a person's, carried over
FITTED_FILES = (ENCODERS_FILE, SCALER_FILE, FIT_FILE)


def save(directory, encoders, scaler, fit_record):
    """Write encoders.json, scaler.json and fit.json (sample size, seed, parameters) into `directory`
    (a path or a URL)."""
    directory = storage.path(directory)
    if not storage.is_url(directory):
        directory.mkdir(parents=True, exist_ok=True)
    for name, content in ((ENCODERS_FILE, {column: encoder.to_json() for column, encoder in encoders.items()}),
                          (SCALER_FILE, scaler.to_json()), (FIT_FILE, fit_record)):
        (directory / name).write_text(json.dumps(content, indent=1) + "\n")


def fingerprint(directory):
    """A hash of every file a reader trusts (FITTED_FILES: the encoders, the scaler, and fit.json, whose
    column lists train.py builds its model from): processed/'s manifest records the one it was made with."""
    return _digest(_read(storage.path(directory)))


def _read(directory):
    """{name: bytes} of FITTED_FILES, each read once, or a UserError naming the first one missing."""
    contents = {}
    for name in FITTED_FILES:
        path = directory / name
        try:
            contents[name] = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise UserError(f"{path} is missing: run preprocess.py first") from None
    return contents


def _digest(contents):
    digest = hashlib.sha256()
    for name, content in contents.items():  # each file's name and length first: no two folders hash alike
        digest.update(f"{name} {len(content)}\n".encode())
        digest.update(content)
    return digest.hexdigest()


def load(directory, fitted_with=None):
    """(encoders, scaler, fit record) from a preprocessors folder, or a UserError saying what makes it.

    fitted_with: (the `preprocessors_sha256` a stage's manifest records, that stage's folder): the
    files must be those it was made with, hashed from the very bytes that are parsed here.
    """
    directory = storage.path(directory)
    contents = _read(directory)
    if fitted_with is not None and _digest(contents) != fitted_with[0]:
        raise UserError(f"{directory}/ was not fitted with {fitted_with[1]}/ (their hashes differ: encoders.json, "
                        "scaler.json or fit.json was changed, or comes from another run of preprocess.py): run "
                        "preprocess.py again, or point --preprocessors at the folder it wrote")
    try:
        fit_record = json.loads(contents[FIT_FILE])
        encoders = {column: CategoryEncoder.from_json(fitted, fit_record["parameters"]["min_frequency"])
                    for column, fitted in json.loads(contents[ENCODERS_FILE]).items()}
        scaler = StandardScaler.from_json(json.loads(contents[SCALER_FILE]))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
        raise UserError(f"{directory}/ is not a preprocessors folder preprocess.py wrote ({error}); "
                        "run preprocess.py again") from None
    return encoders, scaler, fit_record
