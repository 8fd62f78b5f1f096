"""merge_and_clean's work on the cluster: raw files -> merged/{impressions,actions,_quarantine}.

Two passes, both one task per unit of work:

1. one task per group of consecutive small raw files of one source (about GROUP_BYTES on disk,
   see `plan_tasks`), per large file, or per byte range of a large one (see `split_large_files`)
   reads its files as one text where it can (raw.read_files), validates and cleans them a block at
   a time, and writes their canonical actions (`actions/<source>-<first file>.parquet`) or their
   shown items cut by day into a scratch folder, and their
   quarantined rows (`_quarantine/<source>/part-<first file>.parquet`), each file's rows in raw
   order; it accounts for every file on its own;
2. one task per impression day gathers that day's pieces in the raw files' order,
   drops exact duplicate shown items (they may sit in different files), labels the
   split and writes `impressions/part-<day>.parquet`.

Passing rows through disk, cut by day, is the shuffle: no worker ever holds more than a
block of raw text and the cleaned rows of about one, or one day.

Exact duplicate actions are kept (repeated actions are signal) and counted by repartition.py,
whose sort by customer puts them side by side: counting them here took a second copy of every
action cut by customer and a pass over it, a tenth of this stage at 100 M actions.
"""

import collections
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
from distributed import get_worker

from recpipe import cluster, schemas, stage, stages, storage, summary, tables
from recpipe.cleaning import (clean_action_rows, clean_impressions,
                              drop_duplicate_impressions, split_days, typed_actions, typed_impressions)
from recpipe.cli import UserError
from recpipe.cluster import task_key, wait_with_progress
from recpipe.raw import (BLOCK_BYTES, BLOCK_ROWS, ROW_KEY_BITS, SOURCES, byte_ranges, can_split, count_rows,
                         file_format, list_raw_files, read_blocks, read_files, read_rows, split_row_keys)
from recpipe.tables import write_table

# Scratch files live for one run and are read once: compressing and describing them cost a fifth of
# the first pass's writing, and saved nothing.
SCRATCH_OPTIONS = {"compression": "none", "use_dictionary": False, "write_statistics": False}

# Shown items between the two passes: the final table without `split`, plus the ranking's row.
SCRATCH_IMPRESSIONS = schemas.IMPRESSIONS.remove(schemas.IMPRESSIONS.get_field_index("split")).append(
    pa.field("row", pa.int64()))


# Uncompressed JSON Lines and CSV files larger than this are read by several tasks, a range of about
# this many bytes each, so that one large file keeps every worker busy.
SPLIT_BYTES = 32 * 2**20

# Consecutive smaller files of one source are read by one task, up to about this many bytes on disk
# (a compressed file by its compressed size), and write one merged file (or a scratch file per
# impression day) and one quarantine file between them: a landing zone of a file per source and hour
# then costs what its bytes cost, not a task and small Parquet files each.
# Smaller than SPLIT_BYTES so that a few hundred MiB still make enough tasks to share among the
# workers: on docs/benchmarks.md's 155 MiB in 118 files, 8 MiB made 23 tasks, cleaned in 6.1-6.6 s
# on 2 workers, against 7.8-8.7 s for 32 MiB (8 tasks, the last ones alone) and 7.0-7.2 s a file a task.
GROUP_BYTES = 8 * 2**20


@dataclass(frozen=True)
class Part:
    """A byte range of a raw file read by one task: its `number` in the file, the lines that start in
    [start, end), the row number of the first, and the file's header line (CSV)."""

    number: int
    start: int
    end: int
    first_row: int
    header: bytes = None


