"""What train.py's loop uses: its run folder, the memory a step needs, progress, metrics, evaluation, the
rule to beat, checkpoint selection, safe checkpoints, the curves plot.

A run folder holds train.py's own files and nothing else (RUN_FILES): train.py writes only into a
new or empty folder, or, with --resume, on into the folder of the checkpoint it continues.
Checkpoints hold tensors and plain Python values only, and are read with torch.load's
weights_only loader, so resuming from a file never runs code that came with it.
"""

import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from recpipe import cli, folders, stages
from recpipe.cli import OutputError, UserError

CHECKPOINT, CONFIG, METRICS, TRAIN_LOSS, FINAL, CURVES = (
    "checkpoint.pt", "config.json", "metrics.jsonl", "train_loss.jsonl", "final.json", "curves.png")
RUN_FILES = (CONFIG, CHECKPOINT, METRICS, TRAIN_LOSS, FINAL, CURVES)
# A file being written is renamed into place (save_checkpoint, write_json); a killed run leaves it behind.
_PARTIAL = re.compile(r"\.(" + "|".join(map(re.escape, RUN_FILES)) + r")\.partial-\d+")

# Flags that shape the model or what it sees: a checkpoint continues only under the same values.
MODEL_FLAGS = ("dim", "heads", "layers", "max_history", "empty_histories")


@dataclasses.dataclass(frozen=True)
class Flag(stages.Parameter):
    """A flag of train.py, declared as a stage's parameter is (type, default, help, range: a float must also
    be finite), with an exclusive upper bound besides; argparse checks it (parse) before anything runs."""

    below: float = None  # exclusive upper bound

    def check(self, value, given=None):
        value = super().check(value, given)
        if self.below is not None and not value < self.below:
            raise ValueError(f"must be less than {self.below}, got {value if given is None else given}")
        return value


# How the checkpoint kept is chosen, in order of preference: the first one an evaluation
# can compute decides for the run (val AUC is undefined when val holds one class, and val
# log loss too when val is empty). True: higher is better.
SELECTION = {"val_auc": True, "val_logloss": False, "train_loss": False}


# --- the run folder ---------------------------------------------------------------------------------

def is_run_file(name):
    return name in RUN_FILES or bool(_PARTIAL.fullmatch(name))


def run_folder(out, resume, default):
    """The folder a run writes into, checked but not created: a UserError names what is found otherwise.

    Without `resume`: `out` (or `default`) must be missing or empty. With it: the folder of the
    checkpoint, which must hold only train.py's files; `out`, if given, must be that folder.
    """
    if resume:
        checkpoint = Path(resume)
        if checkpoint.is_dir():
            raise UserError(f"--resume {resume} is a folder: give its checkpoint, --resume {checkpoint / CHECKPOINT}")
        if not checkpoint.is_file():
            raise UserError(f"--resume {resume}: no such file: give the {CHECKPOINT} of an earlier run's folder "
                            f"(runs/<timestamp>/{CHECKPOINT})")
        folder = checkpoint.parent
        if checkpoint.name != CHECKPOINT:
            raise UserError(f"--resume {resume}: train.py resumes the {CHECKPOINT} of a run folder and writes on into "
                            f"that folder: give {folder / CHECKPOINT}, or move the file into a folder of its own as "
                            f"{CHECKPOINT}")
        foreign = [entry.name for entry in sorted(folder.iterdir()) if not is_run_file(entry.name)]
        if foreign:
            raise UserError(f"--resume {resume} is not in a run folder of train.py: {folder}/ also holds "
                            f"{folders.listing(foreign)}, and a resumed run writes on into its checkpoint's folder: copy "
                            f"{CHECKPOINT} into a folder of its own and resume that; nothing was written")
        damaged = damaged_records(folder)
        if damaged:
            path, number, problem = damaged
            raise UserError(f"--resume {resume}: line {number} of {path} is not a record train.py writes ({problem}), "
                            "and a resumed run appends to that file and plots it: delete that line (or the whole "
                            "file, which holds the curves' history and nothing the run needs), then resume again; "
                            "nothing was written")
        if out is not None and Path(out).resolve() != folder.resolve():
            raise UserError(f"--out {out} with --resume {resume}: a resumed run writes on into its checkpoint's "
                            f"folder {folder}/ (its metrics and best checkpoint are there): leave out --out, or give "
                            f"--out {folder}; to start a new run in {out}, leave out --resume")
        return folder
    folder = Path(out) if out is not None else Path(default)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {folder} is a file, not a folder: give a new or empty folder as --out")
    entries = sorted(entry.name for entry in folder.iterdir()) if folder.is_dir() else []
    if not entries:
        return folder
    if all(is_run_file(name) for name in entries):
        continuing = f"continue it with --resume {folder / CHECKPOINT}, " if CHECKPOINT in entries else ""
        raise UserError(f"--out {folder} holds an earlier run of train.py ({folders.listing(entries)}): give another --out, "
                        f"{continuing}or delete {folder}/ first; it was left as it was")
    raise UserError(f"--out {folder} is not empty and not a run folder of train.py (it holds {folders.listing(entries)}): "
                    f"give a new or empty folder as --out; nothing was written to {folder}/")


