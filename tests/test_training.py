"""The model and the training loop: metrics, checkpoints, and train.py end to end on generated data:
its run folder, --resume, empty and one-class splits, and its refusals."""

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch

from conftest import BREAKAGES, ROOT, break_stage, broken_stage_line, listing, one_line, run_in_process, run_main
from recpipe import encoders, stage
from recpipe.model import Recommender
from recpipe.training import load_checkpoint, log_loss, roc_auc, save_checkpoint, select

# A run of a few seconds: one epoch of 3 steps (--max-steps counts over the whole run).
TINY = ("--epochs", "1", "--max-steps", "3", "--batch-size", "64", "--dim", "8", "--workers", "0")
RUN_FILES = {"config.json", "checkpoint.pt", "metrics.jsonl", "final.json", "curves.png"}

CATEGORICAL = [20, 10, 8]


def fake_batch(size=8, length=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    history = torch.randint(1, 50, (size, length), generator=generator)
    history[0] = 0            # an empty history
    history[1, 3:] = 0        # a short one
    return {"item": torch.randint(1, 50, (size,), generator=generator), "history_items": history,
            "history_action_types": torch.where(history > 0, 1, 0).to(torch.int8),
            "categorical": torch.stack([torch.randint(0, n, (size,), generator=generator) for n in CATEGORICAL], 1),
            "numeric": torch.randn(size, 9, generator=generator), "target": (torch.arange(size) % 2).float()}


def make_model(seed):
    torch.manual_seed(seed)
    model = Recommender(50, CATEGORICAL, 9, 12, dim=16, heads=2, layers=1)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train_step(model, optimizer, batch):
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch["target"])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def test_training_model_gives_finite_logits_for_empty_histories():
    model, _ = make_model(0)
    model.eval()
    logits = model(fake_batch())
    assert logits.shape == (8,) and torch.isfinite(logits).all()


def test_training_checkpoint_resumes_to_the_same_state(tmp_path):
    model, optimizer = make_model(0)
    batch = fake_batch()
    for _ in range(2):
        train_step(model, optimizer, batch)
    save_checkpoint(tmp_path / "checkpoint.pt", model, optimizer, {"epoch": 1, "step": 2})
    train_step(model, optimizer, batch)  # dropout draws from torch's RNG: resuming must restore it too

    resumed, resumed_optimizer = make_model(1)
    assert load_checkpoint(tmp_path / "checkpoint.pt", resumed, resumed_optimizer) == {"epoch": 1, "step": 2}
    train_step(resumed, resumed_optimizer, batch)
    for (name, expected), actual in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(expected, actual), name


def test_training_roc_auc_and_log_loss_match_hand_computed_values():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert roc_auc([0, 1, 1], [0.5, 0.5, 0.9]) == 0.75  # a tie counts half
    assert np.isnan(roc_auc([1, 1], [0.2, 0.3]))
    assert log_loss([1, 0], [0.5, 0.5]) == pytest.approx(np.log(2))


def strict_json(text):
    """json.loads that fails on NaN and Infinity, as every JSON reader but Python's does."""
    def refuse(token):
        raise ValueError(f"{token} is not JSON")
    return json.loads(text, parse_constant=refuse)


def snapshot(*folders):
    """conftest.listing of several folders at once."""
    return {(str(folder), name): size for folder in folders for name, size in listing(folder).items()}


def assert_one_line_error(result, *expected):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    for text in expected:
        assert text in result.stderr


def without_split(processed_data, root, split, **made_with):
    """A copy of processed_data in which `split` is empty, as preprocess.py publishes it when merge_and_clean.py
    labelled no day so (`--val-days 0`, recorded in the lineage as `made_with`): no folder for the split, and
    0 rows of it in the manifest, which lists the files that are left."""
    data, preprocessors = processed_data
    shutil.copytree(data / "processed", root / "data" / "processed")
    shutil.copytree(preprocessors, root / "preprocessors")
    processed = root / "data" / "processed"
    shutil.rmtree(processed / split)
    manifest = json.loads((processed / "_stage.json").read_text())
    manifest["files"], manifest["tables"] = stage.describe(processed)
    manifest["rows_per_split"][split] = 0
    manifest["lineage"]["merged"]["parameters"].update(made_with)
    (processed / "_stage.json").write_text(json.dumps(manifest))
    return root / "data", root / "preprocessors"


