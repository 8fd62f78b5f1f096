"""train.py's input: processed/ (compact layout, SPEC section 8) streamed as whole batches (SPEC section 9).

    dataset = ProcessedDataset("data/processed", "train", batch_size=512, categorical=[...], numeric=[...])
    loader = make_loader(dataset, num_workers=2, pin_memory=torch.cuda.is_available())
    for epoch in range(epochs):
        dataset.set_epoch(epoch)          # before iterating: persistent workers see it too
        for batch in loader:
            batch = to_device(batch, device)

One day at a time, in date order: a day's examples and histories (every bucket file)
are read with PyArrow, the examples are shuffled with a generator seeded from
(seed, epoch, day), and the day is cut into batches; the last batch of a day may be
smaller, no example is dropped. The join to histories is one index lookup per day
(customer_id -> histories row); a batch gathers only its own rows and pads them to
[B, L] (recpipe.histories.padded), so no day is ever padded as a whole.

Worker split: batches are numbered across the epoch (day after day) and worker w of W
yields the batches g with g % W == w. Every worker reads every day but builds only
its batches, so a single-day split (val, test) keeps all workers busy, and since the
DataLoader takes batches from its workers in turn, the order of batches is the same
for any number of workers.
"""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from recpipe import stage
from recpipe.cli import UserError
from recpipe.histories import padded

ITEM, TARGET = "cat_item", "is_order"
FIX = "run preprocess.py again"


