"""parse_ua_strings' work on the cluster: repartitioned/ -> cleaned/, with the user agent parsed.

One task per impressions bucket (`repartitioned/impressions/bucket=NNNNN/`) reads the
bucket's part files in order, finds its distinct user-agent strings, parses each one
once with ua-parser and maps the parsed fields back onto every row through the
dictionary indices (Arrow kernels, no Python loop over rows); it writes
`cleaned/impressions/bucket=NNNNN/` with the same rows in the same order. One task per
actions folder passes its files on unchanged (hard links where the disk has them).

Why per distinct string: a bucket of a million shown items carries a few thousand
distinct user agents (customers keep their device), and ua-parser tries hundreds of
regular expressions in turn on each string: ~30 us with its native (Rust) resolver,
~750 us with the pure-Python one. Parsing every row would cost more than the rest of
the stage together.

The columns added (schemas.USER_AGENT_FIELDS), by these rules:
  - an empty user agent (or only whitespace, or null) is missing: every family,
    version, brand and model is null and is_bot is False;
  - anything else is parsed: ua-parser answers "Other" for a family it does not
    recognize (garbage included) and gives no version, brand or model (null) where it
    finds none;
  - is_bot is device_family == "Spider", ua-parser's device family for crawlers.
"""

import importlib.metadata
import threading
import time

import pyarrow as pa
import pyarrow.compute as pc
import ua_parser

from recpipe import cluster, schemas, stage, stages, storage, summary
from recpipe.cli import UserError
from recpipe.cluster import task_key, wait_with_progress
from recpipe.tables import parquet_file, read_parts, write_sized

FIELDS = [name for name, _ in schemas.USER_AGENT_FIELDS]
TYPES = dict(schemas.USER_AGENT_FIELDS)
BOT_DEVICE_FAMILY = "Spider"
MISSING = (None, None, None, None, None, None, None, False)  # an empty user agent, in FIELDS order

_resolver = None
_resolver_lock = threading.Lock()  # a worker may run several tasks in threads

# ua-parser's answers in this process, by string: the buckets share most of their user agents
# (2,373 distinct strings in all against 26,238 counted bucket by bucket, 5.5 M actions), and a
# parse is a pure function of the string and the pinned parser. Emptied when it reaches the bound.
_parsed = {}
_parsed_lock = threading.Lock()
PARSED_KEPT = 2**18


def run_stage(args):
    """parse_ua_strings.py: publish cleaned/ from repartitioned/ (see stages.STAGES)."""
    this = stages.BY_NAME["cleaned"]
    require_native_resolver()

    with stage.reading(args.data, this.reads) as repartitioned:
        manifest = repartitioned.manifest
        # Row groups as repartition.py sized them, so that readers of cleaned/ get the same bound.
        row_group_mb = manifest["parameters"].get("row_group_mb", 64)
        parameters = {"row_group_mb": row_group_mb, **parser_version()}
        expected_rows = {table: described["rows"] for table, described in manifest["tables"].items()}
        threads = cluster.in_process_reason(args, stage.table_bytes(manifest), this.reads)
        with stage.publish(args.data, this.name, parameters, [repartitioned.entry()]) as run, \
                cluster.connect(args, threads) as client:
            run.accounting, parsed, group_sizes = parse_ua_strings(
                client, repartitioned.path, run.path, row_group_mb, expected_rows)
            run.extra["user_agents"] = parsed
            if group_sizes:
                run.extra["row_group_mib_in_memory"] = {"impressions": stage.size_stats(group_sizes)}
            rate = f"{parsed['parsed_per_second']:,}/s per core" if parsed["parsed_per_second"] else "-"
            print(f"user agents: {parsed['distinct']:,} distinct strings in {parsed['buckets']} buckets, "
                  f"{parsed['parsed']:,} parsed (the others a worker had parsed before; {rate}); "
                  f"{parsed['bots']:,} rows flagged as bots, {parsed['missing']:,} rows without a user agent")

    summary.print_summary(run.published)


def require_native_resolver():
    """Stop where ua-parser's native resolver is missing, rather than run ~25 times slower."""
    if ua_parser.RegexResolver is None:
        raise UserError(
            "ua-parser's native resolver (package ua-parser-rs) is not installed in this Python "
            "environment; install the pinned requirements there (pip install -r requirements.txt, which "
            "has ua-parser[regex]): the pure-Python resolver would make this stage ~25x slower")