def run_stage(args):
    """merge_and_clean.py: publish merged/ from the raw files under args.raw (see stages.STAGES)."""
    this = stages.BY_NAME["merged"]
    raw_files = list_raw_files(args.raw)
    inputs = [stage.raw_input(args.raw, [path for files in raw_files.values() for path in files])]

    # Cleaning is mostly Arrow, gzip (ISA-L) and NumPy: on 173 MiB of raw files (5.5 M actions) threads took 10.1-11.4 s
    # against 11.0-12.8 s with worker processes, run alternately.
    threads = cluster.in_process_reason(args, inputs[0]["bytes"], args.raw)
    with stage.publish(args.data, this.name, this.asked(args), inputs) as run, cluster.connect(args, threads) as client:
        accounting, impression_days, extra_fields = merge_and_clean(
            client, raw_files, run.path, args.test_days, args.val_days, args.train_days)
        for source, fields in extra_fields.items():
            if fields:
                print(f"ignored unknown fields of {source}: {', '.join(fields)}")
        run.accounting = accounting
        run.extra["impression_days"] = impression_days

    summary.print_summary(run.published)
    published = stage.content_dir(storage.path(args.data) / this.name, run.published)
    print(f"rows set aside are in {published / '_quarantine'}/")


def merge_and_clean(client, raw_files, out_dir, test_days, val_days, train_days, split_bytes=SPLIT_BYTES,
                    line_by_line=False, group_bytes=GROUP_BYTES):
    """Run both passes into `out_dir` (a staging folder); return (accounting, impression days, extra fields).

    `line_by_line` reads every row the reference way, and every file whole (see clean_file); the files
    are grouped into tasks as they are otherwise, so that both ways write the same files.
    """
    out_dir = storage.path(out_dir)
    scratch = out_dir / "_scratch"
    sizes = _file_sizes(raw_files)
    parts = {} if line_by_line else split_large_files(client, raw_files, sizes, split_bytes)
    tasks = plan_tasks(raw_files, sizes, parts, group_bytes)
    futures = [
        client.submit(clean_files, [str(raw_files[source][index]) for index in indexes], source, indexes[0],
                      str(out_dir), line_by_line, part,
                      key=task_key(f"clean-{source}-{indexes[0]}" + ("" if part is None else f"-{part.number}")),
                      pure=False)
        for source, indexes, part in tasks
    ]
    raw_count = sum(map(len, raw_files.values()))
    if len(tasks) < raw_count:
        print(f"cleaning {raw_count:,} raw files in {len(tasks):,} tasks", flush=True)
    results = wait_with_progress(futures, "cleaning raw files")
    reports = [report for result in results for report in result["reports"]]
    if parts:
        workers = {report["worker"] for report in reports if "part" in report}
        print(f"the {sum(map(len, parts.values()))} ranges were read by {len(workers)} "
              f"worker{'s' if len(workers) > 1 else ''}", flush=True)
    by_source = collections.defaultdict(list)
    for report in reports:
        by_source[report["source"]].append(report)
    for source in SOURCES:
        if sum(report["rows_in"] for report in by_source[source]) == 0:
            files = ", ".join(report["file"] for report in by_source[source])
            raise UserError(f"raw source {source}/ holds no rows (files: {files}); it needs data")

    files_by_day = collections.defaultdict(list)  # for the split's refusal to name the files of a lone day
    for report in by_source["impressions"]:
        for day in report["days"]:
            files_by_day[day].append(str(report["file"]))
    days = sorted(files_by_day)
    splits = split_days(days, test_days, val_days, train_days, files_by_day)
    day_futures = [
        client.submit(finish_impression_day, str(scratch / "impressions" / day.isoformat()), day.isoformat(),
                      splits[day], str(out_dir), key=task_key(f"impressions-{day}"), pure=False)
        for day in days
    ]
    day_reports = wait_with_progress(day_futures, "deduplicating impressions by day")
    storage.remove_tree(scratch)  # absent when every row was set aside
    accounting = {}
    for source in SOURCES:
        reports = by_source[source]
        set_aside = _sum_counters(report["set_aside"] for report in reports)
        if source == "impressions":
            accounting["impressions.rankings"] = {
                "rows_in": sum(r["rows_in"] for r in reports), "kept": sum(r["kept"] for r in reports),
                "set_aside": set_aside,
            }
            accounting["impressions.shown_items"] = {
                "rows_in": sum(r["shown_items_in"] for r in reports),
                "kept": sum(r["kept"] for r in day_reports),
                "set_aside": _sum_counters(r["shown_items_set_aside"] for r in reports),
                "duplicates_dropped": sum(r["duplicates_dropped"] for r in day_reports),
            }
        else:
            accounting[source] = {
                "rows_in": sum(r["rows_in"] for r in reports), "kept": sum(r["kept"] for r in reports),
                "set_aside": set_aside, "duplicates_dropped": 0,
            }
    impression_days = {r["day"]: {"split": r["split"], "shown_items": r["kept"]} for r in day_reports}
    extra_fields = {source: set() for source in SOURCES}
    for (source, _, _), result in zip(tasks, results):
        extra_fields[source] |= set(result["extra_fields"])
    extra_fields = {source: sorted(fields) for source, fields in extra_fields.items()}
    return accounting, impression_days, extra_fields


