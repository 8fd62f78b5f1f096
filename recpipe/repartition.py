"""repartition's work on the cluster: merged/ -> repartitioned/, bucketed by customer.

Both tables are cut into `buckets` by a stable hash of customer_id, so that the
history build later reads one bucket's actions and impressions together, without a
shuffle, and a worker's memory is bounded by one bucket:

    repartitioned/actions/bucket=NNNNN/part-*.parquet      sorted by customer_id, occurred_at
    repartitioned/impressions/bucket=NNNNN/part-*.parquet  sorted by dt, customer_id, ranking_id, position

Inside an impressions bucket the days are contiguous and ordered, so one day of one
bucket is a range of row groups that Parquet statistics on `dt` can skip to.

Two passes, the same shuffle through disk as merge_and_clean: one task per merged
file cuts it by bucket into a scratch folder; one task per (table, bucket) gathers
its pieces, sorts them with PyArrow and writes them with tables.write_sized.
"""

import numpy as np
import pyarrow as pa

from recpipe import cluster, schemas, stage, stages, storage, summary, tables
from recpipe.cluster import task_key, wait_with_progress
from recpipe.tables import write_sized

TABLES = {
    "actions": (schemas.ACTIONS, [("customer_id", "ascending"), ("occurred_at", "ascending"),
                                  ("action_type", "ascending"), ("item_id", "ascending")]),
    "impressions": (schemas.IMPRESSIONS, [("dt", "ascending"), ("customer_id", "ascending"),
                                          ("ranking_id", "ascending"), ("position", "ascending"),
                                          ("item_id", "ascending")]),
}
BUCKET_HASH = "splitmix64(customer_id) % buckets"


def run_stage(args):
    """repartition.py: publish repartitioned/ from merged/ (see stages.STAGES)."""
    this = stages.BY_NAME["repartitioned"]
    parameters = {**this.asked(args), "bucket_hash": BUCKET_HASH}

    with stage.reading(args.data, this.reads) as merged, \
            stage.publish(args.data, this.name, parameters, [merged.entry()]) as run, \
            cluster.connect(args) as client:
        run.accounting, group_sizes = repartition(client, merged.path, run.path, args.buckets, args.row_group_mb)
        run.extra["row_group_mib_in_memory"] = {table: stage.size_stats(sizes)
                                                for table, sizes in group_sizes.items() if sizes}

    summary.print_summary(run.published)


def bucket_of(customer_ids, buckets):
    """The bucket of each customer: splitmix64's finalizer of the id, modulo `buckets`.

    A fixed integer mix, not Python's hash() (salted per process) nor a library's
    (free to change between versions): the same customer lands in the same bucket on
    every run, machine and version. Mixing first keeps buckets even when ids are
    sequential or share a stride.
    """
    mixed = splitmix64(np.asarray(customer_ids, dtype=np.int64).astype(np.uint64))
    return (mixed % np.uint64(buckets)).astype(np.int32)


def splitmix64(x):
    """splitmix64's finalizer on a uint64 array: a fixed, well-spread 64-bit mix."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def bucket_name(bucket):
    return f"bucket={bucket:05d}"


def repartition(client, merged_dir, out_dir, buckets, row_group_mb):
    """Run both passes into `out_dir` (a staging folder).

    Returns (accounting, {table: in-memory sizes in bytes of the row groups written}).
    """
    merged_dir, out_dir = storage.path(merged_dir), storage.path(out_dir)
    scratch = out_dir / "_scratch"
    files = [(table, path) for table in TABLES for path in sorted((merged_dir / table).glob("*.parquet"))]
    futures = [client.submit(cut_by_bucket, str(path), table, str(scratch), buckets,
                             key=task_key(f"cut-{table}-{path.stem}"), pure=False)
               for table, path in files]
    rows_in = {table: 0 for table in TABLES}
    for (table, _), rows in zip(files, wait_with_progress(futures, "cutting merged files by customer bucket")):
        rows_in[table] += rows

    futures = [client.submit(write_bucket, str(pieces), table, str(out_dir / table / pieces.name), row_group_mb,
                             key=task_key(f"write-{table}-{pieces.name}"), pure=False)
               for table in TABLES for pieces in sorted((scratch / table).glob("bucket=*"))]
    rows_out = {table: 0 for table in TABLES}
    group_sizes = {table: [] for table in TABLES}
    for future, (rows, sizes) in zip(futures, wait_with_progress(futures, "sorting and writing buckets")):
        table = future.key.split("-")[1]
        rows_out[table] += rows
        group_sizes[table] += sizes
    storage.remove_tree(scratch)  # absent when merged/ kept no rows (every raw row was set aside)
    return {table: {"rows_in": rows_in[table], "kept": rows_out[table]} for table in TABLES}, group_sizes


def cut_by_bucket(path, table, scratch, buckets):
    """Pass 1 for one merged file (runs on a worker): its rows, cut by bucket into scratch/<table>/bucket=N/."""
    data = tables.read(path, schema=TABLES[table][0])
    bucket = bucket_of(data.column("customer_id").to_numpy(), buckets)
    order = np.argsort(bucket, kind="stable")
    data = data.take(pa.array(order))
    counts = np.bincount(bucket, minlength=buckets)
    start = 0
    for number, count in enumerate(counts):
        if count:
            tables.write(data.slice(start, count),
                         storage.path(scratch) / table / bucket_name(number) / f"{storage.path(path).stem}.parquet")
            start += count
    return data.num_rows


def write_bucket(pieces_dir, table, out_dir, row_group_mb):
    """Pass 2 for one bucket of one table (runs on a worker): gather, sort, write sized row groups."""
    schema, sort_keys = TABLES[table]
    pieces = sorted(storage.path(pieces_dir).glob("*.parquet"))
    data = pa.concat_tables([tables.read(piece, schema=schema) for piece in pieces])
    data = data.sort_by(sort_keys)
    return data.num_rows, write_sized(data, out_dir, schema, row_group_mb)
