"""The job of our four scripts as one Polars script on one machine, written the fast way (a benchmark peer).

    .venv/bin/python bench/polars_timeline.py RAW OUT [--threads 2] [--lookback-days 365]
        [--max-history 1000] [--test-days 1] [--val-days 1] [--train-days 14]

Raw files in (docs/data.md, Raw input), the timeline layout out, with raw ids, as bench/duckdb_timeline.py
writes it (its docstring has the columns): OUT/timelines.parquet and OUT/examples.parquet.

Lazy frames run on the streaming engine (POLARS_MAX_THREADS = --threads). Every raw value is read as
text and judged by the cleaning rules (docs/data.md, Cleaning), so the rows kept are our pipeline's.
Histories without a join of shown items to actions: actions sorted per customer, each at its place in
its customer's run; join_asof finds, per (customer, day), how many of its actions come before that
midnight and before the midnight --lookback-days earlier (docs/data.md, The history rule).

Where this reader is more lenient than the pipeline's, which no generated data exercises: a string
"true" is taken for the boolean is_order; a JSON field holding an object or a list where a value is
expected stops the script (the pipeline sets the row aside); a CSV with a quote or a carriage return
is refused (values are split at every comma). Whitespace is Unicode's, not Python's str.strip().
Left out, as in bench/duckdb_timeline.py: user agents, encoders, scaler, num_* features, manifests.
"""

import argparse
import gzip
import os
import shutil
import time
from pathlib import Path

pl = None  # imported in main(): Polars sizes its thread pool from POLARS_MAX_THREADS when first imported

FIELDS = {  # required fields, and the optional ones, per source (docs/data.md, Raw input)
    "impressions": ("dt", "ranking_id", "customer_id"),
    "clicks": ("dt", "customer_id", "item_id", "click_time"),
    "add_to_carts": ("dt", "customer_id", "config_id", "simple_id", "occur_at"),
    "previous_orders": ("order_date", "customer_id", "config_id"),
}
OPTIONAL = {"simple_id"}
ACTION_SOURCES = {"clicks": (1, "item_id", "click_time"), "add_to_carts": (2, "config_id", "occur_at"),
                  "previous_orders": (3, "config_id", "order_date")}
TIMESTAMP = (r"^([0-9]{4}-[0-9]{2}-[0-9]{2})(?:[T ]([0-9]{2}:[0-9]{2})(?::([0-9]{2})(?:[.,]([0-9]+))?)?)?"
             r"(Z|([+-])([0-9]{2}):?([0-9]{2})?)?$")


def source_files(raw, source):
    """{format: [(file index in raw order, path)]} of a source's data files."""
    paths = sorted(p for p in (raw / source).iterdir() if p.is_file() and not p.name.startswith((".", "_")))
    if not paths:
        raise SystemExit(f"error: raw source {raw / source}/ has no data file")
    kinds = {}
    for index, path in enumerate(paths):
        suffix = path.name.removesuffix(".gz").rsplit(".", 1)[-1]
        kind = "json" if suffix == "jsonl" else suffix
        if kind not in ("json", "csv", "parquet"):
            raise SystemExit(f"error: {path}: unknown format (.jsonl, .json, .csv or .parquet, optionally .gz)")
        kinds.setdefault(kind, []).append((index, path))
    return kinds


def entry_list():
    """An impressions list with every entry's values as text."""
    return pl.List(pl.Struct({"item_id": pl.String, "is_order": pl.String}))


def text_of(frame, fields, present):
    """The fields as stripped text, null where missing; impressions as entries (null: not a list)."""
    columns = [pl.col(f).cast(pl.String).str.strip_chars().replace("", None).alias(f) if f in present
               else pl.lit(None, pl.String).alias(f) for f in fields]
    if "impressions" in present:
        columns.append(pl.col("impressions").cast(entry_list()).alias("entries"))
    return frame.select(pl.col("file_index").cast(pl.Int32), pl.col("row_index").cast(pl.Int64), *columns)


def read_json(files, source):
    """JSON Lines rows whose every field is text, impressions as entries."""
    fields = FIELDS[source]
    lines = pl.concat(pl.scan_lines(path, row_index_name="row_index").with_columns(pl.lit(i).alias("file_index"))
                      for i, path in files)
    # json_decode cannot skip a line that is not JSON: only lines with the field every kept row of the
    # source has (which a line that is not a JSON object lacks) go on to it.
    needed = pl.col("line").str.json_path_match("$.impressions" if source == "impressions" else "$.customer_id")
    rows = lines.with_columns(needed.alias("needed")).filter(pl.col("needed").is_not_null()).with_columns(
        pl.col("line").str.json_decode(pl.Struct({f: pl.String for f in fields})).alias("fields"))
    if source == "impressions":  # the impressions as their JSON text first: they may be a string or a number
        listed = pl.col("needed")
        rows = rows.with_columns(pl.when(listed.str.starts_with("[")).then(listed).str.json_decode(entry_list())
                                 .alias("impressions"))
    return text_of(rows.unnest("fields"), fields, {*fields, "impressions"} if source == "impressions" else fields)


