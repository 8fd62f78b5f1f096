"""preprocess's work on the cluster: cleaned/ -> processed/ and the fitted preprocessors.

NVTabular's split: statistics are computed on the cluster, fitted in the client from
their sums, then applied to partitions.

1. One task per customer bucket returns the statistics of the bucket's share of the
   seeded train sample: value counts per categorical column (the sampled rows'
   history items included) and moments per numeric column — computing histories for
   the sampled (customer, day) keys only.
2. The client sums those, fits the encoders and the scaler, and saves them as JSON.
3. One task per bucket computes the history windows and activity features of every
   (customer, day) with impressions (recpipe.histories), checks them with the leak
   guard, transforms examples and histories, and writes them in one of three layouts
   (docs/data.md, Layouts), which share everything but the writer:
   - timeline (the default): each customer's actions once, in
     timelines/bucket=NNNNN/, and per example the window (history_end, history_length)
     into them, in <split>/examples/dt=YYYY-MM-DD/;
   - compact: a history list per customer and day, in <split>/histories/dt=…/;
   - wide: the examples with their histories padded to --max-history, in <split>/dt=…/.

Computing a bucket's histories twice is cheaper than keeping them: on 20 M actions,
writing and re-reading them took 0.95 s per bucket, computing them 0.34 s.

A worker holds one bucket at a time: its actions, impressions and histories.
"""

import json
import posixpath

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from recpipe import cluster, encoders, folders, schemas, stage, stages, storage, summary, tables
from recpipe.cli import OutputError, UserError
from recpipe.schemas import US_PER_DAY
from recpipe.cluster import task_key, wait_with_progress
from recpipe.encoders import CategoryEncoder, StandardScaler
from recpipe.histories import (COUNT_FEATURES, NUMERIC_FEATURES, compute_histories, history_item_counts,
                               history_windows, padded, timelines)
from recpipe.repartition import splitmix64
from recpipe.tables import read_parts

SPLITS = ("train", "val", "test")
# Categorical feature -> the cleaned impressions column it encodes (docs/data.md, Features).
CATEGORICAL = {"cat_item": "item_id", "cat_position": "position", "cat_browser": "browser_family",
               "cat_os": "os_family", "cat_device": "device_family"}
# What an example is made of; the raw user agent and its versions, brand and model are not read.
EXAMPLE_SOURCES = ["dt", "ranking_id", "customer_id", "split", "is_order", *CATEGORICAL.values()]
EXAMPLE_ROW_GROUP = 65_536
WIDE_ROW_GROUP = 50_000  # rows of 2 x max_history values each: keep a group's memory bounded
WIDE_CHUNK = 10_000      # examples padded at once: 10k x 1000 x 9 bytes ~ 90 MB


class LeakError(RuntimeError):
    """A history holds an action from its own day or later, or is too long: a bug, never published."""


def run_stage(args):
    """preprocess.py: publish processed/ from cleaned/, and the fitted preprocessors to args.preprocessors
    (see stages.STAGES)."""
    this = stages.BY_NAME["processed"]
    parameters = this.asked(args)
    target = storage.path(args.preprocessors)
    for name in stages.NAMES:
        if _inside(target, storage.path(args.data) / name):
            raise UserError(f"--preprocessors {target} lies inside {storage.path(args.data) / name}/, a stage folder "
                            "that its stage replaces as a whole: choose a folder outside the stage folders")

    processed_dir = processed_location(args.data)

    with stage.reading(args.data, this.reads) as cleaned, \
            folders.claiming(target, not_a_preprocessors_folder, "replace",
                             "point --preprocessors at a new or empty folder, or at one preprocess.py wrote"):
        refuse_others_preprocessors(target, processed_dir)
        threads = cluster.in_process_reason(args, stage.table_bytes(cleaned.manifest), this.reads)
        with stage.publish(args.data, this.name, parameters, [cleaned.entry()]) as run, \
                cluster.connect(args, threads) as client:
            # Fitted into the stage first: processed/ keeps the copy it was made with.
            fitted_dir = run.path / encoders.FITTED
            run.accounting, fit_record, rows_per_split, history_entries = preprocess(
                client, cleaned.path, run.path, fitted_dir, parameters)
            run.extra["rows_per_split"] = rows_per_split
            examples = sum(rows_per_split.values())
            run.extra["history_entries_per_example"] = round(history_entries / examples, 2) if examples else None
            run.extra["sample_rows"] = fit_record["sample_rows"]
            run.extra["preprocessors_sha256"] = encoders.fingerprint(fitted_dir)
        published = stage.content_dir(storage.path(args.data) / this.name, run.published)
        replace_preprocessors(published / encoders.FITTED, target, args.data, processed_dir)

    summary.print_summary(run.published)
    print(f"rows per split: {rows_per_split}; encoders and scaler fitted on {fit_record['sample_rows']:,} "
          f"sampled train rows, saved in {target}/")
    print(f"{parameters['layout']} layout: {run.published['history_entries_per_example']} history entries stored per "
          "example")


