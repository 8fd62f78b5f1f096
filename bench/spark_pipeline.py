"""Our pipeline's job as a PySpark DataFrame pipeline: raw files in, padded training rows out.

    .venv/bin/python bench/spark_pipeline.py RAW OUT [--cores 2] [--driver-memory 16g] [--lookback-days 365]
        [--max-history 1000] [--test-days 1] [--val-days 1] [--train-days 14]

The competitor of the benchmarks: "the PySpark pipeline that builds histories with a
window function over a join of impressions and actions", written with the DataFrame
API only (no Python UDFs; nothing from recpipe). It reads RAW as generate_data.py
writes it (impressions/, clicks/, add_to_carts/, previous_orders/; JSON Lines, CSV and
Parquet, optionally .gz; names starting with '_' or '.' skipped), applies the
cleaning rules (docs/data.md, Cleaning, with docs/decisions.md's decisions for merge_and_clean.py),
the split and the history rule (docs/data.md), and writes one row per kept shown
item of a train/val/test day to OUT/dt=YYYY-MM-DD/*.parquet:

    customer_id long, ranking_id string, item_id long (raw id), position long,
    is_order boolean, split string,
    actions array<long>       (--max-history raw item ids, most recent first, right-padded with 0)
    action_types array<byte>  (parallel, padded with 0)

How the rules are expressed in Spark:

- Every field is read as text: JSON with an explicit all-string schema (Spark hands a
  number or an object to a string field as its JSON text) in PERMISSIVE mode with a
  corrupt-record column; CSV files grouped by their header line (a file may carry
  extra columns) with an all-string schema, so that a row with too many or too few
  values is a corrupt record; Parquet columns cast to string. Text is stripped of
  the characters Python's str.strip() removes.
- A row is kept when it is not malformed, every required field is present (not null,
  not empty), every id is a positive int64 (digits only: 3.5, "abc", 0, -7, true are
  not ids), every date is strictly YYYY-MM-DD and exists, every timestamp is ISO 8601
  (pre-checked with a regex for the forms pandas' ISO 8601 parser takes, then cast;
  an offset is converted to UTC, none means UTC) within years 1-9999, and
  `impressions` is a list (anything else fails the JSON record).
- A ranking's entries are exploded with their 0-based position; an entry is kept when
  its item_id is a positive int64 and its is_order a JSON boolean (each entry is
  re-read with from_json as {item_id string, is_order boolean}, so "true" or 1 is not
  a boolean). Exact duplicate shown items (dt, ranking_id, customer_id, item_id,
  position) are collapsed, keeping the first in raw order (files sorted by path, then
  line) for is_order.
- Actions: click (1, item_id, click_time), add-to-cart (2, config_id, occur_at), order
  (3, config_id, midnight UTC of order_date); exact duplicates are kept.
- Split: calendar days counted back from the latest day of the kept shown items.
- Histories: the distinct (customer_id, dt) keys of the output joined to the actions
  on customer_id and dt - lookback <= occurred_at < dt, row_number() over (customer,
  dt) by occurred_at, action_type, item_id descending, the first --max-history kept,
  collected in that order and padded.

Checked against our pipeline with bench/check_alternative.py (same rows, same histories)
on generated data (seeds 0 and 1, 300 and 3,000 customers) and on the fuzzed raw folder
of tests/test_merge_fuzz.py. Where it still differs from merge_and_clean.py, on input
the generator never writes: a JSON line with invalid UTF-8 inside a key, or with text
after its closing brace, is kept (Spark's JSON reader accepts both); an impressions
entry given as a JSON string holding an object's text is read as that object; a
number given for ranking_id keeps its text as written (1e3, not 1000.0); ISO 8601's
basic format (20240301T100000) is refused; gzipped Parquet is refused.
"""

import argparse
import codecs
import csv
import gzip
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

SOURCES = {
    "impressions": ("dt", "ranking_id", "customer_id", "impressions"),
    "clicks": ("dt", "customer_id", "item_id", "click_time"),
    "add_to_carts": ("dt", "customer_id", "config_id", "simple_id", "occur_at"),
    "previous_orders": ("order_date", "customer_id", "config_id"),
}
OPTIONAL = {"simple_id"}
IDS = {"customer_id", "item_id", "config_id", "simple_id"}
DATES = {"dt", "order_date"}
TIMESTAMPS = {"click_time", "occur_at"}
CLICK, ADD_TO_CART, ORDER = 1, 2, 3
US_PER_DAY = 86_400_000_000
FIRST_US = -62_135_596_800_000_000  # 0001-01-01T00:00:00Z
LAST_US = 253_402_300_799_999_999  # 9999-12-31T23:59:59.999999Z
CORRUPT = "_corrupt_record"

