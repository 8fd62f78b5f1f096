"""merge_and_clean's work on the cluster: raw files -> merged/{impressions,actions,_quarantine}.

Two passes, both one task per unit of work:

1. one task per raw file (or per byte range of a large one, see `split_large_files`)
   reads, validates and cleans it, writes its canonical actions
   (`actions/<source>-<file>.parquet`, plus a copy with a row group per customer bucket
   into a scratch folder) or its shown items cut by day into the scratch folder, and its
   quarantined rows (`_quarantine/<source>/part-<file>.parquet`);
2. one task per impression day gathers that day's pieces in the raw files' order,
   drops exact duplicate shown items (they may sit in different files), labels the
   split and writes `impressions/part-<day>.parquet`; one task per customer bucket
   counts the exact duplicate actions (kept, but reported).

Passing rows through disk, cut by day or bucket, is the shuffle: no worker ever
holds more than one raw file, one day or one bucket.
"""

import collections
import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
from distributed import get_worker

from recpipe import cluster, schemas, stage, stages, storage, summary, tables
from recpipe.cleaning import (ACTION_SOURCES, clean_action_rows, clean_actions, clean_impressions,
                              drop_duplicate_impressions, exact_duplicate_actions, split_days, typed_actions,
                              typed_impressions)
from recpipe.cli import UserError
from recpipe.cluster import task_key, wait_with_progress
from recpipe.raw import (BLOCK_BYTES, SOURCES, byte_ranges, can_split, count_rows, file_format, list_raw_files,
                         read_blocks, read_rows)
from recpipe.tables import write_table

# Scratch files live for one run and are read once: compressing and describing them cost a fifth of
# the first pass's writing, and saved nothing.
SCRATCH_OPTIONS = {"compression": "none", "use_dictionary": False, "write_statistics": False}

# The key of a scratch action file's metadata that names the customer bucket of each of its row groups.
BUCKETS_KEY = "recpipe.buckets"

# Shown items between the two passes: the final table without `split`, plus the ranking's row.
SCRATCH_IMPRESSIONS = schemas.IMPRESSIONS.remove(schemas.IMPRESSIONS.get_field_index("split")).append(
    pa.field("row", pa.int64()))


