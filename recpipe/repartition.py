"""repartition's work on the cluster: merged/ -> repartitioned/, bucketed by customer.

Both tables are cut into `buckets` by a stable hash of customer_id, so that the
history build later reads one bucket's actions and impressions together, without a
shuffle, and a worker's memory is bounded by one bucket:

    repartitioned/actions/bucket=NNNNN/part-*.parquet      sorted by customer_id, occurred_at
    repartitioned/impressions/bucket=NNNNN/part-*.parquet  sorted by dt, customer_id, ranking_id, position

Inside an impressions bucket the days are contiguous and ordered, so one day of one
bucket is a range of row groups that Parquet statistics on `dt` can skip to.

Two passes, the same shuffle through disk as merge_and_clean: one task per merged
file cuts it by bucket into one scratch file, a piece per bucket; one task per
(table, bucket) reads its pieces, sorts them with PyArrow and writes them with
tables.write_sized.
"""

import numpy as np
import pyarrow as pa

from recpipe import cluster, folders, schemas, stage, stages, storage, summary, tables
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

# Scratch pieces live for one run and are read once, each by one task: Arrow's own format (IPC) costs
# a fraction of Parquet's encoding and decoding, and LZ4 keeps the scratch folder near merged/'s size on
# disk (the impressions' strings, which Parquet stores as dictionaries, are six times larger raw).
SCRATCH_OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4")


def run_stage(args):
    """repartition.py: publish repartitioned/ from merged/ (see stages.STAGES)."""
    this = stages.BY_NAME["repartitioned"]
    parameters = {**this.asked(args), "bucket_hash": BUCKET_HASH}

    with stage.reading(args.data, this.reads) as merged, \
            stage.publish(args.data, this.name, parameters, [merged.entry()]) as run, \
            cluster.connect(args, cluster.in_process_reason(args, stage.table_bytes(merged.manifest), this.reads)) \
            as client:
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
    futures = [client.submit(cut_by_bucket, str(path), table, str(scratch / table / f"{path.stem}.arrow"), buckets,
                             key=task_key(f"cut-{table}-{path.stem}"), pure=False)
               for table, path in files]
    rows_in = {table: 0 for table in TABLES}
    pieces = {}  # (table, bucket): [(scratch file, start, length)], in the order of merged/'s files
    for (table, path), (rows, ranges) in zip(files, wait_with_progress(futures, "cutting merged files by customer bucket")):
        rows_in[table] += rows
        for bucket, where in ranges.items():
            pieces.setdefault((table, bucket), []).append((str(scratch / table / f"{path.stem}.arrow"), *where))

    futures = [client.submit(write_bucket, pieces[table, bucket], table, str(out_dir / table / bucket_name(bucket)),
                             row_group_mb, key=task_key(f"write-{table}-{bucket_name(bucket)}"), pure=False)
               for table, bucket in sorted(pieces)]
    rows_out = {table: 0 for table in TABLES}
    group_sizes = {table: [] for table in TABLES}
    for (table, _), (rows, sizes) in zip(sorted(pieces), wait_with_progress(futures, "sorting and writing buckets")):
        rows_out[table] += rows
        group_sizes[table] += sizes
    storage.remove_tree(scratch)  # absent when merged/ kept no rows (every raw row was set aside)
    return {table: {"rows_in": rows_in[table], "kept": rows_out[table]} for table in TABLES}, group_sizes


def cut_by_bucket(path, table, scratch_file, buckets):
    """Pass 1 for one merged file (runs on a worker): its rows cut by bucket into one scratch file, each
    bucket's rows an Arrow IPC stream of their own. Returns (rows, {bucket: (start, length) in the file}),
    so that pass 2 reads a bucket's piece with one ranged read, without a footer or an index.

    One file per merged file, not one per bucket: opening, closing and listing thousands of small files
    (and on object storage, a request for each) cost more than cutting their rows.
    """
    data = tables.read(path, schema=TABLES[table][0])
    if not data.num_rows:
        return 0, {}
    bucket = bucket_of(data.column("customer_id").to_numpy(), buckets)
    # Stable, so a bucket's rows keep their order; on 16-bit keys NumPy's stable sort is a radix sort.
    order = np.argsort(bucket.astype(np.uint16) if buckets <= 2**16 else bucket, kind="stable")
    data = data.take(pa.array(order))
    counts = np.bincount(bucket, minlength=buckets)
    sink, ranges, first = pa.BufferOutputStream(), {}, 0
    for number in np.flatnonzero(counts).tolist():
        start = sink.tell()
        with pa.ipc.new_stream(sink, data.schema, options=SCRATCH_OPTIONS) as writer:
            writer.write_table(data.slice(first, counts[number]))
        ranges[number] = (start, sink.tell() - start)
        first += counts[number]
    folders.make_parents(scratch_file)
    storage.path(scratch_file).write_bytes(sink.getvalue())
    return data.num_rows, ranges


def read_piece(scratch_file, start, length):
    """One bucket's rows of a scratch file (cut_by_bucket): one ranged read, local or in object storage."""
    if storage.is_url(scratch_file):
        where = storage.path(scratch_file)
        content = pa.py_buffer(where.fs.cat_file(where.path, start=start, end=start + length))
    else:
        with pa.OSFile(scratch_file) as file:
            content = file.read_at(length, start)
    return pa.ipc.open_stream(content).read_all()


def write_bucket(pieces, table, out_dir, row_group_mb):
    """Pass 2 for one bucket of one table (runs on a worker): gather, sort, write sized row groups."""
    schema, sort_keys = TABLES[table]
    # One chunk: PyArrow sorts a table of many chunks chunk by chunk and merges them, a third slower.
    data = pa.concat_tables([read_piece(*piece) for piece in pieces]).combine_chunks()
    data = data.sort_by(sort_keys)
    return data.num_rows, write_sized(data, out_dir, schema, row_group_mb)
