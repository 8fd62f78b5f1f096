"""What train.py's loop uses: metrics, evaluation, atomic checkpoints, the curves plot."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from recpipe.loader import to_device


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
def evaluate(model, loader, device, autocast, max_batches=0):
    """AUC and log loss of the model over a loader (the whole split unless max_batches)."""
    model.eval()
    targets, scores = [], []
    for number, batch in enumerate(loader):
        if max_batches and number >= max_batches:
            break
        batch = to_device(batch, device)
        with autocast():
            logits = model(batch)
        targets.append(batch["target"].float().cpu().numpy())
        scores.append(torch.sigmoid(logits.float()).cpu().numpy())
    model.train()
    if not targets:
        return {"auc": float("nan"), "logloss": float("nan"), "examples": 0}
    targets, scores = np.concatenate(targets), np.concatenate(scores)
    return {"auc": roc_auc(targets, scores), "logloss": log_loss(targets, scores), "examples": int(len(targets))}


def bce(logits, targets):
    return F.binary_cross_entropy_with_logits(logits.float(), targets)


def save_checkpoint(path, model, optimizer, state):
    """Write the checkpoint beside its target and rename it into place: a kill never leaves half a file."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state,
                "torch_rng": torch.get_rng_state()}, partial)
    os.replace(partial, path)


def load_checkpoint(path, model, optimizer):
    """Restore model, optimizer and torch's RNG; return the loop state saved with them."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["torch_rng"])
    return checkpoint["state"]


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _records(path):
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_curves(metrics_path, train_loss_path, out_path):
    """Training loss (every 50 steps) with validation log loss, and validation AUC (per evaluation), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records, train_losses = _records(metrics_path), _records(train_loss_path)
    steps = [r["step"] for r in records]
    figure, (loss_axis, auc_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot([r["step"] for r in train_losses] or steps,
                   [r["train_loss"] for r in train_losses] or [r["train_loss"] for r in records],
                   label="train BCE (last 50 steps)")
    loss_axis.plot(steps, [r["val_logloss"] for r in records], marker="o", label="val log loss")
    loss_axis.set_xlabel("step")
    loss_axis.legend()
    auc_axis.plot(steps, [r["val_auc"] if not math.isnan(r["val_auc"]) else None for r in records], marker="o")
    auc_axis.set_xlabel("step")
    auc_axis.set_ylabel("val AUC")
    figure.tight_layout()
    figure.savefig(out_path, dpi=100)
    plt.close(figure)
