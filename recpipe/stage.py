"""Stage mechanics: every stage publishes its output folder through this module, and every
reader of a stage opens it through this module.

A stage writes into a staging folder beside its target (`data/.merged.staging-<host>-<pid>`)
and renames it into place only after everything succeeded, with a `_stage.json`
manifest recording its inputs, parameters, code version, row accounting, tables, every
file it wrote (bytes, and rows of a Parquet file), timings, and two fingerprints that
`recpipe.pipeline` judges staleness by:

- `output_sha256`: a hash of every file the stage wrote. Stages are deterministic, so
  re-running one on the same input with the same parameters gives the same fingerprint.
- `lineage`: everything this output was made from, all the way back: the raw files'
  fingerprint, and every earlier stage's fingerprint and parameters, so staleness can
  still be judged (and a stage remade as it was) after intermediate stages were deleted.

A failed, interrupted or terminated stage removes its staging folder; a SIGKILLed one
leaves it behind, and the next run of that stage removes it. A stage replaces only a
folder it can prove a stage published (recpipe.folders), and holds it locked meanwhile.

Object storage (--data s3://bucket/data) has no rename: there a stage writes into a version
folder of its own inside the stage folder (`merged/v<UTC time>-<host>-<pid>/`), commits it by
writing `_stage.json` last (one object, which names the version: `"version"`), and only then
deletes the version the previous manifest named. Readers open the version the manifest names,
so they see the previous output or the new one, never a part; a killed run leaves only a version
no manifest names, which `pipeline.py status` reports and `clean leftovers` (or the stage's
next run) removes. Object storage has no locks either: run one command at a time on a stage
folder there (docs/operations.md).

A reader (the next stage, the loader, `pipeline.py status`) checks the folder against its
manifest before trusting it: the files listed, their sizes and row counts (cheap), or,
asked for, their contents against `output_sha256`. A folder that differs is refused,
naming the files and the stage to run again.
"""

import concurrent.futures
import contextlib
import datetime as dt
import hashlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from recpipe import folders, stages, storage, tables
from recpipe.cli import OutputError, UserError, output_failure

MANIFEST = "_stage.json"

_PACKAGE_DIR = Path(__file__).resolve().parent


# --- reading a stage --------------------------------------------------------------------------------

def read_manifest(stage_dir, name=None):
    """The manifest of a stage folder, checked to be one a stage wrote (`name`: which stage; default
    the folder's name); a truncated, hand-edited or foreign one is a UserError saying what is wrong."""
    return _read_manifest(stage_dir, name)[0]


def _read_manifest(stage_dir, name=None):
    """(read_manifest's manifest, the sha256 of the bytes it was read from): one read, so that the two
    are of the same version, and one request on object storage."""
    stage_dir = storage.path(stage_dir)
    name = name or stage_dir.name
    manifest, content, problem = _load_manifest(stage_dir, name)
    if problem:
        raise UserError(f"{stage_dir / MANIFEST}: not a manifest that {stages.script(name, 'a stage')} wrote "
                        f"({problem}); this project does not delete a folder it cannot prove it wrote, so delete "
                        f"{stage_dir}/ yourself and run {stages.script(name, 'the stage')} again")
    return manifest, hashlib.sha256(content).hexdigest()


def _load_manifest(stage_dir, name):
    """(manifest, its bytes, None), or (None, None, what is wrong with it)."""
    try:
        content = storage.read_bytes(stage_dir / MANIFEST)
        manifest = json.loads(content)
    except (OSError, ValueError) as error:  # ValueError: JSON, and text that is not UTF-8
        return None, None, f"not readable as JSON: {error}"
    problem = _manifest_problem(manifest, name)
    return (None, None, problem) if problem else (manifest, content, None)


# --- the manifest's schema ----------------------------------------------------------------------------
# What every reader of a manifest takes for granted, checked once, when it is read: a hand-edited field
# is then one line naming it, not a traceback wherever it is used (status, train.py, a later stage).
# A schema is a type or a tuple of them (None: null), a dict {field: schema} (an object with those
# fields, "?field" optional, any others ignored), _Each(schema) (an object, or a list, whose every value
# is `schema`), or a _Check. Stage parameters are checked against their declarations in recpipe.stages.

@dataclass(frozen=True)
class _Each:
    schema: object
    of: type = dict


