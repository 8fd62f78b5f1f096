"""The pipeline as a whole: each stage's parameters, its state, what may be deleted, what must run.

A stage's folder under --data is in one of these states:

- complete:      published, made from what is there now (raw files and earlier stages,
                 by their fingerprints in its `lineage`) with the parameters asked;
- stale:         published, but an earlier stage was re-run since with a different
                 result, the raw files changed, an earlier stage is itself stale, or its
                 parameters differ from those asked (the reasons say which);
- damaged:       published, but its files differ from what its manifest lists (deleted,
                 truncated or added by hand), or its manifest is not one a stage wrote;
- unchecked:     published, but the raw files it was made from could not be listed, so
                 whether it is still up to date cannot be told;
- cleaned away:  deleted after a later stage that was made from it completed;
- missing:       never made (or deleted while a later stage still needed it);
- incomplete:    a folder without a manifest (not made by a stage of this pipeline).

Staleness is judged by content: a stage re-run on the same input with the same
parameters writes the same bytes, so everything made from it stays complete. The raw
files are judged by their names, sizes and modification times (stage.raw_input); with
`verify`, by their contents too, against the hashes merge_and_clean.py recorded.
"""

import dataclasses
import datetime as dt
from pathlib import Path

from recpipe import cli, encoders, folders, stage, stages, storage
from recpipe.cli import UserError
from recpipe.raw import list_raw_files


def parameters_to_run(states, name, asked):
    """What a stage is (re)made with: the flags asked, else what it was last made with, else the defaults.

    "Last made with" is its own manifest, or, once it was cleaned away, the lineage
    recorded by a later stage: a re-run after a fix does not quietly change parameters.
    """
    index = stages.NAMES.index(name)
    recorded = {}
    if states[index].manifest:
        recorded = states[index].manifest.get("parameters", {})
    else:
        for later in states[index + 1:]:
            if later.manifest and name in later.manifest.get("lineage", {}):
                recorded = later.manifest["lineage"][name].get("parameters", {})
                break
    defaults = {parameter.name: parameter.default for parameter in stages.BY_NAME[name].parameters}
    return {**defaults, **{key: value for key, value in recorded.items() if key in defaults}, **asked}


def parameter_flags(parameters):
    """Parameters as the command-line flags that ask for them: --buckets 16 --row-group-mb 64.0."""
    return [text for name, value in parameters.items() for text in (cli.flag(name), str(value))]


@dataclasses.dataclass
class StageState:
    name: str
    state: str                # complete, stale, damaged, unchecked, cleaned away, missing, incomplete
    reasons: list
    path: Path
    manifest: dict = None
    bytes: int = 0
    hashed: tuple = None      # with --verify: (files, bytes) hashed against output_sha256
    raw_hashed: dict = None   # with --verify: the raw files' entry (stage.raw_input), contents hashed
    by_contents: bool = False  # stale because the raw files' contents changed, which `run` does not read

    @property
    def script(self):
        return stages.BY_NAME[self.name].script

    @property
    def rows(self):
        """Rows per table of the output (tables starting with `_` are bookkeeping: quarantine, preprocessors)."""
        tables = (self.manifest or {}).get("tables", {})
        return {table: described["rows"] for table, described in tables.items() if not table.startswith("_")}


def raw_fingerprint(raw_dir, contents=False):
    """(what merge_and_clean.py records of the raw files, stage.raw_input's entry, None) or (None, why they
    cannot be listed). `contents`: with the hashes of their contents, reading every file (local ones)."""
    try:
        files = [path for files in list_raw_files(raw_dir).values() for path in files]
    except UserError as error:
        return None, str(error)
    return stage.raw_input(raw_dir, files, contents), None


