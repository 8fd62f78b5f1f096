"""Stage mechanics: every stage publishes its output folder through this module.

A stage writes into a staging folder beside its target (`data/.merged.staging-<host>-<pid>`)
and renames it into place only after everything succeeded, with a `_stage.json`
manifest recording its inputs, parameters, code version, row accounting, tables,
timings, and two fingerprints that `recpipe.pipeline` judges staleness by:

- `output_sha256`: a hash of every file the stage wrote. Stages are deterministic, so
  re-running one on the same input with the same parameters gives the same fingerprint.
- `lineage`: everything this output was made from, all the way back: the raw files'
  fingerprint, and every earlier stage's fingerprint and parameters, so staleness can
  still be judged (and a stage remade as it was) after intermediate stages were deleted.

A failed, interrupted or terminated stage removes its staging folder; a SIGKILLed one
leaves it behind, and the next run of that stage removes it. Readers therefore only
ever see a complete previous output, or none.
"""

import concurrent.futures
import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from recpipe.cli import UserError

MANIFEST = "_stage.json"

# Each stage folder under --data, and the script that makes it.
SCRIPTS = {
    "merged": "merge_and_clean.py",
    "repartitioned": "repartition.py",
    "cleaned": "parse_ua_strings.py",
    "processed": "preprocess.py",
}

_PACKAGE_DIR = Path(__file__).resolve().parent


def read_manifest(stage_dir):
    path = Path(stage_dir) / MANIFEST
    with open(path) as f:
        return json.load(f)


def require_stage(data_dir, name):
    """Return the manifest of an input stage, or stop with which script makes it."""
    stage_dir = Path(data_dir) / name
    if not (stage_dir / MANIFEST).is_file():
        state = "is incomplete (no _stage.json)" if stage_dir.exists() else "is missing"
        raise UserError(f"{stage_dir}/ {state}: run {SCRIPTS[name]} first")
    return read_manifest(stage_dir)


def stage_input(data_dir, name):
    """The manifest entry for a stage this stage reads: its path, its output's fingerprint and its lineage."""
    manifest = require_stage(data_dir, name)
    manifest_path = Path(data_dir) / name / MANIFEST
    return {"stage": name, "path": str(Path(data_dir, name).resolve()), "manifest_sha256": _sha256_file(manifest_path),
            "output_sha256": manifest.get("output_sha256"), "parameters": manifest.get("parameters", {}),
            "lineage": manifest.get("lineage", {})}