def _file_sizes(raw_files):
    """{path: its size on disk} of every raw file: one listing per source in object storage."""
    sizes = {}
    for files in raw_files.values():
        if files:
            stats = storage.stats(files, storage.path(files[0]).parent)
            sizes.update({file: size for file, (size, _) in stats.items()})
    return sizes


def plan_tasks(raw_files, sizes, parts, group_bytes):
    """[(source, the indexes of its files, Part or None)]: the tasks of pass 1, in raw order.

    A file read in byte ranges is a task per range; the other files of a source are taken in raw order
    into groups of consecutive files of at most about `group_bytes` on disk, a larger file a group of
    its own. A group's outputs are named after its first file: sorted, they are in raw order still.
    """
    tasks = []
    for source in SOURCES:
        group, group_size = [], 0
        for index, path in enumerate(raw_files[source]):
            if (source, index) in parts or (group and group_size + sizes[path] > group_bytes):
                if group:
                    tasks.append((source, group, None))
                group, group_size = [], 0
            if (source, index) in parts:
                tasks += [(source, [index], part) for part in parts[(source, index)]]
            else:
                group.append(index)
                group_size += sizes[path]
        if group:
            tasks.append((source, group, None))
    return tasks


def split_large_files(client, raw_files, sizes, split_bytes):
    """{(source, index): [Part, ...]} for the raw files read in byte ranges (none for the others)."""
    counted = {}
    for source in SOURCES:
        for index, path in enumerate(raw_files[source]):
            if can_split(path) and sizes[path] > split_bytes:
                counted[(source, index)] = [
                    (start, end, client.submit(count_rows, str(path), start, end, pure=False))
                    for start, end in byte_ranges(sizes[path], split_bytes)]
    if not counted:
        return {}
    counts = wait_with_progress([future for ranges in counted.values() for _, _, future in ranges],
                                "counting the lines of large files")
    counts = iter(counts)
    parts = {}
    for (source, index), ranges in counted.items():
        path = raw_files[source][index]
        file_counts = [next(counts) for _ in ranges]
        header = file_counts[0]["first_line"]
        is_csv = file_format(path) == ".csv"
        if is_csv and (any(count["quote"] or count["cr"] for count in file_counts)
                       or not header.strip() or header[:1].isspace()):
            continue  # a quoted value may hold a line end, and blank lines may precede the header: read it whole
        before = 0
        parts[(source, index)] = []
        for number, ((start, end, _), count) in enumerate(zip(ranges, file_counts)):
            parts[(source, index)].append(Part(number, start, end, before + 1, header if is_csv and number else None))
            before += count["rows" if is_csv else "lines"]
    if parts:
        print(f"reading {len(parts)} large file{'s' if len(parts) > 1 else ''} in "
              f"{sum(map(len, parts.values()))} ranges of {split_bytes / 2**20:g} MiB", flush=True)
    return parts


