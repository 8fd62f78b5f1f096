"""Train the transformer recommender on processed/, streaming it to the GPU (or the CPU).

    python train.py                                       # data/, preprocessors/, defaults for this device
    python train.py --data data --preprocessors preprocessors --epochs 3
    python train.py --resume runs/20260101-120000/checkpoint.pt --epochs 5   # continue a run in its folder
    python train.py --data s3://bucket/data --preprocessors s3://bucket/preprocessors  # from object storage

Reads   --data/processed/ (from preprocess.py) and --preprocessors/ (encoders.json, scaler.json, fit.json)
Writes  --out (default runs/<timestamp>/; a new or empty folder, or with --resume the checkpoint's own):
        config.json (every flag, the device, the code version, the fingerprints of processed/ and
        preprocessors/), checkpoint.pt (the best by val AUC; by val log loss when val holds one class, by
        training loss when val is empty), metrics.jsonl (one JSON object per evaluation), train_loss.jsonl
        (every 50 steps), final.json (test_auc, test_logloss, rule_test_auc, val_auc, selected_by,
        examples_per_second: of the training steps alone, the first left out), curves.png. Strict JSON:
        null, not NaN. A full disk stops the run in one line (exit 74), the last checkpoint kept.

Defaults depend on the device: a GPU trains on the full history processed/ was made with, the
CPU on a shorter one with a smaller model. Before the first step, the memory a step needs is
estimated and compared with what the device has; a run that would not fit is refused, naming
flags that would.
"""

import argparse
import contextlib
import datetime as dt
from pathlib import Path

import torch

from recpipe import encoders, folders, stage, stages, storage
from recpipe.cli import UserError, entrypoint
from recpipe.loader import Prepare, ProcessedDataset, Timelines, layout_of, make_loader
from recpipe.model import Recommender
from recpipe.training import (CHECKPOINT, CURVES, FINAL, METRICS, TRAIN_LOSS, Flag, Progress, Throughput,
                               append_jsonl, bce, check_memory, dumps, evaluate, load_checkpoint, no_train_examples,
                               plot_curves, record_run, resume, rule_auc, run_folder, save_checkpoint, select,
                               write_json)

# ----------------------------------------------------------------------------- config
# Every setting is a flag of the same name, declared once with its range, which argparse checks before
# anything runs. Default None: it depends on the device (PER_DEVICE).
config = (
    Flag("epochs", int, 3, "passes over the train split", low=1),
    Flag("max_steps", int, 0, "stop after this many steps in all; 0: no limit", low=0),
    Flag("batch_size", int, None, "examples per step (default: 512 on a GPU, 256 on the CPU)", low=1),
    Flag("max_history", int, None, "history length L the model sees, at most processed/'s --max-history; 0: all "
         "of it (default: 0 on a GPU, 100 on the CPU)", low=0),
    Flag("lr", float, 1e-3, "AdamW learning rate", above=0),
    Flag("weight_decay", float, 0.01, "AdamW weight decay", low=0),
    Flag("dim", int, None, "model width (default: 64 on a GPU, 32 on the CPU)", low=4),
    Flag("heads", int, 4, "attention heads; they must divide --dim", low=1),
    Flag("layers", int, 2, "transformer layers over the history", low=1),
    Flag("dropout", float, 0.1, "dropout on each layer's output and in the head, in [0, 1)", low=0, below=1),
    Flag("workers", int, 0, "DataLoader worker processes; 0: load in this process (on 2 cores, workers lose to "
         "shipping batches between processes)", low=0),
    Flag("eval_batches", int, 0, "evaluate on at most this many batches; 0: the whole split", low=0),
    Flag("seed", int, 0, "seed of the model's initialization and of the shuffling", low=0, high=2**32 - 1),
    Flag("device", str, "auto", "cuda, cuda:N or cpu; auto: cuda where PyTorch sees a GPU, else the CPU"),
    Flag("empty_histories", bool, False, "the baseline: train the same model on all-zero histories"),
    Flag("log_seconds", float, 15.0, "when stdout is not a terminal, a progress line at least this often", low=0),
    Flag("timelines_budget", float, 0.5, "on CUDA, the timelines go to the GPU when they take at most this share "
         "of its free memory, in [0, 1], else they stay in pinned host memory", low=0, high=1),
)
# A GPU gets the full history; the CPU a history and a model small enough for an epoch of
# `make demo`'s data (60,000 examples) in about a minute on 2 cores, in under 1 GiB.
PER_DEVICE = {"cuda": dict(batch_size=512, max_history=0, dim=64),
              "cpu": dict(batch_size=256, max_history=100, dim=32)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data", help="folder holding processed/, or its URL (default: data)")
    parser.add_argument("--preprocessors", default="preprocessors",
                        help="the encoders and scaler processed/ was made with, a folder or its URL "
                             "(default: preprocessors)")
    parser.add_argument("--out", default=None, help="run folder, new or empty (default: runs/<timestamp>; "
                                                     "with --resume, the checkpoint's folder)")
    parser.add_argument("--resume", default=None, help="the checkpoint.pt of a run folder, to continue that run")
    stages.add_storage_options(parser, workers=False)
    for flag in config:
        if flag.type is bool:
            parser.add_argument(flag.flag, action="store_true", help=flag.help)
        else:
            shown = "" if flag.default is None else f" (default: {flag.default})"
            parser.add_argument(flag.flag, type=flag.parse, default=flag.default, help=flag.help + shown)
    args = parser.parse_args(argv)
    storage.local_folders(args, ["data", "preprocessors", "out", "resume"], urls=["data", "preprocessors"])
    storage.configure(storage.urls(args), args.storage_options)
    return args


def pick_device(name):
    try:
        device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                              "cpu" if name == "auto" else name)
    except RuntimeError as error:
        raise UserError(f"--device {name}: {error}; give cuda, cuda:N, cpu or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: PyTorch sees no GPU here; give --device cpu (or auto)")
    return device


