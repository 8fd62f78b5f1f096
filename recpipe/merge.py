"""merge_and_clean's work on the cluster: raw files -> merged/{impressions,actions,_quarantine}.

Two passes, both one task per unit of work:

1. one task per raw file reads, validates and cleans it, writes its canonical actions
   (`actions/<source>-<file>.parquet`, plus a copy cut by customer bucket into a
   scratch folder) or its shown items cut by day into the scratch folder, and its
   quarantined rows (`_quarantine/<source>/part-<file>.parquet`);
2. one task per impression day gathers that day's pieces in the raw files' order,
   drops exact duplicate shown items (they may sit in different files), labels the
   split and writes `impressions/part-<day>.parquet`; one task per customer bucket
   counts the exact duplicate actions (kept, but reported).

Passing rows through disk, cut by day or bucket, is the shuffle: no worker ever
holds more than one raw file, one day or one bucket.
"""

import collections
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from recpipe import schemas
from recpipe.cleaning import (ACTION_SOURCES, clean_actions, clean_impressions, exact_duplicate_actions,
                              drop_duplicate_impressions, split_days)
from recpipe.cli import UserError
from recpipe.cluster import wait_with_progress
from recpipe.raw import SOURCES, read_rows
from recpipe.stage import write_table

# Shown items between the two passes: the final table without `split`, plus the ranking's row.
SCRATCH_IMPRESSIONS = schemas.IMPRESSIONS.remove(schemas.IMPRESSIONS.get_field_index("split")).append(
    pa.field("row", pa.int64()))


def merge_and_clean(client, raw_files, out_dir, test_days, val_days, train_days):
    """Run both passes into `out_dir` (a staging folder); return (accounting, impression days, extra fields)."""
    out_dir = Path(out_dir)
    scratch = out_dir / "_scratch"
    action_files = sum(len(raw_files[source]) for source in ACTION_SOURCES)
    buckets = min(64, max(1, action_files // 8))  # few enough that bucket pieces are not tiny
    futures = [
        client.submit(clean_file, str(path), source, index, str(out_dir), buckets,
                      key=f"clean-{source}-{index}", pure=False)
        for source in SOURCES
        for index, path in enumerate(raw_files[source])
    ]
    reports = wait_with_progress(futures, "cleaning raw files")
    by_source = collections.defaultdict(list)
    for report in reports:
        by_source[report["source"]].append(report)
    for source in SOURCES:
        if sum(report["rows_in"] for report in by_source[source]) == 0:
            files = ", ".join(report["file"] for report in by_source[source])
            raise UserError(f"raw source {source}/ holds no rows (files: {files}); it needs data")

    days = sorted({day for report in by_source["impressions"] for day in report["days"]})
    splits = split_days(days, test_days, val_days, train_days)
    futures = [
        client.submit(finish_impression_day, str(scratch / "impressions" / day.isoformat()), day.isoformat(),
                      splits[day], str(out_dir), key=f"impressions-{day}", pure=False)
        for day in days
    ]
    day_reports = wait_with_progress(futures, "deduplicating impressions by day")
    futures = [client.submit(count_exact_duplicate_actions, str(bucket_dir), key=f"duplicates-{bucket_dir.name}",
                             pure=False)
               for bucket_dir in sorted((scratch / "actions").glob("*"))]
    exact_duplicates = _sum_counters(wait_with_progress(futures, "counting exact duplicate actions"))
    if scratch.exists():  # absent when every row was set aside
        shutil.rmtree(scratch)
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


def clean_file(path, source, index, out_dir, buckets):
    """Pass 1 for one raw file (runs on a worker). Returns its accounting."""
    out_dir = Path(out_dir)
    rows = read_rows(path, source)
    report = {"source": source, "file": path, "rows_in": len(rows.frame), "extra_fields": rows.extra_fields}
    if source == "impressions":
        shown, rankings_set_aside, items_set_aside = clean_impressions(rows.frame, path)
        report["days"] = sorted(set(shown["dt"]))
        for day, of_day in shown.groupby("dt", sort=True):
            write_table(of_day, out_dir / "_scratch" / "impressions" / day.isoformat() / f"{index:05d}.parquet",
                        SCRATCH_IMPRESSIONS)
        report["kept"] = len(rows.frame) - len(rankings_set_aside)
        report["shown_items_in"] = len(shown) + len(items_set_aside)
        report["set_aside"] = dict(collections.Counter(rankings_set_aside["reason"]))
        report["shown_items_set_aside"] = dict(collections.Counter(items_set_aside["reason"]))
        set_aside = pd.concat([rankings_set_aside, items_set_aside], ignore_index=True)
        set_aside = set_aside.sort_values("row", kind="stable")
    else:
        actions, set_aside = clean_actions(rows.frame, source, path)
        if len(actions):
            name = f"{source}-{index:05d}.parquet"
            write_table(actions, out_dir / "actions" / name, schemas.ACTIONS)
            for bucket, of_bucket in actions.groupby(actions["customer_id"] % buckets, sort=True):
                write_table(of_bucket, out_dir / "_scratch" / "actions" / f"{bucket:03d}" / name, schemas.ACTIONS)
        report["kept"] = len(actions)
        report["set_aside"] = dict(collections.Counter(set_aside["reason"]))
    if len(set_aside):
        write_table(set_aside, out_dir / "_quarantine" / source / f"part-{index:05d}.parquet", schemas.QUARANTINE)
    return report


def finish_impression_day(pieces_dir, day, split, out_dir):
    """Pass 2 for one impression day (runs on a worker): dedupe in raw order, label the split, write."""
    # Piece names are the raw files' zero-padded indexes: sorted, they are in raw order.
    pieces = sorted(Path(pieces_dir).glob("*.parquet"))
    shown = pa.concat_tables([pq.read_table(piece, schema=SCRATCH_IMPRESSIONS) for piece in pieces]).to_pandas()
    shown, duplicates = drop_duplicate_impressions(shown)
    shown["split"] = split
    write_table(shown.drop(columns="row"), Path(out_dir) / "impressions" / f"part-{day}.parquet", schemas.IMPRESSIONS)
    return {"day": day, "split": split, "kept": len(shown), "duplicates_dropped": duplicates}


def count_exact_duplicate_actions(bucket_dir):
    """Exact repeats among one customer bucket's actions, {action_type: count} (runs on a worker)."""
    actions = pq.read_table(bucket_dir, schema=schemas.ACTIONS).to_pandas()
    repeats = actions[exact_duplicate_actions(actions)]
    return {int(action_type): int(n) for action_type, n in repeats.groupby("action_type").size().items()}


def _sum_counters(counters):
    total = collections.Counter()
    for counter in counters:
        total.update(counter)
    return dict(sorted(total.items()))
