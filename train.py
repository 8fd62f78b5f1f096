"""Train the transformer recommender on processed/, streaming it to the GPU (or the CPU).

    python train.py --data data --preprocessors preprocessors --epochs 3
    python train.py --max-steps 300 --max-history 100      # a short CPU run
    python train.py --resume runs/20260101-120000/checkpoint.pt --epochs 5   # continue a run in its folder

Reads   --data/processed/ (from preprocess.py) and --preprocessors/ (encoders.json, scaler.json, fit.json)
Writes  --out (default runs/<timestamp>/; a new or empty folder, or with --resume the checkpoint's own):
        config.json (every flag, the device, the code version), checkpoint.pt (the best by val AUC; by
        val log loss when val holds one class, by training loss when val is empty), metrics.jsonl (one
        JSON object per evaluation), train_loss.jsonl (every 50 steps), final.json (test_auc,
        test_logloss, val_auc, selected_by, examples_per_second), curves.png. Strict JSON: null, not NaN.
"""

import argparse
import contextlib
import datetime as dt
import time
from pathlib import Path

import torch

from recpipe import encoders, folders, stage
from recpipe.cli import UserError, entrypoint
from recpipe.loader import ProcessedDataset, make_loader, to_device
from recpipe.model import Recommender
from recpipe.training import (CHECKPOINT, CURVES, FINAL, METRICS, TRAIN_LOSS, append_jsonl, bce, dumps, evaluate,
                               load_checkpoint, no_train_examples, plot_curves, record_run, resume, run_folder,
                               save_checkpoint, select, write_json)

# ----------------------------------------------------------------------------- config
# Defaults here; every one has a flag of the same name.
config = dict(
    epochs=3, max_steps=0, batch_size=512, max_history=0,  # 0: no step limit / processed/'s max_history
    lr=1e-3, weight_decay=0.01, dim=64, heads=4, layers=2, dropout=0.1,
    workers=0, eval_batches=0, seed=0, device="auto", empty_histories=False,
)  # workers: DataLoader processes; on 2 cores they lose to shipping 4.5 MB batches between processes


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data")
    parser.add_argument("--preprocessors", default="preprocessors")
    parser.add_argument("--out", default=None, help="run folder, new or empty (default runs/<timestamp>; "
                                                     "with --resume, the checkpoint's folder)")
    parser.add_argument("--resume", default=None, help="the checkpoint.pt of a run folder, to continue that run")
    for name, default in config.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", help="the baseline: the model sees empty histories")
        else:
            parser.add_argument(flag, type=type(default), default=default)
    args = parser.parse_args(argv)
    for name, low in (("epochs", 1), ("batch_size", 1), ("max_steps", 0), ("max_history", 0), ("dim", 4),
                      ("heads", 1), ("layers", 1), ("workers", 0), ("eval_batches", 0)):
        if getattr(args, name) < low:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least {low}")
    if args.dim % args.heads:
        raise UserError(f"--dim {args.dim} is not a multiple of --heads {args.heads}: the attention splits --dim "
                        "among the heads; give a --dim that --heads divides")
    return args