class ProcessedDataset(IterableDataset):
    """The batches of one split of processed/; see the module's docstring.

    categorical: cat_* columns other than cat_item, in this order (default: the files' order,
    which is fit.json's). numeric: num_* columns (default: the files' order). max_history
    (L): default processed/_stage.json's --max-history. empty_histories: all-zero history
    tensors of the same shapes, and the histories are not read. checked: processed/ as
    stage.open_stage (or stage.reading) returned it, already checked against its manifest.
    """

    def __init__(self, processed_dir, split, batch_size=512, max_history=None, shuffle=True, seed=0,
                 categorical=None, numeric=None, empty_histories=False, checked=None):
        super().__init__()
        if batch_size < 1 or (max_history is not None and max_history < 1):
            raise ValueError(f"batch_size and max_history must be at least 1, not {batch_size} and {max_history}")
        self.processed_dir, self.split = Path(processed_dir), split
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.empty_histories = empty_histories
        checked = checked or stage.open_stage(None, "processed", stage_dir=self.processed_dir)
        manifest, self._version = _manifest(checked)
        self.max_history = int(max_history or manifest["parameters"]["max_history"])
        self.days = _days(self.processed_dir, split, manifest)  # [(date, example files, history files)]
        self._day_rows = [sum(_num_rows(path) for path in examples) for _, examples, _ in self.days]
        schema = _schema(self.days[0][1][0]) if self.days else None
        self.categorical = list(categorical) if categorical is not None else _columns(schema, "cat_", ITEM)
        self.numeric = list(numeric) if numeric is not None else _columns(schema, "num_")
        for _, examples, histories in self.days[:1]:
            _require_columns(examples[0], [ITEM, "customer_id", *self.categorical, *self.numeric, TARGET])
            _require_columns(histories[0], ["customer_id", "actions", "action_types"])
        # Shared memory, so that persistent DataLoader workers see set_epoch() of the main process.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._cached_day = None  # a single-day split (val, test) stays in memory between epochs

    def __len__(self):
        """Examples in the split (from the Parquet footers)."""
        return sum(self._day_rows)

    @property
    def num_batches(self):
        """Batches per epoch, over all workers: a day's last batch may be smaller."""
        return sum(math.ceil(rows / self.batch_size) for rows in self._day_rows)

    def set_epoch(self, epoch):
        """Reshuffle: the order of epoch `epoch` depends on (seed, epoch, day). Call before iterating."""
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self):
        return int(self._epoch.item())

    def __iter__(self):
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        epoch, first = self.epoch, 0  # first: the epoch-wide number of the day's first batch
        for entry, rows in zip(self.days, self._day_rows):
            count = math.ceil(rows / self.batch_size)
            mine = [b for b in range(count) if (first + b) % workers == worker_id]
            first += count
            if not mine:
                continue  # none of this day's batches is this worker's: skip reading it
            data = self._read_day(entry, rows)
            order = self._order(entry[0], epoch, rows)
            for b in mine:
                yield self._batch(data, order[b * self.batch_size:(b + 1) * self.batch_size])

    def _order(self, day, epoch, rows):
        if not self.shuffle:
            return np.arange(rows)
        return np.random.default_rng([self.seed, epoch, day.toordinal()]).permutation(rows)

    def _read_day(self, entry, rows):
        day, example_files, history_files = entry
        if self._cached_day is not None and self._cached_day[0] == day:
            return self._cached_day[1]
        # Checked before and after reading: when processed/ is the same on both sides, every file read
        # belonged to it (a new version is swapped in whole, by rename, manifest included).
        self._check_version()
        examples = _read(example_files, ["customer_id", ITEM, *self.categorical, *self.numeric, TARGET])
        data = {"item": _numpy(examples, ITEM, np.int64),
                "categorical": _stack(examples, self.categorical, np.int64),
                "numeric": _stack(examples, self.numeric, np.float32),
                "target": _numpy(examples, TARGET, np.float32)}
        if not self.empty_histories:
            histories = _read(history_files, ["customer_id", "actions", "action_types"])
            data["history_row"] = _history_rows(histories, examples, history_files[0].parent)
            data["actions"] = _list_array(histories, "actions")
            data["action_types"] = _list_array(histories, "action_types")
        self._check_version()
        if examples.num_rows != rows:
            raise UserError(f"{example_files[0].parent}/ holds {examples.num_rows} rows, {rows} when the loader "
                            f"started: {FIX}")
        if len(self.days) == 1:
            self._cached_day = (day, data)
        return data

    def _check_version(self):
        """Stop (UserError) when processed/ is no longer the version this dataset started with."""
        try:
            current = stage.manifest_digest(self.processed_dir)
        except OSError:
            current = None
        if current != self._version:
            raise UserError(f"{self.processed_dir}/ was replaced or removed while this run read it (preprocess.py "
                            "ran again, or it was copied over): what was read so far is from the earlier version, "
                            "so this run stopped; start train.py again on the new one")

    def _batch(self, data, rows):
        shape = (len(rows), self.max_history)
        if self.empty_histories:
            items, types = np.zeros(shape, np.int64), np.zeros(shape, np.int8)
        else:
            history_rows = data["history_row"][rows]
            items = padded(data["actions"], history_rows, self.max_history, np.int64)
            types = padded(data["action_types"], history_rows, self.max_history, np.int8)
        return {"item": torch.from_numpy(data["item"][rows]),
                "history_items": torch.from_numpy(items),
                "history_action_types": torch.from_numpy(types),
                "categorical": torch.from_numpy(data["categorical"][rows]),
                "numeric": torch.from_numpy(data["numeric"][rows]),
                "target": torch.from_numpy(data["target"][rows])}


def make_loader(dataset, num_workers=0, pin_memory=None):
    """A DataLoader of whole batches (batch_size=None); pinned batches by default where CUDA is."""
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return _Loader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                   persistent_workers=num_workers > 0)


class _Loader(DataLoader):
    """A DataLoader whose workers' user errors stay one line: PyTorch re-raises a worker's exception
    with the worker's whole traceback as its message."""

    def __iter__(self):
        batches = super().__iter__()
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except UserError as error:
                lines = [line for line in str(error).splitlines() if line.strip()]
                raise UserError(lines[-1].split("UserError: ", 1)[-1] if lines else str(error)) from None
            yield batch


def to_device(batch, device):
    """Every tensor of a batch on `device`; asynchronous from pinned memory."""
    return {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}


# --- reading processed/ ---------------------------------------------------------------------------