def _inside(folder, other):
    """Whether `folder` is `other` or lies below it (paths or URLs)."""
    if storage.is_url(folder) or storage.is_url(other):
        return f"{folder}/".startswith(f"{other}/")
    return folder.resolve().is_relative_to(other.resolve())


# Which processed/ the preprocessors of a --preprocessors folder were fitted for, so that fitting another
# one's does not silently replace them. Beside the fitted files, not among them: an absolute path would make
# processed/'s copy, and its fingerprint, depend on where the data lies.
FITTED_FOR = "fitted_for.json"


def not_a_preprocessors_folder(directory):
    """None when a folder holds nothing but what preprocess.py writes there (the fitted files, FITTED_FOR, and
    the README.md that says what the folder is for, kept when the folder is replaced), so it may replace it;
    otherwise what else it holds."""
    unexpected = folders.unexpected_entries(directory, {*encoders.FITTED_FILES, encoders.README_FILE, FITTED_FOR,
                                                        folders.MARKER})
    if unexpected:
        return f"it holds {folders.listing(unexpected)}, which preprocess.py does not write"
    return None


def processed_location(data_dir):
    """processed/'s absolute path or URL, as fitted_for.json records it."""
    return posixpath.join(storage.absolute(data_dir), stages.FINAL)


def refuse_others_preprocessors(target, processed_dir):
    """UserError when the preprocessors in `target` are another processed/'s (fitted_for_another): preprocess.py
    would replace what train.py needs to read that one. pipeline.py run asks before any stage runs."""
    other = fitted_for_another(target, processed_dir)
    if other:
        raise UserError(
            f"refusing to replace {target}/: it holds the preprocessors that {other}/ was made with, which "
            f"train.py needs to read it; point --preprocessors at a folder of its own for {processed_dir}/ "
            "(and give train.py the same), or delete "
            f"{target}/ yourself if {other}/ is no longer used")