def raw_input(raw_dir, files):
    """The manifest entry for raw files: a fingerprint of their names, sizes and mtimes.

    Hashing the content of terabytes of logs on every run would cost more than the
    stage; names, sizes and mtimes change whenever a file is replaced or appended to.
    """
    listing = [(str(Path(f).relative_to(raw_dir)), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in sorted(files)]
    digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    return {"raw": str(Path(raw_dir).resolve()), "files": len(listing),
            "bytes": sum(size for _, size, _ in listing), "fingerprint_sha256": digest}


def lineage(inputs):
    """What an output is made of: the raw files' fingerprint, every earlier stage's fingerprint and parameters."""
    made_of = {}
    for entry in inputs:
        if "raw" in entry:
            made_of["raw"] = {"fingerprint_sha256": entry["fingerprint_sha256"]}
        else:
            made_of.update(entry.get("lineage", {}))
            made_of[entry["stage"]] = {"output_sha256": entry.get("output_sha256"), "parameters": entry["parameters"]}
    return made_of


class StageRun:
    """A stage being written: `path` is its staging folder; `accounting` ends up in the manifest."""

    def __init__(self, name, data_dir, staging, parameters, inputs):
        self.name = name
        self.data_dir = Path(data_dir)
        self.path = staging
        self.parameters = parameters
        self.inputs = inputs
        self.accounting = {}
        self.extra = {}
        self.started_at = dt.datetime.now(dt.timezone.utc)
        self._started = time.monotonic()

    def manifest(self):
        check_accounting(self.accounting)
        return {
            "stage": self.name,
            "script": SCRIPTS.get(self.name),
            "code_version": code_version(),
            "inputs": self.inputs,
            "parameters": self.parameters,
            "accounting": self.accounting,
            "tables": describe_tables(self.path),
            "output_sha256": output_fingerprint(self.path),
            "lineage": lineage(self.inputs),
            **self.extra,
            "started_at": self.started_at.isoformat(timespec="seconds"),
            "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.monotonic() - self._started, 2),
        }


@contextlib.contextmanager
def publish(data_dir, name, parameters, inputs):
    """Yield a StageRun writing into a staging folder; on success, swap it in as `data_dir/name`.

    Anything raised inside (including SystemExit from SIGTERM and KeyboardInterrupt)
    removes the staging folder and leaves the previous output untouched.
    """
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    remove_abandoned_staging(data_dir, name)
    staging = data_dir / f".{name}.staging-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    run = StageRun(name, data_dir, staging, parameters, inputs)
    try:
        yield run
        manifest = run.manifest()
        run.published = manifest
        with open(staging / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        replace_dir(staging, data_dir / name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def replace_dir(staging, target):
    """Replace target by staging with two renames; the old folder is deleted last.

    Between the renames (microseconds) a kill leaves no target at all, which the
    contract allows ("the previous output, or none"); it never leaves a partial one.
    """
    retired = target.with_name(f".{target.name}.retired-{os.getpid()}")
    if target.exists():
        os.rename(target, retired)
    os.rename(staging, target)
    _fsync_dir(target.parent)
    shutil.rmtree(retired, ignore_errors=True)


def leftovers(data_dir, name):
    """This stage's staging/retired folders under data_dir, each as (path, whether its run is dead).

    A folder whose owner pid is gone (on this host) was left by a killed run. One of
    another host, or of a live pid, may belong to a run in progress: it is reported, not touched.
    """
    host = socket.gethostname()
    found = []
    for leftover in sorted(Path(data_dir).glob(f".{name}.*-*")):
        kind_and_owner = leftover.name[len(name) + 2:]
        pid_text = kind_and_owner.rsplit("-", 1)[-1]
        owned_here = kind_and_owner.startswith("retired-") or kind_and_owner.startswith(f"staging-{host}-")
        found.append((leftover, owned_here and pid_text.isdigit() and not _pid_alive(int(pid_text))))
    return found


def remove_abandoned_staging(data_dir, name):
    """Delete staging/retired folders of this stage left by runs that were killed (their pid is gone)."""
    for leftover, abandoned in leftovers(data_dir, name):
        if abandoned:
            print(f"removing {leftover}, left behind by a killed run")
            shutil.rmtree(leftover, ignore_errors=True)


def _pid_alive(pid):
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_accounting(accounting):
    """Every row in ends in exactly one place; a stage that cannot show it does not publish."""
    for source, counts in accounting.items():
        out = counts["kept"] + sum(counts.get("set_aside", {}).values()) + counts.get("duplicates_dropped", 0)
        if out != counts["rows_in"]:
            raise RuntimeError(
                f"accounting of {source} does not balance: {counts['rows_in']} rows in, but kept + set aside "
                f"+ duplicates dropped = {out} ({counts}); this is a bug, the stage was not published"
            )


def write_table(frame, path, schema, row_group_size=None):
    """Write a pandas frame as Parquet with exactly `schema`: no inferred or object dtypes reach disk.

    Casting here fails loudly on a column of the wrong type instead of writing a file
    whose types differ from its neighbours' (what breaks Dask reads and shuffles later).
    """
    table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return table.num_rows


def write_sized(table, directory, schema, row_group_mb, basename="part"):
    """Write an Arrow table with PyArrow's dataset writer: row groups near `row_group_mb` of
    uncompressed data, files of whole row groups (at most 16), rows in their given order.
    Returns the in-memory size in bytes of each row group written.

    "Uncompressed" means as a reader holds it in memory (Arrow), which is what bounds a
    Dask worker; Parquet's own "uncompressed" size is after dictionary and run-length
    encoding, often several times smaller.
    """
    table = table.cast(schema)
    directory = Path(directory)
    if table.num_rows == 0:  # the dataset writer writes no file for no rows; keep the folder readable
        directory.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, directory / f"{basename}-00000.parquet")
        return []
    bytes_per_row = max(1.0, table.nbytes / table.num_rows)
    rows_per_group = max(1, int(row_group_mb * 2**20 / bytes_per_row))
    ds.write_dataset(
        table, directory, format="parquet", basename_template=f"{basename}-{{i}}.unnumbered",
        min_rows_per_group=rows_per_group, max_rows_per_group=rows_per_group,
        max_rows_per_file=16 * rows_per_group, preserve_order=True,
        existing_data_behavior="overwrite_or_ignore",
    )
    # pyarrow numbers files 0, 1, … 10 unpadded; padded names sort in write order (part-2 before part-10).
    for written in directory.glob(f"{basename}-*.unnumbered"):
        number = int(written.name[len(basename) + 1:-len(".unnumbered")])
        written.rename(directory / f"{basename}-{number:05d}.parquet")
    return [table.slice(start, rows_per_group).nbytes for start in range(0, table.num_rows, rows_per_group)]


def read_parts(directory, schema, columns=None):
    """Every Parquet file of a folder, in name order (write order), as one table of exactly `schema`
    (or of its `columns` only: Parquet then reads nothing else).

    A missing or empty folder is an empty table: a bucket may have no rows of a table.
    """
    if columns is not None:
        schema = pa.schema([schema.field(name) for name in columns])
    files = sorted(path for path in Path(directory).glob("*.parquet") if not path.name.startswith((".", "_")))
    tables = []
    for path in files:
        try:
            tables.append(pq.read_table(path, schema=schema, columns=schema.names))
        except (OSError, pa.ArrowException) as error:
            raise UserError(f"{path}: not a readable table of {', '.join(schema.names)} ({error}); "
                            "run the stage that wrote it again") from None
    return pa.concat_tables(tables) if tables else schema.empty_table()


def size_stats(sizes):
    """min / median / max in MiB, and how many, of a list of sizes in bytes."""
    sizes = [size / 2**20 for size in sizes]
    return {"min": round(min(sizes), 2), "median": round(statistics.median(sizes), 2),
            "max": round(max(sizes), 2), "count": len(sizes)}


def describe_tables(stage_dir):
    """Rows, files, bytes and Parquet row-group sizes (MiB, encoded, before compression) of every table.

    A table is a sub-folder holding Parquet; its partition folders (`dt=…`, `bucket=…`)
    belong to it.
    """
    stage_dir = Path(stage_dir)
    tables, group_sizes = {}, {}
    for file in sorted(stage_dir.rglob("*.parquet")):
        table = str(file.parent.relative_to(stage_dir))
        table = "/".join(part for part in table.split("/") if "=" not in part) or "."
        entry = tables.setdefault(table, {"rows": 0, "files": 0, "bytes": 0})
        metadata = pq.ParquetFile(file).metadata
        entry["rows"] += metadata.num_rows
        entry["files"] += 1
        entry["bytes"] += file.stat().st_size
        group_sizes.setdefault(table, []).extend(
            metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
    for table, sizes in group_sizes.items():
        if sizes:
            tables[table]["parquet_row_group_mib"] = size_stats(sizes)
    return tables


def output_fingerprint(stage_dir):
    """sha256 over every file of a stage folder (but its manifest): names and contents.

    Content, not timestamps: a stage re-run on the same input with the same parameters
    writes the same bytes, so what was made from it stays fresh. Files are hashed on
    a thread each per core (hashlib releases the GIL), about 1 GB/s per core.
    """
    stage_dir = Path(stage_dir)
    files = sorted(path for path in stage_dir.rglob("*") if path.is_file() and path.name != MANIFEST)
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        hashes = list(pool.map(_sha256_file, files))
    digest = hashlib.sha256()
    for path, file_hash in zip(files, hashes):
        digest.update(f"{path.relative_to(stage_dir)}\0{file_hash}\n".encode())
    return digest.hexdigest()


def folder_bytes(path):
    """Bytes of every file under a folder: what deleting it gives back."""
    return sum(file.stat().st_size for file in Path(path).rglob("*") if file.is_file() and not file.is_symlink())


def code_version():
    """A hash of the package and scripts' source: it changes exactly when the code does."""
    digest = hashlib.sha256()
    root = _PACKAGE_DIR.parent
    for source in sorted([*_PACKAGE_DIR.glob("*.py"), *root.glob("*.py")]):
        digest.update(source.name.encode())
        digest.update(source.read_bytes())
    version = {"source_sha256": digest.hexdigest()[:16]}
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            version["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return version


def _sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


def print_summary(manifest):
    """The closing one-screen summary: rows in / out / set aside by reason, bytes, seconds."""
    print(f"\n{manifest['script']} -> {manifest['stage']}/ done in {manifest['seconds']:.1f}s")
    accounting = manifest["accounting"]
    if accounting:
        print(f"  {'rows of':<28}{'in':>12}{'kept':>12}{'set aside':>12}{'dup dropped':>13}")
        for source, counts in accounting.items():
            set_aside = sum(counts.get("set_aside", {}).values())
            print(f"  {source:<28}{counts['rows_in']:>12,}{counts['kept']:>12,}{set_aside:>12,}"
                  f"{counts.get('duplicates_dropped', 0):>13,}")
            for reason, count in sorted(counts.get("set_aside", {}).items()):
                print(f"  {'':<28}{'':>12}{'':>12}{count:>12,}  {reason}")
            if counts.get("exact_duplicates_kept"):
                print(f"  {'':<28}exact duplicates kept (repeated actions are signal): "
                      f"{counts['exact_duplicates_kept']:,}")
    total_bytes = 0
    for table, described in manifest["tables"].items():
        total_bytes += described["bytes"]
        print(f"  wrote {table:<26}{described['rows']:>12,} rows {described['files']:>6} files "
              f"{described['bytes'] / 2**20:>10.1f} MiB")
    for table, groups in manifest.get("row_group_mib_in_memory", {}).items():
        print(f"  {table} row groups in memory: {groups['min']:.1f} / {groups['median']:.1f} / {groups['max']:.1f} MiB "
              f"(min / median / max of {groups['count']})")
    print(f"  {total_bytes / 2**20:.1f} MiB written in {manifest['seconds']:.1f}s", flush=True)