def _manifest(checked):
    """processed/'s manifest (from a stage.StageInput: checked against the folder) and its digest."""
    layout = checked.manifest["parameters"].get("layout", "compact")
    if layout != "compact":
        raise UserError(f"{checked.path}/ holds the {layout} layout; the loader reads the compact one: "
                        "run preprocess.py again without --layout")
    return checked.manifest, checked.manifest_sha256


def _days(processed_dir, split, manifest):
    """[(date, example files, history files)] of a split in date order; a UserError names what is missing."""
    split_dir = processed_dir / split
    if not split_dir.exists() and manifest.get("rows_per_split", {}).get(split) == 0:
        return []  # preprocess.py found no day of this split: an empty split, not a missing one
    for table in ("examples", "histories"):
        if not (split_dir / table).is_dir():
            raise UserError(f"{split_dir / table} is missing: run preprocess.py first")
    days = []
    for day_dir in sorted((split_dir / "examples").glob("dt=*")):
        try:
            day = pd.Timestamp(day_dir.name[3:]).date()
        except ValueError:
            raise UserError(f"{day_dir}: not a dt=YYYY-MM-DD folder preprocess.py wrote: {FIX}") from None
        history_dir = split_dir / "histories" / day_dir.name
        examples, histories = sorted(day_dir.glob("*.parquet")), sorted(history_dir.glob("*.parquet"))
        if not examples:
            raise UserError(f"{day_dir}/ holds no Parquet files: {FIX}")
        if not histories:
            raise UserError(f"{history_dir}/ is missing or empty (its examples are in {day_dir}/): {FIX}")
        days.append((day, examples, histories))
    if not days:
        raise UserError(f"{split_dir / 'examples'}/ holds no dt=YYYY-MM-DD folders: {FIX}")
    return days


def _unreadable(path, error):
    return UserError(f"{path}: not a readable Parquet file ({error}): {FIX}")


def _num_rows(path):
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (pa.ArrowException, OSError) as error:
        raise _unreadable(path, error) from None


def _schema(path):
    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as error:
        raise _unreadable(path, error) from None


def _columns(schema, prefix, leave_out=None):
    return [name for name in schema.names if name.startswith(prefix) and name != leave_out] if schema else []


def _require_columns(path, names):
    present = _schema(path).names
    missing = [name for name in names if name not in present]
    if missing:
        raise UserError(f"{path}: has no column {', '.join(missing)} (it has {', '.join(present)}); "
                        f"processed/ and the preprocessors asked for come from different runs? {FIX}")


def _read(paths, columns):
    tables = []
    for path in paths:
        try:
            tables.append(pq.read_table(path, columns=columns))
        except FileNotFoundError:
            raise UserError(f"{path} has gone: processed/ was replaced or removed while this run read it, so "
                            "this run stopped; start train.py again once preprocess.py has finished") from None
        except (pa.ArrowException, OSError) as error:
            raise _unreadable(path, error) from None
    return pa.concat_tables(tables)


def _numpy(table, name, dtype):
    return np.asarray(table.column(name).to_numpy(), dtype=dtype)


def _stack(table, names, dtype):
    out = np.empty((table.num_rows, len(names)), dtype=dtype)
    for i, name in enumerate(names):
        out[:, i] = table.column(name).to_numpy()
    return out


def _list_array(table, name):
    column = table.column(name)
    return column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)


def _history_rows(histories, examples, where):
    """The histories row of each example, by customer_id (once per day): one row per customer and day."""
    index = pd.Index(histories.column("customer_id").to_numpy())
    if not index.is_unique:
        raise UserError(f"{where}/ holds two histories rows for one customer: {FIX}")
    rows = index.get_indexer(examples.column("customer_id").to_numpy())
    if (rows < 0).any():
        customer = examples.column("customer_id")[int(np.flatnonzero(rows < 0)[0])]
        raise UserError(f"{where}/ has no histories row for customer {customer}, who has examples that day: {FIX}")
    return rows
