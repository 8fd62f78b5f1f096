"""Train the transformer recommender on processed/, streaming it to the GPU (or the CPU).

    python train.py --data data --preprocessors preprocessors --epochs 3
    python train.py --max-steps 300 --max-history 100      # a short CPU run

Reads   --data/processed/ (from preprocess.py) and --preprocessors/ (encoders.json, scaler.json, fit.json)
Writes  --out (default runs/<timestamp>/): checkpoint.pt (the best by validation AUC),
        metrics.jsonl (one JSON object per evaluation), train_loss.jsonl (every 50 steps),
        final.json (test_auc, test_logloss, val_auc, examples_per_second), curves.png
"""

import argparse
import contextlib
import datetime as dt
import json
import time
from pathlib import Path

import torch

from recpipe import encoders, stage
from recpipe.cli import UserError, entrypoint
from recpipe.loader import ProcessedDataset, make_loader, to_device
from recpipe.model import Recommender
from recpipe.training import (append_jsonl, bce, evaluate, load_checkpoint, plot_curves, save_checkpoint)

# ----------------------------------------------------------------------------- config
# Defaults here; every one has a flag of the same name.
config = dict(
    epochs=3, max_steps=0, batch_size=512, max_history=0,  # 0: no step limit / processed/'s max_history
    lr=1e-3, weight_decay=0.01, dim=64, heads=4, layers=2, dropout=0.1,
    workers=0, eval_batches=0, seed=0, device="auto", empty_histories=False,
)  # workers: DataLoader processes; on 2 cores they lose to shipping 4.5 MB batches between processes


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data")
    parser.add_argument("--preprocessors", default="preprocessors")
    parser.add_argument("--out", default=None, help="run folder (default runs/<timestamp>)")
    parser.add_argument("--resume", default=None, help="a checkpoint.pt to continue from")
    for name, default in config.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", help="the baseline: the model sees empty histories")
        else:
            parser.add_argument(flag, type=type(default), default=default)
    return parser.parse_args()


@entrypoint
def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    # Mixed precision where there is a GPU; bf16 needs no loss scaling.
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    out = Path(args.out or Path("runs") / dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------------- data
    manifest = stage.require_stage(args.data, "processed")
    if manifest["parameters"]["layout"] != "compact":
        raise UserError(f"{args.data}/processed/ is in the {manifest['parameters']['layout']} layout; "
                        "train.py streams the compact one: run preprocess.py --layout compact")
    fitted, _, fit = encoders.load(Path(args.preprocessors))
    if encoders.fingerprint(Path(args.preprocessors)) != manifest.get("preprocessors_sha256"):
        raise UserError(f"{args.preprocessors}/ was not fitted with {args.data}/processed/ (their hashes differ): "
                        "run preprocess.py again, or point --preprocessors at the folder it wrote")
    max_history = min(args.max_history or manifest["parameters"]["max_history"], manifest["parameters"]["max_history"])
    categorical = [name for name in fit["categorical"] if name != "cat_item"]
    datasets = {split: ProcessedDataset(Path(args.data) / "processed", split, batch_size=args.batch_size,
                                        max_history=max_history, shuffle=split == "train", seed=args.seed,
                                        categorical=categorical, numeric=fit["numeric"],
                                        empty_histories=args.empty_histories)
                for split in ("train", "val", "test")}
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
    state = {"epoch": 0, "step": 0, "best_val_auc": float("-inf"), "config": vars(args)}
    if args.resume:
        state = load_checkpoint(args.resume, model, optimizer)
        print(f"resumed from {args.resume} at epoch {state['epoch']}, step {state['step']}")
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")

    # ------------------------------------------------------------------------- loop
    metrics_path, checkpoint_path = out / "metrics.jsonl", out / "checkpoint.pt"
    examples_seen, train_seconds = 0, 0.0
    done = False
    while state["epoch"] < args.epochs and not done:
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
                append_jsonl(out / "train_loss.jsonl", {"step": state["step"], "train_loss": recent})
                print(f"epoch {state['epoch']} step {state['step']}: loss {recent:.4f}")
            if args.max_steps and state["step"] >= args.max_steps:
                done = True
                break
        train_seconds += time.monotonic() - started
        validation = evaluate(model, loaders["val"], device, autocast, args.eval_batches)
        state["epoch"] += 1
        record = {"epoch": state["epoch"], "step": state["step"],
                  "train_loss": sum(losses) / max(1, len(losses)), "val_auc": validation["auc"],
                  "val_logloss": validation["logloss"], "examples_per_second": examples_seen / max(train_seconds, 1e-9)}
        append_jsonl(metrics_path, record)
        print(json.dumps(record))
        if validation["auc"] > state["best_val_auc"] or state["best_val_auc"] == float("-inf"):
            state["best_val_auc"] = validation["auc"]
            save_checkpoint(checkpoint_path, model, optimizer, state)

    load_checkpoint(checkpoint_path, model, optimizer)
    test = evaluate(model, loaders["test"], device, autocast, args.eval_batches)
    final = {"test_auc": test["auc"], "test_logloss": test["logloss"], "val_auc": state["best_val_auc"],
             "examples_per_second": examples_seen / max(train_seconds, 1e-9), "steps": state["step"],
             "empty_histories": args.empty_histories, "device": str(device)}
    (out / "final.json").write_text(json.dumps(final, indent=2) + "\n")
    plot_curves(metrics_path, out / "train_loss.jsonl", out / "curves.png")
    print(f"final: {json.dumps(final)}\nwrote {out}/")


if __name__ == "__main__":
    main()
