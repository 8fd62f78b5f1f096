"""Benchmark the loader: examples per second delivered to the trainer (no model), per layout, against
the seed approach.

    .venv/bin/python bench/bench_loader.py \
        --processed /tmp/recpipe-bench-200000/data-timeline/processed /tmp/recpipe-bench-200000/data/processed \
        --preprocessors /tmp/recpipe-bench-200000/data/preprocessors

Ours: recpipe.loader for one full pass over --split (or --max-batches) with each of
--workers, for each --processed (its layout from its manifest): batches as the model gets
them on the CPU (loader.Prepare: from the timeline layout, [B, L] gathered from the
timelines loaded once; from the compact one, padded per batch), and the bytes each example
moves to the device (the batch before Prepare). The seed approach, on the compact layout:
a map-style torch Dataset whose __getitem__ returns one example from pandas frames loaded
beforehand (the example's row and its history row, padded to L), batched by the
DataLoader's default collate (batch_size 512, shuffled), timed on --seed-batches batches
with each of --seed-workers; loading its frames is not timed. Both give the same tensors
(checked on the first unshuffled batch). Saves bench/results/loader.json.

The defaults are bench_preprocess.py's first scale (200,000 customers, histories up to
1,000 actions): run that first, and preprocess.py --layout timeline into data-timeline/.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from measure import ROOT, save_report

sys.path.insert(0, str(ROOT))
from recpipe import stage  # noqa: E402  (the root is not on a bench/ script's path)
from recpipe.loader import Prepare, ProcessedDataset, Timelines, make_loader  # noqa: E402

DEFAULT = Path("/tmp/recpipe-bench-200000/data")


class SeedDataset(Dataset):
    """One example per __getitem__ from pandas frames, its history padded to L: what the loader replaces.

    Written to be fair to it: columns are taken by position from the row's values (selecting
    a Series by a list of labels costs 0.4 ms a call), the history by its (customer_id, dt) key
    on a sorted index.
    """

    def __init__(self, examples, histories, categorical, numeric, max_history):
        self.examples = examples
        self.histories = histories.set_index(["customer_id", "dt"]).sort_index()
        at = {name: position for position, name in enumerate(examples.columns)}
        self.key = [at["customer_id"], at["dt"]]
        self.item, self.target = at["cat_item"], at["is_order"]
        self.categorical, self.numeric = [at[name] for name in categorical], [at[name] for name in numeric]
        self.max_history = max_history

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        row = self.examples.iloc[index].to_numpy()
        history = self.histories.loc[tuple(row[self.key])]
        items = np.zeros(self.max_history, np.int64)
        action_types = np.zeros(self.max_history, np.int8)
        length = min(len(history["actions"]), self.max_history)
        items[:length] = history["actions"][:length]
        action_types[:length] = history["action_types"][:length]
        return {"item": int(row[self.item]), "history_items": items, "history_action_types": action_types,
                "categorical": row[self.categorical].astype(np.int64),
                "numeric": row[self.numeric].astype(np.float32), "target": np.float32(row[self.target])}


def time_batches(loader, prepare, max_batches):
    """(examples, batches, seconds, seconds to the first batch, bytes moved per example) of iterating
    `loader`, each batch made ready by `prepare`."""
    examples = batches = moved = 0
    started = time.perf_counter()
    first = None
    for batch in loader:
        moved += sum(tensor.nbytes for tensor in batch.values())
        batch = prepare(batch)
        examples += len(batch["target"])
        batches += 1
        first = first if first is not None else time.perf_counter() - started
        if max_batches and batches >= max_batches:
            break
    return examples, batches, time.perf_counter() - started, first, moved / max(examples, 1)


def history_lengths(split_dir):
    lengths = pc.list_value_length(ds.dataset(split_dir / "histories", format="parquet").to_table(
        columns=["actions"]).column("actions")).to_numpy()
    return {"rows": int(len(lengths)), "mean": round(float(lengths.mean()), 1), "max": int(lengths.max()),
            "share_at_max": round(float((lengths == lengths.max()).mean()), 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processed", type=Path, nargs="+",
                        default=[DEFAULT.with_name("data-timeline") / "processed", DEFAULT / "processed"])
    parser.add_argument("--preprocessors", type=Path, default=DEFAULT / "preprocessors")
    parser.add_argument("--split", default="train")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--max-history", type=int, default=None, help="L (default: processed/'s --max-history)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--max-batches", type=int, default=0, help="ours: stop after this many (0: a full pass)")
    parser.add_argument("--seed-batches", type=int, default=50, help="0: leave the seed approach out")
    parser.add_argument("--seed-workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
    fit = json.loads((args.preprocessors / "fit.json").read_text())
    categorical = [name for name in fit["categorical"] if name != "cat_item"]
    options = dict(batch_size=args.batch_size, max_history=args.max_history, seed=0,
                   categorical=categorical, numeric=fit["numeric"])

    layouts, compact = {}, None
    for processed in args.processed:
        checked = stage.open_stage(None, "processed", stage_dir=processed)
        layout = checked.manifest["parameters"]["layout"]
        started = time.perf_counter()
        timelines = Timelines.load(checked) if layout == "timeline" else None
        figures = {"processed": str(processed), "timelines_load_seconds": round(time.perf_counter() - started, 2)}
        for workers in args.workers:
            dataset = ProcessedDataset(processed, args.split, **options, checked=checked, timelines=timelines)
            prepare = Prepare("cpu", dataset.max_history, timelines)
            examples, batches, seconds, first, moved = time_batches(make_loader(dataset, num_workers=workers), prepare,
                                                                    args.max_batches)
            if not args.max_batches and examples != len(dataset):
                raise SystemExit(f"{layout}, {workers} workers: {examples} examples delivered of {len(dataset)}")
            figures[f"{workers}_workers"] = {
                "examples": examples, "batches": batches, "seconds": round(seconds, 2),
                "seconds_to_first_batch": round(first, 2), "examples_per_second": round(examples / seconds),
                "bytes_moved_to_the_device_per_example": round(moved, 1)}
            print(f"{layout}, {workers} workers: {figures[f'{workers}_workers']}", flush=True)
        started = time.perf_counter()
        dataset._read_day(dataset.days[0], dataset._day_rows[0])
        figures["reading_one_day"] = {"day": str(dataset.days[0][0]), "examples": dataset._day_rows[0],
                                      "seconds": round(time.perf_counter() - started, 3)}
        figures["split_examples"], figures["days"], figures["max_history"] = len(dataset), len(dataset.days), \
            dataset.max_history
        layouts[layout] = figures
        if layout == "compact":
            compact = (processed, dataset.max_history)

    seed = {}
    if compact and args.seed_batches:
        seed = seed_approach(args, compact, categorical, fit, options)
    save_report("loader", {
        "parameters": {"split": args.split, "batch_size": args.batch_size, "categorical": categorical,
                       "numeric": len(fit["numeric"]), "max_batches": args.max_batches},
        "histories": history_lengths(compact[0] / args.split) if compact else None,
        "layouts": layouts, "seed_approach": seed,
    })


def seed_approach(args, compact, categorical, fit, options):
    """The seed approach's examples/s on the compact layout, on frames loaded beforehand (not timed)."""
    processed, max_history = compact
    started = time.perf_counter()
    split_dir = processed / args.split
    columns = ["customer_id", "cat_item", *categorical, *fit["numeric"], "is_order"]
    examples = ds.dataset(split_dir / "examples", format="parquet", partitioning="hive").to_table(
        columns=[*columns, "dt"]).to_pandas()
    histories = ds.dataset(split_dir / "histories", format="parquet", partitioning="hive").to_table().to_pandas()
    seed_dataset = SeedDataset(examples, histories, categorical, fit["numeric"], max_history)
    load_seconds = time.perf_counter() - started
    # Both give the same first batch unshuffled (days in order, files in order): the same tensors.
    theirs = default_collate([seed_dataset[i] for i in range(args.batch_size)])
    ours = Prepare("cpu", max_history)(next(iter(ProcessedDataset(processed, args.split, **options, shuffle=False))))
    if not all(torch.equal(theirs[name], ours[name]) for name in theirs):
        raise SystemExit("the seed approach and ours disagree on the first batch")
    seed = {"frames_load_seconds_untimed": round(load_seconds, 1)}
    for workers in args.seed_workers:
        torch.manual_seed(0)
        loader = DataLoader(seed_dataset, batch_size=args.batch_size, shuffle=True, num_workers=workers)
        examples_done, batches, seconds, _, _ = time_batches(loader, lambda batch: batch, args.seed_batches)
        seed[f"{workers}_workers"] = {"examples": examples_done, "batches": batches, "seconds": round(seconds, 2),
                                      "examples_per_second": round(examples_done / seconds)}
        print(f"seed approach, {workers} workers: {seed[f'{workers}_workers']}", flush=True)
    return seed


if __name__ == "__main__":
    main()