# What Python's str.strip() removes (the pipeline strips text fields with it).
WHITESPACE = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) \
    + "\u2028\u2029\u202f\u205f\u3000"
ID_RE = r"^\+?[0-9]{1,19}$"
DATE_RE = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"
# The ISO 8601 forms pandas' ISO8601 parser accepts (an offset only after a time).
ISO_RE = (r"^[0-9]{4}(?:-[0-9]{1,2}(?:-[0-9]{1,2}(?:[T ][0-9]{1,2}(?::[0-9]{1,2}(?::[0-9]{1,2}(?:\.[0-9]*)?)?)?"
          r" *(?:Z|[+-][0-9]{1,2}(?::[0-9]{1,2}|[0-9]{2})?)?)?)?)?$")
# For the forms Spark's cast refuses (a zone right after the hour or minute, offsets beyond ±18:00):
# the local time and the offset apart.
ZONED_RE = r"^([0-9]{4}-[0-9]{1,2}-[0-9]{1,2}[T ][0-9:.]*?) *(?:Z|([+-])([0-9]{1,2})(?::?([0-9]{1,2}))?)$"


class UserError(Exception):
    pass


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("raw", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--driver-memory", default="16g")
    parser.add_argument("--lookback-days", type=int, default=365)
    parser.add_argument("--max-history", type=int, default=1000)
    parser.add_argument("--test-days", type=int, default=1)
    parser.add_argument("--val-days", type=int, default=1)
    parser.add_argument("--train-days", type=int, default=14)
    args = parser.parse_args(argv)
    for name in ("cores", "lookback_days", "max_history"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("test_days", "val_days", "train_days"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative")
    return args


# ---------------------------------------------------------------- files


def file_format(path):
    name = path.name.lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    suffix = Path(name).suffix
    return {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}.get(suffix), gz


def list_files(raw, source):
    """The source's data files by format, sorted by path; a missing or empty source is a UserError."""
    folder = raw / source
    if not folder.is_dir():
        raise UserError(f"raw source {folder}/ is missing")
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and not any(part.startswith((".", "_")) for part in p.relative_to(folder).parts))
    if not files:
        raise UserError(f"raw source {folder}/ is empty")
    by_format = {}
    for path in files:
        fmt, gz = file_format(path)
        if fmt is None:
            raise UserError(f"{path}: unknown format (expected .jsonl, .json, .csv or .parquet, optionally .gz)")
        if fmt == "csv" and source == "impressions":
            raise UserError(f"{path}: impressions cannot be CSV")
        if fmt == "parquet" and gz:
            raise UserError(f"{path}: gzipped Parquet is not supported here")
        by_format.setdefault(fmt, []).append(path)
    return by_format


def csv_header(path):
    """The column names of a CSV file's first non-blank line (lines end in \\n, \\r\\n or \\r); None if it has none."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    data = b""
    with opener(path, "rb") as stream:
        while True:
            chunk = stream.read(1 << 16)
            data += chunk
            text = data.lstrip(b" \t\n\r\x0b\x0c")
            end = re.search(rb"\r|\n", text)
            if end or not chunk:
                break
    if not text.strip():
        return None
    line = text[:end.start()] if end else text
    if line.startswith(codecs.BOM_UTF8):
        line = line[len(codecs.BOM_UTF8):]
    try:
        header = next(csv.reader([line.decode("utf-8")]), [])
    except (UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"{path}: the header row cannot be read ({error})") from None
    if len(set(header)) != len(header):
        raise UserError(f"{path}: the header row names a column more than once")
    return header


# ---------------------------------------------------------------- Spark


def start_spark(args, local_dir):
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.master(f"local[{args.cores}]")
        .appName("recpipe-spark-pipeline")
        .config("spark.driver.memory", args.driver_memory)
        .config("spark.local.dir", str(local_dir))
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.shuffle.partitions", str(max(4, 4 * args.cores)))
        .config("spark.sql.adaptive.enabled", "true")
        .config("spark.sql.adaptive.coalescePartitions.enabled", "true")
        # A CSV row with too many or too few values must be flagged even when a column is not read.
        .config("spark.sql.csv.parser.columnPruning.enabled", "false")
        .config("spark.sql.sources.partitionOverwriteMode", "static")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("WARN")
    return spark


def read_source(spark, raw, source):
    """All files of one source as one DataFrame: the source's fields as text (impressions: a list of
    struct<item_id string, is_order boolean>, or null where it is not a list), `malformed`, and the
    raw order (`file`, `seq`)."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    fields = SOURCES[source]
    entry_type = T.StructType([T.StructField("item_id", T.StringType()), T.StructField("is_order", T.BooleanType())])
    parts = []

    def finish(df, malformed, columns):
        return df.select(
            *columns,
            malformed.alias("malformed"),
            F.col("_metadata.file_path").alias("file"),
            F.monotonically_increasing_id().alias("seq"),
        )

    by_format = list_files(raw, source)
    for fmt, paths in by_format.items():
        paths = [str(p) for p in paths]
        if fmt == "json":
            schema = T.StructType(
                [T.StructField(name, T.ArrayType(T.StringType()) if name == "impressions" else T.StringType())
                 for name in fields] + [T.StructField(CORRUPT, T.StringType())])
            df = spark.read.json(paths, schema=schema, mode="PERMISSIVE", columnNameOfCorruptRecord=CORRUPT,
                                 allowSingleQuotes=False, allowNonNumericNumbers=False)
            columns = []
            for name in fields:
                if name == "impressions":
                    # Each entry was handed over as its JSON text; read it again with is_order as a boolean,
                    # so that "true", 1 or "yes" are not taken for one.
                    columns.append(F.transform(F.col(name), lambda e: F.from_json(
                        e, entry_type, {"allowSingleQuotes": "false", "allowNonNumericNumbers": "false"}))
                        .alias(name))
                else:
                    columns.append(F.col(name))
            parts.append(finish(df, F.col(CORRUPT).isNotNull(), columns))
        elif fmt == "csv":
            groups = {}
            for path in paths:
                header = csv_header(Path(path))
                if header is not None:
                    groups.setdefault(tuple(header), []).append(path)
            for header, group in groups.items():
                schema = T.StructType([T.StructField(name, T.StringType()) for name in header]
                                      + [T.StructField(CORRUPT, T.StringType())])
                df = spark.read.csv(group, schema=schema, header=True, mode="PERMISSIVE",
                                    columnNameOfCorruptRecord=CORRUPT, escape='"', enforceSchema=True,
                                    multiLine=True)  # a quoted value may hold a line end
                columns = [F.col(name) if name in header else F.lit(None).cast("string").alias(name)
                           for name in fields]
                parts.append(finish(df, F.col(CORRUPT).isNotNull(), columns))
        else:
            df = spark.read.parquet(*paths)
            present = {f.name: f.dataType for f in df.schema.fields}
            columns = []
            for name in fields:
                if name not in present:
                    columns.append(F.lit(None).cast(T.ArrayType(entry_type) if name == "impressions"
                                                     else T.StringType()).alias(name))
                elif name == "impressions":
                    dtype = present[name]
                    if not isinstance(dtype, T.ArrayType):
                        # Not a list: the whole ranking is set aside (bad_impressions).
                        columns.append(F.lit(None).cast(T.ArrayType(entry_type)).alias(name))
                        continue
                    element = dtype.elementType
                    names = {f.name: f.dataType for f in element.fields} if isinstance(element, T.StructType) else {}

                    has_item = "item_id" in names
                    has_order = isinstance(names.get("is_order"), T.BooleanType)  # only a boolean is one

                    def entry(e):
                        item = e["item_id"].cast("string") if has_item else F.lit(None).cast("string")
                        order = e["is_order"] if has_order else F.lit(None).cast("boolean")
                        return F.when(e.isNotNull(), F.struct(item.alias("item_id"), order.alias("is_order")))

                    columns.append(F.transform(F.col(name), entry).alias(name))
                else:
                    columns.append(F.col(name).cast("string").alias(name))
            parts.append(finish(df, F.lit(False), columns))
    result = parts[0]
    for part in parts[1:]:
        result = result.unionByName(part)
    return result


def strip(column):
    from pyspark.sql import functions as F
    return F.btrim(column, F.lit(WHITESPACE))


def parse_id(text):
    """A positive int64 given as digits (JSON numbers arrive as their text), else null."""
    from pyspark.sql import functions as F
    value = F.when(text.rlike(ID_RE), text.try_cast("long"))
    return F.when(value >= 1, value)


def parse_date_us(text):
    """Strict YYYY-MM-DD -> microseconds of its midnight UTC, else null."""
    from pyspark.sql import functions as F
    micros = F.unix_date(F.when(text.rlike(DATE_RE), text.try_cast("date"))).cast("long") * US_PER_DAY
    return F.when(micros.between(FIRST_US, LAST_US), micros)


def parse_timestamp_us(text):
    """ISO 8601 -> microseconds UTC (an offset converted, none is UTC), else null."""
    from pyspark.sql import functions as F
    iso = text.rlike(ISO_RE)
    direct = F.unix_micros(text.try_cast("timestamp"))
    # Spark's cast refuses a zone right after the hour or minute and offsets beyond ±18:00, which pandas
    # takes: parse the local time alone and subtract the offset (evaluated only where the cast failed).
    local = F.unix_micros(F.regexp_extract(text, ZONED_RE, 1).try_cast("timestamp"))
    sign = F.when(F.regexp_extract(text, ZONED_RE, 2) == "-", -1).otherwise(1)
    hours = F.regexp_extract(text, ZONED_RE, 3)
    minutes = F.regexp_extract(text, ZONED_RE, 4)
    offset_min = F.when(hours == "", 0).otherwise(hours.cast("int")) * 60 \
        + F.when(minutes == "", 0).otherwise(minutes.cast("int"))
    valid_offset = (F.when(hours == "", 0).otherwise(hours.cast("int")) <= 23) \
        & (F.when(minutes == "", 0).otherwise(minutes.cast("int")) <= 59)
    fallback = F.when(text.rlike(ZONED_RE) & valid_offset,
                      local - sign * offset_min.cast("long") * 60_000_000)
    micros = F.when(iso, F.coalesce(direct, fallback))
    return F.when(micros.between(FIRST_US, LAST_US), micros)


def validated(df, source):
    """(kept rows, parsed columns): a row is kept when it breaks none of the cleaning rules (docs/data.md)."""
    from pyspark.sql import functions as F

    ok = ~F.col("malformed")
    parsed = {}
    for name in SOURCES[source]:
        if name == "impressions":
            ok = ok & F.col(name).isNotNull()
            continue
        text = strip(F.col(name))
        present = text.isNotNull() & (text != "")
        if name in IDS:
            value = parse_id(text)
        elif name in DATES:
            value = parse_date_us(text)
        elif name in TIMESTAMPS:
            value = parse_timestamp_us(text)
        else:
            value = text
        parsed[name] = value
        if name in OPTIONAL:
            ok = ok & (~present | value.isNotNull())
        else:
            ok = ok & present & value.isNotNull()
    return df.select(*[value.alias(name) for name, value in parsed.items()],
                     *(["impressions"] if source == "impressions" else []), "file", "seq", ok.alias("ok"))


def actions(spark, raw):
    from pyspark.sql import functions as F

    parts = []
    for source, action_type, item, time_field in (("clicks", CLICK, "item_id", "click_time"),
                                                   ("add_to_carts", ADD_TO_CART, "config_id", "occur_at"),
                                                   ("previous_orders", ORDER, "config_id", "order_date")):
        df = validated(read_source(spark, raw, source), source).where("ok")
        parts.append(df.select(F.col("customer_id"), F.col(item).alias("item_id"),
                               F.lit(action_type).cast("tinyint").alias("action_type"),
                               F.col(time_field).alias("occurred_us")))
    return parts[0].unionByName(parts[1]).unionByName(parts[2])


def shown_items(spark, raw):
    """One row per kept shown item, exact duplicates collapsed (the first in raw order wins)."""
    from pyspark.sql import functions as F

    rankings = validated(read_source(spark, raw, "impressions"), "impressions").where("ok")
    entries = rankings.select(
        F.col("dt").alias("dt_us"), "ranking_id", "customer_id", "file", "seq",
        F.posexplode("impressions").alias("position", "entry"))
    item_text = strip(F.col("entry.item_id"))
    entries = entries.select(
        "dt_us", "ranking_id", "customer_id", parse_id(item_text).alias("item_id"),
        F.col("position").cast("long").alias("position"), F.col("entry.is_order").alias("is_order"), "file", "seq",
    ).where("item_id IS NOT NULL AND is_order IS NOT NULL")
    key = ["dt_us", "ranking_id", "customer_id", "item_id", "position"]
    return entries.groupBy(*key).agg(F.min_by("is_order", F.struct("file", "seq")).alias("is_order"))


def build(spark, args):
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    shown = shown_items(spark, args.raw)
    # The split: calendar days counted back from the latest impression day.
    last_day_us = shown.agg(F.max("dt_us")).first()[0]
    if last_day_us is None:
        raise UserError(f"{args.raw}/impressions/ holds no valid shown item")
    age = ((F.lit(last_day_us) - F.col("dt_us")) / F.lit(US_PER_DAY)).cast("int")
    split = (F.when(age < args.test_days, "test")
             .when(age < args.test_days + args.val_days, "val")
             .when(age < args.test_days + args.val_days + args.train_days, "train"))
    examples = shown.withColumn("split", split).where(F.col("split").isNotNull())

    keys = examples.select("customer_id", "dt_us").distinct()
    lookback_us = args.lookback_days * US_PER_DAY
    acts = actions(spark, args.raw)
    joined = keys.alias("k").join(
        acts.alias("a"),
        (F.col("a.customer_id") == F.col("k.customer_id"))
        & (F.col("a.occurred_us") >= F.col("k.dt_us") - F.lit(lookback_us))
        & (F.col("a.occurred_us") < F.col("k.dt_us")),
    ).select("k.customer_id", "k.dt_us", "a.item_id", "a.action_type", "a.occurred_us")
    recency = Window.partitionBy("customer_id", "dt_us").orderBy(
        F.col("occurred_us").desc(), F.col("action_type").desc(), F.col("item_id").desc())
    histories = (
        joined.withColumn("rn", F.row_number().over(recency))
        .where(F.col("rn") <= args.max_history)
        .groupBy("customer_id", "dt_us")
        .agg(F.sort_array(F.collect_list(F.struct("rn", "item_id", "action_type"))).alias("h"))
        .select("customer_id", "dt_us",
                F.transform("h", lambda x: x["item_id"]).alias("items"),
                F.transform("h", lambda x: x["action_type"]).alias("types"))
    )

    def padded(column, zero):
        values = F.coalesce(F.col(column), F.array().cast(f"array<{zero}>"))
        return F.concat(values, F.array_repeat(F.lit(0).cast(zero), F.lit(args.max_history) - F.size(values)))

    # The writer needs each task's rows grouped by dt: sorted here, before padding, rather than by the
    # writer after it (rows ten times wider).
    return (
        examples.join(histories, ["customer_id", "dt_us"], "left")
        .withColumn("dt", F.date_format(F.timestamp_micros("dt_us"), "yyyy-MM-dd"))
        .sortWithinPartitions("dt")
        .select(
            F.col("customer_id"), F.col("ranking_id"), F.col("item_id"), F.col("position"), F.col("is_order"),
            F.col("split"),
            padded("items", "bigint").alias("actions"),
            padded("types", "tinyint").alias("action_types"),
            F.col("dt"),
        )
    )


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    args.out = args.out.resolve()
    args.raw = args.raw.resolve()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    local_dir = Path(tempfile.mkdtemp(prefix=".spark-local-", dir=args.out.parent))
    spark = None
    try:
        for source in SOURCES:  # fail fast, naming the source, before Spark starts
            list_files(args.raw, source)
        spark = start_spark(args, local_dir)
        from pyspark.sql import Observation
        from pyspark.sql import functions as F

        rows = build(spark, args)
        observation = Observation("written")
        rows = rows.observe(observation, F.count(F.lit(1)).alias("rows"))
        rows.write.mode("overwrite").partitionBy("dt").parquet(str(args.out))
        written = observation.get["rows"]
        print(f"spark_pipeline: wrote {written:,} rows to {args.out} in {time.perf_counter() - started:.1f} s "
              f"(local[{args.cores}], driver memory {args.driver_memory})", flush=True)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if spark is not None:
            spark.stop()
        shutil.rmtree(local_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
