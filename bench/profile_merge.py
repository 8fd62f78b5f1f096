"""Where merge_and_clean's cleaning pass spends its time, per phase, on the benchmark's raw data.

    .venv/bin/python bench/profile_merge.py --work /tmp/recpipe-bench

Cleans every raw file under --work/raw in this process, one after another, timing the phases
of merge.clean_file: read (the file, gunzipped), decode (Arrow's blocks, the screen, the lines
left to orjson), validate (the typed rules, then the reference rules on the rows they left),
build (the action stream or the shown items, in row order) and write (Parquet). Prints and saves
bench/results/merge_profile.json. Sequential, so the seconds add up to one core's work.
"""

import argparse
import collections
import tempfile
import time
from pathlib import Path

import numpy as np

from measure import ROOT, save_report

import sys
sys.path.insert(0, str(ROOT))
from recpipe import merge, raw as rawfiles  # noqa: E402
from recpipe.cleaning import (clean_action_rows, clean_impressions, typed_actions,  # noqa: E402
                              typed_impressions)
from recpipe.raw import SOURCES, list_source_files  # noqa: E402

PHASES = ("read", "decode", "validate", "build", "write")


class Clock:
    def __init__(self):
        self.seconds = collections.Counter()
        self.last = time.perf_counter()

    def lap(self, phase):
        now = time.perf_counter()
        self.seconds[phase] += now - self.last
        self.last = now


def clean(path, source, index, out, clock):
    data = rawfiles._read_whole(path)
    clock.lap("read")
    fmt = rawfiles.file_format(path)
    original = rawfiles._file_chunks
    rawfiles._file_chunks = lambda _: rawfiles._chunks_of(data)  # read_block reads no more: the decode phase is decoding only
    try:
        block = rawfiles.read_block(path, source)
    finally:
        rawfiles._file_chunks = original
    clock.lap("decode" if fmt != ".parquet" else "read")
    if source == "impressions":
        plain, shown = typed_impressions(block.table, block.rows)
        rest = merge._rest(block, plain)
        shown_rest, rankings, items = clean_impressions(rest, path)
        clock.lap("validate")
        shown = merge._in_row_order(shown, shown_rest)
        days = list(shown.groupby("dt", sort=True))
        clock.lap("build")
        for day, of_day in days:
            merge.write_table(of_day, out / "impressions" / str(day) / f"{index:05d}.parquet",
                              merge.SCRATCH_IMPRESSIONS)
    else:
        plain, actions, rows = typed_actions(block.table, block.rows, source)
        rest = merge._rest(block, plain)
        actions_rest, rows_rest, set_aside = clean_action_rows(rest, source, path)
        clock.lap("validate")
        order = np.argsort(np.concatenate([rows, rows_rest]), kind="stable")
        import pandas as pd
        actions = pd.concat([actions, actions_rest], ignore_index=True).take(order).reset_index(drop=True)
        clock.lap("build")
        merge.write_table(actions, out / "actions" / f"{source}-{index:05d}.parquet", merge.schemas.ACTIONS)
    clock.lap("write")
    return block.rows_in


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/recpipe-bench", help="holds raw/, as bench_merge_and_clean.py made it")
    args = parser.parse_args()
    raw = Path(args.work) / "raw"
    clock, rows = Clock(), collections.Counter()
    with tempfile.TemporaryDirectory() as out:
        for source in SOURCES:
            for index, path in enumerate(list_source_files(raw, source)):
                clock.last = time.perf_counter()
                rows[source] += clean(path, source, index, Path(out), clock)
    total = sum(clock.seconds.values())
    save_report("merge_profile", {
        "raw_rows": dict(rows),
        "seconds_one_core": round(total, 2),
        "phases": {phase: {"seconds": round(clock.seconds[phase], 2), "share": round(clock.seconds[phase] / total, 3)}
                   for phase in PHASES},
    })


if __name__ == "__main__":
    main()