@entrypoint
def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    # Mixed precision where there is a GPU; bf16 needs no loss scaling.
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    # Checked now, made only once every other check passed: a refused run leaves no folder behind.
    out = run_folder(args.out, args.resume, Path("runs") / dt.datetime.now().strftime("%Y%m%d-%H%M%S"))

    # ------------------------------------------------------------------------- data
    # Held for the whole run: no preprocess.py replaces processed/ or preprocessors/ under it (and
    # the loader stops the run, should processed/ be swapped anyway: by hand, or from another machine).
    with stage.reading(args.data, "processed") as processed, folders.reading(Path(args.preprocessors)):
        manifest = processed.manifest
        fitted, _, fit = encoders.load(Path(args.preprocessors))
        if encoders.fingerprint(Path(args.preprocessors)) != manifest.get("preprocessors_sha256"):
            raise UserError(f"{args.preprocessors}/ was not fitted with {args.data}/processed/ (their hashes differ): "
                            "run preprocess.py again, or point --preprocessors at the folder it wrote")
        made_with = manifest["parameters"]["max_history"]
        max_history = min(args.max_history or made_with, made_with)
        categorical = [name for name in fit["categorical"] if name != "cat_item"]
        datasets = {split: ProcessedDataset(processed.path, split, batch_size=args.batch_size, max_history=max_history,
                                            shuffle=split == "train", seed=args.seed, categorical=categorical,
                                            numeric=fit["numeric"], empty_histories=args.empty_histories,
                                            checked=processed)
                    for split in ("train", "val", "test")}
        if len(datasets["train"]) == 0:
            raise UserError(no_train_examples(processed.path, manifest, datasets))
        pin = device.type == "cuda"
        loaders = {split: make_loader(dataset, num_workers=args.workers, pin_memory=pin)
                   for split, dataset in datasets.items()}
        print("examples: " + ", ".join(f"{split} {len(dataset):,}" for split, dataset in datasets.items())
              + f"; history length {max_history}; device {device}")

        # ------------------------------------------------------------------------ model
        model = Recommender(fitted["cat_item"].size, [fitted[name].size for name in categorical], len(fit["numeric"]),
                            max_history, dim=args.dim, heads=args.heads, layers=args.layers, dropout=args.dropout)
        model.to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        state = {"epoch": 0, "step": 0, "best": None}
        if args.resume:
            state = {**state, **resume(args.resume, model, optimizer, {**vars(args), "max_history": max_history})}
            print(f"resumed from {args.resume} at epoch {state['epoch']}, step {state['step']}; "
                  f"writing on into {out}/")
        resumed_at = {"at_epoch": state["epoch"], "at_step": state["step"]} if args.resume else None
        # Plain values only: the checkpoint is read back by a loader that refuses anything else.
        state.update(config=vars(args), max_history=max_history)
        print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")

        out.mkdir(parents=True, exist_ok=True)
        record_run(out, {"flags": vars(args), "max_history": max_history, "device": str(device),
                         "code_version": stage.code_version(),
                         "processed": {"path": str(processed.path.resolve()),
                                       "output_sha256": manifest.get("output_sha256"),
                                       "preprocessors_sha256": manifest.get("preprocessors_sha256")},
                         "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}, resumed_at)

        # ------------------------------------------------------------------------- loop
        metrics_path, checkpoint_path = out / METRICS, out / CHECKPOINT

        def steps_left():
            return not (args.max_steps and state["step"] >= args.max_steps)

        if not (state["epoch"] < args.epochs and steps_left()):
            print(f"nothing left to train: {args.resume} is at epoch {state['epoch']} of --epochs {args.epochs}, step "
                  f"{state['step']} (--max-steps {args.max_steps}); evaluating it on test")
        examples_seen, train_seconds = 0, 0.0
        while state["epoch"] < args.epochs and steps_left():
            datasets["train"].set_epoch(state["epoch"])
            losses, started = [], time.monotonic()
            for batch in loaders["train"]:
                batch = to_device(batch, device)
                with autocast():
                    loss = bce(model(batch), batch["target"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                examples_seen += len(batch["target"])
                state["step"] += 1
                if state["step"] % 50 == 0:
                    recent = sum(losses[-50:]) / len(losses[-50:])
                    append_jsonl(out / TRAIN_LOSS, {"step": state["step"], "train_loss": recent})
                    print(f"epoch {state['epoch']} step {state['step']}: loss {recent:.4f}")
                if not steps_left():
                    break
            train_seconds += time.monotonic() - started
            validation = evaluate(model, loaders["val"], device, autocast, args.eval_batches)
            state["epoch"] += 1
            record = {"epoch": state["epoch"], "step": state["step"],
                      "train_loss": sum(losses) / len(losses) if losses else None, "val_auc": validation["auc"],
                      "val_logloss": validation["logloss"], "val_examples": validation["examples"],
                      "examples_per_second": examples_seen / max(train_seconds, 1e-9)}
            append_jsonl(metrics_path, record)
            print(dumps(record))
            best, note = select(state["best"], record)
            if note:
                print(note)
            if best:
                state["best"] = best
                save_checkpoint(checkpoint_path, model, optimizer, state)

        load_checkpoint(checkpoint_path, model, optimizer, what="the run's best checkpoint",
                        fix="it was changed while train.py ran; run again with another --out")
        test = evaluate(model, loaders["test"], device, autocast, args.eval_batches)
        best = state["best"] or {}
        final = {"test_auc": test["auc"], "test_logloss": test["logloss"], "test_examples": test["examples"],
                 "val_auc": best.get("val_auc"), "val_logloss": best.get("val_logloss"),
                 "selected_by": best.get("selected_by"), "selected_epoch": best.get("epoch"),
                 "selected_step": best.get("step"),
                 "examples_per_second": examples_seen / train_seconds if train_seconds else None,
                 "steps": state["step"], "empty_histories": args.empty_histories, "device": str(device)}
        write_json(out / FINAL, final)
        plot_curves(metrics_path, out / TRAIN_LOSS, out / CURVES)
        print(f"final: {dumps(final)}\nwrote {out}/")


if __name__ == "__main__":
    main()
