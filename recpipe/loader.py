"""train.py's input: processed/ streamed as whole batches (docs/data.md: Layouts, Training input), from the timeline
layout (the default) or the compact one.

    timelines = Timelines.load(processed)            # the timeline layout: every customer's actions, once
    dataset = ProcessedDataset(processed.path, "train", batch_size=512, timelines=timelines, checked=processed)
    loader = make_loader(dataset, num_workers=2, pin_memory=torch.cuda.is_available())
    prepare = Prepare(device, dataset.max_history, timelines)   # on CUDA: the timelines go to the GPU once
    for epoch in range(epochs):
        dataset.set_epoch(epoch)                     # before iterating: persistent workers see it too
        for batch in loader:
            batch = prepare(batch)                   # on the device, [B, L] histories built there

One day at a time, in date order: a day's examples (every bucket file) are read with
PyArrow, shuffled with a generator seeded from (seed, epoch, day), and cut into batches;
the last batch of a day may be smaller, no example is dropped.

What a batch moves to the device. From the timeline layout, the examples' own columns in
narrow types (indices as int32, the target as uint8) and each history as where it ends in
the flat timelines and how long it is: 63 bytes an example with 4 categorical and 9 numeric
columns, whatever L. `Prepare` gives them the model's types and builds the [B, L] item and
action-type tensors there, one gather each, padding 0; the timelines stay on the device
(within --timelines-budget of its free memory; else in pinned host memory). From the compact
layout, a day's histories are joined by customer_id and each batch padded to [B, L] on the
CPU (B x L x 9 bytes more). Both give the model exactly the same tensors.

Workers: days are dealt to DataLoader workers in turn (day d to worker d mod W), so each
file is read once per epoch, by one worker. Every batch carries its number in the epoch,
and the loader hands them on in that order: the batches are the same for any number of
workers.
"""

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from recpipe import stage, tables
from recpipe.cli import UserError
from recpipe.histories import padded

ITEM, TARGET = "cat_item", "is_order"
FIX = "run preprocess.py again"
LAYOUTS = ("timeline", "compact")


class Timelines:
    """Every customer's timeline (docs/data.md, Layouts), loaded once: one flat array of items and one of
    action types, oldest first, and where each customer's timeline starts in them.

    `index` (customers and starts, small) is what the DataLoader workers need to place an
    example's window; the flat arrays stay with the process that feeds the model.
    """

    def __init__(self, customers, starts, items, action_types):
        order = np.argsort(customers, kind="stable")
        self.customers, self.starts = customers[order], starts[order]  # sorted, for searchsorted
        self.items, self.action_types = items, action_types

    @classmethod
    def load(cls, checked):
        """The timelines of processed/ (a stage.StageInput), all buckets."""
        files = sorted((checked.path / "timelines").glob("bucket=*/*.parquet"))
        if not files:
            raise UserError(f"{checked.path / 'timelines'}/ holds no timelines: {FIX}")
        table = _read(files, ["customer_id", "actions", "action_types"])
        actions, action_types = _list_array(table, "actions"), _list_array(table, "action_types")
        offsets = actions.offsets.to_numpy().astype(np.int64)
        customers = table.column("customer_id").to_numpy()
        if len(np.unique(customers)) != len(customers):
            raise UserError(f"{checked.path / 'timelines'}/ holds two timelines for one customer: {FIX}")
        return cls(customers, offsets[:-1], torch.from_numpy(actions.values.to_numpy().astype(np.int32)),
                   torch.from_numpy(action_types.values.to_numpy(zero_copy_only=False).astype(np.int8)))

    @property
    def index(self):
        return TimelineIndex(self.customers, self.starts, len(self.items))

    @property
    def nbytes(self):
        return self.items.nbytes + self.action_types.nbytes


class TimelineIndex:
    """Where each customer's timeline starts in the flat arrays (what a worker needs of Timelines)."""

    def __init__(self, customers, starts, size):
        self.customers, self.starts = customers, starts
        self.dtype = np.int32 if size < 2**31 else np.int64

    def ends(self, customer_ids, history_end, where):
        """Each example's window end in the flat arrays; a UserError when a customer has no timeline."""
        rows = np.searchsorted(self.customers, customer_ids)
        found = rows < len(self.customers)
        found[found] = self.customers[rows[found]] == customer_ids[found]
        if not found.all():
            customer = customer_ids[np.flatnonzero(~found)[0]]
            raise UserError(f"{where}/ has examples of customer {customer}, who has no timeline: {FIX}")
        return (self.starts[rows] + history_end).astype(self.dtype)