def fitted_for_another(target, processed_dir):
    """The processed/ folder other than `processed_dir` that was made with the preprocessors in `target` and
    still records them (train.py needs them to read it); None when there is none: no record (a folder of an
    older version), the same folder, or one since deleted, damaged or made with others. None too when
    `processed_dir` records them as well: a copy of both folders, made together, is theirs as much."""
    try:
        other = json.loads(storage.read_bytes(target / FITTED_FOR))["processed"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(other, str) or other == processed_dir:
        return None
    try:
        fingerprint = encoders.fingerprint(target)
    except UserError:
        return None

    def records_them(folder):
        try:
            return stage.read_manifest(folder, "processed").get("preprocessors_sha256") == fingerprint
        except (UserError, OSError):
            return False

    return other if records_them(other) and not records_them(processed_dir) else None


def replace_preprocessors(fitted_dir, target, data_dir, processed_dir):
    """Copy what processed/ was made with to --preprocessors, with the record that they are `processed_dir`'s:
    through a staging folder beside it on a file system; on object storage, which renames nothing, file by
    file (train.py refuses a folder caught between two versions: its encoders and scaler are not the ones
    processed/'s manifest records)."""
    staging = None
    fitted_dir = storage.path(fitted_dir)
    record = (json.dumps({"processed": processed_dir}, indent=2) + "\n").encode()
    try:
        if storage.is_url(target):
            for name in encoders.FITTED_FILES:
                (target / name).write_bytes((fitted_dir / name).read_bytes())
            (target / FITTED_FOR).write_bytes(record)
            return
        staging = folders.make_staging(target)
        for name in encoders.FITTED_FILES:
            (staging / name).write_bytes((fitted_dir / name).read_bytes())
        (staging / FITTED_FOR).write_bytes(record)
        if (target / encoders.README_FILE).is_file():
            (staging / encoders.README_FILE).write_bytes((target / encoders.README_FILE).read_bytes())
        folders.replace(staging, target)
    except OSError as error:
        if staging is not None:
            folders.discard(staging)
        raise OutputError(
            f"{data_dir}/processed/ was published, but {target}/ could not be replaced ({error}); train.py "
            f"refuses the old one. Copy {data_dir}/processed/{encoders.FITTED}/ to {target}/, or make room and run "
            "`python pipeline.py run --from processed`") from None


def examples_schema(layout="compact"):
    """The examples' columns; the timeline layout's carry each example's window into its customer's timeline."""
    window = [("history_end", pa.int32()), ("history_length", pa.int32())] if layout == "timeline" else []
    return pa.schema([("customer_id", pa.int64()), ("ranking_id", pa.string()),
                      *[(name, pa.int64()) for name in CATEGORICAL],
                      *[(name, pa.float32()) for name in NUMERIC_FEATURES], *window, ("is_order", pa.float32())])


# A compact histories row, and a timeline row: one customer's actions (newest first in the
# former, oldest first in the latter) as encoded items and action types.
HISTORIES_SCHEMA = pa.schema([("customer_id", pa.int64()), ("actions", pa.list_(pa.int64())),
                              ("action_types", pa.list_(pa.int8()))])
TIMELINES_SCHEMA = HISTORIES_SCHEMA


def preprocess(client, cleaned_dir, out_dir, preprocessors_dir, params):
    """Run the three steps into `out_dir` (a staging folder); return (accounting, fit record, rows per split,
    history entries stored)."""
    cleaned_dir, out_dir = storage.path(cleaned_dir), storage.path(out_dir)
    buckets = sorted(path.name for path in (cleaned_dir / "impressions").glob("bucket=*"))
    futures = [client.submit(summarize_bucket, str(cleaned_dir), bucket, params,
                             key=task_key(f"histories-{bucket}"), pure=False) for bucket in buckets]
    summaries = wait_with_progress(futures, "computing the sample's statistics")
    train_rows = sum(of_bucket["train_rows"] for of_bucket in summaries)
    if train_rows and not sum(of_bucket["sample_rows"] for of_bucket in summaries):
        # Encoders fitted on nothing encode every value as unknown, and a scaler's moments of nothing are NaN.
        raise UserError(f"--sample-frac {params['sample_frac']:g} sampled none of the {train_rows:,} train examples, "
                        "and encoders fitted on no rows would encode every value as unknown: give a larger "
                        f"--sample-frac (default {stages.BY_NAME['processed'].parameter('sample_frac').default})")

    counts = {name: pd.Series(dtype="int64") for name in CATEGORICAL}
    moments = {name: np.zeros(3) for name in NUMERIC_FEATURES}
    for of_bucket in summaries:
        for name, bucket_counts in of_bucket["counts"].items():
            counts[name] = counts[name].add(bucket_counts, fill_value=0)
        for name, bucket_moments in of_bucket["moments"].items():
            moments[name] += bucket_moments
    fitted = {name: CategoryEncoder(params["min_frequency"]).fit(counts[name]) for name in CATEGORICAL}
    scaler = StandardScaler().fit({name: tuple(values) for name, values in moments.items()})
    sample_rows = sum(of_bucket["sample_rows"] for of_bucket in summaries)
    fit_record = {"fitted_on": "train", "sample_rows": sample_rows,
                  "parameters": {name: params[name] for name in
                                 ("seed", "sample_frac", "min_frequency", "lookback_days", "max_history")},
                  "vocabulary_sizes": {name: encoder.size for name, encoder in fitted.items()},
                  "categorical": list(CATEGORICAL), "numeric": NUMERIC_FEATURES}
    encoders.save(preprocessors_dir, fitted, scaler, fit_record)

    futures = [client.submit(write_bucket, str(cleaned_dir), bucket, str(out_dir), str(preprocessors_dir), params,
                             key=task_key(f"write-{bucket}"), pure=False)
               for bucket in buckets]
    written = wait_with_progress(futures, f"computing histories, writing the {params['layout']} layout")

    rows_in = sum(w["rows_in"] for w in written)
    history_entries = sum(w["history_entries"] for w in written)
    outside = sum(w["outside_splits"] for w in written)
    rows_per_split = {split: sum(w[split] for w in written) for split in SPLITS}
    accounting = {"impressions": {"rows_in": rows_in, "kept": sum(rows_per_split.values()),
                                  "set_aside": {"day_outside_splits": outside} if outside else {}}}
    return accounting, fit_record, rows_per_split, history_entries


def in_sample(ranking_id, position, seed, fraction):
    """The seeded sample: a fixed hash of (ranking_id, position, seed) below `fraction`.

    Per row, not per partition: the same rows are sampled whatever the buckets are.
    `ranking_id` may be an Arrow array: each distinct id (a ranking shows several items) is then
    hashed once, without a Python string per row.
    """
    if isinstance(ranking_id, (pa.Array, pa.ChunkedArray)):
        ids = pc.dictionary_encode(ranking_id.combine_chunks() if isinstance(ranking_id, pa.ChunkedArray)
                                   else ranking_id)
        text = pd.util.hash_array(ids.dictionary.to_numpy(zero_copy_only=False), categorize=False)[
            ids.indices.to_numpy(zero_copy_only=False)]
    else:
        text = pd.util.hash_array(np.asarray(ranking_id, dtype=object), categorize=False)
    with np.errstate(over="ignore"):  # the multiply wraps modulo 2^64 by design, for every seed above 1
        salt = splitmix64(np.asarray(position, dtype=np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15))
    uniform = (splitmix64(text ^ salt) >> np.uint64(11)).astype(np.float64) / 2.0**53
    return uniform < fraction


def _features(features, rows):
    """The num_* features (raw, by name) at `rows`, log1p on counts, as float64 (not yet scaled)."""
    out = {}
    for name in NUMERIC_FEATURES:
        values = np.asarray(features[name])[rows]
        out[name] = np.log1p(values) if name in COUNT_FEATURES else values
    return out


def _table_features(histories):
    return {name: histories.column(name).to_numpy() for name in NUMERIC_FEATURES}


def check_histories(histories, lookback_days, max_history, where):
    """The leak guard: every history action is in [D − lookback, D) and no history is too long."""
    lengths = pc.list_value_length(histories.column("history_items")).to_numpy(zero_copy_only=False)
    if len(lengths) and lengths.max() > max_history:
        raise LeakError(f"{where}: a history holds {lengths.max()} actions, more than --max-history {max_history}")
    times = pc.list_flatten(histories.column("history_occurred_at")).to_numpy()
    day_us = histories.column("dt").cast(pa.timestamp("us")).cast(pa.int64()).to_numpy()
    parent_day = np.repeat(day_us, lengths)
    late = times >= parent_day
    early = times < parent_day - lookback_days * US_PER_DAY
    if late.any() or early.any():
        row = int(np.repeat(np.arange(len(lengths)), lengths)[np.flatnonzero(late | early)[0]])
        raise LeakError(f"{where}: the history of customer {histories.column('customer_id')[row]} on "
                        f"{histories.column('dt')[row]} holds an action outside [D - {lookback_days} days, D)")


def check_timelines(windows, customers, offsets, taken, history_end, lookback_days, max_history, where):
    """The leak guard of the timeline layout: every example's window [history_end - history_length,
    history_end) of its customer's timeline holds only actions in [D − lookback, D), at most
    max_history of them.

    Each timeline's times are checked not to decrease, so a window whose oldest and newest
    actions lie in range holds only actions in range: every action is covered without
    expanding the windows (which is what this layout saves).
    """
    length = windows.length
    if len(length) and length.max() > max_history:
        raise LeakError(f"{where}: a history holds {length.max()} actions, more than --max-history {max_history}")
    times = windows.occurred_us[taken]
    steps = np.diff(times)
    starts = offsets[1:-1]
    steps[starts[(starts > 0) & (starts < len(times))] - 1] = 0  # where the next customer's timeline starts
    if (steps < 0).any():
        raise LeakError(f"{where}: a timeline is not in time order")
    rows = np.searchsorted(customers, windows.key_customer)
    base, limit = offsets[rows], offsets[rows + 1]
    outside = np.flatnonzero((history_end < length) | (base + history_end > limit))
    has = np.flatnonzero(length > 0)
    newest = times[base[has] + history_end[has] - 1]
    oldest = times[base[has] + history_end[has] - length[has]]
    day_us = windows.key_day[has] * US_PER_DAY
    late_or_early = has[(newest >= day_us) | (oldest < day_us - lookback_days * US_PER_DAY)]
    wrong = np.concatenate([outside, late_or_early])
    if len(wrong):
        key = int(wrong[0])
        raise LeakError(f"{where}: the history of customer {windows.key_customer[key]} on "
                        f"{np.datetime64(int(windows.key_day[key]), 'D')} holds an action outside "
                        f"[D - {lookback_days} days, D), or outside its timeline")


def read_bucket(cleaned_dir, bucket):
    """A bucket's impressions of the three splits (Arrow), its actions (pandas), and how many rows it had."""
    impressions = read_parts(storage.path(cleaned_dir) / "impressions" / bucket, schemas.CLEANED_IMPRESSIONS, EXAMPLE_SOURCES)
    rows_in = impressions.num_rows
    impressions = impressions.filter(pc.is_in(impressions.column("split"), value_set=pa.array(SPLITS)))
    actions = read_parts(storage.path(cleaned_dir) / "actions" / bucket, schemas.ACTIONS).to_pandas()
    return impressions, actions, rows_in


def _keys(impressions):
    """(keys, key of each example): the distinct (customer_id, dt) of the examples in order of appearance, and
    each example's row among them.

    One integer per example, (the customer's code, the day), factorized in order of appearance: pandas would
    hash Python date objects, a tenth of a second per million examples.
    """
    customer_codes, customers = pd.factorize(impressions.column("customer_id").to_numpy())
    days = impressions.column("dt").cast(pa.int32()).to_numpy(zero_copy_only=False).astype(np.int64)
    first_day = days.min(initial=0)
    span = days.max(initial=0) - first_day + 1
    key_of_example, pairs = pd.factorize(customer_codes.astype(np.int64) * span + (days - first_day))
    keys = pd.DataFrame({"customer_id": customers[pairs // span].astype(np.int64),
                         "dt": pa.array((pairs % span + first_day).astype(np.int32)).cast(pa.date32()).to_pandas()})
    return keys, key_of_example


def _value_counts(values):
    """Occurrences per value (Arrow, in C++), without nulls and empty strings, as a Series."""
    counted = pc.value_counts(values).flatten()
    counts = pd.Series(counted[1].to_numpy(), index=counted[0].to_pandas(), dtype="int64")
    return counts[counts.index.notna() & (counts.index != "")]


def summarize_bucket(cleaned_dir, bucket, params):
    """Step 1 for one bucket (runs on a worker): the statistics of its share of the sample."""
    impressions, actions, _ = read_bucket(cleaned_dir, bucket)
    train = impressions.filter(pc.equal(impressions.column("split"), "train"))
    sampled = train.filter(in_sample(train.column("ranking_id"),
                                     train.column("position").to_numpy(), params["seed"], params["sample_frac"]))
    counts = {name: _value_counts(sampled.column(column)) for name, column in CATEGORICAL.items()}
    keys, key_of_example = _keys(sampled)
    windows = history_windows(actions, keys, params["lookback_days"], params["max_history"])
    # History items share the item vocabulary: count them once per sampled (customer, day).
    counts["cat_item"] = counts["cat_item"].add(history_item_counts(windows), fill_value=0)
    features = _features(windows.features, key_of_example)
    moments = {name: np.array([len(values), values.sum(), np.square(values).sum()])
               for name, values in features.items()}
    return {"counts": counts, "moments": moments, "sample_rows": sampled.num_rows, "train_rows": train.num_rows}


def _encode_lists(lists, encode, value_type):
    lists = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = encode(pc.list_flatten(lists).to_numpy())
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, value_type))