def inspect(data_dir, raw_dir, asked, verify=False, making=False):
    """The state of every stage under data_dir, in order. `asked`: {stage: {parameter: value}}.

    Every published stage is checked against its manifest (file list, sizes, rows; with
    `verify`, every file's content against its fingerprint too, and the raw files' contents
    against the hashes merge_and_clean.py recorded). --data must be a folder; `making` (for `run`):
    or one that its first stage may make (stage.require_data).
    """
    if storage.is_url(data_dir):
        storage.require_bucket(data_dir, "--data")
    else:
        stage.require_data(data_dir, making)
    data_dir = storage.path(data_dir)
    manifests, broken = {}, {}
    for name in stages.NAMES:
        if (data_dir / name / stage.MANIFEST).is_file():
            try:
                manifests[name] = stage.read_manifest(data_dir / name)
            except UserError as error:
                broken[name] = str(error)
    # The raw files' contents are hashed only when asked, and only if a stage recorded them to compare with.
    recorded = verify and any("content_sha256" in manifest.get("lineage", {}).get("raw", {})
                              for manifest in manifests.values())
    raw, raw_problem = raw_fingerprint(raw_dir, contents=recorded)
    states = []
    for index, name in enumerate(stages.NAMES):
        path = data_dir / name
        if name in broken:
            states.append(StageState(name, "damaged", [broken[name]], path, bytes=stage.folder_bytes(path)))
            continue
        if name not in manifests:
            later_made_from_it = any(name in manifests[later].get("lineage", {}) for later in stages.NAMES[index + 1:]
                                     if later in manifests)
            state = ("incomplete" if path.exists() else "cleaned away" if later_made_from_it else "missing")
            reasons = ([f"a folder without {stage.MANIFEST}: not the output of a finished stage, so this project will "
                        f"not replace it; move it away or delete it yourself"] if path.exists() else [])
            states.append(StageState(name, state, reasons, path, bytes=stage.folder_bytes(path) if path.exists() else 0))
            continue
        manifest = manifests[name]
        problem = stage.damage(path, manifest, full=verify)
        hashed = None
        if verify and not problem and manifest.get("output_sha256"):  # damage() hashed every file it lists
            hashed = (len(manifest.get("files", {})), sum(file["bytes"] for file in manifest.get("files", {}).values()))
        if problem:
            states.append(StageState(name, "damaged", [stage.damage_message(path, name, problem)], path, manifest,
                                     stage.folder_bytes(path)))
            continue
        reasons, by_contents = _stale_reasons(manifest, states, manifests, raw, raw_dir, asked.get(name, {}))
        state = "stale" if reasons else "complete"
        if not reasons and raw_problem and "raw" in manifest.get("lineage", {}):
            state, reasons = "unchecked", [f"the raw files it was made from could not be checked: {raw_problem}"]
        states.append(StageState(name, state, reasons, path, manifest, stage.folder_bytes(path), hashed,
                                 raw if recorded and raw and "content_sha256" in raw else None, by_contents))
    return states


def _stale_reasons(manifest, earlier_states, manifests, raw, raw_dir, asked):
    """(why a published stage is stale, whether only the raw files' contents tell: `run` judges by names,
    sizes and mtimes, so `run --from merged` is what remakes it)."""
    made_of = manifest.get("lineage")
    if made_of is None or not manifest.get("output_sha256"):
        return ["it was made by an older version of the pipeline that recorded no fingerprints: run it again."], False
    reasons, by_contents = [], False
    if "raw" in made_of and raw is not None and raw["fingerprint_sha256"] != made_of["raw"]["fingerprint_sha256"]:
        reasons.append(f"the raw files under {raw_dir}/ changed (names, sizes or modification times) since it "
                       "was made.")
    elif "raw" in made_of and raw is not None and "content_sha256" in raw and \
            made_of["raw"].get("content_sha256", raw["content_sha256"]) != raw["content_sha256"]:
        changed = _changed_raw_files(manifests.get("merged"), raw)
        reasons.append(f"the contents of raw files under {raw_dir}/ changed since it was made"
                       + (f" ({folders.listing(changed)})" if changed else "")
                       + ", with the same names, sizes and modification times: only hashing them shows it; "
                       "`python pipeline.py run --from merged` reads them again.")
        by_contents = True
    for earlier in earlier_states:
        # The first earlier stage that differs is the cause; every stage after it says the same.
        if earlier.state == "stale":
            reasons.append(f"{earlier.name}/, which it was made from, is stale.")
            by_contents = by_contents or earlier.by_contents
            break
        if earlier.name in manifests and (manifests[earlier.name]["output_sha256"]
                                          != made_of.get(earlier.name, {}).get("output_sha256")):
            reasons.append(f"{earlier.name}/, which it was made from, was re-run since, with a different result.")
            break
    recorded = manifest.get("parameters", {})
    for name, value in asked.items():
        if recorded.get(name) != value:
            flag = cli.flag(name)
            reasons.append(f"it was made with {flag} {recorded.get(name)}, and {flag} {value} was asked.")
    return reasons, by_contents


