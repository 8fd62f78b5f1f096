"""Benchmark the four scripts on a landing zone of daily files against the same rows in 16 files.

    .venv/bin/python bench/bench_landing_zone.py --customers 5000 --actions-per-customer 100
    .venv/bin/python bench/bench_landing_zone.py --files-per-day 32   # a producer per 45 minutes: 4,992 raw files

Generates raw data with generate_data.py into --work/generated (reused when its parameters match),
then writes its rows again two ways, the same lines in the same order:

  daily    one file per source and day (the day of each row: its dt, or its order_date; a row
           without a readable one stays on its file's day), or, with --files-per-day K, each
           day's rows cut into K consecutive files, as K producers' drops of a day would be;
  sixteen  16 files in all, 4 per source, each a run of consecutive days.

Impressions and previous orders as JSON Lines, clicks as gzipped JSON Lines, add-to-carts as CSV
(the generator's Parquet rows become JSON lines, and its CSV files without a `channel` column get
an empty one, so that every CSV file has the same header). Then, for each layout, runs
merge_and_clean.py, repartition.py, parse_ua_strings.py and preprocess.py in order, each its own
measured process with default flags, and checks that the two processed/ folders hold the same
examples and timelines (table contents sorted by their keys, not file bytes) and merged/ the same
accounting. Prints and saves bench/results/landing_zone.json (and .png).
"""

import argparse
import datetime as dt
import gzip
import json
import re
import shutil
import sys
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from measure import ROOT, add_data_arguments, ensure_raw, run_measured, save_report

sys.path.insert(0, str(ROOT))
from recpipe.raw import SOURCES, file_format, list_source_files  # noqa: E402

STAGES = ("merge_and_clean.py", "repartition.py", "parse_ua_strings.py", "preprocess.py")
DAY_FIELD = {"impressions": "dt", "clicks": "dt", "add_to_carts": "dt", "previous_orders": "order_date"}
SUFFIX = {"impressions": ".jsonl", "clicks": ".jsonl.gz", "add_to_carts": ".csv", "previous_orders": ".jsonl"}
CSV_HEADER = b"dt,customer_id,config_id,simple_id,occur_at,channel"
_DATE = re.compile(rb"\d{4}-\d{2}-\d{2}")


def day_of(text):
    """The date a text starts with, if it is one; else None."""
    match = _DATE.match(text)
    if match is None:
        return None
    try:
        return dt.date.fromisoformat(match.group().decode())
    except ValueError:
        return None


def source_lines(raw, source):
    """[(day, line)] of one generated source, in raw order (its files sorted, then their lines), each line
    ending in \\n, blank lines left out (they are no rows)."""
    lines = []
    field = re.compile(rb'"' + DAY_FIELD[source].encode() + rb'"\s*:\s*"')
    for path in list_source_files(raw, source):
        file_day = day_of(path.name.encode())
        fmt = file_format(path)
        if fmt == ".parquet":
            table = pq.read_table(path)
            texts = [orjson.dumps(row, default=str) for row in table.to_pylist()]
        else:
            data = path.read_bytes()
            data = gzip.decompress(data) if path.name.endswith(".gz") else data
            texts = data.splitlines()
            if fmt == ".csv":
                header, texts = texts[0], texts[1:]
                if not header.endswith(b",channel"):
                    texts = [text + b"," for text in texts]
        for text in texts:
            if not text.strip():
                continue
            if fmt == ".csv":
                day = day_of(text)
            else:
                found = field.search(text)
                day = day_of(text[found.end():]) if found else None
            lines.append((day or file_day, text + b"\n"))
    first = min(day for day, _ in lines if day is not None)
    return [(day or first, line) for day, line in lines]  # backfill.jsonl has no day of its own


def write_file(path, source, lines):
    data = b"".join(lines)
    if source == "add_to_carts":
        data = CSV_HEADER + b"\n" + data
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, compresslevel=6, mtime=0) if path.name.endswith(".gz") else data)