# Uncompressed JSON Lines and CSV files larger than this are read by several tasks, a range of about
# this many bytes each, so that one large file keeps every worker busy.
SPLIT_BYTES = 32 * 2**20


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

    with stage.publish(args.data, this.name, this.asked(args), inputs) as run, cluster.connect(args) as client:
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
                    line_by_line=False):
    """Run both passes into `out_dir` (a staging folder); return (accounting, impression days, extra fields).

    `line_by_line` reads every row the reference way, and every file whole (see clean_file).
    """
    out_dir = storage.path(out_dir)
    scratch = out_dir / "_scratch"
    action_files = sum(len(raw_files[source]) for source in ACTION_SOURCES)
    buckets = min(64, max(1, action_files // 8))  # few enough that bucket pieces are not tiny
    parts = {} if line_by_line else split_large_files(client, raw_files, split_bytes)
    futures = [
        client.submit(clean_file, str(path), source, index, str(out_dir), buckets, line_by_line, part,
                      key=task_key(f"clean-{source}-{index}" + ("" if part is None else f"-{part.number}")), pure=False)
        for source in SOURCES
        for index, path in enumerate(raw_files[source])
        for part in parts.get((source, index), [None])
    ]
    reports = wait_with_progress(futures, "cleaning raw files")
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
    # Both halves of pass 2 are submitted at once: the workers take the second's tasks as the first's run out.
    day_futures = [
        client.submit(finish_impression_day, str(scratch / "impressions" / day.isoformat()), day.isoformat(),
                      splits[day], str(out_dir), key=task_key(f"impressions-{day}"), pure=False)
        for day in days
    ]
    bucket_futures = [client.submit(count_exact_duplicate_actions, str(scratch / "actions"), bucket,
                                    key=task_key(f"duplicates-{bucket:03d}"), pure=False)
                      for bucket in sorted({bucket for report in reports for bucket in report.get("buckets", [])})]
    day_reports = wait_with_progress(day_futures, "deduplicating impressions by day")
    exact_duplicates = _sum_counters(wait_with_progress(bucket_futures, "counting exact duplicate actions"))
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
                "exact_duplicates_kept": exact_duplicates.get(ACTION_SOURCES[source][0], 0),
            }
    impression_days = {r["day"]: {"split": r["split"], "shown_items": r["kept"]} for r in day_reports}
    extra_fields = {source: sorted(set().union(*(r["extra_fields"] for r in by_source[source])))
                    for source in SOURCES}
    return accounting, impression_days, extra_fields


def split_large_files(client, raw_files, split_bytes):
    """{(source, index): [Part, ...]} for the raw files read in byte ranges (none for the others)."""
    counted = {}
    for source in SOURCES:
        for index, path in enumerate(raw_files[source]):
            if can_split(path) and path.stat().st_size > split_bytes:
                counted[(source, index)] = [
                    (start, end, client.submit(count_rows, str(path), start, end, pure=False))
                    for start, end in byte_ranges(path.stat().st_size, split_bytes)]
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


def clean_file(path, source, index, out_dir, buckets, line_by_line=False, part=None, block_bytes=BLOCK_BYTES):
    """Pass 1 for one raw file, or one Part of it (runs on a worker). Returns its accounting.

    The file is read, cleaned and written a block of at most about `block_bytes` of text at a time
    (raw.read_blocks), so that a task's memory is bounded by the block whatever the file holds; a file of
    more than one block writes a piece per block, named as a file's ranges are, in the same order.
    `line_by_line` reads every row the reference way (raw.read_rows), the file whole, instead of Arrow's
    blocks first; the output is the same, which a test checks.
    """
    out_dir = storage.path(out_dir)
    name = f"{index:05d}" if part is None else f"{index:05d}.{part.number:05d}"  # sorted, in raw order
    report = {"source": source, "file": path, "rows_in": 0, "extra_fields": set()}
    if part is not None:
        report["part"], report["worker"] = part.number, _worker_address()
    kept, shown_items_in, days, written_buckets = 0, 0, set(), set()
    set_aside_reasons, items_set_aside_reasons = collections.Counter(), collections.Counter()
    for number, (rows_in, extra_fields, cleaned, last) in enumerate(_clean_blocks(path, source, line_by_line,
                                                                                  part, block_bytes)):
        piece = name if number == 0 and last else f"{name}-{number:05d}"  # a file of one block: as before
        report["rows_in"] += rows_in
        report["extra_fields"] |= extra_fields
        if source == "impressions":
            shown, rankings_set_aside, items_set_aside = cleaned
            days |= set(shown["dt"])
            for day, of_day in shown.groupby("dt", sort=True):
                write_table(of_day, out_dir / "_scratch" / "impressions" / day.isoformat() / f"{piece}.parquet",
                            SCRATCH_IMPRESSIONS, **SCRATCH_OPTIONS)
            kept += rows_in - len(rankings_set_aside)
            shown_items_in += len(shown) + len(items_set_aside)
            set_aside_reasons.update(_reasons(rankings_set_aside))
            items_set_aside_reasons.update(_reasons(items_set_aside))
            set_aside = pd.concat([rankings_set_aside, items_set_aside], ignore_index=True)
            set_aside = set_aside.sort_values("row", kind="stable")
        else:
            actions, set_aside = cleaned
            if len(actions):
                write_table(actions, out_dir / "actions" / f"{source}-{piece}.parquet", schemas.ACTIONS)
                written_buckets |= set(_write_by_bucket(actions, buckets, out_dir / "_scratch" / "actions"
                                                        / f"{source}-{piece}.parquet"))
            kept += len(actions)
            set_aside_reasons.update(_reasons(set_aside))
        if len(set_aside):
            write_table(set_aside, out_dir / "_quarantine" / source / f"part-{piece}.parquet", schemas.QUARANTINE)
    report["kept"], report["set_aside"] = kept, dict(set_aside_reasons)
    if source == "impressions":
        report["days"], report["shown_items_in"] = sorted(days), shown_items_in
        report["shown_items_set_aside"] = dict(items_set_aside_reasons)
    elif written_buckets:
        report["buckets"] = sorted(written_buckets)
    return report


def _reasons(set_aside):
    """{reason: rows} of set-aside rows, in the order the reasons first occur (counted in pandas: a file
    of a million malformed lines is no million Python steps)."""
    counts = set_aside["reason"].value_counts(sort=False)
    return {str(reason): int(n) for reason, n in counts.items()}


def _worker_address():
    try:
        return get_worker().address
    except ValueError:  # not on a worker: called in-process
        return "this process"


def _clean_blocks(path, source, line_by_line, part, block_bytes):
    """Yield (rows in, extra fields, cleaned, whether it is the last) for each block of one raw file:
    clean_impressions' or clean_actions' result."""
    if line_by_line:
        rows = read_rows(path, source)
        if source == "impressions":
            yield len(rows.frame), rows.extra_fields, clean_impressions(rows.frame, path), True
        else:
            yield len(rows.frame), rows.extra_fields, clean_actions(rows.frame, source, path), True
        return
    blocks = read_blocks(path, source, block_bytes=block_bytes) if part is None else read_blocks(
        path, source, part.start, part.end, part.first_row, part.header, block_bytes=block_bytes)
    for block, last in blocks:
        yield block.rows_in, block.extra_fields, _clean_block(block, path, source), last


def _clean_block(block, path, source):
    if source == "impressions":
        plain, shown = typed_impressions(block.table, block.rows)
        shown_rest, rankings_set_aside, items_set_aside = clean_impressions(_rest(block, plain), path)
        return _in_row_order(shown, shown_rest), rankings_set_aside, items_set_aside
    plain, actions, rows = typed_actions(block.table, block.rows, source)
    actions_rest, rows_rest, set_aside = clean_action_rows(_rest(block, plain), source, path)
    order = np.argsort(np.concatenate([rows, rows_rest]), kind="stable")
    actions = pd.concat([actions, actions_rest], ignore_index=True).take(order).reset_index(drop=True)
    return actions, set_aside


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


def _write_by_bucket(actions, buckets, path):
    """Write `actions` to one file, a row group per customer bucket (named in the file's metadata); return
    the buckets written. One file per raw file, not one per bucket: opening and closing hundreds of small
    files cost more than cleaning their rows."""
    bucket_of = actions["customer_id"].to_numpy() % buckets
    order = np.argsort(bucket_of, kind="stable")
    table = pa.Table.from_pandas(actions.take(order), schema=schemas.ACTIONS, preserve_index=False)
    present, firsts = np.unique(bucket_of[order], return_index=True)
    bounds = [*firsts.tolist(), len(order)]
    with tables.writer(path, table.schema.with_metadata({BUCKETS_KEY: json.dumps(present.tolist())}),
                       **SCRATCH_OPTIONS) as writer:
        for first, last in zip(bounds[:-1], bounds[1:]):
            writer.write_table(table.slice(first, last - first), row_group_size=last - first)
    return present.tolist()


def count_exact_duplicate_actions(scratch_dir, bucket):
    """Exact repeats among one customer bucket's actions, {action_type: count} (runs on a worker)."""
    pieces = []
    for path in sorted(storage.path(scratch_dir).glob("*.parquet")):
        file = tables.parquet_file(path, whole=True)
        written = json.loads(file.schema_arrow.metadata[BUCKETS_KEY.encode()])
        if bucket in written:
            pieces.append(file.read_row_group(written.index(bucket)))
    actions = pa.concat_tables(pieces).to_pandas()
    repeats = actions[exact_duplicate_actions(actions)]
    return {int(action_type): int(n) for action_type, n in repeats.groupby("action_type").size().items()}


def _sum_counters(counters):
    total = collections.Counter()
    for counter in counters:
        total.update(counter)
    return dict(sorted(total.items()))