@dataclass(frozen=True)
class _Check:
    words: str
    test: object


def _is_datetime(value):
    try:
        dt.datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return False
    return True


_COUNT = _Check("a count (a whole number, 0 or more)", lambda value: type(value) is int and value >= 0)
_NUMBER = _Check("a number", lambda value: type(value) in (int, float) and math.isfinite(value))
_SIZES = {"min": _NUMBER, "median": _NUMBER, "max": _NUMBER, "count": _COUNT}  # size_stats
_MANIFEST = {
    "stage": str,
    "parameters": dict,
    "tables": _Each({"rows": _COUNT, "files": _COUNT, "bytes": _COUNT, "?parquet_row_group_mib": _SIZES}),
    "finished_at": _Check("a date and time", _is_datetime),
    "accounting": _Each({"rows_in": _COUNT, "kept": _COUNT, "?set_aside": _Each(_COUNT),
                         "?duplicates_dropped": _COUNT, "?exact_duplicates_kept": _COUNT}),
    "inputs": _Each(dict, of=list),
    "?script": str, "?code_version": dict, "?started_at": str, "?seconds": _NUMBER,
    # Absent in manifests of older versions:
    "?output_sha256": str,
    "?lineage": {"?raw": {"fingerprint_sha256": str, "?content_sha256": str},  # content: raw_input
                 **{f"?{name}": {"?output_sha256": (str, None), "parameters": dict} for name in stages.NAMES}},
    "?files": _Each({"bytes": _COUNT, "?rows": _COUNT}),
    "?version": _Check("the name of a version folder", lambda value: isinstance(value, str)
                       and folders.VERSION.match(value) is not None),  # only on object storage
    # What a stage adds of its own (StageRun.extra): merged, repartitioned and cleaned, repartitioned, cleaned,
    # processed.
    "?impression_days": _Each({"split": str, "shown_items": _COUNT}),
    "?row_group_mib_in_memory": _Each(_SIZES),
    "?buckets_chosen": {"buckets": _COUNT, "why": str}, "?exact_duplicate_actions": _Each(_COUNT),
    "?user_agents": dict,
    "?rows_per_split": _Each(_COUNT), "?history_entries_per_example": (_NUMBER, None), "?sample_rows": _COUNT,
    "?preprocessors_sha256": str,
}
# Parameters that readers take from a manifest with no default to fall back on (train.py, the loader and
# `profile` read processed/'s max_history); any other may be absent, in a manifest of an older version.
_NEEDED_PARAMETERS = {"processed": ("max_history",)}
_WORDS = {str: "a string", dict: "an object", list: "a list", type(None): "null"}


def _manifest_problem(manifest, name):
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__}, not an object"
    problem = _schema_problem(manifest, _MANIFEST, "")
    if problem:
        return problem
    if manifest["stage"] != name:
        return f"it says it is the manifest of {manifest['stage']!r}, not of {name!r}"
    for stage_name, where, parameters in [
            (name, "parameters", manifest["parameters"]),
            *((earlier, f"lineage.{earlier}.parameters", made["parameters"])
              for earlier, made in manifest.get("lineage", {}).items() if earlier in stages.BY_NAME)]:
        problem = _parameters_problem(stage_name, where, parameters)
        if problem:
            return problem
    return None


def _schema_problem(value, schema, where):
    """None when `value` fits `schema`; else a few words naming the field (`where`) and what it holds."""
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return _not(where, value, "an object")
        for key, inner in schema.items():
            field = _field(where, key.removeprefix("?"))
            if key.removeprefix("?") not in value:
                if key.startswith("?"):
                    continue
                return f"no {field!r}"
            problem = _schema_problem(value[key.removeprefix("?")], inner, field)
            if problem:
                return problem
        return None
    if isinstance(schema, _Each):
        if not isinstance(value, schema.of):
            return _not(where, value, _WORDS[schema.of])
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            problem = _schema_problem(item, schema.schema, _field(where, key))
            if problem:
                return problem
        return None
    if isinstance(schema, _Check):
        return None if schema.test(value) else _not(where, value, schema.words)
    kinds = schema if isinstance(schema, tuple) else (schema,)
    if any(_fits(value, kind) for kind in kinds):
        return None
    return _not(where, value, " or ".join(kind.words if isinstance(kind, _Check) else _WORDS[kind or type(None)]
                                          for kind in kinds))