def clean_file(path, source, index, out_dir, line_by_line=False, part=None, block_bytes=BLOCK_BYTES):
    """Pass 1 for one raw file, or one Part of it (runs on a worker): clean_files of that file alone; returns
    its accounting, with its unknown fields."""
    result = clean_files([path], source, index, out_dir, line_by_line, part, block_bytes)
    report, = result["reports"]
    report["extra_fields"] = set(result["extra_fields"])
    return report


def clean_files(paths, source, index, out_dir, line_by_line=False, part=None, block_bytes=BLOCK_BYTES):
    """Pass 1 for consecutive raw files of one source, the first numbered `index`, or for one Part of one file
    (runs on a worker). Returns {"reports": each file's accounting, in order, "extra_fields": the unknown
    fields they hold}.

    The files are read as one text where they can be (raw.read_files: a block of at most about `block_bytes`
    of text at a time, however many files it holds), cleaned a block at a time, and their cleaned rows
    written, in raw order, after each block that is not the last once the rows of about a block of text
    are waiting, and at the end: so a task holds at most about a block of text and the cleaned rows of
    about one, whatever its files hold. Its output is one piece (named `index`, a Part's `index.part`),
    or a piece per write, numbered after it in the same order: a lone file writes a piece per block, as
    read_blocks cuts it. Each row keeps its file and its row number in that file (in the quarantine, and
    in each file's accounting). `line_by_line` reads every row the reference way (raw.read_rows), a file
    at a time, instead of Arrow's blocks first; the output is the same, which a test checks.
    """
    out_dir = storage.path(out_dir)
    name = f"{index:05d}" if part is None else f"{index:05d}.{part.number:05d}"  # sorted, in raw order
    pending = _Pending(source, out_dir, name)
    accounts = _Accounts(source, paths)
    files = np.array(paths, dtype=object)
    extra = set()
    for row_keys, extra_fields, text_bytes, cleaned, last in _clean_blocks(paths, source, line_by_line, part,
                                                                           block_bytes):
        extra |= extra_fields
        accounts.add(row_keys, cleaned)
        if source == "impressions":
            shown, rankings_set_aside, items_set_aside = cleaned
            # Empty frames left out: an empty column's type must not change a piece's columns' types.
            set_aside = pd.concat([frame for frame in (rankings_set_aside, items_set_aside) if len(frame)]
                                  or [rankings_set_aside], ignore_index=True)
            set_aside = set_aside.sort_values("row", kind="stable", ignore_index=True)  # keys: file, then row
            shown["row"] = split_row_keys(shown["row"].to_numpy())[1]
            kept = shown
        else:
            kept, _, set_aside = cleaned
        file_of, set_aside["row"] = split_row_keys(set_aside["row"].to_numpy())
        set_aside["source_file"] = files[file_of]
        pending.add(kept, set_aside, len(row_keys), text_bytes)
        if not last and pending.full(block_bytes):
            pending.write(more=True)
    pending.write(more=False)
    reports = accounts.reports()
    if part is not None:
        reports[0]["part"], reports[0]["worker"] = part.number, _worker_address()
    return {"reports": reports, "extra_fields": sorted(extra)}


