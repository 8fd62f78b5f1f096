"""Generated raw data as docs/data.md (Raw input) describes it, for demos, tests and benchmarks.

`generate(out_dir, ...)` writes one sub-directory per source, in a mix of formats, with
a learnable signal and a known set of bad rows planted (docs/data.md, Cleaning), and
`<out_dir>/_generated.json` holding the parameters and the exact accounting that the
cleaning stage must reproduce. The same parameters give the same bytes on every run:
every random draw comes from `numpy.random.default_rng(seed)` (one spawned child per
concern, so that changing one part of the generator leaves the others' draws alone, and
one child of each per block of customers), gzip headers carry mtime 0, and nothing reads
the clock.

Customers are made in blocks of about BLOCK_ROWS actions and shown items (customer ids
are consecutive within a block, and no two blocks share one); each block's rows are
appended to every file before the next block is drawn, so that memory is bounded by a
block whatever the number of customers. A file's rows are its blocks' rows one after
the other (a click file is in time order within each block), and a Parquet file has a row
group per block. The block size is part of the data, so `_generated.json` records it
(`customers_per_block`); the accounting is added up over the blocks, which is exact since
no row, duplicate or key is shared between blocks.

Dates are fixed so that outputs are reproducible: the impression days are the
`days` days from 2024-03-01; actions (clicks, add-to-carts, orders) span those days
plus the 28 days before them.

Layout (day index i counts impression days from 0, action days from 0 at the first
action day):

    impressions/YYYY-MM-DD.jsonl       i even (JSON Lines)
    impressions/YYYY-MM-DD.jsonl.gz    i odd
    impressions/YYYY-MM-DD.parquet     the last-but-two impression day (i = days - 3)
    clicks/YYYY-MM-DD.jsonl.gz         every action day
    add_to_carts/YYYY-MM-DD.csv        every action day; .csv.gz where i % 3 == 2;
                                       an extra `channel` column where i % 10 == 4
    previous_orders/YYYY-MM-DD.parquet one per week of action days (named by its first day)
    previous_orders/backfill.jsonl     a few hundred orders drawn at random from all of them

The world:
  - item popularity is a Zipf-like long tail (p proportional to 1/rank^1.1);
  - customer activity is lognormal (sigma 1.5) around `actions_per_customer`, so a few
    customers have thousands of actions (the pipeline caps histories at 1000); actions
    are 70% clicks, 20% add-to-carts, 10% orders; a third of a customer's actions go
    to a small personal set of favourite items, which makes repeats common;
  - each customer has a mostly-stable user agent from a pool of a few thousand
    real-looking strings (about 40 templates with varied versions); a few per cent of
    rankings carry a null, empty or blank user agent, a few hundredths of a per cent a
    garbage one (random bytes read as latin-1, or a 10 KB string);
  - each impression day about 20% of customers, weighted toward the active ones, get
    a ranking of 5-20 items (usually 10), without repeated items.

The planted signal: each slot of a ranking for customer c on day D shows, with
probability 0.3, an item c clicked or carted in [D - 14 days, D) (when there is one),
otherwise a popularity sample; `is_order` is true with p = 0.25 for items among c's
clicks and carts in that window and p = 0.02 otherwise. Every ordered shown item is
also a previous_orders row with order_date D.

The bad rows: 2% of the rows of every source carry exactly one defect, of a kind the
file's format can express, with at least one row of every kind per source. Besides,
0.5% of good rankings, clicks and add-to-carts are repeated verbatim later in the same
file, and some rows carry an unknown extra field (which is not a defect).

The package: world (the customers, items, actions and rankings), user_agents, text
(vectorised formatting), defects (the bad rows and duplicates) and sources (one class
per raw source, writing its files); this module ties them together in generate().
"""

import concurrent.futures
import json
import os
from pathlib import Path

import numpy as np

