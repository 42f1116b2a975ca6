"""FedSGD training with client-side defences (mlaudit.federated.train_fedsgd): it learns, a strong defence costs
accuracy, the history is what it says, bad input is refused."""

from __future__ import annotations

import pytest
import torch

from mlaudit.data import load_dataset
from mlaudit.errors import ConfigError
from mlaudit.federated import train_fedsgd
from mlaudit.models import build_model


def _run(defence: dict | None, rounds: int = 60) -> list[float]:
    torch.manual_seed(0)
    model = build_model({"name": "mlp", "width": 32}, input_shape=(1, 8, 8), num_classes=10)
    h = train_fedsgd(model, load_dataset("digits"), users=8, batch=16, rounds=rounds, lr=0.5, defence=defence,
                     eval_every=30)
    assert h.rounds == [30, 60][: len(h.rounds)] and len(h.test_accuracy) == len(h.distortion)
    return h.test_accuracy


def test_fedsgd_learns_and_heavy_noise_costs_accuracy() -> None:
    plain = _run(None)
    assert plain[-1] > 0.75  # digits, 10 classes: chance is 0.1
    noisy = _run({"method": "noise", "sigma": 1.0})
    assert noisy[-1] < plain[-1] - 0.2


def test_bad_input() -> None:
    model = build_model({"name": "mlp", "width": 8}, input_shape=(1, 8, 8), num_classes=10)
    data = load_dataset("digits")
    with pytest.raises(ConfigError, match="lr > 0"):
        train_fedsgd(model, data, users=2, batch=4, rounds=1, lr=0.0)
    with pytest.raises(ConfigError, match="defence method"):
        train_fedsgd(model, data, users=2, batch=4, rounds=1, lr=0.1, defence={"method": "shuffle"})