def read_csv(files, source):
    """CSV rows with as many values as their header names; files of one header read together."""
    if pl.scan_lines([path for _, path in files]).select(pl.col("line").str.contains(r'["\r]').any()).collect().item():
        raise SystemExit(f"error: a CSV of {source}/ quotes a value or ends lines in \\r: this peer splits at commas")
    by_header = {}
    for i, path in files:
        with (gzip.open if path.name.endswith(".gz") else open)(path, "rt") as handle:
            by_header.setdefault(handle.readline().rstrip("\n"), []).append((i, path))
    frames = []
    for header, group in by_header.items():
        names = header.split(",")
        lines = pl.concat(pl.scan_lines(path, row_index_name="row_index").with_columns(pl.lit(i).alias("file_index"))
                          for i, path in group)
        values = pl.col("line").str.split(",")
        rows = lines.filter((pl.col("row_index") > 0) & (values.list.len() == len(names))).with_columns(
            values.list.get(names.index(f)).alias(f) for f in FIELDS[source] if f in names)
        frames.append(text_of(rows, FIELDS[source], set(names)))
    return pl.concat(frames)


def read_parquet(files, source):
    """Parquet rows, every field cast to text (a bool to 'true' or 'false')."""
    frames = [pl.scan_parquet(path).with_row_index("row_index").with_columns(pl.lit(i).alias("file_index"))
              for i, path in files]
    return pl.concat(text_of(frame, FIELDS[source], set(frame.collect_schema().names())) for frame in frames)


def read_source(raw, source):
    """One LazyFrame of a source's rows, every value as text; file_index, row_index give raw order."""
    readers = {"json": read_json, "csv": read_csv, "parquet": read_parquet}
    return pl.concat(readers[kind](files, source) for kind, files in source_files(raw, source).items())


def parse_id(s):
    value = s.str.strip_prefix("+").cast(pl.Int64, strict=False)
    return pl.when(s.str.contains(r"^\+?[0-9]{1,19}$") & (value >= 1)).then(value)