class _Accounts:
    """Each file's accounting of a task's files, counted a block at a time from the rows' keys."""

    def __init__(self, source, paths):
        self.source, self.paths = source, paths
        n = len(paths)
        self.rows_in, self.kept = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        self.shown_items_in = np.zeros(n, dtype=np.int64)
        self.set_aside = [collections.Counter() for _ in paths]
        self.items_set_aside = [collections.Counter() for _ in paths]
        self.days = [set() for _ in paths]

    def _count(self, keys):
        return np.bincount(split_row_keys(keys)[0], minlength=len(self.paths))

    def add(self, row_keys, cleaned):
        self.rows_in += self._count(row_keys)
        if self.source == "impressions":
            shown, rankings_set_aside, items_set_aside = cleaned
            self.kept += self._count(row_keys) - self._count(rankings_set_aside["row"].to_numpy())
            self.shown_items_in += self._count(shown["row"].to_numpy()) + self._count(items_set_aside["row"].to_numpy())
            _count_reasons(self.set_aside, rankings_set_aside)
            _count_reasons(self.items_set_aside, items_set_aside)
            days = pd.DataFrame({"file": split_row_keys(shown["row"].to_numpy())[0], "dt": shown["dt"]})
            for file, day in days.drop_duplicates().itertuples(index=False):  # a step per file and day
                self.days[file].add(day)
        else:
            _, kept_keys, set_aside = cleaned
            self.kept += self._count(kept_keys)
            _count_reasons(self.set_aside, set_aside)

    def reports(self):
        reports = []
        for number, path in enumerate(self.paths):
            report = {"source": self.source, "file": path, "rows_in": int(self.rows_in[number]),
                      "kept": int(self.kept[number]), "set_aside": dict(self.set_aside[number])}
            if self.source == "impressions":
                report["days"], report["shown_items_in"] = sorted(self.days[number]), int(self.shown_items_in[number])
                report["shown_items_set_aside"] = dict(self.items_set_aside[number])
            reports.append(report)
        return reports


def _count_reasons(counters, set_aside):
    """Add set-aside rows (row keys) to each file's {reason: rows}, in the order the reasons first occur
    (counted in pandas: a file of a million malformed lines is no million Python steps)."""
    if not len(set_aside):
        return
    counts = pd.DataFrame({"file": split_row_keys(set_aside["row"].to_numpy())[0], "reason": set_aside["reason"]}
                          ).groupby(["file", "reason"], sort=False).size()
    for (file, reason), n in counts.items():  # a step per file and reason
        counters[file][str(reason)] += int(n)


class _Pending:
    """A task's cleaned rows not yet written: its files' kept rows and set-aside rows, in raw order."""

    def __init__(self, source, out_dir, name):
        self.source, self.out_dir, self.name = source, out_dir, name
        self.kept, self.set_aside, self.rows, self.text_bytes = [], [], 0, 0
        self.written = 0

    def add(self, kept, set_aside, rows_in, text_bytes):
        if len(kept):
            self.kept.append(kept)
        if len(set_aside):
            self.set_aside.append(set_aside)
        self.rows += rows_in
        self.text_bytes += text_bytes

    def full(self, block_bytes):
        return self.text_bytes >= (block_bytes or float("inf")) or self.rows >= BLOCK_ROWS

    def write(self, more):
        """Write what is pending as the next piece; `more`: whether pieces may follow (it is numbered)."""
        if not more and not self.kept and not self.set_aside:
            return
        piece = f"{self.name}-{self.written:05d}" if more or self.written else self.name
        self.written += 1
        out_dir, source = self.out_dir, self.source
        if self.kept:
            kept = self.kept[0] if len(self.kept) == 1 else pd.concat(self.kept, ignore_index=True)
            if source == "impressions":
                for day, of_day in kept.groupby("dt", sort=True):
                    _write(of_day, out_dir / "_scratch" / "impressions" / day.isoformat() / f"{piece}.parquet",
                           SCRATCH_IMPRESSIONS, **SCRATCH_OPTIONS)
            else:
                _write(kept, out_dir / "actions" / f"{source}-{piece}.parquet", schemas.ACTIONS)
        if self.set_aside:
            set_aside = self.set_aside[0] if len(self.set_aside) == 1 else pd.concat(self.set_aside,
                                                                                      ignore_index=True)
            _write(set_aside, out_dir / "_quarantine" / source / f"part-{piece}.parquet", schemas.QUARANTINE)
        self.kept, self.set_aside, self.rows, self.text_bytes = [], [], 0, 0