def _fits(value, kind):
    if kind is None:
        return value is None
    return kind.test(value) if isinstance(kind, _Check) else isinstance(value, kind)


def _parameters_problem(stage_name, where, parameters):
    """What is wrong with a stage's recorded parameters, by the declarations the scripts' flags are
    checked by (stages.Parameter.check): a value its flag would refuse is refused here too."""
    for parameter in stages.BY_NAME[stage_name].parameters:
        field = _field(where, parameter.name)
        if parameter.name not in parameters:
            if parameter.name in _NEEDED_PARAMETERS.get(stage_name, ()):
                return f"no {field!r}"
            continue
        try:
            parameter.check(parameters[parameter.name])
        except ValueError as error:
            return f"{field!r} {error}"
    return None


def _field(where, key):
    """A field's name in a message: tables.actions.rows, files["actions/part-0.parquet"].bytes, inputs[0]."""
    if isinstance(key, int):
        return f"{where}[{key}]"
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        return f"{where}.{key}" if where else key
    return f"{where}[{json.dumps(key)}]"


def _shown(value):
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _not(where, value, words):
    return f"{where!r} is {_shown(value)}, not {words}"


def manifest_digest(stage_dir):
    """sha256 of a stage folder's manifest: it changes whenever the folder is published again."""
    return _sha256_file(storage.path(stage_dir) / MANIFEST)


def content_dir(stage_dir, manifest):
    """Where a published stage's files are: its folder, or on object storage the version folder its
    manifest names."""
    stage_dir = storage.path(stage_dir)
    return stage_dir / manifest["version"] if "version" in manifest else stage_dir


def damage(stage_dir, manifest, full=False):
    """How a stage folder differs from what its manifest says was published, in a few words; None
    when it does not. Cheap: the file list, sizes, and Parquet row counts (footers only; on object
    storage, whose objects are written whole and never changed in place, one listing of names and
    sizes). `full`: also every file's content against `output_sha256` (as fast as the disk reads).

    Manifests of older versions list no files: only their fingerprint can tell, so it is used.
    """
    stage_dir = content_dir(stage_dir, manifest)
    listed = manifest.get("files")
    problems = []
    if listed is not None:
        on_disk = stage_files(stage_dir)
        missing = [name for name in listed if name not in on_disk]
        changed = [name for name, described in listed.items()
                   if name in on_disk and _file_differs(stage_dir / name, on_disk[name], described)]
        unlisted = [name for name in on_disk if name not in listed]
        for names, words in ((missing, "missing"), (changed, "changed (size or rows)"),
                             (unlisted, "not written by the stage")):
            if names:
                problems.append(f"{len(names)} file{'s' if len(names) > 1 else ''} {words}: {folders.listing(names)}")
    if (full or listed is None) and not problems and manifest.get("output_sha256"):
        if output_fingerprint(stage_dir) != manifest["output_sha256"]:
            problems.append("the files' contents differ from the fingerprint recorded when it was published "
                            "(output_sha256)")
    return "; ".join(problems) or None


def _file_differs(path, size, described):
    if size != described["bytes"]:
        return True
    if "rows" not in described or storage.is_url(path):  # a footer there is a request per file: see damage()
        return False
    try:
        return tables.parquet_file(path).metadata.num_rows != described["rows"]
    except (OSError, pa.ArrowException):
        return True


def damage_message(stage_dir, name, problem):
    script = stages.script(name, "the stage that wrote it")
    fix = (f"move out or delete what the stage did not write, then run `python pipeline.py run --from {name}` "
           f"(or {script})" if "not written by the stage" in problem
           else f"run `python pipeline.py run --from {name}` (or {script}) to make it again")
    return f"{stage_dir}/ is not as {script} published it: {problem}; {fix}"


@dataclass
class StageInput:
    """A stage folder checked against its manifest, as a later stage or the loader reads it: `path` holds
    its files (`folder` itself, or the version its manifest names on object storage)."""

    name: str
    path: Path
    manifest: dict
    manifest_sha256: str
    folder: Path

    def entry(self):
        """What a stage's manifest records of this input: path, fingerprints, parameters, lineage."""
        return {"stage": self.name, "path": storage.absolute(self.folder), "manifest_sha256": self.manifest_sha256,
                "output_sha256": self.manifest.get("output_sha256"), "parameters": self.manifest["parameters"],
                "lineage": self.manifest.get("lineage", {})}