def write_layouts(generated, work, files_per_day):
    """Write work/<layout>/raw for both layouts from the generated rows; return {layout: files}."""
    counts = {"daily": 0, "sixteen": 0}
    for layout in counts:
        shutil.rmtree(work / layout, ignore_errors=True)
    for source in SOURCES:
        lines = sorted(source_lines(generated, source), key=lambda pair: pair[0])  # stable: raw order in a day
        days = sorted({day for day, _ in lines})
        by_day = {day: [] for day in days}
        for day, line in lines:
            by_day[day].append(line)
        for day, of_day in by_day.items():
            for part in range(files_per_day):
                piece = of_day[len(of_day) * part // files_per_day:len(of_day) * (part + 1) // files_per_day]
                name = f"{day}{'' if files_per_day == 1 else f'-{part:03d}'}{SUFFIX[source]}"
                if piece:
                    write_file(work / "daily" / "raw" / source / name, source, piece)
                    counts["daily"] += 1
        # Four runs of whole days, as near a quarter of the rows each as whole days allow.
        at, runs = 0, []
        for quarter in range(1, 5):
            end = at
            while end < len(days) and (sum(len(by_day[d]) for d in days[:end + 1]) <= len(lines) * quarter / 4
                                       or end == at):
                end += 1
            runs.append(days[at:end] if quarter < 4 else days[at:])
            at = end
        for number, run in enumerate(runs):
            if run:
                write_file(work / "sixteen" / "raw" / source / f"part-{number}{SUFFIX[source]}", source,
                           [line for day in run for line in by_day[day]])
                counts["sixteen"] += 1
    return counts


def run_layout(data):
    """The four scripts on data/raw, in order, each measured: {stage: figures}."""
    for folder in ("merged", "repartitioned", "cleaned", "processed", "preprocessors"):
        shutil.rmtree(data / folder, ignore_errors=True)
    stages = {}
    for stage in STAGES:
        extra = ["--preprocessors", data / "preprocessors"] if stage == "preprocess.py" else []
        command = [sys.executable, stage, "--data", data, *extra]
        print(f"\n##### {data.name}: {stage}", flush=True)
        result = run_measured([str(part) for part in command], cwd=ROOT)
        if result["returncode"] != 0:
            raise SystemExit(f"{stage} failed on {data} with status {result['returncode']}")
        stages[stage] = {"seconds": round(result["seconds"], 2),
                         "peak_rss_gib": round(result["peak_rss_bytes"] / 2**30, 2)}
    return stages


def files_of(folder):
    return sum(1 for path in Path(folder).rglob("*.parquet"))


def stage_files(data):
    """Parquet files each stage published (its current version)."""
    return {stage: files_of(data / stage) for stage in ("merged", "repartitioned", "cleaned", "processed")}


def sorted_table(folder):
    """Every row under `folder` (hive partitions as columns), sorted by its columns that are not lists."""
    table = ds.dataset(folder, format="parquet", partitioning="hive").to_table()
    keys = [name for name in table.column_names if not pa.types.is_list(table.schema.field(name).type)
            and not pa.types.is_large_list(table.schema.field(name).type)]
    return table.select(sorted(table.column_names)).sort_by([(name, "ascending") for name in sorted(keys)])


def processed_tables(data):
    processed = data / "processed"
    tables = {"timelines": processed / "timelines"}
    for split in sorted(path.name for path in processed.iterdir() if (path / "examples").is_dir()):
        tables[f"{split}/examples"] = processed / split / "examples"
    return tables


def compare(first, second):
    """{table: whether the two data folders' processed/ tables hold the same rows}, and merged/'s accounting."""
    first_tables, second_tables = processed_tables(first), processed_tables(second)
    result = {"same_tables": sorted(first_tables) == sorted(second_tables)}
    for name in first_tables:
        if name in second_tables:
            a, b = sorted_table(first_tables[name]), sorted_table(second_tables[name])
            result[name] = {"rows": a.num_rows, "equal": a.equals(b)}
    accounting = [json.loads((data / "merged" / "_stage.json").read_text())["accounting"] for data in (first, second)]
    result["merged_accounting_equal"] = accounting[0] == accounting[1]
    result["all_equal"] = (result["same_tables"] and result["merged_accounting_equal"]
                           and all(value["equal"] for value in result.values() if isinstance(value, dict)))
    return result


def plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layouts = list(report["layouts"])
    figure, axis = plt.subplots(figsize=(7, 3.2))
    left = [0.0] * len(layouts)
    for stage in STAGES:
        seconds = [report["layouts"][layout]["stages"][stage]["seconds"] for layout in layouts]
        axis.barh(layouts, seconds, left=left, label=stage.removesuffix(".py"))
        left = [a + b for a, b in zip(left, seconds)]
    labels = [f"{layout}\n{report['layouts'][layout]['raw_files']:,} raw files" for layout in layouts]
    axis.set_yticks(range(len(layouts)), labels)
    axis.set_xlabel("seconds, end to end (four scripts)")
    axis.set_title(f"{report['action_rows']:,} raw actions: daily files / 16 files = {report['daily_over_sixteen']}x",
                   fontsize=10)
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser)
    parser.set_defaults(customers=5000, work="/tmp/recpipe-landing")
    parser.add_argument("--files-per-day", type=int, default=1, help="raw files per source and day (daily layout)")
    parser.add_argument("--only", choices=("daily", "sixteen"), help="run one layout (the files are written anyway)")
    parser.add_argument("--name", default="landing_zone", help="the report's name under bench/results/")
    args = parser.parse_args()
    work = Path(args.work)
    generated_args = argparse.Namespace(**{**vars(args), "work": str(work / "generated")})
    generated, parameters = ensure_raw(generated_args)
    raw_files = write_layouts(generated, work, args.files_per_day)
    print(f"raw files: {raw_files}", flush=True)
    layouts = {}
    for layout in ("daily", "sixteen"):
        if args.only in (None, layout):
            stages = run_layout(work / layout)
            layouts[layout] = {"raw_files": raw_files[layout], "stages": stages,
                               "seconds": round(sum(stage["seconds"] for stage in stages.values()), 2),
                               "files_written": stage_files(work / layout)}
    expected = json.loads((generated / "_generated.json").read_text())["expected"]
    report = {"parameters": {**parameters, "files_per_day": args.files_per_day},
              "action_rows": sum(expected[s]["rows_in"] for s in ("clicks", "add_to_carts", "previous_orders")),
              "layouts": layouts}
    if len(layouts) == 2:
        report["daily_over_sixteen"] = round(layouts["daily"]["seconds"] / layouts["sixteen"]["seconds"], 2)
        daily, sixteen = layouts["daily"]["stages"], layouts["sixteen"]["stages"]
        report["per_stage_daily_over_sixteen"] = {
            stage: round(daily[stage]["seconds"] / sixteen[stage]["seconds"], 2) for stage in STAGES}
        report["outputs"] = compare(work / "daily", work / "sixteen")
    save_report(args.name, report)
    if len(layouts) == 2:
        plot(report, ROOT / "bench" / "results" / f"{args.name}.png")


if __name__ == "__main__":
    main()