class ProcessedDataset(IterableDataset):
    """The batches of one split of processed/; see the module's docstring.

    categorical: cat_* columns other than cat_item, in this order (default: the files' order,
    which is fit.json's). numeric: num_* columns (default: the files' order). max_history
    (L): default processed/_stage.json's --max-history. empty_histories: all-zero history
    tensors of the same shapes, and the histories are not read. checked: processed/ as
    stage.open_stage (or stage.reading) returned it, already checked against its manifest.
    timelines: Timelines.load(checked), for the timeline layout (loaded here if not given).
    """

    def __init__(self, processed_dir, split, batch_size=512, max_history=None, shuffle=True, seed=0,
                 categorical=None, numeric=None, empty_histories=False, checked=None, timelines=None):
        super().__init__()
        if batch_size < 1 or (max_history is not None and max_history < 1):
            raise ValueError(f"batch_size and max_history must be at least 1, not {batch_size} and {max_history}")
        self.split = split
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.empty_histories = empty_histories
        checked = checked or stage.open_stage(None, "processed", stage_dir=processed_dir)
        self.processed_dir = checked.folder  # where its manifest is; its files are in checked.path
        manifest, self._version = checked.manifest, checked.manifest_sha256
        self.layout = layout_of(checked)
        self.max_history = int(max_history or manifest["parameters"]["max_history"])
        self.days = _days(checked.path, split, manifest, self.layout)  # [(date, example files, history files)]
        self._day_rows = [sum(_num_rows(path) for path in examples) for _, examples, _ in self.days]
        schema = _schema(self.days[0][1][0]) if self.days else None
        self.categorical = list(categorical) if categorical is not None else _columns(schema, "cat_", ITEM)
        self.numeric = list(numeric) if numeric is not None else _columns(schema, "num_")
        window = ["history_end", "history_length"] if self.layout == "timeline" else []
        for _, examples, histories in self.days[:1]:
            _require_columns(examples[0], [ITEM, "customer_id", *self.categorical, *self.numeric, *window, TARGET])
            if histories:
                _require_columns(histories[0], ["customer_id", "actions", "action_types"])
        if self.layout == "timeline" and not empty_histories:
            self.timelines = (timelines or Timelines.load(checked)).index
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
        for number, (entry, rows) in enumerate(zip(self.days, self._day_rows)):
            count = math.ceil(rows / self.batch_size)
            if number % workers == worker_id:
                data = self._read_day(entry, rows)
                order = self._order(entry[0], epoch, rows)
                for b in range(count):
                    batch = self._batch(data, order[b * self.batch_size:(b + 1) * self.batch_size])
                    yield {**batch, "sequence": torch.tensor(first + b)}
            first += count

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
        window = ["history_end", "history_length"] if self.layout == "timeline" and not self.empty_histories else []
        examples = _read(example_files, ["customer_id", ITEM, *self.categorical, *self.numeric, *window, TARGET])
        # Narrow types, widened on the device by Prepare: what crosses to the device is what costs.
        data = {"item": _numpy(examples, ITEM, np.int32),
                "categorical": _stack(examples, self.categorical, np.int32),
                "numeric": _stack(examples, self.numeric, np.float32),
                "target": _numpy(examples, TARGET, np.uint8)}
        if window:
            data["history_end"] = self.timelines.ends(_numpy(examples, "customer_id", np.int64),
                                                      _numpy(examples, "history_end", np.int64),
                                                      example_files[0].parent)
            lengths = np.minimum(_numpy(examples, "history_length", np.int64), self.max_history)
            data["history_length"] = lengths.astype(np.int16 if self.max_history < 2**15 else np.int32)
        elif self.layout == "compact" and not self.empty_histories:
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
        batch = {name: torch.from_numpy(data[name][rows]) for name in ("item", "categorical", "numeric", "target")}
        if "history_end" in data:
            return {**batch, "history_end": torch.from_numpy(data["history_end"][rows]),
                    "history_length": torch.from_numpy(data["history_length"][rows])}
        if "history_row" in data:
            history_rows = data["history_row"][rows]
            items = padded(data["actions"], history_rows, self.max_history, np.int64)
            types = padded(data["action_types"], history_rows, self.max_history, np.int8)
        else:  # empty histories: the same shapes, all padding
            items, types = np.zeros((len(rows), self.max_history), np.int64), np.zeros((len(rows), self.max_history), np.int8)
        return {**batch, "history_items": torch.from_numpy(items), "history_action_types": torch.from_numpy(types)}