def open_stage(data_dir, name, stage_dir=None, full=False):
    """An input stage, or a UserError saying which script makes it, or what differs from its manifest.
    `data_dir` (--data) is checked to be a folder; without it (the loader), `stage_dir` is the stage folder."""
    if data_dir is not None:
        require_data(data_dir)
    stage_dir = storage.path(stage_dir if stage_dir is not None else storage.path(data_dir) / name)
    if not (stage_dir / MANIFEST).is_file():
        if storage.is_url(stage_dir):
            storage.require_bucket(stage_dir)
        raise UserError(_missing_message(data_dir, name, stage_dir))
    manifest, digest = _read_manifest(stage_dir, name)
    problem = damage(stage_dir, manifest, full)
    if problem:
        raise UserError(damage_message(stage_dir, name, problem))
    return StageInput(name, content_dir(stage_dir, manifest), manifest, digest, stage_dir)


def _missing_message(data_dir, name, stage_dir):
    """What to run when a stage folder has no manifest: its script, or, when the stages before it are
    missing too, the first of them (one message, not one per stage as each is run in turn)."""
    state = "is incomplete (no _stage.json)" if stage_dir.exists() else "is missing"
    script = stages.script(name, "the stage")
    if data_dir is None or name not in stages.BY_NAME:
        return f"{stage_dir}/ {state}: run {script} first"
    before = []
    for earlier in reversed(stages.NAMES[:stages.NAMES.index(name)]):
        if (storage.path(data_dir) / earlier / MANIFEST).is_file():
            break
        before.insert(0, earlier)
    if not before:
        return f"{stage_dir}/ {state}: run {script} first (or `python pipeline.py run`, which runs what is missing)"
    names = [f"{earlier}/" for earlier in before]
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    return (f"{stage_dir}/ {state}, and so {'is' if len(names) == 1 else 'are'} {listed} before it: "
            f"`python pipeline.py run --data {data_dir}` makes them all in order (or run "
            f"{stages.script(before[0], None)} first)")


def require_data(data_dir, making=False):
    """A UserError unless --data is a folder on this machine (a URL of object storage is checked where it is
    opened, recpipe.storage); `making` (a stage writing its folder into it): it may also not exist yet, as
    long as the folder it would be made in does, so that a mistyped path starts no pipeline of its own."""
    if storage.is_url(data_dir):
        return
    data_dir = Path(data_dir)
    if data_dir.is_dir():
        return
    found = next(folder for folder in (data_dir, *data_dir.parents) if folder.exists() or folder == folder.parent)
    if found.exists() and not found.is_dir():
        what = "a file" if found == data_dir else f"{found} is a file"
        raise UserError(f"--data {data_dir}: {what}, not a folder: give the folder that holds the stage folders "
                        f"({', '.join(name + '/' for name in stages.NAMES)})")
    if not making:
        raise UserError(f"--data {data_dir}: no such folder: check the path (`python pipeline.py run --data "
                        f"{data_dir}` would make a new pipeline there, from --raw's files)")
    if not data_dir.parent.is_dir():
        raise UserError(f"--data {data_dir}: no such folder, nor {data_dir.parent}/ to make it in: check the path, "
                        f"or make {data_dir.parent}/ first to start a new pipeline there")


@contextlib.contextmanager
def reading(data_dir, name, stage_dir=None):
    """Hold an input stage for reading (no command replaces or deletes it meanwhile) and yield it
    checked against its manifest (StageInput)."""
    if data_dir is not None:
        require_data(data_dir)  # before the lock file is made beside the stage folder
    stage_dir = storage.path(stage_dir if stage_dir is not None else storage.path(data_dir) / name)
    with folders.reading(stage_dir):
        yield open_stage(data_dir, name, stage_dir)