def _changed_raw_files(merged, raw):
    """The raw files whose contents differ from what merged/'s manifest recorded (none when it is gone)."""
    recorded = next((entry.get("file_sha256") for entry in (merged or {}).get("inputs", []) if "raw" in entry), None)
    if not recorded:
        return []
    return [name for name, digest in raw["file_sha256"].items() if recorded.get(name) not in (None, digest)]


def needed_by(states, name):
    """Why a stage folder must be kept (a later stage would be rebuilt from it), or None if it may go."""
    index = stages.NAMES.index(name)
    if name == stages.FINAL:
        return f"{name}/ is the pipeline's output: train.py reads it"
    for later in states[index + 1:]:
        if later.state == "cleaned away":
            continue  # a stage after it was made from it, and is what matters
        if later.state == "complete":
            return None
        if later.state == "unchecked":
            return (f"{later.name}/ could not be checked against the raw files, so it is not known whether it "
                    f"would be rebuilt from {name}/")
        if states[index].state == "stale":
            return f"{name}/ is stale, and so is {later.name}/ after it"
        return f"{later.name}/ is {later.state} and would be rebuilt from {name}/"
    return None


def deletable(states):
    """The intermediate stage folders that can be deleted now without losing anything still needed
    (and that `clean` may delete: folders a stage published, holding nothing else)."""
    return [state for state in states if state.manifest is not None and needed_by(states, state.name) is None
            and (state.state != "damaged" or stage.not_a_stage_folder(state.path, state.name) is None)]


def stages_to_run(states, forced=None):
    """The stages `run` must run, in order: the last stage unless complete, the forced one, and, walking
    back from each, every input of theirs that is not complete (missing, cleaned away or stale)."""
    must = set()
    for target in [stages.FINAL] + ([forced] if forced else []):
        index = stages.NAMES.index(target)
        while index >= 0 and (states[index].state != "complete" or stages.NAMES[index] == forced):
            must.add(stages.NAMES[index])
            index -= 1
    return [name for name in stages.NAMES if name in must]


def all_leftovers(data_dir, preprocessors_dir):
    """Temporary folders of stage runs and of preprocess.py's preprocessors folder (folders.Leftover)."""
    return [*(leftover for name in stages.NAMES for leftover in stage.leftovers(data_dir, name)),
            *_preprocessors_leftovers(preprocessors_dir)]


def _preprocessors_leftovers(preprocessors_dir):
    if storage.is_url(preprocessors_dir):
        return []  # written file by file there, through no staging folder
    preprocessors_dir = Path(preprocessors_dir)
    return folders.leftovers(preprocessors_dir.parent, preprocessors_dir.name)


def remove_leftovers(data_dir, preprocessors_dir):
    """Delete the temporary folders killed runs left behind (those proven ours); return what was deleted."""
    return folders.remove_abandoned(all_leftovers(data_dir, preprocessors_dir))


def preprocessors_state(states, preprocessors_dir):
    """(a line saying whether train.py can run on processed/ with preprocessors/, whether it can), or
    (None, False) while there is no processed/ to speak of. train.py refuses a damaged processed/, and
    preprocessors other than the ones processed/ was made with."""
    processed = states[-1]
    if processed.state == "damaged":
        return (f"train.py refuses {processed.path}/ while it is damaged (above): "
                "run `python pipeline.py run --from processed`"), False
    if processed.manifest is None:
        return None, False
    folder = storage.path(preprocessors_dir)
    try:
        matches = encoders.fingerprint(preprocessors_dir) == processed.manifest.get("preprocessors_sha256")
    except UserError:
        if not folder.exists():
            return (f"{preprocessors_dir}/ is missing: run `python pipeline.py run --from processed`, which fits "
                    "it again (train.py needs it)"), False
        what = "a file" if folder.is_file() else "a folder without the fitted encoders and scaler"
        return (f"--preprocessors {preprocessors_dir} is {what}, not one preprocess.py wrote: point --preprocessors "
                "at the folder preprocess.py wrote for processed/ (train.py needs it), or run "
                "`python pipeline.py run --from processed --preprocessors NEW-FOLDER`"), False
    if matches:
        return f"{preprocessors_dir}/ was fitted with processed/: train.py can run", True
    return (f"{preprocessors_dir}/ was not fitted with processed/: train.py refuses it; "
            "run `python pipeline.py run --from processed`"), False


