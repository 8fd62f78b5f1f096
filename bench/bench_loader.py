"""Benchmark the loader: examples per second delivered to the trainer (no model), against the seed approach.

    .venv/bin/python bench/bench_loader.py --processed /tmp/recpipe-bench-200000/data/processed \
        --preprocessors /tmp/recpipe-bench-200000/data/preprocessors

Ours: recpipe.loader (one day at a time, whole batches, padding per batch) for one full
pass over --split (or --max-batches) with each of --workers. The seed approach: a
map-style torch Dataset whose __getitem__ returns one example from pandas frames loaded
beforehand (the example's row and its history row, padded to L), batched by the
DataLoader's default collate (batch_size 512, shuffled), timed on --seed-batches
batches with each of --seed-workers; loading its frames is not timed. Both give the
same tensors (checked on the first unshuffled batch). Saves bench/results/loader.json.

The defaults are bench_preprocess.py's first scale (200,000 customers, histories up to
1,000 actions): run that first.
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
from recpipe.loader import ProcessedDataset, make_loader  # noqa: E402  (the root is not on a bench/ script's path)

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


def time_batches(loader, max_batches):
    """(examples, batches, seconds, seconds to the first batch) of iterating `loader`."""
    examples = batches = 0
    started = time.perf_counter()
    first = None
    for batch in loader:
        examples += len(batch["target"])
        batches += 1
        first = first if first is not None else time.perf_counter() - started
        if max_batches and batches >= max_batches:
            break
    return examples, batches, time.perf_counter() - started, first


def history_lengths(split_dir):
    lengths = pc.list_value_length(ds.dataset(split_dir / "histories", format="parquet").to_table(
        columns=["actions"]).column("actions")).to_numpy()
    return {"rows": int(len(lengths)), "mean": round(float(lengths.mean()), 1), "max": int(lengths.max()),
            "share_at_max": round(float((lengths == lengths.max()).mean()), 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processed", type=Path, default=DEFAULT / "processed")
    parser.add_argument("--preprocessors", type=Path, default=DEFAULT / "preprocessors")
    parser.add_argument("--split", default="train")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--max-history", type=int, default=None, help="L (default: processed/'s --max-history)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--max-batches", type=int, default=0, help="ours: stop after this many (0: a full pass)")
    parser.add_argument("--seed-batches", type=int, default=50)
    parser.add_argument("--seed-workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
    fit = json.loads((args.preprocessors / "fit.json").read_text())
    categorical = [name for name in fit["categorical"] if name != "cat_item"]
    options = dict(batch_size=args.batch_size, max_history=args.max_history, seed=0,
                   categorical=categorical, numeric=fit["numeric"])

    ours = {}
    for workers in args.workers:
        dataset = ProcessedDataset(args.processed, args.split, **options)
        examples, batches, seconds, first = time_batches(make_loader(dataset, num_workers=workers), args.max_batches)
        if not args.max_batches and examples != len(dataset):
            raise SystemExit(f"ours with {workers} workers delivered {examples} examples of {len(dataset)}")
        ours[workers] = {"examples": examples, "batches": batches, "seconds": round(seconds, 2),
                         "seconds_to_first_batch": round(first, 2), "examples_per_second": round(examples / seconds)}
        print(f"ours, {workers} workers: {ours[workers]}", flush=True)
    max_history = dataset.max_history
    # What every worker repeats: reading a day (examples + histories, joined), here the first.
    started = time.perf_counter()
    dataset._read_day(dataset.days[0], dataset._day_rows[0])
    read_day = {"day": str(dataset.days[0][0]), "examples": dataset._day_rows[0],
                "seconds": round(time.perf_counter() - started, 3)}

    # The seed approach, on frames loaded beforehand (not timed).
    started = time.perf_counter()
    split_dir = args.processed / args.split
    columns = ["customer_id", "cat_item", *categorical, *fit["numeric"], "is_order"]
    examples = ds.dataset(split_dir / "examples", format="parquet", partitioning="hive").to_table(
        columns=[*columns, "dt"]).to_pandas()
    histories = ds.dataset(split_dir / "histories", format="parquet", partitioning="hive").to_table().to_pandas()
    seed_dataset = SeedDataset(examples, histories, categorical, fit["numeric"], max_history)
    load_seconds = time.perf_counter() - started
    # Both give the same first batch unshuffled (days in order, files in order): the same tensors.
    theirs = default_collate([seed_dataset[i] for i in range(args.batch_size)])
    first_batch = next(iter(ProcessedDataset(args.processed, args.split, **options, shuffle=False)))
    if not all(torch.equal(theirs[name], first_batch[name]) for name in first_batch):
        raise SystemExit("the seed approach and ours disagree on the first batch")
    seed = {}
    for workers in args.seed_workers:
        torch.manual_seed(0)
        loader = DataLoader(seed_dataset, batch_size=args.batch_size, shuffle=True, num_workers=workers)
        examples_done, batches, seconds, _ = time_batches(loader, args.seed_batches)
        seed[workers] = {"examples": examples_done, "batches": batches, "seconds": round(seconds, 2),
                         "examples_per_second": round(examples_done / seconds)}
        print(f"seed approach, {workers} workers: {seed[workers]}", flush=True)

    rate = {**{("ours", workers): figures["examples_per_second"] for workers, figures in ours.items()},
            **{("seed", workers): figures["examples_per_second"] for workers, figures in seed.items()}}
    save_report("loader", {
        "parameters": {"processed": str(args.processed), "split": args.split, "batch_size": args.batch_size,
                       "max_history": max_history, "categorical": categorical, "numeric": len(fit["numeric"]),
                       "max_batches": args.max_batches},
        "split_examples": len(dataset), "days": len(dataset.days), "histories": history_lengths(split_dir),
        "reading_one_day": read_day,
        "ours": {f"{workers}_workers": figures for workers, figures in ours.items()},
        "seed_approach": {"frames_load_seconds_untimed": round(load_seconds, 1),
                          **{f"{workers}_workers": figures for workers, figures in seed.items()}},
        "speedup_over_the_seed_approach": {
            **{f"{workers}_workers_each": round(rate["ours", workers] / rate["seed", workers], 1)
               for workers in ours if workers in seed},
            "best_over_best": round(max(rate[key] for key in rate if key[0] == "ours")
                                    / max(rate[key] for key in rate if key[0] == "seed"), 1)},
    })


if __name__ == "__main__":
    main()