# The fields of a record that the curves and the loop read, in the files a resumed run appends to.
RECORD_FIELDS = {METRICS: ("epoch", "step"), TRAIN_LOSS: ("step",)}


def damaged_records(folder):
    """(file, line number, what is wrong) for the first line of metrics.jsonl or train_loss.jsonl in
    `folder` that is not a record train.py writes (cut short by a kill, edited, or another tool's);
    None when every line is one."""
    for name, fields in RECORD_FIELDS.items():
        path = Path(folder) / name
        if not path.exists():
            continue
        try:
            lines = path.read_bytes().split(b"\n")
        except OSError as error:
            return path, 1, f"it cannot be read: {error.strerror}"
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:  # UnicodeDecodeError too
                return path, number, f"not JSON: {error}"
            if not isinstance(record, dict):
                return path, number, f"a JSON {type(record).__name__}, not an object"
            wrong = [field for field in fields if type(record.get(field)) is not int]
            if wrong:
                return path, number, f"no whole-number {' or '.join(repr(field) for field in wrong)}"
    return None


def record_run(folder, identity, resumed_at=None):
    """Write config.json, the run folder's identity: `identity` (flags, device, code version, data).

    A resumed run keeps the first run's identity and adds its own under "resumed", with the
    epoch and step it continued from.
    """
    path = Path(folder) / CONFIG
    if resumed_at is None:
        write_json(path, identity)
        return
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict):  # a run folder from before config.json existed
        record = dict(identity)
    write_json(path, {**record, "resumed": [*record.get("resumed", []), {**identity, **resumed_at}]})


# --- strict JSON ------------------------------------------------------------------------------------