class Prepare:
    """A batch as the model takes it, on `device`: moved there (asynchronously from pinned memory), its
    columns in the model's types, and from the timeline layout its [B, L] histories gathered there.

    timelines: Timelines, for the timeline layout. On CUDA they are copied to the device once
    when they take at most `budget` of its free memory, else kept in pinned host memory
    (the gather then runs on the host and moves [B, L]).
    """

    def __init__(self, device, max_history, timelines=None, budget=0.5):
        self.device, self.max_history = torch.device(device), max_history
        self.items = self.action_types = None
        self.where = "not needed"
        if timelines is not None:
            home = self.device
            if self.device.type == "cuda" and timelines.nbytes > budget * torch.cuda.mem_get_info(self.device)[0]:
                home = torch.device("cpu")
            self.items, self.action_types = timelines.items.to(home), timelines.action_types.to(home)
            if home.type == "cpu" and self.device.type == "cuda":
                self.items, self.action_types = self.items.pin_memory(), self.action_types.pin_memory()
            self.where = f"{timelines.nbytes / 2**20:,.1f} MiB on {home}"

    def __call__(self, batch):
        moved = {name: tensor.to(self.device, non_blocking=True) for name, tensor in batch.items()
                 if name not in ("history_end", "history_length")}
        out = {"item": moved["item"].long(), "categorical": moved["categorical"].long(),
               "numeric": moved["numeric"], "target": moved["target"].float()}
        if "history_end" in batch:
            out["history_items"], out["history_action_types"] = self._gather(batch["history_end"],
                                                                             batch["history_length"])
        else:
            out["history_items"] = moved["history_items"]
            out["history_action_types"] = moved["history_action_types"]
        return out

    def _gather(self, end, length):
        """[B, L] items and action types, most recent first, 0 past each history's length."""
        home = self.items.device
        end, length = end.to(home, non_blocking=True).long(), length.to(home, non_blocking=True).long()
        shape = (len(end), self.max_history)
        if home.type == "cuda":  # every [B, L] slot at once: branch-free, and the GPU has the lanes
            position = torch.arange(self.max_history, device=home)
            valid = position[None, :] < length[:, None]
            index = torch.where(valid, end[:, None] - 1 - position[None, :], 0)
            items = torch.where(valid, self.items[index], 0).long()
            types = torch.where(valid, self.action_types[index], 0)
        else:  # only the slots a history fills (a mean history is far shorter than L), like histories.padded
            row = torch.repeat_interleave(torch.arange(len(end)), length)
            column = torch.arange(len(row)) - torch.repeat_interleave(torch.cumsum(length, 0) - length, length)
            source = torch.repeat_interleave(end - 1, length) - column
            items, types = torch.zeros(shape, dtype=torch.int64), torch.zeros(shape, dtype=torch.int8)
            items[row, column] = self.items[source].long()
            types[row, column] = self.action_types[source]
        return items.to(self.device, non_blocking=True), types.to(self.device, non_blocking=True)


def make_loader(dataset, num_workers=0, pin_memory=None):
    """A DataLoader of whole batches (batch_size=None); pinned batches by default where CUDA is."""
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return _Loader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                   persistent_workers=num_workers > 0)


class _Loader(DataLoader):
    """A DataLoader that hands batches on in their order in the epoch, whatever worker made them, and
    whose workers' user errors stay one line (PyTorch re-raises a worker's exception with the
    worker's whole traceback as its message)."""

    def __iter__(self):
        batches = super().__iter__()
        waiting, expected = {}, 0
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except UserError as error:
                lines = [line for line in str(error).splitlines() if line.strip()]
                raise UserError(lines[-1].split("UserError: ", 1)[-1] if lines else str(error)) from None
            waiting[int(batch.pop("sequence"))] = batch
            while expected in waiting:
                yield waiting.pop(expected)
                expected += 1
        if waiting:
            raise RuntimeError(f"batches {sorted(waiting)[:3]}... came without the ones before them: this is a bug")


# --- reading processed/ ---------------------------------------------------------------------------

def layout_of(checked):
    """The layout of processed/ (a stage.StageInput: checked against the folder), one the loader reads; a
    manifest older than the layouts is compact's."""
    layout = checked.manifest["parameters"].get("layout", "compact")
    if layout not in LAYOUTS:
        raise UserError(f"{checked.path}/ holds the {layout} layout; the loader reads the timeline and the compact "
                        "ones: run preprocess.py again without --layout")
    return layout


def _days(processed_dir, split, manifest, layout):
    """[(date, example files, history files)] of a split in date order (no history files in the timeline
    layout); a UserError names what is missing."""
    split_dir = processed_dir / split
    if not split_dir.exists() and manifest.get("rows_per_split", {}).get(split) == 0:
        return []  # preprocess.py found no day of this split: an empty split, not a missing one
    for table in ("examples", "histories") if layout == "compact" else ("examples",):
        if not (split_dir / table).is_dir():
            raise UserError(f"{split_dir / table} is missing: run preprocess.py first")
    days = []
    for day_dir in sorted((split_dir / "examples").glob("dt=*")):
        try:
            day = pd.Timestamp(day_dir.name[3:]).date()
        except ValueError:
            raise UserError(f"{day_dir}: not a dt=YYYY-MM-DD folder preprocess.py wrote: {FIX}") from None
        examples = sorted(day_dir.glob("*.parquet"))
        if not examples:
            raise UserError(f"{day_dir}/ holds no Parquet files: {FIX}")
        histories = []
        if layout == "compact":
            history_dir = split_dir / "histories" / day_dir.name
            histories = sorted(history_dir.glob("*.parquet"))
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
        return tables.parquet_file(path).metadata.num_rows
    except (pa.ArrowException, OSError) as error:
        raise _unreadable(path, error) from None


def _schema(path):
    try:
        return tables.read_schema(path)
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
    read = []
    for path in paths:
        try:
            read.append(tables.read(path, columns=columns))
        except FileNotFoundError:
            raise UserError(f"{path} has gone: processed/ was replaced or removed while this run read it, so "
                            "this run stopped; start train.py again once preprocess.py has finished") from None
        except (pa.ArrowException, OSError) as error:
            raise _unreadable(path, error) from None
    return pa.concat_tables(read)


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