def raw_input(raw_dir, files, contents=True):
    """The manifest entry for raw files: a fingerprint of their names, sizes and mtimes
    (`fingerprint_sha256`), by which `pipeline.py` judges whether they changed; and, `contents`, of
    local files, a hash of each one's bytes (`file_sha256`) and of them all (`content_sha256`), which
    `pipeline.py status --verify` compares.

    Hashing terabytes of logs on every `status` and `run` would cost more than the stage; names,
    sizes and mtimes change whenever a file is replaced or appended to, unless someone sets them
    back (`touch -r`, a copy that keeps them). Hashing once, when merge_and_clean.py reads them, is a
    second read, hashed at about 500 MiB/s per core on the reference machine: 0.2 s of the stage's 14 s on
    docs/benchmarks.md's 155 MiB. On object storage every write gives an object a new modification time,
    so no object is downloaded here to be hashed.
    """
    stats = storage.stats(files, raw_dir)
    listing = [(storage.relative(f, raw_dir), *stats[f]) for f in sorted(files, key=str)]
    digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    where = storage.absolute(raw_dir)
    entry = {"raw": where, "files": len(listing),
             "bytes": sum(size for _, size, _ in listing), "fingerprint_sha256": digest}
    if contents and not storage.is_url(raw_dir):
        entry.update(raw_contents(raw_dir, files))
    return entry


def raw_contents(raw_dir, files):
    """{"content_sha256": over every file's name and content, "file_sha256": {name: sha256 of its bytes}} of
    local raw files, hashed on a thread each per core (hashlib releases the GIL)."""
    files = sorted(files, key=str)
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        hashes = dict(zip((storage.relative(f, raw_dir) for f in files), pool.map(_sha256_file, files)))
    return {"content_sha256": hashlib.sha256(json.dumps(sorted(hashes.items())).encode()).hexdigest(),
            "file_sha256": hashes}


def lineage(inputs):
    """What an output is made of: the raw files' fingerprints, every earlier stage's fingerprint and parameters."""
    made_of = {}
    for entry in inputs:
        if "raw" in entry:
            made_of["raw"] = {key: entry[key] for key in ("fingerprint_sha256", "content_sha256") if key in entry}
        else:
            made_of.update(entry.get("lineage", {}))
            made_of[entry["stage"]] = {"output_sha256": entry.get("output_sha256"), "parameters": entry["parameters"]}
    return made_of


# --- publishing a stage -----------------------------------------------------------------------------

class StageRun:
    """A stage being written: `path` is its staging folder; `accounting` ends up in the manifest."""

    def __init__(self, name, staging, parameters, inputs):
        self.name = name
        self.path = staging
        self.parameters = parameters
        self.inputs = inputs
        self.accounting = {}
        self.extra = {}
        self.started_at = dt.datetime.now(dt.timezone.utc)
        self._started = time.monotonic()

    def manifest(self):
        check_accounting(self.accounting)
        files, tables = describe(self.path)
        return {
            "stage": self.name,
            "script": stages.script(self.name, None),
            "code_version": code_version(),
            "inputs": self.inputs,
            "parameters": self.parameters,
            "accounting": self.accounting,
            "tables": tables,
            "output_sha256": output_fingerprint(self.path),
            "lineage": lineage(self.inputs),
            **self.extra,
            "started_at": self.started_at.isoformat(timespec="seconds"),
            "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.monotonic() - self._started, 2),
            "files": files,
        }


def not_a_stage_folder(folder, name):
    """None when `folder` is a stage folder a stage of this pipeline published: a valid manifest of
    stage `name`, and nothing in it but the files that manifest lists. Otherwise what was found."""
    folder = storage.path(folder)
    if not (folder / MANIFEST).is_file():
        if storage.is_url(folder) and all(folders.VERSION.match(entry.name) and folders.owner(entry)
                                          for entry in folder.iterdir()):
            return None  # on object storage: only versions of runs that did not commit, each marked ours
        return f"it has no {MANIFEST}"
    manifest, _, problem = _load_manifest(folder, name)
    if problem:
        return f"its {MANIFEST} is not one a stage wrote ({problem})"
    listed = manifest.get("files")
    if listed is None:  # an older version's manifest lists no files; its fingerprint covers them all
        if manifest.get("output_sha256") and output_fingerprint(folder) == manifest["output_sha256"]:
            return None
        return f"its {MANIFEST} lists no files and its contents differ from its fingerprint"
    if "version" in manifest:  # object storage: the version it names, and versions of runs that did not commit
        version = manifest["version"]
        unexpected = [f"{version}/{name}" for name in
                      folders.unexpected_entries(folder / version, {*listed, folders.MARKER})]
        unexpected += [entry.name for entry in folder.iterdir() if entry.name not in (MANIFEST, version)
                       and not (folders.VERSION.match(entry.name) and folders.owner(entry))]
    else:
        unexpected = folders.unexpected_entries(folder, {*listed, MANIFEST, folders.MARKER})
    if unexpected:
        return f"it holds what {stages.script(name, 'the stage')} did not write: {folders.listing(unexpected)}"
    return None