def complete(args, device):
    """Fill the per-device defaults and check what no single flag's range can: a UserError names the flags."""
    for name, value in PER_DEVICE.get(device.type, PER_DEVICE["cpu"]).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.dim % args.heads:
        raise UserError(f"--dim {args.dim} is not a multiple of --heads {args.heads}: the attention splits --dim "
                        "among the heads; give a --dim that --heads divides")
    return args


@entrypoint
def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    args = complete(args, device)
    torch.manual_seed(args.seed)
    # Mixed precision where there is a GPU; bf16 needs no loss scaling.
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    # Checked now, made only once every other check passed: a refused run leaves no folder behind.
    out = run_folder(args.out, args.resume, Path("runs") / dt.datetime.now().strftime("%Y%m%d-%H%M%S"))

    # ------------------------------------------------------------------------- data
    # Held for the whole run: no preprocess.py replaces processed/ or preprocessors/ under it (and
    # the loader stops the run, should processed/ be swapped anyway: by hand, or from another machine).
    with stage.reading(args.data, "processed") as processed, folders.reading(args.preprocessors):
        manifest = processed.manifest
        preprocessors_sha256 = manifest.get("preprocessors_sha256")
        fitted, _, fit = encoders.load(args.preprocessors, fitted_with=(preprocessors_sha256, processed.folder))
        made_with = manifest["parameters"]["max_history"]
        max_history = min(args.max_history or made_with, made_with)
        categorical = [name for name in fit["categorical"] if name != "cat_item"]
        # The timeline layout: every customer's actions, loaded once, and kept on the model's device.
        timelines = Timelines.load(processed) if layout_of(processed) == "timeline" else None

        def dataset(split, empty_histories=args.empty_histories):
            return ProcessedDataset(processed.folder, split, batch_size=args.batch_size, max_history=max_history,
                                    shuffle=split == "train", seed=args.seed, categorical=categorical,
                                    numeric=fit["numeric"], empty_histories=empty_histories, checked=processed,
                                    timelines=timelines)

        datasets = {split: dataset(split) for split in ("train", "val", "test")}
        if len(datasets["train"]) == 0:
            raise UserError(no_train_examples(processed.path, manifest, datasets))
        pin = device.type == "cuda"
        loaders = {split: make_loader(data, num_workers=args.workers, pin_memory=pin) for split, data in datasets.items()}
        prepare = Prepare(device, max_history, timelines, args.timelines_budget)
        print("examples: " + ", ".join(f"{split} {len(data):,}" for split, data in datasets.items())
              + f"; history length {max_history}; device {device}; {datasets['train'].layout} layout"
              + (f" (timelines: {prepare.where})" if timelines is not None else ""))

        # ------------------------------------------------------------------------ model
        model = Recommender(fitted["cat_item"].size, [fitted[name].size for name in categorical], len(fit["numeric"]),
                            max_history, dim=args.dim, heads=args.heads, layers=args.layers, dropout=args.dropout)
        model.to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        state = {"epoch": 0, "step": 0, "best": None}
        if args.resume:
            state = {**state, **resume(args.resume, model, optimizer, {**vars(args), "max_history": max_history,
                                                                       "preprocessors_sha256": preprocessors_sha256})}
            print(f"resumed from {args.resume} at epoch {state['epoch']}, step {state['step']}; "
                  f"writing on into {out}/")
        resumed_at = {"at_epoch": state["epoch"], "at_step": state["step"]} if args.resume else None
        # Plain values only: the checkpoint is read back by a loader that refuses anything else.
        # --storage-options may hold credentials: they are written nowhere.
        flags = {name: value for name, value in vars(args).items() if name != "storage_options"}
        state.update(config=flags, max_history=max_history, preprocessors_sha256=preprocessors_sha256)
        needed = check_memory(model, device, autocast, args.batch_size, max_history, len(categorical),
                              len(fit["numeric"]), args)
        print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters; a step of {args.batch_size} "
              f"examples needs about {needed / 2**30:.2f} GiB (estimated)")

        out.mkdir(parents=True, exist_ok=True)
        record_run(out, {"flags": flags, "max_history": max_history, "device": str(device),
                         "code_version": stage.code_version(),
                         "processed": {"path": storage.absolute(processed.folder),
                                       "output_sha256": manifest.get("output_sha256"),
                                       "manifest_sha256": processed.manifest_sha256},
                         "preprocessors": {"path": storage.absolute(args.preprocessors),
                                           "sha256": preprocessors_sha256},
                         "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}, resumed_at)

        # ------------------------------------------------------------------------- loop
        metrics_path, checkpoint_path = out / METRICS, out / CHECKPOINT

        def steps_left():
            return args.max_steps - state["step"] if args.max_steps else None

        if not (state["epoch"] < args.epochs and steps_left() != 0):
            print(f"nothing left to train: {args.resume} is at epoch {state['epoch']} of --epochs {args.epochs}, step "
                  f"{state['step']} (--max-steps {args.max_steps}); evaluating it on test")
        throughput = Throughput()
        while state["epoch"] < args.epochs and steps_left() != 0:
            datasets["train"].set_epoch(state["epoch"])
            losses = []
            throughput.start()
            steps = datasets["train"].num_batches if steps_left() is None else min(datasets["train"].num_batches,
                                                                                  steps_left())
            progress = Progress(state["epoch"] + 1, args.epochs, steps, args.log_seconds)
            for batch in loaders["train"]:
                batch = prepare(batch)
                with autocast():
                    loss = bce(model(batch), batch["target"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                throughput.step(len(batch["target"]))
                state["step"] += 1
                progress.update(len(batch["target"]), losses)
                if state["step"] % 50 == 0:
                    recent = losses[-50:]
                    append_jsonl(out / TRAIN_LOSS, {"step": state["step"], "train_loss": sum(recent) / len(recent)})
                if steps_left() == 0:
                    break
            progress.close()
            validation = evaluate(model, loaders["val"], prepare, autocast, args.eval_batches)
            state["epoch"] += 1
            record = {"epoch": state["epoch"], "step": state["step"],
                      "train_loss": sum(losses) / len(losses) if losses else None, "val_auc": validation["auc"],
                      "val_logloss": validation["logloss"], "val_examples": validation["examples"],
                      "examples_per_second": throughput.rate}
            append_jsonl(metrics_path, record)
            print(dumps(record))
            best, note = select(state["best"], record)
            if note:
                print(note)
            if best:
                state["best"] = best
                save_checkpoint(checkpoint_path, model, optimizer, state)

        # ------------------------------------------------------------------------- test
        load_checkpoint(checkpoint_path, model, optimizer, what="the run's best checkpoint",
                        fix="it was changed while train.py ran; run again with another --out")
        test = evaluate(model, loaders["test"], prepare, autocast, args.eval_batches)
        # The rule that needs no training, on the same examples and histories (real ones, also when the
        # model was trained on empty histories): does the transformer add anything to it?
        rule_data = datasets["test"] if not args.empty_histories else dataset("test", empty_histories=False)
        rule = rule_auc(make_loader(rule_data, num_workers=args.workers, pin_memory=pin), prepare, args.eval_batches)
        best = state["best"] or {}
        final = {"test_auc": test["auc"], "test_logloss": test["logloss"], "test_examples": test["examples"],
                 "rule_test_auc": rule, "val_auc": best.get("val_auc"), "val_logloss": best.get("val_logloss"),
                 "selected_by": best.get("selected_by"), "selected_epoch": best.get("epoch"),
                 "selected_step": best.get("step"),
                 "examples_per_second": throughput.rate,
                 "steps": state["step"], "empty_histories": args.empty_histories, "device": str(device)}
        write_json(out / FINAL, final)
        plot_curves(metrics_path, out / TRAIN_LOSS, out / CURVES, final)
        print(f"final: {dumps(final)}")
        print(summary(final) + f"\nwrote {out}/")


def summary(final):
    """The test AUC beside the rule's, and what that says."""
    model, rule = final["test_auc"], final["rule_test_auc"]
    if model is None or rule is None:
        return "test AUC: undefined (the test examples evaluated are all of one class, or none)"
    if final["empty_histories"]:
        verdict = "this model saw empty histories (--empty-histories): the baseline for what histories carry"
    elif model > rule + 0.005:
        verdict = f"the model beats the rule by {model - rule:.3f}"
    else:
        verdict = "the model does NOT beat the rule that needs no training: it adds nothing here"
    return (f"test AUC {model:.3f}, against {rule:.3f} for the rule that needs no training (how often the shown "
            f"item occurs in the example's history): {verdict}")


if __name__ == "__main__":
    main()
