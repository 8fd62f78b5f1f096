"""pipeline.py: stage states judged by fingerprints and parameters, what may be deleted, what must run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pandas as pd
import pyarrow as pa
import pytest

from conftest import (BREAKAGES, ROOT, break_stage, broken_stage_line, listing, one_line, run_in_process, run_joined,
                      run_main, temporary_folder)
from recpipe import pipeline, stage, stages, tables
from recpipe.cli import UserError
from recpipe.raw import SOURCES

SCHEMA = pa.schema([("customer_id", pa.int64())])
DEFAULTS = {stage.name: {p.name: p.default for p in stage.parameters} for stage in stages.STAGES}
DEFAULTS["repartitioned"]["buckets"] = 16  # a run records the number it chose (repartition.choose_buckets), never None


def make_raw(root):
    raw = root / "raw"
    for source in SOURCES:
        (raw / source).mkdir(parents=True)
        (raw / source / "part.jsonl").write_text("{}\n")
    return raw


def make_stage(data, name, rows, parameters=None, raw=None):
    """Publish a stage of `rows` rows from its input (raw files for merged), as the real scripts do."""
    if name == "merged":
        inputs = [stage.raw_input(raw, sorted(raw.rglob("*.jsonl")))]
    else:
        inputs = [stage.open_stage(data, stages.NAMES[stages.NAMES.index(name) - 1]).entry()]
    with stage.publish(data, name, parameters or DEFAULTS[name], inputs) as run:
        tables.write_table(pd.DataFrame({"customer_id": range(rows)}), run.path / "table" / "part.parquet", SCHEMA)
    return run.published


@pytest.fixture
def chain(tmp_path):
    """Every stage published from the one before it, with default parameters: (data, raw)."""
    raw, data = make_raw(tmp_path), tmp_path / "data"
    for name in stages.NAMES:
        make_stage(data, name, 3, raw=raw)
    return data, raw


def printed_states(out):
    """{stage folder: state} from `pipeline.py status` output."""
    return {line.split()[0]: line.split()[1] for line in out.splitlines()
            if line.endswith(".py") and line.split()[0].endswith("/")}


def states_of(data, raw, asked=None):
    return {state.name: state for state in pipeline.inspect(data, raw, asked or {})}


def test_pipeline_fresh_chain_is_complete_and_intermediates_can_go(chain):
    data, raw = chain
    states = states_of(data, raw)
    assert {name: state.state for name, state in states.items()} == dict.fromkeys(stages.NAMES, "complete")
    assert states["merged"].rows == {"table": 3}
    assert states["merged"].bytes == stage.folder_bytes(data / "merged") > 0
    deletable = [state.name for state in pipeline.deletable(list(states.values()))]
    assert deletable == ["merged", "repartitioned", "cleaned"]
    assert pipeline.stages_to_run(list(states.values())) == []


def test_pipeline_identical_rerun_keeps_later_stages_complete(chain):
    data, raw = chain
    before = stage.read_manifest(data / "merged")
    make_stage(data, "merged", 3, raw=raw)
    assert stage.read_manifest(data / "merged")["finished_at"] >= before["finished_at"]
    assert {state.state for state in states_of(data, raw).values()} == {"complete"}


def test_pipeline_rerun_with_a_different_result_marks_every_later_stage_stale(chain):
    data, raw = chain
    make_stage(data, "merged", 4, raw=raw)
    states = states_of(data, raw)
    assert states["merged"].state == "complete"
    assert states["repartitioned"].reasons == ["merged/, which it was made from, was re-run since, with a different result."]
    assert states["cleaned"].reasons == ["merged/, which it was made from, was re-run since, with a different result."]
    assert states["processed"].state == "stale"
    assert pipeline.stages_to_run(list(states.values())) == ["repartitioned", "cleaned", "processed"]


def test_pipeline_rerun_with_other_parameters_marks_later_stages_stale(chain):
    data, raw = chain
    make_stage(data, "repartitioned", 5, parameters={**DEFAULTS["repartitioned"], "buckets": 4})
    states = states_of(data, raw)
    assert states["repartitioned"].state == "complete"  # not asked for anything else
    assert [states[name].state for name in ("cleaned", "processed")] == ["stale", "stale"]


def test_pipeline_parameters_asked_differ_from_those_used_is_stale(chain):
    data, raw = chain
    states = states_of(data, raw, {"processed": {"max_history": 50}, "repartitioned": {"buckets": 16}})
    assert states["repartitioned"].state == "complete"  # asked what it was made with
    assert states["processed"].reasons == ["it was made with --max-history 1000, and --max-history 50 was asked."]
    assert pipeline.stages_to_run(list(states.values())) == ["processed"]


def test_pipeline_changed_raw_files_are_seen_after_merged_is_cleaned_away(chain):
    data, raw = chain
    shutil.rmtree(data / "merged")
    shutil.rmtree(data / "repartitioned")
    assert [state.state for state in states_of(data, raw).values()] == [
        "cleaned away", "cleaned away", "complete", "complete"]
    (raw / "clicks" / "more.jsonl").write_text("{}\n")
    states = states_of(data, raw)
    assert states["cleaned"].reasons == [
        f"the raw files under {raw}/ changed (names, sizes or modification times) since it was made."]
    assert states["processed"].state == "stale"
    assert pipeline.stages_to_run(list(states.values())) == list(stages.NAMES)


def test_pipeline_missing_stages_all_run_and_never_made_ones_are_missing(tmp_path):
    (tmp_path / "data").mkdir()
    states = list(states_of(tmp_path / "data", make_raw(tmp_path)).values())
    assert [state.state for state in states] == ["missing"] * 4
    assert pipeline.stages_to_run(states) == list(stages.NAMES)
    assert pipeline.deletable(states) == []


def test_pipeline_from_a_stage_runs_it_and_what_it_needs(chain):
    data, raw = chain
    states = list(states_of(data, raw).values())
    assert pipeline.stages_to_run(states, forced="repartitioned") == ["repartitioned"]
    shutil.rmtree(data / "merged")
    states = list(states_of(data, raw).values())
    assert pipeline.stages_to_run(states, forced="repartitioned") == ["merged", "repartitioned"]


def test_pipeline_remove_refuses_what_a_later_stage_would_be_rebuilt_from(chain):
    data, raw = chain
    make_stage(data, "repartitioned", 5)  # cleaned/ and processed/ are now stale
    states = list(states_of(data, raw).values())
    with pytest.raises(UserError, match="cleaned/ is stale and would be rebuilt from repartitioned/"):
        pipeline.remove(states, "repartitioned")
    with pytest.raises(UserError, match="pipeline's output: train.py reads it"):
        pipeline.remove(states, "processed")
    assert (data / "repartitioned").exists()
    assert pipeline.remove(states, "merged") > 0  # repartitioned/ is complete, and made from it
    assert not (data / "merged").exists()


def test_pipeline_parameters_to_run_keep_what_a_cleaned_away_stage_was_made_with(chain):
    data, raw = chain
    make_stage(data, "repartitioned", 3, parameters={**DEFAULTS["repartitioned"], "buckets": 4})
    for name in ("cleaned", "processed"):
        make_stage(data, name, 3)
    shutil.rmtree(data / "repartitioned")
    states = list(states_of(data, raw).values())
    assert pipeline.parameters_to_run(states, "repartitioned", {})["buckets"] == 4
    assert pipeline.parameters_to_run(states, "repartitioned", {"buckets": 8})["buckets"] == 8
    assert pipeline.parameters_to_run(states, "processed", {})["max_history"] == 1000


def test_pipeline_a_manifest_without_fingerprints_is_stale(chain):
    data, raw = chain
    manifest = stage.read_manifest(data / "cleaned")
    del manifest["lineage"]
    (data / "cleaned" / stage.MANIFEST).write_text(json.dumps(manifest))
    assert "recorded no fingerprints" in states_of(data, raw)["cleaned"].reasons[0]


def test_pipeline_leftovers_of_killed_runs_are_reported_and_removed(chain, tmp_path):
    data, raw = chain
    dead = temporary_folder(data, "merged")
    live = temporary_folder(data, "cleaned", pid=os.getppid())
    foreign = temporary_folder(data, "repartitioned", marked=False)
    preprocessors = temporary_folder(tmp_path, "preprocessors")
    leftovers = pipeline.all_leftovers(data, tmp_path / "preprocessors")
    assert [(leftover.path, leftover.abandoned) for leftover in leftovers] == [
        (dead, True), (foreign, False), (live, False), (preprocessors, True)]
    states = list(states_of(data, raw).values())
    report = pipeline.format_status(states, leftovers, None)
    assert f"temporary folder {dead} (0.0 MiB): left by a killed run" in report
    assert f"temporary folder {live} (0.0 MiB): a run in progress" in report
    assert f"temporary folder {foreign} (0.0 MiB): has no .recpipe-staging marker, so not made by this project" in report
    assert pipeline.remove_leftovers(data, tmp_path / "preprocessors") == [dead, preprocessors]
    assert not dead.exists() and live.exists() and foreign.exists()
    assert [state.state for state in pipeline.inspect(data, raw, {})] == ["complete"] * 4  # never mistaken for output


@pytest.mark.parametrize("argv, message", [
    (["status", "--buckets", "0"], "argument --buckets: must be at least 1, got 0"),
    (["run", "--sample-frac", "2"], "argument --sample-frac: must be at most 1, got 2"),
    (["clean", "processed"], "argument STAGE: invalid choice: 'processed'"),
])
def test_pipeline_bad_flags_are_one_clear_line(tmp_path, argv, message):
    result = run_in_process("pipeline.py", *argv, "--data", tmp_path, check=False)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_pipeline_run_stops_at_a_failing_stage_with_its_exit_status(session_cluster, raw_dir, tmp_path):
    (raw_dir / "clicks" / "broken.jsonl.gz").write_bytes(b"not gzip")  # found only when the stage reads it
    result = run_joined(session_cluster, "pipeline.py", "run", "--data", tmp_path / "data", "--raw", raw_dir,
                        check=False)
    assert result.returncode == 2
    assert "broken.jsonl.gz: cannot be read or decompressed" in result.stderr
    assert "merge_and_clean.py failed (exit status 2)" in result.stderr
    assert "=== repartitioned/" not in result.stdout and "Traceback" not in result.stderr


def test_pipeline_status_reports_damaged_stages_and_exits_2(chain, capsys):
    data, raw = chain
    (data / "cleaned" / "table" / "part.parquet").unlink()
    (data / "processed" / "_stage.json").write_text("[]")
    status = run_main("pipeline.py", "status", "--data", data, "--raw", raw)
    out, err = capsys.readouterr()
    assert status == 2
    assert printed_states(out) == {"merged/": "complete", "repartitioned/": "complete", "cleaned/": "damaged",
                      "processed/": "damaged"}
    assert one_line(err) == (
        f"error: {data / 'cleaned'}/ is not as parse_ua_strings.py published it: 1 file missing: table/part.parquet; "
        "run `python pipeline.py run --from cleaned` (or parse_ua_strings.py) to make it again "
        "(and 1 more damaged stage folders, above)")
    assert f"why: {data / 'processed' / '_stage.json'}: not a manifest that preprocess.py wrote (a JSON list" in out


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_pipeline_status_shows_a_broken_stage_as_damaged_and_says_it_in_one_line(chain, capsys, breakage):
    data, raw = chain
    break_stage(data / "repartitioned", breakage)
    before = listing(data)
    assert run_main("pipeline.py", "status", "--data", data, "--raw", raw) == 2
    out, err = capsys.readouterr()
    assert printed_states(out)["repartitioned/"] == "damaged"
    start, end = broken_stage_line(data / "repartitioned", breakage, "repartition.py")
    line = one_line(err)
    assert line.startswith(start) and line.endswith(end), line
    assert listing(data) == before


def test_pipeline_status_verify_reads_every_file_against_the_fingerprint(chain, capsys):
    data, raw = chain
    path = data / "merged" / "table" / "part.parquet"
    content = bytearray(path.read_bytes())
    content[4] ^= 0xFF  # same size, same footer: only the content tells
    path.write_bytes(bytes(content))
    assert run_main("pipeline.py", "status", "--data", data, "--raw", raw) == 0
    assert run_main("pipeline.py", "status", "--verify", "--data", data, "--raw", raw) == 2
    assert one_line(capsys.readouterr().err).startswith(
        f"error: {data / 'merged'}/ is not as merge_and_clean.py published it: the files' contents differ from the "
        "fingerprint recorded when it was published (output_sha256)")


@pytest.mark.parametrize("breakage, problem", [
    ("nowhere", "raw source {raw}/nowhere/impressions/ is missing"),
    ("a stray file", "{raw}/clicks/README.txt: unknown format"),
])
def test_pipeline_says_when_it_cannot_check_the_raw_files(chain, capsys, breakage, problem):
    data, raw = chain
    if breakage == "a stray file":
        (raw / "clicks" / "README.txt").write_text("where these logs come from")
        where = raw
    else:
        where = raw / "nowhere"
    problem = problem.format(raw=raw)
    before = listing(data.parent)
    assert run_main("pipeline.py", "status", "--data", data, "--raw", where) == 0
    out = capsys.readouterr().out
    assert list(printed_states(out).values()) == ["unchecked"] * 4
    assert f"why: the raw files it was made from could not be checked: {problem}" in out
    assert run_main("pipeline.py", "run", "--data", data, "--raw", where) == 2
    assert one_line(capsys.readouterr().err).startswith(f"error: {problem}")
    assert listing(data.parent) == before


def test_pipeline_clean_refuses_a_folder_a_stage_did_not_write(chain, capsys):
    data, raw = chain
    (data / "merged" / "notes.txt").write_text("keep me")
    (data / "repartitioned" / "_stage.json").unlink()
    before = listing(data)
    assert run_main("pipeline.py", "clean", "merged", "--data", data, "--raw", raw) == 2
    assert one_line(capsys.readouterr().err) == (
        f"error: refusing to delete {data / 'merged'}/: it holds what merge_and_clean.py did not write: notes.txt, "
        "so this project cannot tell that it wrote it; delete it yourself if nothing in it is needed")
    assert run_main("pipeline.py", "clean", "repartitioned", "--data", data, "--raw", raw) == 2
    assert one_line(capsys.readouterr().err).startswith(
        f"error: refusing to delete {data / 'repartitioned'}/: it has no _stage.json, so this project cannot tell")
    assert listing(data) == before


@pytest.mark.processes
@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_pipeline_interrupted_midway_removes_the_stage_staging_folder_and_stops(cleaned_data, tmp_path,
                                                                               signal_number):
    """Ctrl-C (SIGINT to the terminal's process group) or SIGTERM (to pipeline.py alone) while a stage
    runs inside pipeline.py: that stage's staging folder goes, its previous output stays, no later stage runs."""
    data = tmp_path / "data"
    shutil.copytree(cleaned_data / "data", data)
    manifest = (data / "repartitioned" / stage.MANIFEST).read_text()
    process = subprocess.Popen(
        [sys.executable, "pipeline.py", "run", "--from", "repartitioned", "--data", data, "--raw",
         cleaned_data / "raw", "--preprocessors", tmp_path / "preprocessors", "--workers", "2"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not list(data.glob(".repartitioned.staging-*/*/*/*.parquet")):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be stopped"
        time.sleep(0.02)
    if signal_number == signal.SIGINT:
        os.killpg(process.pid, signal_number)
    else:
        os.kill(process.pid, signal_number)
    stdout, stderr = process.communicate(timeout=60)

    assert process.returncode == 128 + signal_number, stderr
    assert "Traceback" not in stderr and "=== cleaned/" not in stdout
    assert pipeline.all_leftovers(data, tmp_path / "preprocessors") == []
    assert (data / "repartitioned" / stage.MANIFEST).read_text() == manifest


def test_pipeline_day_to_day_end_to_end(session_cluster, processed_data, cleaned_data, tmp_path):
    """On data made by the stage scripts: status, a re-run of one stage, a parameter change, reclaiming
    space, train.py on what is left, and what a changed merged/ makes of it all."""
    data, preprocessors = tmp_path / "data", tmp_path / "preprocessors"
    shutil.copytree(processed_data[0], data)
    # Without the record of the processed/ they were fitted for, which names the fixture's: preprocess.py
    # would refuse to replace them for this copy while that one still records them.
    shutil.copytree(processed_data[1], preprocessors, ignore=shutil.ignore_patterns("fitted_for.json"))
    where = ["--data", data, "--raw", cleaned_data / "raw", "--preprocessors", preprocessors]
    computing = [*where, "--workers", "2"]  # only `run` takes the cluster flags

    status = run_in_process("pipeline.py", "status", *where).stdout
    assert [line.split()[1] for line in status.splitlines() if line.endswith(".py") and "/" in line] == \
        ["complete"] * 4
    assert "made with: --buckets 3 --row-group-mb 64.0" in status  # each stage's parameters
    assert "--max-history 60" in status and "--layout timeline" in status
    assert "was fitted with processed/: train.py can run" in status
    assert "python pipeline.py clean merged" in status
    assert "ran nothing" in run_in_process("pipeline.py", "run", *computing).stdout

    # Re-running one stage with the same input and parameters changes nothing after it.
    rerun = run_in_process("pipeline.py", "run", "--from", "repartitioned", *computing).stdout
    assert "=== repartitioned/ (asked with --from)" in rerun and "=== cleaned/" not in rerun
    assert rerun.count("Dask dashboard: ") == 1 and "joined scheduler" not in rerun  # one cluster, said once
    assert stage.read_manifest(data / "repartitioned")["parameters"]["buckets"] == 3  # kept, not the default

    # Asking for another history length remakes processed/ alone.
    changed = run_joined(session_cluster, "pipeline.py", "run", "--max-history", "20", *where).stdout
    assert [line.split()[1] for line in changed.splitlines() if line.startswith("=== ") and "/ (" in line] == \
        ["processed/"]
    assert stage.read_manifest(data / "processed")["parameters"]["max_history"] == 20

    # Reclaiming space: processed/ stays complete, and train.py runs on it.
    for name in ("merged", "repartitioned"):
        run_in_process("pipeline.py", "clean", name, *where)
    states = {state.name: state.state for state in pipeline.inspect(data, cleaned_data / "raw", {})}
    assert states == {"merged": "cleaned away", "repartitioned": "cleaned away", "cleaned": "complete",
                      "processed": "complete"}
    run_in_process("train.py", "--data", data, "--preprocessors", preprocessors, "--out", tmp_path / "run",
               "--epochs", "1", "--max-steps", "3", "--batch-size", "64", "--dim", "8", "--workers", "0")
    assert json.loads((tmp_path / "run" / "final.json").read_text())["steps"] == 3

    # merged/ made again with another split: what was made from the old one is stale, and cleaned/ is kept.
    run_joined(session_cluster, "merge_and_clean.py", "--raw", cleaned_data / "raw", "--data", data, "--test-days", "2")
    states = {state.name: state for state in pipeline.inspect(data, cleaned_data / "raw", {})}
    assert states["cleaned"].reasons == ["merged/, which it was made from, was re-run since, with a different result."]
    assert states["processed"].state == "stale"
    refused = run_in_process("pipeline.py", "clean", "cleaned", *where, check=False)
    assert refused.returncode == 2 and "cleaned/ is stale, and so is processed/ after it" in refused.stderr
    assert (data / "cleaned" / stage.MANIFEST).exists()


@pytest.mark.processes
def test_pipeline_clean_and_another_stage_wait_for_a_run_that_reads_the_folder(session_cluster, cleaned_data,
                                                                             tmp_path):
    """`clean merged`, and merge_and_clean.py which would replace merged/, while `run --from repartitioned`
    reads merged/: both refused at once naming the run; the run completes and merged/ is whole."""
    data = tmp_path / "data"
    shutil.copytree(cleaned_data / "data", data)
    where = ["--data", data, "--raw", cleaned_data / "raw", "--preprocessors", tmp_path / "preprocessors"]
    merged = listing(data / "merged")
    import dask

    from recpipe import cluster
    # The session's cluster admits only holders of its credentials: the client's, through Dask's variables.
    tls = {variable: dask.config.get(key) for key, variable in cluster.TLS_CONFIG.items() if dask.config.get(key, None)}
    process = subprocess.Popen([sys.executable, "pipeline.py", "run", "--from", "repartitioned", *map(str, where),
                                "--scheduler", session_cluster], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, env={**os.environ, **tls})
    try:
        deadline = time.monotonic() + 120
        while not list(data.glob(".repartitioned.staging-*")):  # made once merged/ is held for reading
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be met"
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGSTOP)  # the run, paused while it holds merged/, cannot end meanwhile
        try:
            cleaning = run_in_process("pipeline.py", "clean", "merged", *where, check=False)
            merging = run_in_process("merge_and_clean.py", "--raw", cleaned_data / "raw", "--data", data, check=False)
        finally:
            os.killpg(process.pid, signal.SIGCONT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    reader = f"pipeline.py (pid {process.pid}) is reading it"
    assert cleaning.returncode == 2 and one_line(cleaning.stderr) == (
        f"error: cannot delete {data / 'merged'}/ now: {reader}; wait until that finishes (or stop it), then run "
        "this again")
    assert merging.returncode == 2 and one_line(merging.stderr) == (
        f"error: cannot replace {data / 'merged'}/ now: {reader}; wait until that finishes (or stop it), then run "
        "this again")
    assert process.returncode == 0, stderr
    assert listing(data / "merged") == merged


@pytest.mark.parametrize("script, argv", [
    ("train.py", ["--out", "gs://bucket/runs/1"]),
    ("train.py", ["--resume", "abfs://container/runs/1/checkpoint.pt"]),
])
def test_pipeline_a_url_for_a_local_folder_is_one_line_naming_it(tmp_path, monkeypatch, script, argv):
    monkeypatch.chdir(tmp_path)
    result = run_in_process(script, *argv, check=False)
    url = argv[-1]
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert line.startswith(f"error: --{argv[-2].lstrip('-')} {url}: a {url.split(':')[0]}:// URL") and \
        "docs/cluster.md" in line
    assert list(tmp_path.iterdir()) == []  # nothing made


def test_pipeline_a_file_url_is_its_path(chain, capsys):
    data, raw = chain
    assert run_main("pipeline.py", "status", "--data", f"file://{data}", "--raw", f"file://{raw}") == 0
    assert capsys.readouterr().out.count(" complete ") == 4


def edit_manifest(folder, edit):
    path = folder / stage.MANIFEST
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


WRONG_FIELDS = [
    ("merged", lambda m: m.update(lineage=[]), "'lineage' is [], not an object"),
    ("repartitioned", lambda m: m.update(tables={"table": 5}), "'tables.table' is 5, not an object"),
    ("repartitioned", lambda m: m["parameters"].update(buckets="x"), "'parameters.buckets' must be an integer, got 'x'"),
    ("repartitioned", lambda m: m["parameters"].update(buckets=0), "'parameters.buckets' must be at least 1, got 0"),
    ("repartitioned", lambda m: m["parameters"].update(row_group_mb=float("nan")),  # JSON's NaN, which json reads
     "'parameters.row_group_mb' must be a finite number, got nan"),
    ("cleaned", lambda m: m["lineage"]["merged"]["parameters"].update(test_days=-1),
     "'lineage.merged.parameters.test_days' must be at least 0, got -1"),
    ("processed", lambda m: m.update(history_entries_per_example="x"),
     "'history_entries_per_example' is \"x\", not a number or null"),
    ("processed", lambda m: m["parameters"].update(max_history="abc"), "'parameters.max_history' must be an integer, got 'abc'"),
]


@pytest.mark.parametrize("name, edit, problem", WRONG_FIELDS)
def test_pipeline_a_manifest_field_of_the_wrong_type_is_one_line_naming_it(chain, tmp_path, capsys, name, edit,
                                                                           problem):
    """Fields of the wrong type or out of their flag's range: `status` and `run` used to stop with a traceback
    (or, `--buckets 0`, publish with a division by zero); now every reader says which file and field, and the
    stage to run again."""
    data, raw = chain
    edit_manifest(data / name, edit)
    script = stages.BY_NAME[name].script
    start = f"error: {data / name / stage.MANIFEST}: not a manifest that {script} wrote ({problem}"
    end = f"delete {data / name}/ yourself and run {script} again"
    before = listing(tmp_path)
    where = ["--data", data, "--raw", raw, "--preprocessors", tmp_path / "preprocessors"]
    if name == "processed":  # its reader is train.py
        commands = [["train.py", "--data", data, "--preprocessors", tmp_path / "preprocessors", "--out",
                     tmp_path / "run"]]
    else:  # the next stage, and `run`, which has nothing to run before it reports: processed/ is complete
        after = stages.STAGES[stages.NAMES.index(name) + 1]
        commands = [[after.script, "--data", data, *(["--preprocessors", tmp_path / "preprocessors"]
                                                     if after.folders else [])], ["pipeline.py", "run", *where]]
    for command in [["pipeline.py", "status", *where], *commands]:
        assert run_main(*command) == 2, command
        line = one_line(capsys.readouterr().err)
        assert line.startswith(start) and line.endswith(end), (command, line)
    assert listing(tmp_path) == before


def commands_on(data, raw, root):
    """{name: argv} of every command that takes --data, as a user would type it."""
    pre, where = root / "preprocessors", ["--data", data, "--raw", raw]
    return {"status": ["pipeline.py", "status", *where, "--preprocessors", pre],
            "run": ["pipeline.py", "run", *where, "--preprocessors", pre],
            "clean": ["pipeline.py", "clean", "merged", *where, "--preprocessors", pre],
            "clean leftovers": ["pipeline.py", "clean", "leftovers", "--data", data, "--preprocessors", pre],
            "merge_and_clean.py": ["merge_and_clean.py", *where],
            "repartition.py": ["repartition.py", "--data", data],
            "preprocess.py": ["preprocess.py", "--data", data, "--preprocessors", pre],
            "train.py": ["train.py", "--data", data, "--preprocessors", pre, "--out", root / "run"]}


@pytest.mark.parametrize("command", ["status", "run", "clean", "clean leftovers", "merge_and_clean.py",
                                     "repartition.py", "train.py"])
@pytest.mark.parametrize("inside", [False, True])
def test_pipeline_data_that_is_a_file_is_one_line_in_every_command(tmp_path, capsys, command, inside):
    """It was a FileExistsError or NotADirectoryError traceback (run, merge_and_clean.py, train.py), or every
    stage `missing` (status)."""
    raw, file = make_raw(tmp_path), tmp_path / "notes.txt"
    file.write_text("not a folder")
    data = file / "data" if inside else file
    before = listing(tmp_path)
    assert run_main(*commands_on(data, raw, tmp_path)[command]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"error: --data {data}: {f'{file} is a file' if inside else 'a file'}, not a folder: give the folder that "
        "holds the stage folders (merged/, repartitioned/, cleaned/, processed/)")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("command", ["status", "clean", "clean leftovers", "repartition.py", "preprocess.py",
                                     "train.py", "run", "merge_and_clean.py"])
def test_pipeline_data_that_does_not_exist_is_named_and_nothing_is_made(tmp_path, capsys, command):
    """A mistyped --data was answered `merged/ is missing: run merge_and_clean.py first`, which would build a
    pipeline at the typo. Readers name the folder; `run` and merge_and_clean.py, which make a new --data,
    make one only inside a folder that exists."""
    raw = make_raw(tmp_path)
    making = command in ("run", "merge_and_clean.py")
    data = tmp_path / "dat" / "data" if making else tmp_path / "dat"
    before = listing(tmp_path)
    assert run_main(*commands_on(data, raw, tmp_path)[command]) == 2
    line = one_line(capsys.readouterr().err)
    if making:
        assert line == (f"error: --data {data}: no such folder, nor {data.parent}/ to make it in: check the path, or "
                        f"make {data.parent}/ first to start a new pipeline there")
    else:
        assert line == (f"error: --data {data}: no such folder: check the path (`python pipeline.py run --data "
                        f"{data}` would make a new pipeline there, from --raw's files)")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("command, missing", [
    ("preprocess.py", "cleaned/ is missing, and so is repartitioned/ before it"),
    ("train.py", "processed/ is missing, and so are repartitioned/ and cleaned/ before it"),
])
def test_pipeline_a_stage_run_before_its_inputs_names_the_first_missing_stage(tmp_path, capsys, command, missing):
    """It named only the stage just before: three runs, three messages, to learn that repartition.py comes first."""
    raw, data = make_raw(tmp_path), tmp_path / "data"
    make_stage(data, "merged", 3, raw=raw)
    before = listing(tmp_path)
    assert run_main(*commands_on(data, raw, tmp_path)[command]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"error: {data}/{missing}: `python pipeline.py run --data {data}` makes them all in order (or run "
        "repartition.py first)")
    assert listing(tmp_path) == before


def test_pipeline_status_verify_hashes_raw_files_put_back_with_the_same_names_sizes_and_mtimes(chain, capsys):
    """Staleness is judged by names, sizes and mtimes, which a file put back with all three does not change:
    --verify also hashes the raw files against what merge_and_clean.py recorded, and says what it hashed."""
    data, raw = chain
    file = raw / "clicks" / "part.jsonl"
    kept = file.stat()
    file.write_text("[]\n")  # the same size
    os.utime(file, ns=(kept.st_atime_ns, kept.st_mtime_ns))
    before = listing(data.parent)
    where = ["--data", data, "--raw", raw]
    assert run_main("pipeline.py", "status", *where) == 0
    assert set(printed_states(capsys.readouterr().out).values()) == {"complete"}
    assert run_main("pipeline.py", "status", "--verify", *where) == 0
    out = capsys.readouterr().out
    assert printed_states(out) == dict.fromkeys(["merged/", "repartitioned/", "cleaned/", "processed/"], "stale")
    assert (f"why: the contents of raw files under {raw}/ changed since it was made (clicks/part.jsonl), with the "
            "same names, sizes and modification times: only hashing them shows it; `python pipeline.py run --from "
            "merged` reads them again.") in out
    assert out.count("next: `python pipeline.py run --from merged` (same flags) runs ") == 4
    sizes = sum(described["bytes"] for name in stages.NAMES
                for described in stage.read_manifest(data / name)["files"].values())
    assert out.splitlines()[-1] == (
        f"verified: hashed 4 files ({pipeline.mib(sizes)}) of 4 stage folders against their output_sha256, and "
        f"{len(SOURCES)} raw files (0.0 MiB) against the hashes merge_and_clean.py recorded")
    assert listing(data.parent) == before
    assert run_main("pipeline.py", "status", "--help") == 0
    assert "raw files by names, sizes and modification times" in " ".join(capsys.readouterr().out.split())


def test_pipeline_says_what_is_wrong_with_preprocessors_and_run_does_not_exit_0_when_train_cannot_run(chain, capsys):
    """`--preprocessors data/raw` was called missing; a damaged processed/ still said `train.py can run`; `run`
    with missing preprocessors said `ran nothing`, exit 0."""
    data, raw = chain
    where = ["--data", data, "--raw", raw]
    before = listing(data.parent)
    assert run_main("pipeline.py", "status", *where, "--preprocessors", raw) == 0
    out = capsys.readouterr().out
    assert (f"--preprocessors {raw} is a folder without the fitted encoders and scaler, not one preprocess.py wrote: "
            "point --preprocessors at the folder preprocess.py wrote for processed/") in out and "missing" not in out

    missing = data.parent / "preprocessors"
    assert run_main("pipeline.py", "run", *where, "--preprocessors", missing) == 2
    captured = capsys.readouterr()
    assert "=== ran nothing" in captured.out
    assert one_line(captured.err) == (f"error: {missing}/ is missing: run `python pipeline.py run --from processed`, "
                                      "which fits it again (train.py needs it)")
    assert listing(data.parent) == before

    (data / "processed" / "table" / "part.parquet").unlink()
    assert run_main("pipeline.py", "status", *where, "--preprocessors", missing) == 2
    out = capsys.readouterr().out
    assert f"train.py refuses {data / 'processed'}/ while it is damaged (above)" in out and "can run" not in out


def test_pipeline_clean_refuses_stage_flags_it_would_ignore(chain, capsys):
    data, raw = chain
    before = listing(data)
    assert run_main("pipeline.py", "clean", "merged", "--data", data, "--raw", raw, "--buckets", "3") == 2
    assert "error: unrecognized arguments: --buckets 3" in capsys.readouterr().err
    assert listing(data) == before