def parse_date(s):
    return pl.when(s.str.contains(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$") & ~s.str.starts_with("0000")).then(
        s.str.to_date("%Y-%m-%d", strict=False))


def parse_timestamp(s, parts):
    """ISO 8601, an offset converted to UTC, none meaning UTC; cut to the microsecond; years 1 to 9999.
    parts: the column of s.str.extract_groups(TIMESTAMP), computed once."""
    part = parts.struct
    local = pl.concat_str(part["1"], pl.lit("T"), part["2"].fill_null("00:00"), pl.lit(":"),
                          part["3"].fill_null("00"), pl.lit("."), part["4"].fill_null("0").str.slice(0, 6))
    minutes = (pl.when(part["6"] == "-").then(-1).otherwise(1)
               * (part["7"].cast(pl.Int64).fill_null(0) * 60 + part["8"].cast(pl.Int64).fill_null(0)))
    utc = local.str.to_datetime("%Y-%m-%dT%H:%M:%S%.f", time_unit="us", time_zone="UTC", strict=False) \
        - pl.duration(minutes=minutes)
    return pl.when(~s.str.starts_with("0000") & utc.dt.year().is_between(1, 9999)).then(utc)


def kept(raw, source):
    """A source's kept rows, every field parsed; a row with a missing or bad field is left out."""
    parsers = {"customer_id": parse_id, "item_id": parse_id, "config_id": parse_id, "simple_id": parse_id,
               "dt": parse_date, "order_date": parse_date}
    times = [f for f in FIELDS[source] if f in ("click_time", "occur_at")]
    rows = read_source(raw, source).with_columns(pl.col(f).str.extract_groups(TIMESTAMP).alias(f"{f}_parts")
                                                 for f in times)
    parsed = rows.with_columns((parse_timestamp(pl.col(f), pl.col(f"{f}_parts")) if f in times
                                else parsers.get(f, lambda s: s)(pl.col(f))).alias(f"p_{f}") for f in FIELDS[source])
    ok = [pl.col(f).is_null() | pl.col(f"p_{f}").is_not_null() if f in OPTIONAL else pl.col(f"p_{f}").is_not_null()
          for f in FIELDS[source]]
    if source == "impressions":
        ok.append(pl.col("entries").is_not_null())
    return parsed.filter(*ok)


def examples(raw, args):
    """Shown items of train/val/test days, with their split; of exact duplicates the first in raw order."""
    entries = (kept(raw, "impressions")
               .with_columns(pl.int_ranges(0, pl.col("entries").list.len(), dtype=pl.Int32).alias("position"))
               .explode("entries", "position").unnest("entries")
               .with_columns(parse_id(pl.col("item_id").str.strip_chars()).alias("item"))
               .filter(pl.col("item").is_not_null() & pl.col("is_order").is_in(["true", "false"])))
    key = [pl.col("p_dt").alias("dt"), pl.col("p_ranking_id").alias("ranking_id"),
           pl.col("p_customer_id").alias("customer_id"), pl.col("item").alias("item_id"), "position"]
    shown = entries.group_by(key).agg(
        (pl.col("is_order").sort_by("file_index", "row_index").first() == "true").alias("is_order"))
    age = (pl.col("dt").max() - pl.col("dt")).dt.total_days()
    t, v, n = args.test_days, args.val_days, args.train_days
    split = pl.when(age < t).then(pl.lit("test")).when(age < t + v).then(pl.lit("val")).otherwise(pl.lit("train"))
    return shown.filter(age < t + v + n).with_columns(split.alias("split"))


def actions(raw, customers):
    """The action stream of those customers, sorted, each action at its place in its customer's run."""
    stream = pl.concat([kept(raw, source).select(
        pl.col("p_customer_id").alias("customer_id"), pl.col(f"p_{item}").alias("item_id"),
        pl.lit(code, pl.Int8).alias("action_type"), pl.col(f"p_{when}").cast(pl.Datetime("us", "UTC")).alias("at"))
        for source, (code, item, when) in ACTION_SOURCES.items()])
    return (stream.join(customers, on="customer_id", how="semi")
            .sort("customer_id", "at", "action_type", "item_id")
            .with_columns(pl.int_range(pl.len(), dtype=pl.Int32).over("customer_id").alias("place")))


def windows(keys, stream, args):
    """Per key (customer, day): stop, how many of its customer's actions come before D, and length, how
    many of those are its history; per customer, the reach of its timeline: [first, stop) of its places."""
    # through: how many of the customer's actions happened on or before that (UTC) day.
    daily = (stream.group_by("customer_id", pl.col("at").dt.date().alias("day"))
             .agg((pl.col("place").max() + 1).alias("through")).sort("day"))

    def before(day):
        """Per key, how many of its customer's actions come before midnight of `day`, an expression of dt."""
        return keys.with_columns(day.alias("cut")).join_asof(
            daily, left_on="cut", right_on="day", by="customer_id", allow_exact_matches=False,
            check_sortedness=False)["through"].fill_null(0)  # both sorted by day: keys by dt, daily by day

    stop = before(pl.col("dt"))
    since = before(pl.col("dt").dt.offset_by(f"-{args.lookback_days}d"))
    found = keys.with_columns(stop=stop, length=(stop - since).clip(upper_bound=args.max_history))
    reach = found.group_by("customer_id").agg((pl.col("stop") - pl.col("length")).min().alias("first"),
                                              pl.col("stop").max().alias("last"))
    return found, reach


def write(out, shown, stream, found, reach):
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    inside = pl.col("place").is_between(pl.col("first"), pl.col("last"), closed="left")
    reached = pl.col("place").filter(inside)
    (reach.join(stream, on="customer_id", how="left").group_by("customer_id")
     .agg(pl.col("item_id").filter(inside).sort_by(reached).alias("actions"),
          pl.col("action_type").filter(inside).sort_by(reached).alias("action_types"))
     .sort("customer_id").write_parquet(out / "timelines.parquet"))
    (shown.join(found, on=["customer_id", "dt"]).join(reach, on="customer_id")
     .select("dt", "split", "customer_id", "ranking_id", "item_id", "position", "is_order",
             (pl.col("stop") - pl.col("first")).cast(pl.Int32).alias("history_end"),
             pl.col("length").cast(pl.Int32).alias("history_length"))
     .sort("dt", "customer_id", "ranking_id", "position").write_parquet(out / "examples.parquet"))


def main():
    global pl
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("raw", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lookback-days", type=int, default=365)
    parser.add_argument("--max-history", type=int, default=1000)
    parser.add_argument("--test-days", type=int, default=1)
    parser.add_argument("--val-days", type=int, default=1)
    parser.add_argument("--train-days", type=int, default=14)
    args = parser.parse_args()
    started = time.perf_counter()
    os.environ["POLARS_MAX_THREADS"] = str(args.threads)
    import polars
    pl = polars

    shown = examples(args.raw, args).collect(engine="streaming")
    keys = shown.select("customer_id", "dt").unique().sort("dt")
    stream = actions(args.raw, keys.select("customer_id").unique().lazy()).collect(engine="streaming")
    found, reach = windows(keys, stream, args)
    write(args.out, shown, stream, found, reach)
    print(f"polars_timeline: {len(shown):,} examples, {len(keys):,} (customer, day) histories, to {args.out}/ "
          f"in {time.perf_counter() - started:.1f} s ({pl.thread_pool_size()} threads)")


if __name__ == "__main__":
    main()