@contextlib.contextmanager
def publish(data_dir, name, parameters, inputs):
    """Yield a StageRun writing into a staging folder; on success, swap it in as `data_dir/name`.

    The target is held exclusively meanwhile, and replaced only when it is missing, empty or
    a stage folder this pipeline published (recpipe.folders). Anything raised inside
    (including SystemExit from SIGTERM and KeyboardInterrupt) removes the staging folder and
    leaves the previous output untouched. A full disk or a read-only folder is an OutputError.
    """
    if storage.is_url(data_dir):
        with _publish_to_store(storage.path(data_dir), name, parameters, inputs) as run:
            yield run
        return
    require_data(data_dir, making=True)
    data_dir = Path(data_dir).resolve()
    target = data_dir / name
    made_data_dir = not data_dir.exists()
    try:
        data_dir.mkdir(exist_ok=True)
        with folders.claiming(target, lambda folder: not_a_stage_folder(folder, name), "replace",
                              "move it away or delete it yourself, or point --data at another folder"):
            for leftover in folders.remove_abandoned(folders.leftovers(data_dir, name)):
                print(f"removed {leftover}, left behind by a killed run")
            staging = folders.make_staging(target)
            run = StageRun(name, staging, parameters, inputs)
            try:
                yield run
                manifest = run.manifest()
                run.published = manifest
                with open(staging / MANIFEST, "w") as f:
                    json.dump(manifest, f, indent=2, sort_keys=False)
                    f.write("\n")
                    f.flush()
                    os.fsync(f.fileno())
                folders.replace(staging, target)
            except BaseException:
                folders.discard(staging)
                raise
    except BaseException as error:
        if made_data_dir:
            with contextlib.suppress(OSError):
                data_dir.rmdir()  # made for this run, which published nothing: only if nothing else is in it
        message = output_failure(error, folder=data_dir) if isinstance(error, OSError) else None
        if message is None:
            raise
        raise OutputError(message) from error