def resolver():
    """ua-parser's native (Rust) resolver over its bundled regexes, built once per process.

    Built explicitly rather than through ua_parser.parse(): the default parser picks the
    best resolver it finds and silently falls back to pure Python, and wraps it in a
    cache that would only cost here, since each string reaches it once per bucket.
    """
    global _resolver
    with _resolver_lock:
        if _resolver is None:
            require_native_resolver()
            _resolver = ua_parser.RegexResolver(ua_parser.load_lazy_builtins())
    return _resolver


def parser_version():
    """The packages that decide what the parsed columns hold; recorded in the manifest."""
    version = importlib.metadata.version
    return {"ua_parser": version("ua-parser"), "regexes": f"ua-parser-builtins {version('ua-parser-builtins')}",
            "resolver": f"ua-parser-rs {version('ua-parser-rs')}"}


def parse_user_agent(user_agent):
    """ua-parser's answer for one non-empty string, as a tuple in FIELDS order."""
    result = resolver()(user_agent, ua_parser.Domain.ALL).complete().with_defaults()
    browser, os, device = result.user_agent, result.os, result.device
    # `or`: an empty family or version is as good as none; keep the schema's two meanings
    # of null (missing user agent) and "Other" (not recognized) apart.
    device_family = device.family or "Other"
    return (browser.family or "Other", browser.major or None, os.family or "Other", os.major or None,
            device_family, device.brand or None, device.model or None, device_family == BOT_DEVICE_FAMILY)


def parse_partition(table):
    """Append FIELDS to a table of impressions, parsing each distinct user agent once.

    Returns (table, stats) where stats counts rows, distinct strings parsed, parse
    seconds, rows flagged as bots and rows with no user agent.
    """
    # One dictionary for the whole partition; unify_dictionaries guarantees every chunk
    # (one per part file) indexes into the same one.
    agents = pc.dictionary_encode(table.column("user_agent")).unify_dictionaries()
    if table.num_rows == 0:
        distinct, chunks = pa.array([], pa.string()), []
    else:
        distinct, chunks = agents.chunk(0).dictionary, agents.chunks
    # Strings that differ only by surrounding whitespace are one user agent: strip the
    # (small) dictionary, then encode it again so that each stripped form is parsed once.
    stripped = pc.dictionary_encode(pc.utf8_trim_whitespace(distinct))
    to_parse = stripped.dictionary.to_pylist()

    with _parsed_lock:
        answers = {user_agent: _parsed[user_agent] for user_agent in to_parse if user_agent in _parsed}
    new = [user_agent for user_agent in to_parse if user_agent and user_agent not in answers]
    if new:
        resolver()  # built (its regexes compiled) outside the timing: once per process, not per string
    started = time.perf_counter()
    parsed_now = {user_agent: parse_user_agent(user_agent) for user_agent in new}
    seconds = time.perf_counter() - started
    with _parsed_lock:
        if len(_parsed) + len(parsed_now) > PARSED_KEPT:
            _parsed.clear()
        _parsed.update(parsed_now)
    answers.update(parsed_now)
    values = {name: [] for name in FIELDS}
    for user_agent in to_parse:
        for name, value in zip(FIELDS, answers[user_agent] if user_agent else MISSING):
            values[name].append(value)

    for name in FIELDS:
        # parsed value of each stripped string -> of each distinct string -> of each row
        of_distinct = pa.array(values[name], TYPES[name]).take(stripped.indices)
        column = pa.chunked_array(
            [pa.DictionaryArray.from_arrays(chunk.indices, of_distinct).cast(TYPES[name]) for chunk in chunks],
            TYPES[name])
        if name == "is_bot":
            column = column.fill_null(False)  # a null user agent (the schema allows none) is missing
        table = table.append_column(pa.field(name, TYPES[name]), column)

    stats = {
        "rows": table.num_rows,
        "distinct": sum(1 for user_agent in to_parse if user_agent),
        "parsed": len(new),
        "parse_seconds": seconds,
        "bots": pc.sum(table.column("is_bot")).as_py() or 0,
        "missing": table.column("browser_family").null_count,
    }
    return table, stats