from recpipe import folders
from recpipe.synthetic.defects import BAD_FRACTION, DUPLICATE_FRACTION
from recpipe.synthetic.sources import _AddToCarts, _Clicks, _Impressions, _Planted, _PreviousOrders
from recpipe.synthetic.user_agents import _Pool, _user_agents
from recpipe.synthetic.world import (DAYS_BEFORE, FIRST_IMPRESSION_DAY, MEAN_RANKING_LENGTH, ORDER_P_OTHER,
                                     ORDER_P_RECENT, RANKED_FRACTION, RECENT_SLOT_P, SIGNAL_DAYS, _actions, _Block,
                                     _rankings, _World)

GENERATED = "_generated.json"
SOURCES = ("impressions", "clicks", "add_to_carts", "previous_orders")
CONCERNS = ("world", "actions", "rankings", "user_agents", *SOURCES)  # one generator each
BLOCK_ROWS = 2_000_000  # 0.7 GiB peak RSS in all, at 20 M actions as at 100 M (docs/benchmarks.md)


def not_a_generated_folder(folder):
    """None when a folder holds nothing but the files generate() wrote there (its _generated.json lists
    them), so that it may be replaced; otherwise what was found."""
    try:
        files = json.loads((Path(folder) / GENERATED).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"it has no {GENERATED} listing the files the generator wrote"
    unexpected = folders.unexpected_entries(folder, {*files, GENERATED, folders.MARKER})
    if unexpected:
        return f"it holds {folders.listing(unexpected)}, which the generator did not write"
    return None


def customers_per_block(days, actions_per_customer, block_rows=BLOCK_ROWS):
    """How many customers are generated, and their rows written, together: about `block_rows` actions and
    shown items."""
    rows_per_customer = actions_per_customer + RANKED_FRACTION * days * MEAN_RANKING_LENGTH
    return max(1, int(block_rows // rows_per_customer))


def generate(out_dir, *, customers=2000, items=5000, days=18, actions_per_customer=60, seed=0,
             block_rows=BLOCK_ROWS):
    """Write a raw dataset under `out_dir` (replacing it) and return its `_generated.json` content plus a summary.

    Customers are generated in blocks of customers_per_block(days, actions_per_customer,
    block_rows), one after the other, each block's rows appended to the files before the next
    is drawn, so that memory is bounded by `block_rows`, whatever the number of customers. The
    data depend on the block size, so it is one of the parameters.

    The returned dict has "parameters" and "expected" (what `_generated.json` holds)
    and "summary": files, rows and bad rows planted per source, and actions generated.
    """
    for name, value in (("customers", customers), ("items", items), ("days", days), ("block_rows", block_rows)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not actions_per_customer > 0:
        raise ValueError(f"actions_per_customer must be positive, got {actions_per_customer!r}")
    # Capped, so that data of one block say so, whatever block_rows made them.
    per_block = min(int(customers), customers_per_block(int(days), float(actions_per_customer), int(block_rows)))
    parameters = {
        "customers": int(customers), "items": int(items), "days": int(days),
        "actions_per_customer": float(actions_per_customer), "seed": int(seed), "customers_per_block": per_block,
        "first_action_day": str(FIRST_IMPRESSION_DAY - DAYS_BEFORE),
        "first_impression_day": str(FIRST_IMPRESSION_DAY),
        "last_impression_day": str(FIRST_IMPRESSION_DAY + int(days) - 1),
        "bad_fraction": BAD_FRACTION, "duplicate_fraction": DUPLICATE_FRACTION,
        "signal": {"recent_slot_p": RECENT_SLOT_P, "window_days": SIGNAL_DAYS,
                   "order_p_recent": ORDER_P_RECENT, "order_p_other": ORDER_P_OTHER},
    }
    out_dir = Path(out_dir)
    with folders.claiming(out_dir, not_a_generated_folder, "replace",
                          "point --out at a new or empty folder, or at one generate_data.py wrote"):
        staging = folders.make_staging(out_dir)
        try:
            expected, summary = _write_blocks(staging, int(seed), int(customers), int(items), int(days),
                                              float(actions_per_customer), per_block)
            result = {"parameters": parameters, "expected": expected}
            # The files it wrote prove a folder is the generator's, which it may then replace.
            files = sorted(str(path.relative_to(staging)) for path in staging.rglob("*")
                           if path.is_file() and path.name != folders.MARKER)
            (staging / GENERATED).write_text(json.dumps({**result, "files": files}, indent=2, sort_keys=True) + "\n")
            folders.replace(staging, out_dir)
        except BaseException:
            folders.discard(staging)
            raise
    return {**result, "summary": summary}


def _generators(seed, block):
    """One generator per concern for a block of customers.

    Block 0 draws from each concern's own generator (world and user_agents continue after the
    draws all blocks share: item popularity, the pool of agents), block k from the concern's
    k-th child: no two blocks share a draw, and a dataset of one block draws exactly what the
    generator drew before it wrote in blocks.
    """
    return {concern: np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(code, block) if block else (code,)))
            for code, concern in enumerate(CONCERNS)}


def _write_blocks(folder, seed, customers, items, days, actions_per_customer, per_block):
    """Generate the blocks of customers in turn, appending each one's rows to the files under `folder`; return the
    expected accounting and the summary, added up over the blocks."""
    rng = _generators(seed, 0)
    world = _World(rng["world"], customers, items, days, actions_per_customer)
    agents = _Pool(rng["user_agents"])
    planted = {name: _Planted() for name in SOURCES}
    files, expected, summary = {}, None, None
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            for first in range(1, customers + 1, per_block):
                if first > 1:
                    rng = _generators(seed, (first - 1) // per_block)
                block = _Block(rng["world"], world, first, min(per_block, customers + 1 - first))
                actions, sources = _block_sources(rng, block, agents, planted)
                if not files:
                    files = {name: [source.open_file(folder / name, index) for index in range(source.n_files)]
                             for name, source in sources.items()}
                # zlib, pyarrow and most of numpy release the GIL, so a block's files are built in parallel.
                jobs = [pool.submit(source.write_piece, files[name][index], index)
                        for name, source in sources.items() for index in range(source.n_files)]
                for job in jobs:
                    job.result()
                expected = _added(expected, {name: source.expected() for name, source in sources.items()})
                summary = _added(summary, {
                    "actions": actions,
                    "rows": {name: source.rows_in() for name, source in sources.items()},
                    "bad_rows": {name: int((source.defect >= 0).sum()) for name, source in sources.items()},
                    "duplicate_rows": {name: int(source.duplicate.sum()) for name, source in sources.items()},
                })
    finally:
        for source_files in files.values():
            for file in source_files:
                file.close()
    summary["files"] = {name: len(source_files) for name, source_files in files.items()}
    return expected, summary


def _block_sources(rng, block, agents, planted):
    """The number of actions of a block, and its rows of every source."""
    actions = _actions(rng["actions"], block)
    rankings, shown = _rankings(rng["rankings"], block, actions)
    user_agents = _user_agents(rng["user_agents"], agents, block, rankings)
    world = block.world
    return len(actions["customer_id"]), {
        "impressions": _Impressions(rng["impressions"], world, rankings, shown, user_agents, planted["impressions"]),
        "clicks": _Clicks(rng["clicks"], world, actions, planted["clicks"]),
        "add_to_carts": _AddToCarts(rng["add_to_carts"], world, actions, planted["add_to_carts"]),
        "previous_orders": _PreviousOrders(rng["previous_orders"], block, actions, rankings, shown,
                                           planted["previous_orders"]),
    }


def _added(total, part):
    """Accounting added up over the blocks: numbers add, dicts add key by key."""
    if total is None:
        return part
    if part is None:
        return total
    if isinstance(part, dict):
        return {key: _added(total.get(key), part.get(key)) for key in sorted({*total, *part})}
    return total + part