def json_safe(value):
    """`value` with every NaN or infinity replaced by None: JSON has no such numbers, and readers
    other than Python's reject the NaN and Infinity tokens."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def dumps(value, **kwargs):
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def write_json(path, value):
    """Write `value` as strict JSON beside `path` and rename it into place: never half a file."""
    path = Path(path)
    partial = _partial(path)
    with writing(path, partial):
        partial.write_text(dumps(value, indent=2) + "\n")
        os.replace(partial, path)


def append_jsonl(path, record):
    """Append `record` as one line: after a line of its own even when the file's last one lacks its newline,
    and the file cut back to where it was when the write fails (a full disk leaves no half line)."""
    with writing(path), open(path, "ab+") as file:
        start = file.seek(0, os.SEEK_END)
        if start:
            file.seek(start - 1)
        line = ("\n" if start and file.read(1) != b"\n" else "") + dumps(record) + "\n"
        try:
            file.write(line.encode())
            file.flush()
        except OSError:
            file.truncate(start)
            raise


def _partial(path):
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


@contextlib.contextmanager
def writing(path, partial=None):
    """Around a write of the run folder: the partial file is removed when it fails, and a full disk or
    a folder that cannot be written is an OutputError naming `path` and the fix (exit 74, one line)."""
    try:
        yield
    except BaseException as error:
        if partial is not None:
            partial.unlink(missing_ok=True)
        message = _write_failure(error, Path(path))
        if message is None:
            raise
        raise OutputError(message) from None


def _write_failure(error, path):
    """The line an OutputError says when `error` (or one it came from: PyTorch raises a RuntimeError of its own
    over the OSError of a failed write) is a full disk or an unwritable folder; None otherwise."""
    found = cli.write_errno(error)
    if found is None:
        return None
    code = found[1]
    folder = path.parent
    then = (f"then continue the run with --resume {folder / CHECKPOINT} (its best checkpoint so far)"
            if (folder / CHECKPOINT).is_file() else f"then start the run again (delete {folder}/ or give another --out)")
    reason = os.strerror(code).lower()
    if code == errno.EFBIG:
        return (f"file too large for its file system (or `ulimit -f`) while writing {path}: raise the limit, or put "
                f"the run folder on a file system without it; {then}")
    if code in cli.DISK_FULL:
        return f"{reason} while writing {path}: free space on the disk that holds {folder}/, {then}"
    return f"{reason}: cannot write {path}: make {folder}/ writable for this user, {then}"


# --- memory -----------------------------------------------------------------------------------------

PROBE_EXAMPLES = 2
BACKWARD_TEMPORARIES = 1.5  # the backward pass holds gradients of the largest activations besides them; 1.5 covers
# the step measured at L = 250 (bench/bench_train_memory.py) and overshoots at L = 1000 (bench/results)
HEADROOM = 0.9               # of what is available: the allocator, the loader and the OS need some too


def check_memory(model, device, autocast, batch_size, max_history, categorical, numeric, args):
    """Bytes one training step needs (estimated); a UserError naming flags that fit when the device has less.

    The activations the backward pass keeps are measured, not guessed: a forward pass of
    PROBE_EXAMPLES examples of the run's shapes records every tensor autograd saves, and a
    step holds them per example, scaled by BACKWARD_TEMPORARIES. To that come the
    gradients and AdamW's two moments (3 x the parameters) and the batch itself.
    """
    per_example, fixed = step_memory(model, device, autocast, max_history, categorical, numeric)
    needed = fixed + per_example * batch_size
    available = available_memory(device)
    if available is None or needed <= HEADROOM * available:
        return needed
    fits = int((HEADROOM * available - fixed) // per_example)
    instead = (f"use --batch-size {fits} or less" if fits >= 1 else
               "no --batch-size fits: use a shorter --max-history or a smaller --dim or --layers")
    raise UserError(f"a training step of --batch-size {batch_size} at --max-history {max_history} (--dim {args.dim}, "
                    f"--layers {args.layers}) needs about {_gib(needed)} of memory on {device} (estimated), and "
                    f"{_gib(available)} is available: {instead}, or a shorter --max-history")


def step_memory(model, device, autocast, max_history, categorical, numeric):
    """(bytes per example, fixed bytes) of a training step with this model at history length `max_history`."""
    ones = dict(dtype=torch.int64, device=device)
    probe = {"item": torch.ones(PROBE_EXAMPLES, **ones),
             "history_items": torch.ones(PROBE_EXAMPLES, max_history, **ones),  # full histories: the most memory
             "history_action_types": torch.ones(PROBE_EXAMPLES, max_history, dtype=torch.int8, device=device),
             "categorical": torch.zeros(PROBE_EXAMPLES, categorical, **ones),
             "numeric": torch.zeros(PROBE_EXAMPLES, numeric, device=device),
             "target": torch.zeros(PROBE_EXAMPLES, device=device)}
    saved = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), autocast():
        model(probe)
    batch = sum(tensor.element_size() * tensor.numel() for tensor in probe.values()) / PROBE_EXAMPLES
    per_example = BACKWARD_TEMPORARIES * sum(saved.values()) / PROBE_EXAMPLES + batch
    fixed = 3 * sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
    return per_example, fixed


def available_memory(device):
    """Bytes this process may still take on `device`: free GPU memory, or the machine's available memory
    (within this container's cgroup limit, when it has one); None when it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        available = int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    try:  # cgroup v2: a container's limit, less what it uses already
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            available = min(available, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return available


def _gib(size):
    return f"{size / 2**30:,.1f} GiB" if size < 2**40 else f"{size / 2**40:,.1f} TiB"


# --- progress ---------------------------------------------------------------------------------------

class Progress:
    """Where an epoch stands: step, examples/s, the loss of the last 50 steps and the epoch's ETA.

    On a terminal, a bar redrawn in place; in a log (CI, nohup), where a bar redrawn with
    carriage returns is unreadable, a line at least every `seconds` and one at the end.
    """

    def __init__(self, epoch, epochs, steps, seconds, stream=None):
        self.epoch, self.epochs, self.steps, self.seconds = epoch, epochs, steps, seconds
        self.stream = stream or sys.stdout
        self.terminal = self.stream.isatty()
        self.done = self.examples = 0
        self.loss = float("nan")
        self.started = self.shown = time.monotonic()

    def update(self, examples, losses):
        self.done += 1
        self.examples += examples
        self.loss = sum(losses[-50:]) / len(losses[-50:])
        now = time.monotonic()
        left = max(self.steps - self.done, 0) * (now - self.started) / self.done
        if self.terminal and (now - self.shown >= 0.2 or self.done == self.steps):
            filled = int(20 * min(self.done / max(self.steps, 1), 1))
            self.stream.write(f"\r[{'#' * filled}{'.' * (20 - filled)}] {self._line(f'epoch ETA {_duration(left)}')}"
                              "\x1b[K")
            self.stream.flush()
            self.shown = now
        elif not self.terminal and now - self.shown >= self.seconds:
            print(self._line(f"epoch ETA {_duration(left)}"), file=self.stream, flush=True)
            self.shown = now

    def close(self):
        if self.terminal:
            self.stream.write("\n")
        elif self.done:
            print(self._line(f"took {_duration(time.monotonic() - self.started)}"), file=self.stream, flush=True)

    def _line(self, tail):
        rate = self.examples / max(time.monotonic() - self.started, 1e-9)
        return (f"epoch {self.epoch}/{self.epochs} step {self.done}/{self.steps} | {rate:,.0f} examples/s | "
                f"loss {self.loss:.4f} | {tail}")


class Throughput:
    """Examples per second of the training steps (`rate`, None before two steps): each step from the end of the
    one before it (or its epoch's start) to the end of its optimizer step, its batch's loading included;
    evaluations and checkpoints fall between epochs and are left out. So is the first step of the process,
    which pays for lazy initialization (kernels loaded and tuned, memory first allocated: seconds on a GPU)
    that no later step pays for."""

    def __init__(self):
        self.examples, self.seconds, self.steps, self.last = 0, 0.0, 0, None

    def start(self):
        """At an epoch's start."""
        self.last = time.monotonic()

    def step(self, examples):
        now = time.monotonic()
        if self.steps:
            self.examples += examples
            self.seconds += now - self.last
        self.steps, self.last = self.steps + 1, now

    @property
    def rate(self):
        return self.examples / self.seconds if self.seconds else None


def _duration(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# --- metrics, evaluation, selection -----------------------------------------------------------------

def roc_auc(targets, scores):
    """Area under the ROC curve (Mann–Whitney, ties averaged); NaN when only one class is present."""
    targets = np.asarray(targets) > 0.5
    positives, negatives = targets.sum(), (~targets).sum()
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = pd.Series(np.asarray(scores, dtype=np.float64)).rank(method="average").to_numpy()
    return float((ranks[targets].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def log_loss(targets, probabilities, eps=1e-7):
    p = np.clip(np.asarray(probabilities, dtype=np.float64), eps, 1 - eps)
    t = np.asarray(targets, dtype=np.float64)
    return float(-np.mean(t * np.log(p) + (1 - t) * np.log(1 - p)))


@torch.no_grad()
def evaluate(model, loader, prepare, autocast, max_batches=0):
    """AUC and log loss of the model over a loader (the whole split unless max_batches); `prepare`
    (loader.Prepare) puts each batch on the model's device."""
    model.eval()
    targets, scores = [], []
    for number, batch in enumerate(loader):
        if max_batches and number >= max_batches:
            break
        batch = prepare(batch)
        with autocast():
            logits = model(batch)
        targets.append(batch["target"].float().cpu().numpy())
        scores.append(torch.sigmoid(logits.float()).cpu().numpy())
    model.train()
    if not targets:
        return {"auc": float("nan"), "logloss": float("nan"), "examples": 0}
    targets, scores = np.concatenate(targets), np.concatenate(scores)
    return {"auc": roc_auc(targets, scores), "logloss": log_loss(targets, scores), "examples": int(len(targets))}


@torch.no_grad()
def rule_auc(loader, prepare, max_batches=0):
    """Test AUC of the rule that needs no training: score each example by how often its shown item occurs
    in its history (clicks, add-to-carts and orders alike). None when undefined (one class, or none)."""
    targets, scores = [], []
    for number, batch in enumerate(loader):
        if max_batches and number >= max_batches:
            break
        batch = prepare(batch)
        history = batch["history_items"]
        scores.append(((history == batch["item"][:, None]) & (history != 0)).sum(1).cpu().numpy())
        targets.append(batch["target"].cpu().numpy())
    if not targets:
        return None
    auc = roc_auc(np.concatenate(targets), np.concatenate(scores))
    return auc if _finite(auc) else None


def bce(logits, targets):
    return F.binary_cross_entropy_with_logits(logits.float(), targets)


def _finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value)


def select(best, record):
    """(the new best, a note) when the evaluation `record` beats `best`, else (None, None).

    The first evaluation of a run always wins and fixes the criterion (SELECTION); the note
    says why, when it is not val AUC. A later one wins when its value is finite and better.
    """
    note = None
    if best is None:
        name = next((name for name in SELECTION if _finite(record.get(name))), "train_loss")
        if name == "val_logloss":
            note = (f"val AUC is undefined (the {record.get('val_examples') or 0:,} val examples evaluated are all of "
                    "one class): choosing the checkpoint by val log loss")
        elif name == "train_loss" and not record.get("val_examples"):
            note = ("val is empty: choosing the checkpoint by training loss (merge_and_clean.py --val-days N "
                    "labels N days as val)")
        elif name == "train_loss":
            note = "val AUC and log loss are undefined: choosing the checkpoint by training loss"
    else:
        name, value = best["selected_by"], record.get(best["selected_by"])
        if not _finite(value) or (best["value"] is not None and
                                  not (value > best["value"] if SELECTION[name] else value < best["value"])):
            return None, None
    value = record.get(name)
    chosen = {"selected_by": name, "value": value if _finite(value) else None,
              **{key: record.get(key) for key in ("epoch", "step", "val_auc", "val_logloss", "train_loss")}}
    return chosen, note


# --- checkpoints ------------------------------------------------------------------------------------

def save_checkpoint(path, model, optimizer, state):
    """Write the checkpoint beside its target and rename it into place: a kill never leaves half a file.

    Everything in it is a tensor or a plain Python value, so read_checkpoint can load it
    without running code; `state` must stay so (numbers, strings, lists, dicts, None).
    """
    path = Path(path)
    partial = _partial(path)
    with writing(path, partial):
        # A file object of ours, not a path: PyTorch's own writer reports a failed write without its errno,
        # while a write of ours it calls keeps the OSError as the context of the RuntimeError it raises.
        with open(partial, "wb") as file:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state,
                        "torch_rng": torch.get_rng_state()}, file)
        os.replace(partial, path)


RESUME_FIX = "resume from a checkpoint.pt train.py wrote, or start a new run without --resume"


def read_checkpoint(path, what="--resume", fix=RESUME_FIX):
    """The content of a checkpoint save_checkpoint wrote, or a UserError naming `what` (the flag, or
    which checkpoint), what is wrong with it, and `fix`.

    weights_only: a file that asks to call anything beyond tensors and plain values when
    loaded is refused before any of it runs (a .pt file can carry code).
    """
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{what} {path}: no such file: {fix}") from None
    except (PermissionError, IsADirectoryError) as error:
        raise UserError(f"{what} {path}: cannot read it ({error.strerror}): {fix}") from None
    except (OSError, EOFError) as error:
        # torch reports a file cut short as EINVAL (seeking past its end) or EOFError.
        raise UserError(f"{what} {path} is empty or cut short ({type(error).__name__}: {str(error) or 'no data'}): "
                        f"{fix}") from None
    except Exception as error:
        # Broad on purpose: a damaged file raises RuntimeError, a refused one the loader's own error
        # class, and neither may end in a traceback.
        text = str(error)
        called = re.search(r"GLOBAL ([\w.]+)", text)
        if called:
            raise UserError(f"{what} {path}: refused to load: it asks to run {called.group(1)} when loaded, and a "
                            f"checkpoint train.py wrote holds only tensors and plain values (nothing was run): "
                            f"{fix}") from None
        if text.startswith("Weights only load failed"):
            stopped = next((line.strip() for line in text.splitlines() if line.strip().startswith("Unsupported")),
                           "something other than tensors and plain values")
            raise UserError(f"{what} {path} is not a checkpoint train.py wrote (the loader stopped at: "
                            f"{stopped.rstrip('.')}): {fix}") from None
        first = " ".join(text.split(". ")[0].split()) or type(error).__name__
        raise UserError(f"{what} {path} is damaged or cut short ({first}): {fix}") from None
    if (not isinstance(checkpoint, dict) or not {"model", "optimizer", "state", "torch_rng"} <= set(checkpoint)
            or not isinstance(checkpoint["state"], dict)):
        raise UserError(f"{what} {path} is a PyTorch file but not a checkpoint train.py wrote (it has no model, "
                        f"optimizer, state and torch_rng): {fix}")
    return checkpoint


def resume(path, model, optimizer, asked):
    """Continue from the checkpoint at `path`: refused (UserError) when it was made with other MODEL_FLAGS
    than `asked` (this run's flag values, max_history the length used); return its loop state."""
    checkpoint = read_checkpoint(path)
    changed = changed_model_flags(checkpoint, asked)
    if changed:
        raise UserError(f"--resume {path} was made with {changed}: continue it with the flags it was made with, "
                        "or start a new run without --resume")
    # Vocabularies of the same sizes can index other values: only the same preprocessors continue a model.
    made_with = checkpoint["state"].get("preprocessors_sha256")
    if made_with is not None and made_with != asked["preprocessors_sha256"]:
        raise UserError(f"--resume {path} was trained with other preprocessors than --preprocessors "
                        f"{asked['preprocessors']} (their hashes differ; its embeddings index other values): resume it "
                        f"with the --data and --preprocessors it was trained on ({Path(path).parent / CONFIG} names "
                        "them), or start a new run without --resume")
    return restore(checkpoint, model, optimizer, path)


def changed_model_flags(checkpoint, asked):
    """'--dim 16 --layers 1 (asked: --dim 8 --layers 2)' when a flag of MODEL_FLAGS differs from the
    checkpoint's, else None. `asked`: this run's values (max_history: the history length used)."""
    state = checkpoint["state"]
    config = state.get("config") if isinstance(state.get("config"), dict) else {}
    # config holds --max-history as given (0: processed/'s); the state, the length the model was built for.
    saved = {name: config[name] for name in MODEL_FLAGS if name in config and name != "max_history"}
    if "max_history" in state:
        saved["max_history"] = state["max_history"]
    differ = [name for name in MODEL_FLAGS if name in saved and saved[name] != asked[name]]
    if not differ:
        return None
    return (" ".join(_flag(name, saved[name]) for name in differ) + " (asked: "
            + " ".join(_flag(name, asked[name]) for name in differ) + ")")


def _flag(name, value):
    flag = cli.flag(name)
    if isinstance(value, bool):
        return flag if value else f"no {flag}"
    return f"{flag} {value}"


def restore(checkpoint, model, optimizer, path, what="--resume"):
    """Put a checkpoint's weights, optimizer and torch RNG in place; return its loop state.

    A checkpoint from before select() kept its best val AUC alone, starting at -inf: it becomes
    a "best" selected by val AUC, so the -inf goes no further.
    """
    try:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["torch_rng"])
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        found = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line or "Missing" in line
                      or "Unexpected" in line), " ".join(str(error).split()))
        found = found if len(found) <= 200 else found[:200] + "..."  # missing keys come as one long list
        raise UserError(f"{what} {path} does not fit this model ({found.rstrip('.')}): it was trained on another "
                        "--data/--preprocessors (vocabulary sizes) or with other model flags; give the ones it was "
                        "made with") from None
    state = checkpoint["state"]
    if "best_val_auc" in state:
        auc = state.pop("best_val_auc")
        state.setdefault("best", {"selected_by": "val_auc", "value": auc if _finite(auc) else None,
                                  "epoch": state.get("epoch"), "step": state.get("step"),
                                  "val_auc": auc if _finite(auc) else None, "val_logloss": None, "train_loss": None})
    return state