@pytest.fixture(scope="module")
def trained_run(processed_data, tmp_path_factory):
    """One run of train.py with TINY: (its folder, its result). Tests copy the folder before changing it."""
    data, preprocessors = processed_data
    run = tmp_path_factory.mktemp("trained") / "run"
    result = run_in_process("train.py", "--data", data, "--preprocessors", preprocessors, "--out", run, *TINY)
    return run, result


def test_train_runs_end_to_end_on_the_cpu_and_writes_its_outputs(trained_run, processed_data):
    run, result = trained_run
    assert "device cpu" in result.stdout
    assert {path.name for path in run.iterdir()} == RUN_FILES  # train_loss.jsonl comes every 50 steps
    records = [strict_json(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and {"val_auc", "val_logloss", "train_loss", "val_examples"} <= set(records[0])
    final = strict_json((run / "final.json").read_text())
    assert {"test_auc", "test_logloss", "val_auc", "examples_per_second"} <= set(final)
    assert 0 <= final["test_auc"] <= 1 and final["steps"] == 3
    assert (final["selected_by"], final["selected_step"], final["val_auc"]) == ("val_auc", 3, records[0]["val_auc"])
    assert (run / "curves.png").stat().st_size > 1000
    config = strict_json((run / "config.json").read_text())
    assert config["flags"]["dim"] == 8 and config["flags"]["data"] == str(processed_data[0])
    assert config["device"] == "cpu" and config["max_history"] == 60 and config["code_version"]["source_sha256"]
    assert config["processed"]["output_sha256"] == stage.open_stage(processed_data[0], "processed").manifest[
        "output_sha256"]
    assert config["preprocessors"]["sha256"] == encoders.fingerprint(processed_data[1])
    assert config["flags"]["batch_size"] == 64 and config["flags"]["log_seconds"] == 15  # defaults are resolved


def test_train_names_what_is_missing_and_the_script_that_makes_it(processed_data, tmp_path, capsys):
    data, _ = processed_data
    assert run_main("train.py", "--data", tmp_path, "--out", tmp_path / "run") == 2
    line = one_line(capsys.readouterr().err)
    assert f"{tmp_path}/processed/ is missing" in line and f"python pipeline.py run --data {tmp_path}" in line, line
    assert run_main("train.py", "--data", data, "--preprocessors", tmp_path / "none", "--out", tmp_path / "run") == 2
    assert "run preprocess.py first" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()  # a refused run makes no run folder


class RunsCode:
    """What a hostile .pt can hold: an object whose loading calls os.system."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _out_holds_user_files(tmp_path, run):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's\n")
    return ["--out", tmp_path / "mine"], ["--out", "is not empty and not a run folder of train.py (it holds notes.txt)",
                                          "give a new or empty folder as --out"]


def _out_is_an_earlier_run(tmp_path, run):
    return ["--out", run], [f"--out {run} holds an earlier run of train.py",
                            f"continue it with --resume {run}/checkpoint.pt", "give another --out"]


def _resume_a_missing_checkpoint(tmp_path, run):
    return ["--resume", "/no/such.pt"], ["--resume /no/such.pt: no such file"]


def _resume_into_another_out(tmp_path, run):
    return (["--resume", run / "checkpoint.pt", "--out", tmp_path / "elsewhere"],
            [f"--out {tmp_path / 'elsewhere'} with --resume", f"writes on into its checkpoint's folder {run}/",
             "leave out --out"])


def _resume_from_a_folder_with_other_files(tmp_path, run):
    (run / "notes.txt").write_text("the user's\n")
    return ["--resume", run / "checkpoint.pt"], ["is not in a run folder of train.py", "also holds notes.txt"]


def _resume_a_truncated_checkpoint(tmp_path, run):
    checkpoint = run / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:checkpoint.stat().st_size // 2])
    return ["--resume", checkpoint], [f"--resume {checkpoint} is empty or cut short"]


def _resume_with_another_dim(tmp_path, run):
    return ["--resume", run / "checkpoint.pt", "--dim", "16"], ["was made with --dim 8 (asked: --dim 16)",
                                                                 "continue it with the flags it was made with"]


def _resume_a_checkpoint_that_runs_code(tmp_path, run):
    torch.save({"model": RunsCode(f"touch {tmp_path / 'ran'}")}, run / "checkpoint.pt")
    return ["--resume", run / "checkpoint.pt"], ["refused to load: it asks to run", "system", "nothing was run"]


def _resume_a_checkpoint_of_other_preprocessors(tmp_path, run):
    """Vocabularies of the same sizes can index other values: the sizes alone let such a checkpoint through."""
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    checkpoint["state"]["preprocessors_sha256"] = "0" * 64
    torch.save(checkpoint, run / "checkpoint.pt")
    return ["--resume", run / "checkpoint.pt"], ["was trained with other preprocessors than --preprocessors",
                                                 f"({run / 'config.json'} names them)"]


def _resume_with_metrics_cut_short(tmp_path, run):
    """A run killed while it appended: the next record used to be glued onto the half line, and curves.png
    died on it in a JSONDecodeError traceback after the whole run had trained."""
    line = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(line + line[:30])
    return ["--resume", run / "checkpoint.pt", "--epochs", "2"], [
        f"--resume {run / 'checkpoint.pt'}: line 2 of {run / 'metrics.jsonl'} is not a record train.py writes "
        "(not JSON: ", "delete that line (or the whole file", "then resume again; nothing was written"]


def _resume_with_another_tools_metrics(tmp_path, run):
    (run / "metrics.jsonl").write_text('{"loss": 0.3, "iteration": 10}\n')
    return ["--resume", run / "checkpoint.pt", "--epochs", "2"], [
        f"line 1 of {run / 'metrics.jsonl'} is not a record train.py writes (no whole-number 'epoch' or 'step')"]


def _resume_with_a_train_loss_that_is_not_records(tmp_path, run):
    (run / "train_loss.jsonl").write_text('{"step": 50, "train_loss": 0.4}\n[0.3]\n')
    return ["--resume", run / "checkpoint.pt", "--epochs", "2"], [
        f"line 2 of {run / 'train_loss.jsonl'} is not a record train.py writes (a JSON list, not an object)"]


@pytest.mark.parametrize("case", [_out_holds_user_files, _out_is_an_earlier_run,
                                  _resume_a_missing_checkpoint, _resume_into_another_out,
                                  _resume_from_a_folder_with_other_files, _resume_a_truncated_checkpoint,
                                  _resume_with_another_dim, _resume_a_checkpoint_that_runs_code,
                                  _resume_a_checkpoint_of_other_preprocessors, _resume_with_metrics_cut_short,
                                  _resume_with_another_tools_metrics, _resume_with_a_train_loss_that_is_not_records],
                         ids=lambda case: case.__name__.strip("_"))
def test_train_refuses_a_run_folder_or_checkpoint_in_one_line_and_touches_nothing(case, trained_run, processed_data,
                                                                                    tmp_path, capsys):
    data, preprocessors = processed_data
    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    flags, expected = case(tmp_path, run)
    before = snapshot(tmp_path, data / "processed", preprocessors)
    status = run_main("train.py", "--data", data, "--preprocessors", preprocessors, *TINY, *flags)
    assert status == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("error: ") and all(text in line for text in expected), line
    assert snapshot(tmp_path, data / "processed", preprocessors) == before
    assert not (tmp_path / "ran").exists()


def test_train_resume_of_a_finished_run_evaluates_it_in_its_own_folder(trained_run, processed_data, tmp_path):
    data, preprocessors = processed_data
    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    checkpoint, metrics = (run / "checkpoint.pt").read_bytes(), (run / "metrics.jsonl").read_text()
    result = run_in_process("train.py", "--data", data, "--preprocessors", preprocessors, *TINY,
                            "--resume", run / "checkpoint.pt")
    assert "nothing left to train" in result.stdout
    assert (run / "checkpoint.pt").read_bytes() == checkpoint and (run / "metrics.jsonl").read_text() == metrics
    final = strict_json((run / "final.json").read_text())
    assert final["steps"] == 3 and final["examples_per_second"] is None
    assert final["test_auc"] == strict_json((trained_run[0] / "final.json").read_text())["test_auc"]
    resumed = strict_json((run / "config.json").read_text())["resumed"]
    assert [(entry["at_epoch"], entry["at_step"]) for entry in resumed] == [(1, 3)]


def test_train_refuses_an_empty_train_split_naming_train_days(processed_data, tmp_path):
    data, preprocessors = without_split(processed_data, tmp_path, "train", train_days=0)
    before = snapshot(tmp_path)
    result = run_in_process("train.py", "--data", data, "--preprocessors", preprocessors, "--out", tmp_path / "run",
                            *TINY, check=False)
    assert_one_line_error(result, "processed/ has no train examples", "--train-days 0",
                          "python pipeline.py run --train-days 14")
    assert snapshot(tmp_path) == before


def test_train_with_an_empty_val_split_selects_by_training_loss_and_says_so(processed_data, tmp_path, capsys):
    data, preprocessors = without_split(processed_data, tmp_path, "val", val_days=0)
    run = tmp_path / "run"
    flags = ["--data", data, "--preprocessors", preprocessors, "--batch-size", "64", "--dim", "8", "--workers", "0"]
    assert run_main("train.py", *flags, "--out", run, "--epochs", "1", "--max-steps", "2") == 0
    assert "val is empty: choosing the checkpoint by training loss" in capsys.readouterr().out
    # A second evaluation, after a resume: the better training loss of the two keeps its checkpoint.
    assert run_main("train.py", *flags, "--resume", run / "checkpoint.pt", "--epochs", "2", "--max-steps", "4") == 0
    records = [strict_json(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"], r["val_examples"], r["val_auc"]) for r in records] == [(1, 2, 0, None),
                                                                                           (2, 4, 0, None)]
    final = strict_json((run / "final.json").read_text())
    best = min(records, key=lambda r: r["train_loss"])
    assert (final["selected_by"], final["selected_epoch"], final["steps"]) == ("train_loss", best["epoch"], 4)
    assert final["val_auc"] is None and final["val_logloss"] is None and 0 <= final["test_auc"] <= 1


def test_train_with_one_class_in_val_selects_by_val_log_loss(processed_data, tmp_path):
    data, preprocessors = processed_data
    # One val example evaluated: one class, so AUC is undefined (and so is the test AUC, of one example too).
    result = run_in_process("train.py", "--data", data, "--preprocessors", preprocessors, "--out", tmp_path / "run",
                            "--epochs", "1", "--max-steps", "3", "--batch-size", "1", "--eval-batches", "1",
                            "--dim", "8", "--workers", "0")
    assert "val AUC is undefined" in result.stdout and "choosing the checkpoint by val log loss" in result.stdout
    final = strict_json((tmp_path / "run" / "final.json").read_text())
    assert final["selected_by"] == "val_logloss" and final["val_auc"] is None and final["val_logloss"] > 0
    assert final["test_auc"] is None and final["test_examples"] == 1
    assert strict_json((tmp_path / "run" / "metrics.jsonl").read_text())["val_auc"] is None


def test_training_select_keeps_the_better_checkpoint_by_the_first_criterion_it_can_compute():
    def record(epoch, **values):
        return {"epoch": epoch, "step": epoch, "val_auc": float("nan"), "val_logloss": float("nan"),
                "train_loss": float("nan"), "val_examples": 10, **values}

    best, note = select(None, record(1, val_auc=0.6, val_logloss=0.5))
    assert best["selected_by"] == "val_auc" and note is None
    assert select(best, record(2, val_auc=0.55, val_logloss=0.1)) == (None, None)  # AUC decides, not log loss
    assert select(best, record(2, val_auc=0.7))[0]["epoch"] == 2
    best, note = select(None, record(1, val_logloss=0.5, train_loss=0.4))
    assert best["selected_by"] == "val_logloss" and "val log loss" in note
    assert select(best, record(2, val_logloss=0.6, train_loss=0.1)) == (None, None)
    best, note = select(None, record(1, train_loss=0.4, val_examples=0))
    assert best["selected_by"] == "train_loss" and note.startswith("val is empty")
    assert select(best, record(2, train_loss=float("nan"), val_examples=0)) == (None, None)  # NaN never wins
    assert select(best, record(2, train_loss=0.3, val_examples=0))[0]["value"] == 0.3


def start_training(data, preprocessors, out, *flags):
    """train.py in the background, stopped (SIGSTOP) once it holds processed/ and has said so, so that a test
    can act while it is mid-run; SIGCONT lets it go on."""
    process = subprocess.Popen([sys.executable, "train.py", "--data", str(data), "--preprocessors", str(preprocessors),
                                "--out", str(out), *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    for line in process.stdout:
        if line.startswith("examples: "):  # printed once processed/ is held and its splits opened
            os.killpg(process.pid, signal.SIGSTOP)
            return process
    raise AssertionError(f"train.py ended before it started training: {process.communicate()}")


@pytest.mark.processes
def test_train_holds_processed_so_preprocess_cannot_replace_it_midway(processed_data, tmp_path, capsys):
    """`preprocess.py --min-frequency 50` while train.py runs used to replace processed/ under it (training went
    on with other vocabulary indices, or died in an IndexError): now preprocess.py is refused, naming train.py."""
    data, preprocessors = tmp_path / "data", tmp_path / "preprocessors"
    shutil.copytree(processed_data[0], data)
    shutil.copytree(processed_data[1], preprocessors)
    training = start_training(data, preprocessors, tmp_path / "run", *TINY)
    try:
        before = snapshot(data, preprocessors)
        status = run_main("preprocess.py", "--data", data, "--preprocessors", preprocessors, "--min-frequency", "50")
        after = snapshot(data, preprocessors)
    finally:
        os.killpg(training.pid, signal.SIGCONT)
    stdout, stderr = training.communicate(timeout=120)
    assert status == 2 and one_line(capsys.readouterr().err) == (  # preprocessors/ is claimed first, then processed/
        f"error: cannot replace {preprocessors}/ now: train.py (pid {training.pid}) is reading it; wait until "
        "that finishes (or stop it), then run this again")
    assert after == before
    assert training.returncode == 0, stderr
    assert strict_json((tmp_path / "run" / "final.json").read_text())["steps"] == 3


@pytest.mark.processes
def test_train_stops_in_one_line_when_processed_is_swapped_midway(processed_data, tmp_path):
    """processed/ replaced by other means than preprocess.py (moved by hand, or from another machine, where
    no lock reaches): the run stops at the next day it reads, and writes no final.json."""
    data, preprocessors = tmp_path / "data", tmp_path / "preprocessors"
    shutil.copytree(processed_data[0], data)
    shutil.copytree(processed_data[1], preprocessors)
    shutil.copytree(data / "processed", tmp_path / "newer")
    manifest = json.loads((tmp_path / "newer" / "_stage.json").read_text())
    (tmp_path / "newer" / "_stage.json").write_text(json.dumps({**manifest, "finished_at": "2030-01-01T00:00:00"}))
    training = start_training(data, preprocessors, tmp_path / "run", *TINY)
    try:
        os.rename(data / "processed", tmp_path / "older")
        os.rename(tmp_path / "newer", data / "processed")
    finally:
        os.killpg(training.pid, signal.SIGCONT)
    _, stderr = training.communicate(timeout=120)
    assert training.returncode == 2
    assert one_line(stderr) == (
        f"error: {data / 'processed'}/ was replaced or removed while this run read it (preprocess.py ran again, or "
        "it was copied over): what was read so far is from the earlier version, so this run stopped; start train.py "
        "again on the new one")
    assert not (tmp_path / "run" / "final.json").exists()


@pytest.mark.processes
def test_train_imports_nothing_of_dask():
    """The training side runs where only PyTorch, PyArrow, pandas and NumPy are installed (a GPU machine):
    nothing of Dask, nor of the object storage libraries that --raw uses."""
    blocked = ("import sys; sys.modules.update(dask=None, distributed=None, fsspec=None, upath=None, s3fs=None); "
               "import train")
    result = subprocess.run([sys.executable, "-c", blocked], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("breakage", [*BREAKAGES, "a day deleted"])
def test_train_refuses_a_broken_or_damaged_processed_in_one_line(processed_data, tmp_path, capsys, breakage):
    """Deleting dt= folders of processed/train/ used to train silently on less data; a hand-edited
    _stage.json ended in a traceback."""
    data, preprocessors = tmp_path / "data", processed_data[1]
    shutil.copytree(processed_data[0] / "processed", data / "processed")
    if breakage == "a day deleted":
        day = sorted((data / "processed" / "train" / "examples").iterdir())[0].name
        shutil.rmtree(data / "processed" / "train" / "examples" / day)
    else:
        break_stage(data / "processed", breakage)
    before = snapshot(tmp_path)
    assert run_main("train.py", "--data", data, "--preprocessors", preprocessors, "--out", tmp_path / "run", *TINY) == 2
    line = one_line(capsys.readouterr().err)
    if breakage == "a day deleted":
        assert line.startswith(f"error: {data / 'processed'}/ is not as preprocess.py published it: ") and (
            f"files missing: train/examples/{day}/" in line), line
    else:
        start, end = broken_stage_line(data / "processed", breakage, "preprocess.py")
        assert line.startswith(start) and line.endswith(end), line
    assert snapshot(tmp_path) == before


def test_training_model_attention_runs_the_fused_kernel_on_the_cpu():
    """FlashAttention for the CPU, forward and backward: the math kernel would hold [B, heads, L, L]
    (attention-weight dropout, for one, sends PyTorch there)."""
    from torch.profiler import ProfilerActivity, profile
    model, _ = make_model(0)
    model.train()
    with profile(activities=[ProfilerActivity.CPU]) as profiled:
        model(fake_batch()).sum().backward()
    kernels = {event.name for event in profiled.events() if "attention" in event.name}
    assert {"aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::_scaled_dot_product_flash_attention_for_cpu_backward"} <= kernels
    assert "aten::_scaled_dot_product_attention_math" not in kernels


def test_training_step_memory_grows_linearly_with_the_history_length():
    from recpipe.training import step_memory
    torch.manual_seed(0)
    per_example = {}
    for length in (200, 400, 800):
        model = Recommender(50, CATEGORICAL, 9, length, dim=16, heads=2, layers=2)
        per_example[length], _ = step_memory(model, torch.device("cpu"), contextlib.nullcontext, length,
                                             len(CATEGORICAL), 9)
    assert per_example[400] / per_example[200] == pytest.approx(2, rel=0.05)
    assert per_example[800] / per_example[400] == pytest.approx(2, rel=0.05)


def test_training_model_scores_the_shown_item_by_how_recently_it_occurs():
    """Same batch, the shown item moved from the oldest to the most recent history slot: the score changes."""
    model, _ = make_model(0)
    model.eval()
    batch = fake_batch()
    batch["history_items"][2] = torch.arange(1, 13)
    batch["item"][2] = 12
    oldest = model(batch)[2]
    batch["history_items"][2] = torch.arange(12, 0, -1)
    assert model(batch)[2] != oldest


def test_train_refuses_a_step_that_does_not_fit_in_memory_naming_a_batch_size_that_does(processed_data, tmp_path,
                                                                                        capsys):
    data, preprocessors = processed_data
    status = run_main("train.py", "--data", data, "--preprocessors", preprocessors, "--out", tmp_path / "run",
                      "--batch-size", "100000000", "--dim", "8")
    line = one_line(capsys.readouterr().err)
    assert status == 2
    match = re.fullmatch(r"error: a training step of --batch-size 100000000 at --max-history 60 \(--dim 8, --layers 2\) "
                         r"needs about [\d,.]+ TiB of memory on cpu \(estimated\), and [\d,.]+ GiB is available: use "
                         r"--batch-size (\d+) or less, or a shorter --max-history", line)
    assert match, line
    assert 1000 < int(match.group(1)) < 100000000
    assert not (tmp_path / "run").exists()


def test_train_in_a_log_prints_progress_lines_and_the_rule_beside_the_model(processed_data, tmp_path):
    data, preprocessors = processed_data
    # In this process, stdout a StringIO (run_in_process): not a terminal, as a log is, so Progress prints lines.
    result = run_in_process("train.py", "--data", data, "--preprocessors", preprocessors, "--out", tmp_path / "run",
                            "--epochs", "1", "--max-steps", "4", "--batch-size", "64", "--dim", "8",
                            "--log-seconds", "0")
    progress = [line for line in result.stdout.splitlines() if line.startswith("epoch 1/1 step ")]
    assert [line.split(" | ")[0] for line in progress] == [f"epoch 1/1 step {n}/4" for n in (1, 2, 3, 4, 4)]
    assert all(re.fullmatch(r"epoch 1/1 step \d/4 \| [\d,]+ examples/s \| loss \d\.\d{4} \| epoch ETA \dm\d\ds", line)
               for line in progress[:4]), progress
    assert re.fullmatch(r"epoch 1/1 step 4/4 \| [\d,]+ examples/s \| loss \d\.\d{4} \| took \dm\d\ds", progress[4])
    final = strict_json((tmp_path / "run" / "final.json").read_text())
    assert 0.5 < final["rule_test_auc"] < 1
    assert f"against {final['rule_test_auc']:.3f} for the rule that needs no training" in result.stdout


def test_training_progress_on_a_terminal_is_a_bar_redrawn_in_place(monkeypatch):
    from recpipe import training
    clock = iter(range(100))
    monkeypatch.setattr(training.time, "monotonic", lambda: float(next(clock)))

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    progress = training.Progress(1, 3, 4, seconds=15, stream=terminal)
    for loss in (0.5, 0.4, 0.3, 0.2):
        progress.update(64, [0.6, loss])
    progress.close()
    frames = terminal.getvalue().split("\r")[1:]
    assert len(frames) == 4 and terminal.getvalue().endswith("\n")
    assert frames[0].startswith("[#####...............] epoch 1/3 step 1/4 | ")
    assert frames[-1].startswith("[####################] epoch 1/3 step 4/4 | ") and "loss 0.4000" in frames[-1]


@pytest.mark.parametrize("flag, value, expected", [
    ("--lr", "-0.1", "must be more than 0, got -0.1"), ("--lr", "nan", "must be a finite number, got nan"),
    ("--dropout", "1.5", "must be less than 1, got 1.5"), ("--weight-decay", "-5", "must be at least 0, got -5"),
    ("--timelines-budget", "-1", "must be at least 0, got -1"),
    ("--timelines-budget", "nan", "must be a finite number, got nan"), ("--epochs", "0", "must be at least 1, got 0"),
    ("--seed", "-1", "must be at least 0, got -1"), ("--log-seconds", "inf", "must be a finite number, got inf")])
def test_train_refuses_a_flag_out_of_its_range_before_anything_runs(processed_data, tmp_path, flag, value, expected):
    """--lr -0.1 / nan, --dropout 1.5 and --weight-decay -5 ended in tracebacks; --timelines-budget -1 / nan ran."""
    data, preprocessors = processed_data
    before = snapshot(tmp_path, data / "processed", preprocessors)
    result = run_in_process("train.py", "--data", data, "--preprocessors", preprocessors, "--out", tmp_path / "run",
                            *TINY, flag, value, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr and not result.stdout
    assert result.stderr.strip().splitlines()[-1].endswith(f"error: argument {flag}: {expected}")  # after the usage
    assert snapshot(tmp_path, data / "processed", preprocessors) == before


def test_train_help_of_storage_options_speaks_of_no_workers(capsys):
    """train.py has no Dask workers to send the options to."""
    assert run_main("train.py", "--help") == 0
    help_text = " ".join(capsys.readouterr().out.split("options:")[-1].split())  # past the usage
    words = help_text[help_text.index("--storage-options JSON"):help_text.index("--epochs EPOCHS")]
    assert "worker" not in words and "recorded nowhere" in words


@pytest.mark.parametrize("edit", ["two numeric columns instead of nine", "the numeric columns reordered"])
def test_train_refuses_an_edited_fit_json_and_status_says_so(processed_data, tmp_path, capsys, edit):
    """fit.json was not in the preprocessors' fingerprint: an edited one trained another model with exit 0, and
    `pipeline.py status` said "train.py can run"."""
    data, preprocessors = processed_data[0], tmp_path / "preprocessors"
    shutil.copytree(processed_data[1], preprocessors)
    fit = json.loads((preprocessors / "fit.json").read_text())
    assert len(fit["numeric"]) == 9
    numeric = fit["numeric"][:2] if edit.startswith("two") else fit["numeric"][::-1]
    (preprocessors / "fit.json").write_text(json.dumps({**fit, "numeric": numeric}, indent=1) + "\n")
    before = snapshot(tmp_path, data)
    assert run_main("train.py", "--data", data, "--preprocessors", preprocessors, "--out", tmp_path / "run", *TINY) == 2
    assert one_line(capsys.readouterr().err) == (
        f"error: {preprocessors}/ was not fitted with {data / 'processed'}/ (their hashes differ: encoders.json, "
        "scaler.json or fit.json was changed, or comes from another run of preprocess.py): run preprocess.py again, "
        "or point --preprocessors at the folder it wrote")
    run_main("pipeline.py", "status", "--data", data, "--preprocessors", preprocessors, "--raw", tmp_path / "raw")
    status = capsys.readouterr().out
    assert f"{preprocessors}/ was not fitted with processed/: train.py refuses it" in status, status
    assert "train.py can run" not in status
    assert snapshot(tmp_path, data) == before


def test_train_refuses_a_manifest_whose_max_history_is_not_a_number(processed_data, tmp_path, capsys):
    """`parameters.max_history: "abc"` in processed/_stage.json ended in a TypeError traceback."""
    data, preprocessors = tmp_path / "data", processed_data[1]
    shutil.copytree(processed_data[0] / "processed", data / "processed")
    manifest = json.loads((data / "processed" / "_stage.json").read_text())
    manifest["parameters"]["max_history"] = "abc"
    (data / "processed" / "_stage.json").write_text(json.dumps(manifest))
    before = snapshot(tmp_path, preprocessors)
    assert run_main("train.py", "--data", data, "--preprocessors", preprocessors, "--out", tmp_path / "run", *TINY) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"error: {data / 'processed' / '_stage.json'}: ") and "max_history" in line and (
        "preprocess.py" in line), line
    assert snapshot(tmp_path, preprocessors) == before


@contextlib.contextmanager
def small_disk(folder, size):
    """`folder` on a tmpfs of `size` (root only: skipped where mount is refused)."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@contextlib.contextmanager
def file_size_limit(size):
    """`ulimit -f` for this process: a write past `size` bytes fails with EFBIG (Python ignores SIGXFSZ)."""
    import resource
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)


@pytest.mark.parametrize("limit", ["a full disk", "a file size limit"])
def test_train_stops_in_one_line_with_74_when_the_checkpoint_cannot_be_written(processed_data, tmp_path, limit):
    """PyTorch's `RuntimeError: [enforce fail at inline_container.cc:672]` with two tracebacks, exit 1, and up to
    1.2 MB of .checkpoint.pt.partial-PID left behind. The checkpoint (some 130 kB here) is the first file of the
    run too large for what is left: config.json and metrics.jsonl fit."""
    data, preprocessors = processed_data
    before = snapshot(data / "processed", preprocessors)
    with contextlib.ExitStack() as stack:
        if limit == "a full disk":
            out = stack.enter_context(small_disk(tmp_path / "disk", "64k")) / "run"
        else:
            out = tmp_path / "run"
            stack.enter_context(file_size_limit(64 * 1024))
        result = run_in_process("train.py", "--data", data, "--preprocessors", preprocessors, "--out", out, *TINY,
                                "--max-steps", "1", "--eval-batches", "1", check=False)
        written = set(listing(out))
    assert result.returncode == 74, result.stderr
    reason = "no space left on device" if limit == "a full disk" else "file too large for its file system"
    assert one_line(result.stderr).startswith(f"error: {reason}")
    assert f"while writing {out / 'checkpoint.pt'}: " in result.stderr and (
        f"then start the run again (delete {out}/ or give another --out)" in result.stderr)
    assert written == {"config.json", "metrics.jsonl"}  # no partial checkpoint left
    assert snapshot(data / "processed", preprocessors) == before


def test_training_append_jsonl_starts_a_line_of_its_own(tmp_path):
    from recpipe.training import append_jsonl
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1, "step": 3}')  # its newline lost to an editor
    append_jsonl(path, {"epoch": 2, "step": 6})
    assert path.read_text() == '{"epoch": 1, "step": 3}\n{"epoch": 2, "step": 6}\n'