def verified_line(states, raw_dir):
    """What `status --verify` read: the files of how many stage folders it hashed, and the raw files."""
    hashed = [state for state in states if state.hashed]
    line = (f"verified: hashed {sum(state.hashed[0] for state in hashed):,} files "
            f"({mib(sum(state.hashed[1] for state in hashed))}) of {len(hashed)} stage folders against their "
            "output_sha256")
    raw = next((state.raw_hashed for state in states if state.raw_hashed), None)
    if raw:
        return line + (f", and {raw['files']:,} raw files ({mib(raw['bytes'])}) against the hashes "
                       "merge_and_clean.py recorded")
    if storage.is_url(raw_dir):
        return line + ("; raw files in object storage are judged by names, sizes and modification times, which "
                       "every write there changes")
    if any(state.state == "unchecked" for state in states):
        return line + "; the raw files could not be listed (above), so none was hashed"
    if not any("raw" in (state.manifest or {}).get("lineage", {}) for state in states):
        return line + "; no stage here was made from raw files, so none was hashed"
    return line + ("; no raw file was hashed: no stage here recorded their contents to compare with "
                   "(`python pipeline.py run --from merged` records them)")


def remove(states, name):
    """Delete an intermediate stage folder, refusing (UserError, with the reason) when it is still needed,
    in use by another command, or not a folder a stage published (recpipe.folders)."""
    if name not in stages.NAMES:
        raise UserError(f"clean {name}: not a stage; choose one of {', '.join(stages.NAMES)} (or `leftovers`)")
    state = states[stages.NAMES.index(name)]
    if not state.path.exists():
        raise UserError(f"{state.path}/ does not exist: nothing to delete")
    with folders.claiming(state.path, lambda folder: stage.not_a_stage_folder(folder, name), "delete",
                          "delete it yourself if nothing in it is needed"):
        reason = needed_by(states, name)
        if reason:
            raise UserError(f"{state.path}/ is still needed: {reason}; run `python pipeline.py run` first, "
                            "then clean it")
        storage.remove_tree(state.path, last=stage.MANIFEST)  # object storage: the proof that it is ours goes last
    return state.bytes


def mib(size):
    return f"{size / 2**20:,.1f} MiB"


def format_status(states, leftovers, preprocessors_line):
    """The status report: one line per stage, then what may be deleted and what was left behind."""
    lines = [f"{'stage':<16}{'state':<14}{'size':>13}  {'finished (UTC)':<18}{'made by'}"]
    for state in states:
        finished = ""
        if state.manifest:
            finished = dt.datetime.fromisoformat(state.manifest["finished_at"]).strftime("%Y-%m-%d %H:%M")
        size = mib(state.bytes) if state.path.exists() else "-"
        lines.append(f"{state.name + '/':<16}{state.state:<14}{size:>13}  {finished:<18}{state.script}")
        if state.rows:
            lines.append(" " * 16 + "rows: " + ", ".join(f"{table} {rows:,}" for table, rows in state.rows.items()))
        made_with = {parameter.name: state.manifest["parameters"][parameter.name]
                     for parameter in stages.BY_NAME[state.name].parameters
                     if state.manifest and parameter.name in state.manifest.get("parameters", {})}
        if made_with:
            lines.append(" " * 16 + "made with: " + " ".join(parameter_flags(made_with)))
        if state.manifest and state.manifest.get("history_entries_per_example") is not None:
            lines.append(" " * 16 + f"{state.manifest['history_entries_per_example']:,g} history entries stored "
                         "per example")
        for reason in state.reasons:
            lines.append(" " * 16 + f"why: {reason}")
        if state.name in stages_to_run(states):
            # `run` alone judges raw files by names, sizes and mtimes: what only their contents tell needs --from.
            command = "run --from merged" if any(other.by_contents for other in states) else "run"
            lines.append(" " * 16 + f"next: `python pipeline.py {command}` (same flags) runs {state.script}")
    if preprocessors_line:
        lines.append(preprocessors_line)
    free = deletable(states)
    if free:
        lines.append(f"can be deleted now, giving back {mib(sum(state.bytes for state in free))}:")
        lines.extend(f"  python pipeline.py clean {state.name:<14}# {mib(state.bytes)}" for state in free)
    else:
        lines.append("nothing can be deleted now without losing what a later stage still needs")
    for leftover in leftovers:
        lines.append(f"{leftover.what} {leftover.path} ({mib(stage.folder_bytes(leftover.path))}): {leftover.note}")
    return "\n".join(lines)