def write_bucket(cleaned_dir, bucket, out_dir, preprocessors_dir, params):
    """Step 3 for one bucket (runs on a worker): rows written per split, rows read, rows outside the splits,
    and the history entries stored."""
    fitted, scaler, _ = encoders.load(preprocessors_dir)
    impressions, actions, rows_in = read_bucket(cleaned_dir, bucket)
    keys, key_of_example = _keys(impressions)
    layout, lookback, max_history = params["layout"], params["lookback_days"], params["max_history"]
    if layout == "timeline":
        windows = history_windows(actions, keys, lookback, max_history)
        customers, offsets, taken, history_end = timelines(windows)
        check_timelines(windows, customers, offsets, taken, history_end, lookback, max_history, bucket)
        features = windows.features
    else:
        histories = compute_histories(actions, keys, lookback, max_history)
        check_histories(histories, lookback, max_history, bucket)
        features = _table_features(histories)

    columns = {"customer_id": impressions.column("customer_id"), "ranking_id": impressions.column("ranking_id")}
    for name, column in CATEGORICAL.items():
        columns[name] = fitted[name].transform(impressions.column(column))
    for name, values in _features(features, key_of_example).items():
        columns[name] = scaler.transform(name, values)
    if layout == "timeline":
        columns["history_end"] = history_end[key_of_example].astype(np.int32)
        columns["history_length"] = windows.length[key_of_example].astype(np.int32)
        timeline = pa.table({"customer_id": customers,
                             "actions": _lists(offsets, fitted["cat_item"].transform(windows.item_id[taken]), pa.int64()),
                             "action_types": _lists(offsets, windows.action_type[taken], pa.int8())},
                            schema=TIMELINES_SCHEMA)
        _write(timeline, storage.path(out_dir) / "timelines" / bucket / "part-00000.parquet", EXAMPLE_ROW_GROUP)
        stored = len(taken)
    else:
        actions = _encode_lists(histories.column("history_items"), fitted["cat_item"].transform, pa.int64())
        action_types = histories.column("history_action_types").combine_chunks()
        stored = len(actions.values) if layout == "compact" else len(key_of_example) * max_history
    columns["is_order"] = impressions.column("is_order").cast(pa.float32())
    examples = pa.table(columns, schema=examples_schema(layout))

    rows = {split: 0 for split in SPLITS}
    key_days = keys["dt"].to_numpy()
    splits_and_days = impressions.select(["split", "dt"]).to_pandas()
    for (split, day), example_rows in splits_and_days.groupby(["split", "dt"], sort=True).indices.items():
        day_name = f"dt={pd.Timestamp(day).date().isoformat()}"
        of_day = examples.take(pa.array(example_rows))
        base = storage.path(out_dir) / split
        if layout == "wide":
            _write_wide(of_day, actions, action_types, key_of_example[example_rows],
                        base / day_name / f"part-{bucket}.parquet", max_history)
        else:
            _write(of_day, base / "examples" / day_name / f"part-{bucket}.parquet", EXAMPLE_ROW_GROUP)
        if layout == "compact":
            key_rows = np.flatnonzero(key_days == day)
            day_histories = pa.table({"customer_id": histories.column("customer_id").take(key_rows),
                                      "actions": actions.take(key_rows), "action_types": action_types.take(key_rows)},
                                     schema=HISTORIES_SCHEMA)
            _write(day_histories, base / "histories" / day_name / f"part-{bucket}.parquet", EXAMPLE_ROW_GROUP)
        rows[split] += len(example_rows)
    return {**rows, "rows_in": rows_in, "outside_splits": rows_in - impressions.num_rows,
            "history_entries": int(stored)}