def test_train_examples_per_second_counts_the_training_steps_alone(processed_data, tmp_path, monkeypatch):
    """final.json's rate came out 3x below the steps' own after three epochs. Here the start, the evaluations,
    the checkpoints and the first step (a GPU's lazy initialization) each take 100 s more on train.py's clock:
    counted, any one of them would put the rate below 256 / 100."""
    import train
    from recpipe import training
    data, preprocessors = processed_data
    clock = {"offset": 0.0}
    monkeypatch.setattr(training, "time", types.SimpleNamespace(monotonic=lambda: time.monotonic() + clock["offset"]))

    def slowed(function, first_only=False):
        calls = []

        def slow(*args, **kwargs):
            if not (first_only and calls):
                clock["offset"] += 100
            calls.append(1)
            return function(*args, **kwargs)
        return slow

    for name in ("check_memory", "evaluate", "save_checkpoint"):
        monkeypatch.setattr(train, name, slowed(getattr(train, name)))
    monkeypatch.setattr(train, "bce", slowed(train.bce, first_only=True))  # once per training step: the first is slowed
    run_in_process("train.py", "--data", data, "--preprocessors", preprocessors, "--out", tmp_path / "run",
                   "--epochs", "2", "--max-steps", "4", "--batch-size", "64", "--dim", "8", "--eval-batches", "1")
    final = strict_json((tmp_path / "run" / "final.json").read_text())
    records = [strict_json(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert final["steps"] == 4 and final["examples_per_second"] == records[-1]["examples_per_second"]
    assert final["examples_per_second"] > 4 * 64 / 100
