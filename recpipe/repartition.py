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

Sorted, an action that repeats an earlier one exactly (the same customer, item, action type
and time) follows it: the stage counts those repeats per source here (`exact_duplicate_actions`,
in its summary and manifest). They are kept: repeated actions are signal.

Without --buckets the stage derives their number (choose_buckets) and records it as its parameter,
with the reason beside it (`buckets_chosen`).
"""

import math

import numpy as np
import pyarrow as pa

from recpipe import cluster, folders, schemas, stage, stages, storage, summary, tables
from recpipe.cli import UserError
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


# choose_buckets: a bucket's tables take at most this share of a worker thread's memory. preprocess.py's
# largest worker holds about 0.25 GiB + 0.4 GiB per million actions in its bucket (docs/cluster.md), where
# the bucket's tables take 0.094 GiB per million actions: some 4.5 times the tables; and a worker wants four
# times its largest task (Dask spills at 60% of its limit and pauses at 80%). 4.5 x 4, and the 0.25 GiB: 20.
BUCKET_SHARE = 20
BUCKETS_PER_THREAD = 4  # so that a thread's last bucket is a quarter of its work: threads end together
SAMPLE_ROWS = 65_536  # rows read of each table to learn its bytes per row in memory
UNLIMITED_THREAD_MEMORY = 4 * 2**30  # what docs/cluster.md asks of a worker, for workers that set no limit


def run_stage(args):
    """repartition.py: publish repartitioned/ from merged/ (see stages.STAGES)."""
    this = stages.BY_NAME["repartitioned"]

    with stage.reading(args.data, this.reads) as merged, \
            stage.publish(args.data, this.name, {}, [merged.entry()]) as run, \
            cluster.connect(args, cluster.in_process_reason(args, stage.table_bytes(merged.manifest), this.reads)) \
            as client:
        if args.buckets:
            buckets, why = args.buckets, "given: --buckets, or what pipeline.py kept from the last run"
        else:
            buckets, why = choose_buckets(merged_bytes_in_memory(merged), worker_threads(client), args.row_group_mb)
        run.parameters = {"buckets": buckets, **this.asked(args), "bucket_hash": BUCKET_HASH}
        run.accounting, group_sizes, repeats = repartition(client, merged.path, run.path, buckets, args.row_group_mb)
        run.extra["buckets_chosen"] = {"buckets": buckets, "why": why}
        run.extra["exact_duplicate_actions"] = repeats
        run.extra["row_group_mib_in_memory"] = {table: stage.size_stats(sizes)
                                                for table, sizes in group_sizes.items() if sizes}

    print(f"buckets: {buckets} ({why})")
    summary.print_summary(run.published)


def merged_bytes_in_memory(merged):
    """The bytes merged/'s tables take in memory (Arrow): each table's rows (its manifest's) times the
    bytes per row of the first rows of its first file, which carry its strings' real lengths."""
    total = 0
    for table, (schema, _) in TABLES.items():
        rows = merged.manifest["tables"].get(table, {}).get("rows", 0)
        first = min((merged.path / table).glob("*.parquet"), default=None) if rows else None
        sample = next(tables.parquet_file(first).iter_batches(batch_size=SAMPLE_ROWS), None) if first else None
        if sample is not None and sample.num_rows:
            total += math.ceil(rows * pa.Table.from_batches([sample]).cast(schema).nbytes / sample.num_rows)
    return total


def worker_threads(client):
    """[(memory limit in bytes or None, threads)] of each of the cluster's workers."""
    return [(worker.get("memory_limit") or None, worker["nthreads"])
            for worker in client.scheduler_info(n_workers=-1)["workers"].values()]


def choose_buckets(bytes_in_memory, workers, row_group_mb):
    """(buckets, why) for merged/'s tables taking `bytes_in_memory`, on `workers` (worker_threads).

    The bucket bounds a task's memory in this stage and every later one, so: enough buckets that one
    takes at most 1/BUCKET_SHARE of a worker thread's memory (the smallest share of any worker). Beyond
    that, BUCKETS_PER_THREAD per thread, so that no thread waits long on another's last bucket; but no
    bucket smaller than --row-group-mb, whose fixed costs (a task and files per table in each stage)
    would outweigh that. Rounded up to a multiple of the threads: every thread gets as many buckets.
    """
    if not workers:
        raise UserError("the cluster has no workers, and --buckets is derived from their memory; "
                        "start them first, or give --buckets")
    threads = sum(count for _, count in workers)
    limited = [limit / count for limit, count in workers if limit]
    per_thread = min(limited) if limited else UNLIMITED_THREAD_MEMORY
    for_memory = math.ceil(bytes_in_memory / (per_thread / BUCKET_SHARE))
    for_threads = min(BUCKETS_PER_THREAD * threads, bytes_in_memory // max(1, int(row_group_mb * 2**20)))
    buckets = threads * math.ceil(max(1, for_memory, for_threads) / threads)
    assumed = "" if limited else " (assumed: no worker has a memory limit)"
    reason = (f"derived: merged/ takes {_gib(bytes_in_memory)} in memory; {for_memory:,} for memory (a bucket at "
              f"most 1/{BUCKET_SHARE} of {_gib(per_thread)} per worker thread{assumed}), {for_threads:,} for the "
              f"threads ({BUCKETS_PER_THREAD} per thread, none under --row-group-mb {row_group_mb:g}); the larger, up "
              f"to a multiple of the cluster's {threads} thread{'s' if threads > 1 else ''}")
    high = stages.BY_NAME["repartitioned"].parameter("buckets").high
    if buckets > high:
        raise UserError(f"--buckets would be {buckets:,}, more than the {high:,} allowed ({reason}); give the "
                        "workers more memory each (--memory-limit) or fewer threads")
    return buckets, reason


def _gib(size):
    return f"{size / 2**30:.2f} GiB"


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

    Returns (accounting, {table: in-memory sizes in bytes of the row groups written},
    {action source: its exact duplicate actions}).
    """
    merged_dir, out_dir = storage.path(merged_dir), storage.path(out_dir)
    scratch = out_dir / "_scratch"
    files = [(table, path, scratch / table / f"{path.stem}.arrow")
             for table in TABLES for path in sorted((merged_dir / table).glob("*.parquet"))]
    futures = [client.submit(cut_by_bucket, str(path), table, str(scratch_file), buckets,
                             key=task_key(f"cut-{table}-{path.stem}"), pure=False)
               for table, path, scratch_file in files]
    rows_in = {table: 0 for table in TABLES}
    pieces = {}  # (table, bucket): [(scratch file, start, length)], in the order of merged/'s files
    cut = wait_with_progress(futures, "cutting merged files by customer bucket")
    for (table, _, scratch_file), (rows, ranges) in zip(files, cut):
        rows_in[table] += rows
        for bucket, (start, length) in ranges.items():
            pieces.setdefault((table, bucket), []).append((str(scratch_file), start, length))

    futures = [client.submit(write_bucket, pieces[table, bucket], table, str(out_dir / table / bucket_name(bucket)),
                             row_group_mb, key=task_key(f"write-{table}-{bucket_name(bucket)}"), pure=False)
               for table, bucket in sorted(pieces)]
    rows_out = {table: 0 for table in TABLES}
    group_sizes = {table: [] for table in TABLES}
    repeats = {source: 0 for source in schemas.SOURCE_OF_ACTION_TYPE.values()}
    for (table, _), (rows, sizes, bucket_repeats) in zip(sorted(pieces),
                                                         wait_with_progress(futures, "sorting and writing buckets")):
        rows_out[table] += rows
        group_sizes[table] += sizes
        for action_type, count in bucket_repeats.items():
            repeats[schemas.SOURCE_OF_ACTION_TYPE[action_type]] += count
    storage.remove_tree(scratch)  # absent when merged/ kept no rows (every raw row was set aside)
    accounting = {table: {"rows_in": rows_in[table], "kept": rows_out[table]} for table in TABLES}
    accounting["actions"]["exact_duplicates_kept"] = sum(repeats.values())
    return accounting, group_sizes, repeats


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
    counts = np.bincount(bucket, minlength=buckets).tolist()
    sink, ranges, first = pa.BufferOutputStream(), {}, 0
    for number, count in enumerate(counts):
        if count:
            start = sink.tell()
            with pa.ipc.new_stream(sink, data.schema, options=SCRATCH_OPTIONS) as writer:
                writer.write_table(data.slice(first, count))
            ranges[number] = (start, sink.tell() - start)
            first += count
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
    """Pass 2 for one bucket of one table (runs on a worker): gather, sort, write sized row groups. Returns
    (rows, the row groups' sizes in memory, {action_type: exact duplicate actions} of an actions bucket)."""
    schema, sort_keys = TABLES[table]
    # One chunk: PyArrow sorts a table of many chunks chunk by chunk and merges them, a third slower.
    data = pa.concat_tables([read_piece(*piece) for piece in pieces]).combine_chunks()
    data = data.sort_by(sort_keys)
    repeats = exact_duplicate_actions(data) if table == "actions" else {}
    return data.num_rows, write_sized(data, out_dir, schema, row_group_mb), repeats


def exact_duplicate_actions(actions):
    """{action_type: how many actions repeat an earlier one exactly} of `actions` in TABLES' order, which sorts
    on every column: the same customer, item, action type and time, so that a repeat follows what it repeats."""
    if actions.num_rows < 2:
        return {}
    repeats = np.ones(actions.num_rows - 1, dtype=bool)
    for name in schemas.ACTIONS.names:
        values = actions.column(name).combine_chunks()
        if pa.types.is_timestamp(values.type):
            values = values.cast(pa.int64())
        values = values.to_numpy(zero_copy_only=False)
        repeats &= values[1:] == values[:-1]
    types, counts = np.unique(actions.column("action_type").to_numpy()[1:][repeats], return_counts=True)
    return dict(zip(types.tolist(), counts.tolist()))