def _table(frame, schema):
    """`frame` as an Arrow table of `schema`, each column one array: a piece's bytes must not depend on how
    many frames its rows came in (Parquet's dictionary gives up at a size checked between arrays)."""
    return pa.Table.from_pandas(frame, schema=schema, preserve_index=False).combine_chunks()


def _write(frame, path, schema, **options):
    tables.write(_table(frame, schema), path, **options)


def _worker_address():
    try:
        return get_worker().address
    except ValueError:  # not on a worker: called in-process
        return "this process"


def _clean_blocks(paths, source, line_by_line, part, block_bytes):
    """Yield (the keys of its rows, extra fields, bytes of text, cleaned, whether it is the last) for each block
    of a task's raw files, their rows numbered by row key (raw.split_row_keys): clean_impressions' result, or
    clean_action_rows'."""
    if line_by_line:
        for position, path in enumerate(paths):
            rows = read_rows(path, source)
            rows.frame["row"] += position << ROW_KEY_BITS
            if source == "impressions":
                cleaned = clean_impressions(rows.frame, path)
            else:
                cleaned = clean_action_rows(rows.frame, source, path)
            yield rows.frame["row"].to_numpy(), rows.extra_fields, rows.text_bytes, cleaned, position == len(paths) - 1
        return
    if part is None:
        blocks = read_files(paths, source, block_bytes=block_bytes)
    else:
        (path,) = paths
        blocks = read_blocks(path, source, part.start, part.end, part.first_row, part.header, block_bytes=block_bytes)
    for block, last in blocks:
        row_keys = np.concatenate([block.rows, block.rest["row"].to_numpy(dtype=np.int64)])
        yield row_keys, block.extra_fields, block.text_bytes, _clean_block(block, paths[0], source), last


def _clean_block(block, path, source):
    """clean_impressions' or clean_action_rows' result for a Block (its rows in row order); `path` names
    the rows' file in the quarantine until their keys name theirs."""
    if source == "impressions":
        plain, shown = typed_impressions(block.table, block.rows)
        shown_rest, rankings_set_aside, items_set_aside = clean_impressions(_rest(block, plain), path)
        return _in_row_order(shown, shown_rest), rankings_set_aside, items_set_aside
    plain, actions, rows = typed_actions(block.table, block.rows, source)
    actions_rest, rows_rest, set_aside = clean_action_rows(_rest(block, plain), source, path)
    rows = np.concatenate([rows, rows_rest])
    order = np.argsort(rows, kind="stable")
    actions = pd.concat([actions, actions_rest], ignore_index=True).take(order).reset_index(drop=True)
    return actions, rows[order], set_aside


def _rest(block, plain):
    """RawRows frame of every row of `block` the typed rules did not take, in row order."""
    return pd.concat([block.rest, block.as_rows(~plain)], ignore_index=True).sort_values(
        "row", kind="stable", ignore_index=True)


def _in_row_order(shown, shown_rest):
    shown = pd.concat([shown, shown_rest], ignore_index=True)
    return shown.take(np.argsort(shown["row"].to_numpy(), kind="stable")).reset_index(drop=True)


def finish_impression_day(pieces_dir, day, split, out_dir):
    """Pass 2 for one impression day (runs on a worker): dedupe in raw order, label the split, write."""
    # Piece names are the raw files' zero-padded indexes: sorted, they are in raw order.
    pieces = sorted(storage.path(pieces_dir).glob("*.parquet"))
    shown = pa.concat_tables([tables.read(piece, schema=SCRATCH_IMPRESSIONS) for piece in pieces]).to_pandas()
    shown, duplicates = drop_duplicate_impressions(shown)
    shown["split"] = split
    write_table(shown.drop(columns="row"), storage.path(out_dir) / "impressions" / f"part-{day}.parquet", schemas.IMPRESSIONS)
    return {"day": day, "split": split, "kept": len(shown), "duplicates_dropped": duplicates}


def _sum_counters(counters):
    total = collections.Counter()
    for counter in counters:
        total.update(counter)
    return dict(sorted(total.items()))