def _lists(offsets, values, value_type):
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, value_type))


def _write(table, path, row_group_size):
    tables.write(table, path, row_group_size=row_group_size)


def wide_schema(examples_schema, max_history):
    """The examples' columns plus the two padded history columns, which are never null."""
    def padded_list(name, value_type):
        element = pa.field("element", value_type, nullable=False)
        return pa.field(name, pa.list_(element, max_history), nullable=False)
    return examples_schema.append(padded_list("actions", pa.int64())).append(padded_list("action_types", pa.int8()))


def _write_wide(examples, actions, action_types, key_rows, path, max_history):
    schema = wide_schema(examples.schema, max_history)
    # Encoding the 2 x max_history values of every row is nearly all of this stage's time (py-spy, 10 M
    # actions: 81%). Dictionaries and min/max statistics on mostly-zero padding cost more than they save;
    # plain values with zstd write 32% faster, read as fast, for files 1.8x larger (docs/benchmarks.md).
    example_columns = examples.schema.names
    with tables.writer(path, schema, use_dictionary=example_columns, write_statistics=example_columns,
                       compression="zstd", compression_level=1) as writer:
        for start in range(0, max(len(key_rows), 1), WIDE_CHUNK):
            rows = key_rows[start:start + WIDE_CHUNK]
            chunk = examples.slice(start, len(rows))
            # The examples of one customer and day share a history: pad each once, then copy whole rows.
            keys, key_of_row = np.unique(rows, return_inverse=True)
            lists = [pa.FixedSizeListArray.from_arrays(padded(data, keys, max_history, dtype)[key_of_row].ravel(),
                                                       type=schema.field(name).type)
                     for name, data, dtype in (("actions", actions, np.int64), ("action_types", action_types, np.int8))]
            writer.write_table(pa.Table.from_arrays([*chunk.columns, *lists], schema=schema),
                               row_group_size=WIDE_ROW_GROUP)