@contextlib.contextmanager
def _publish_to_store(data_dir, name, parameters, inputs):
    """publish() on object storage, which renames nothing: write a new version folder, commit it by
    writing the manifest that names it, then delete the version the previous manifest named."""
    target = data_dir / name
    fix = "move it away or delete it yourself, or point --data at another location"
    try:
        for leftover in folders.remove_abandoned(leftovers(data_dir, name)):
            print(f"removed {leftover}, left behind by a killed run")
        folders.refuse_unless_ours(target, lambda folder: not_a_stage_folder(folder, name), "replace", fix)
        version = folders.make_version(target)
    except UserError:
        raise
    except Exception as error:  # object storage's own errors: no such bucket, no endpoint, no credentials
        raise storage.failure(error, target) from None
    run = StageRun(name, version, parameters, inputs)
    try:
        yield run
        manifest = run.manifest()
        manifest["version"] = version.name
        run.published = manifest
        previous = _committed_version(target)
        if previous is not None:
            folders.mark(target / previous)  # ours to delete, even if this process dies before it does
        (target / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    except BaseException:
        with contextlib.suppress(storage.NotDeleted):  # the error that stopped the stage is the one to show
            folders.discard(version)
        raise
    if previous is not None and previous != version.name:
        try:
            folders.discard(target / previous)
        except storage.NotDeleted as error:  # published all the same: the old version is a leftover now
            print(f"warning: {error}", file=sys.stderr)


def _committed_version(target):
    """The version folder the manifest of a stage folder on object storage names; None when it has none."""
    try:
        return json.loads((storage.path(target) / MANIFEST).read_bytes()).get("version")
    except (OSError, ValueError, AttributeError):
        return None


def leftovers(data_dir, name):
    """What killed runs of a stage left (folders.Leftover): staging and retired folders beside its folder,
    or on object storage the versions inside it that its manifest does not name."""
    if storage.is_url(data_dir):
        target = storage.path(data_dir) / name
        committed = _committed_version(target)
        if committed is None and (target / MANIFEST).is_file():
            return []  # a manifest that names no version: which one it meant cannot be told, so nothing is left over
        return folders.version_leftovers(target, committed)
    return folders.leftovers(data_dir, name)


def check_accounting(accounting):
    """Every row in ends in exactly one place; a stage that cannot show it does not publish."""
    for source, counts in accounting.items():
        out = counts["kept"] + sum(counts.get("set_aside", {}).values()) + counts.get("duplicates_dropped", 0)
        if out != counts["rows_in"]:
            raise RuntimeError(
                f"accounting of {source} does not balance: {counts['rows_in']} rows in, but kept + set aside "
                f"+ duplicates dropped = {out} ({counts}); this is a bug, the stage was not published"
            )


def table_bytes(manifest):
    """The bytes of every table a stage's manifest describes, summed: the size of its output on disk."""
    return sum(table["bytes"] for table in manifest["tables"].values())


def size_stats(sizes):
    """min / median / max in MiB, and how many, of a list of sizes in bytes."""
    sizes = [size / 2**20 for size in sizes]
    return {"min": round(min(sizes), 2), "median": round(statistics.median(sizes), 2),
            "max": round(max(sizes), 2), "count": len(sizes)}


def stage_files(stage_dir):
    """{relative path: bytes} of every file a stage wrote into its folder, sorted: all but the manifest
    and the staging marker."""
    # In the order of their paths' parts, as pathlib sorts them: `output_sha256` hashes in this order.
    return {name: size for name, size in sorted(storage.files(stage_dir).items(), key=lambda item: item[0].split("/"))
            if name not in (MANIFEST, folders.MARKER)}


def describe(stage_dir):
    """(files, tables) of a stage folder: every file's bytes (and rows, for Parquet), and per table the
    rows, files, bytes and Parquet row-group sizes (MiB, encoded, before compression).

    A table is a sub-folder holding Parquet; its partition folders (`dt=…`, `bucket=…`)
    belong to it.
    """
    stage_dir = storage.path(stage_dir)
    files, by_table, group_sizes = {}, {}, {}
    for name, size in stage_files(stage_dir).items():
        files[name] = {"bytes": size}
        if not name.endswith(".parquet"):
            continue
        metadata = tables.parquet_file(stage_dir / name).metadata
        files[name]["rows"] = metadata.num_rows
        table = "/".join(part for part in Path(name).parent.parts if "=" not in part) or "."
        entry = by_table.setdefault(table, {"rows": 0, "files": 0, "bytes": 0})
        entry["rows"] += metadata.num_rows
        entry["files"] += 1
        entry["bytes"] += files[name]["bytes"]
        group_sizes.setdefault(table, []).extend(
            metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
    for table, sizes in group_sizes.items():
        if sizes:
            by_table[table]["parquet_row_group_mib"] = size_stats(sizes)
    return files, by_table


def output_fingerprint(stage_dir):
    """sha256 over every file a stage wrote (stage_files): names and contents.

    Content, not timestamps: a stage re-run on the same input with the same parameters
    writes the same bytes, so what was made from it stays fresh. Files are hashed on
    a thread each per core (hashlib releases the GIL), about 1 GB/s per core.
    """
    stage_dir = storage.path(stage_dir)
    files = list(stage_files(stage_dir))
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        hashes = list(pool.map(_sha256_file, [stage_dir / name for name in files]))
    digest = hashlib.sha256()
    for name, file_hash in zip(files, hashes):
        digest.update(f"{name}\0{file_hash}\n".encode())
    return digest.hexdigest()


def folder_bytes(path):
    """Bytes of every file under a folder: what deleting it gives back. On object storage, of a stage folder, the
    committed version's and its manifest's alone: a killed run's version is a leftover, counted as one."""
    files = storage.files(path)
    if storage.is_url(path) and (committed := _committed_version(path)) is not None:
        return sum(size for name, size in files.items() if name == MANIFEST or name.startswith(f"{committed}/"))
    return sum(files.values())


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
    with storage.path(path).open("rb") as f:
        while chunk := f.read(8 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()