def clean_impressions_bucket(bucket_dir, out_dir, row_group_mb):
    """One impressions bucket (runs on a worker): parse its user agents, write it in the same row order."""
    bucket_dir = storage.path(bucket_dir)
    impressions = read_parts(bucket_dir, schemas.IMPRESSIONS)
    cleaned, stats = parse_partition(impressions)
    target = storage.path(out_dir) / "impressions" / bucket_dir.name
    group_sizes = write_sized(cleaned, target, schemas.CLEANED_IMPRESSIONS, row_group_mb)
    return {"bucket": bucket_dir.name, "rows_in": impressions.num_rows, "kept": cleaned.num_rows,
            "group_sizes": group_sizes, "parser": parser_version(), **stats}


def share_actions_folder(folder, in_root, out_root):
    """Pass one folder's action files on unchanged (runs on a worker); return their row count.

    Hard links where the file system has them (storage.share): the stage writes no byte of the
    actions, the two folders hold one copy of them, and deleting repartitioned/ leaves cleaned/
    whole (and gives back only what cleaned/ does not share).
    """
    rows = 0
    in_root = storage.path(in_root)
    for path in sorted(storage.path(folder).glob("*.parquet")):
        target = storage.path(out_root) / str(path.relative_to(in_root))
        storage.share(path, target)
        try:
            rows += parquet_file(target).metadata.num_rows
        except (OSError, pa.ArrowException) as error:
            raise UserError(f"{path}: not a readable Parquet file ({error}); run repartition.py again "
                            "to rewrite repartitioned/") from None
    return rows


def parse_ua_strings(client, in_dir, out_dir, row_group_mb, expected_rows=None):
    """Parse every impressions bucket of `in_dir` (repartitioned/) into `out_dir` (a staging folder)
    and pass the actions on.

    `expected_rows` ({table: rows}, from repartitioned/'s manifest) is checked against what
    was read. Returns (accounting, user-agent summary, in-memory row group sizes of impressions).
    """
    in_dir, out_dir = storage.path(in_dir), storage.path(out_dir)
    buckets = sorted(path for path in (in_dir / "impressions").glob("bucket=*") if path.is_dir())
    action_folders = sorted({path.parent for path in (in_dir / "actions").rglob("*.parquet")})
    if not buckets:
        raise UserError(f"{in_dir / 'impressions'}/ holds no bucket=NNNNN/ folders; run repartition.py again")
    if not action_folders:
        raise UserError(f"{in_dir / 'actions'}/ holds no Parquet files; run repartition.py again")

    # Both kinds of task go in at once: passing files on is disk-bound, parsing is CPU-bound.
    futures = [client.submit(clean_impressions_bucket, str(bucket), str(out_dir), row_group_mb,
                             key=task_key(f"parse-user-agents-{bucket.name}"), pure=False) for bucket in buckets]
    futures += [client.submit(share_actions_folder, str(folder), str(in_dir), str(out_dir),
                              key=task_key(f"share-actions-{folder.relative_to(in_dir)}"), pure=False)
                for folder in action_folders]
    results = wait_with_progress(futures, "parsing user agents, passing the actions on")
    reports, action_rows = results[:len(buckets)], sum(results[len(buckets):])

    local = parser_version()
    for report in reports:
        if report["parser"] != local:
            raise UserError(f"a worker parses with {report['parser']}, this client with {local}; install the same "
                            "requirements.txt on every worker so that cleaned/ matches its manifest")
    impression_rows = sum(report["rows_in"] for report in reports)
    for table, rows in (("impressions", impression_rows), ("actions", action_rows)):
        expected = (expected_rows or {}).get(table)
        if expected is not None and expected != rows:
            raise UserError(f"{in_dir / table}/ holds {rows:,} rows but its _stage.json records {expected:,}: "
                            "repartitioned/ changed after it was published; run repartition.py again")

    accounting = {
        "impressions": {"rows_in": impression_rows, "kept": sum(report["kept"] for report in reports)},
        "actions": {"rows_in": action_rows, "kept": action_rows},
    }
    parse_seconds = sum(report["parse_seconds"] for report in reports)
    parsed = sum(report["parsed"] for report in reports)
    summary = {
        "distinct": sum(report["distinct"] for report in reports),
        "parsed": parsed,
        "parsed_per_second": round(parsed / parse_seconds) if parsed and parse_seconds else None,
        "parse_seconds": round(parse_seconds, 3),
        "bots": sum(report["bots"] for report in reports),
        "missing": sum(report["missing"] for report in reports),
        "buckets": len(reports),
    }
    group_sizes = [size for report in reports for size in report["group_sizes"]]
    return accounting, summary, group_sizes
