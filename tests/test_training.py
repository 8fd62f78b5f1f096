"""The model and the training loop: metrics, checkpoints, and train.py end to end on generated data."""

import json

import numpy as np
import pytest
import torch

from conftest import run_script
from recpipe.model import Recommender
from recpipe.training import load_checkpoint, log_loss, roc_auc, save_checkpoint

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


def test_train_runs_end_to_end_on_the_cpu_and_writes_its_outputs(processed_data, tmp_path):
    data, preprocessors = processed_data
    result = run_script("train.py", "--data", data, "--preprocessors", preprocessors, "--out", tmp_path / "run",
                        "--epochs", "2", "--max-steps", "6", "--batch-size", "64", "--dim", "16", "--workers", "0")
    assert "device cpu" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) >= 1 and {"val_auc", "val_logloss", "train_loss"} <= set(records[0])
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert {"test_auc", "test_logloss", "val_auc", "examples_per_second"} <= set(final)
    assert 0 <= final["test_auc"] <= 1
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    assert (tmp_path / "run" / "checkpoint.pt").exists()


def test_train_names_what_is_missing_and_the_script_that_makes_it(processed_data, tmp_path):
    data, _ = processed_data
    result = run_script("train.py", "--data", tmp_path, "--out", tmp_path / "run", check=False)
    assert result.returncode == 2 and "processed/ is missing: run preprocess.py first" in result.stderr
    result = run_script("train.py", "--data", data, "--preprocessors", tmp_path / "none", "--out", tmp_path / "run",
                        check=False)
    assert result.returncode == 2 and "run preprocess.py first" in result.stderr
    assert "Traceback" not in result.stderr