def load_checkpoint(path, model, optimizer, what="--resume", fix=RESUME_FIX):
    """Restore model, optimizer and torch's RNG from a checkpoint file; return the loop state saved with them."""
    return restore(read_checkpoint(path, what, fix), model, optimizer, path, what)


def no_train_examples(processed_dir, manifest, datasets):
    """Why processed/ has no train examples, and the flag that gives it some: one line."""
    days = "; ".join(f"{split}: " + (", ".join(str(day) for day, _, _ in datasets[split].days) or "none")
                     for split in ("val", "test"))
    made = manifest.get("lineage", {}).get("merged", {}).get("parameters", {})
    made_with = " ".join(f"--{name.replace('_', '-')} {made[name]}" for name in ("train_days", "val_days", "test_days")
                         if name in made)
    return (f"{processed_dir}/ has no train examples (days {days}), so there is nothing to train on: "
            "merge_and_clean.py labels as train the --train-days days before val and test"
            + (f" (it was run with {made_with})" if made_with else "")
            + "; run `python pipeline.py run --train-days 14` (with raw data that reaches that far back)")


# --- the curves -------------------------------------------------------------------------------------

def _records(path):
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _numbers(records, name):
    return [record[name] if _finite(record.get(name)) else float("nan") for record in records]


def plot_curves(metrics_path, train_loss_path, out_path, final=None):
    """curves.png: the losses against the step, and the val AUC per epoch beside the test AUCs of the model
    and of the rule that needs no training (from `final`). Every point is marked, so a run of one
    epoch or of a few steps still shows something."""
    try:
        import matplotlib
    except ImportError:  # a GPU machine with only what training needs: the metrics are in the JSON files
        print(f"matplotlib is not installed: no {Path(out_path).name}")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records, train_losses = _records(metrics_path), _records(train_loss_path)
    figure, (loss_axis, auc_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    if train_losses:
        loss_axis.plot([r["step"] for r in train_losses], _numbers(train_losses, "train_loss"), marker=".",
                       label="train BCE, mean of the last 50 steps")
    loss_axis.plot([r["step"] for r in records], _numbers(records, "train_loss"), marker="s", linestyle="--",
                   label="train BCE, mean of the epoch")
    loss_axis.plot([r["step"] for r in records], _numbers(records, "val_logloss"), marker="o", label="val log loss")
    loss_axis.set(xlabel="step", ylabel="binary cross-entropy", title="losses")
    loss_axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    loss_axis.legend(fontsize="small")
    loss_axis.grid(alpha=0.3)

    epochs = [r["epoch"] for r in records]
    aucs = _numbers(records, "val_auc")
    auc_axis.plot(epochs, aucs, marker="o", label="model, val")
    for epoch, auc in zip(epochs, aucs):
        if math.isfinite(auc):
            auc_axis.annotate(f"{auc:.3f}", (epoch, auc), textcoords="offset points", xytext=(0, 6), ha="center",
                              fontsize="small")
    for key, label, style in (("test_auc", "model, test", "-"), ("rule_test_auc", "rule (no training), test", ":")):
        if final and _finite(final.get(key)):
            auc_axis.axhline(final[key], linestyle=style, color="grey", label=f"{label}: {final[key]:.3f}")
    auc_axis.set(xlabel="epoch", ylabel="AUC", title="val AUC per epoch")
    if epochs:
        auc_axis.set_xticks(range(min(epochs), max(epochs) + 1))
    auc_axis.legend(fontsize="small")
    auc_axis.grid(alpha=0.3)
    figure.tight_layout()
    out_path = Path(out_path)
    partial = _partial(out_path)
    with writing(out_path, partial):
        figure.savefig(partial, dpi=100, format="png")
        os.replace(partial, out_path)
    plt.close(figure)
