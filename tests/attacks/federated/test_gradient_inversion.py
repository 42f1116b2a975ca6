"""Honest-but-curious attacks: label recovery from the last layer (exact for one image), Inverting Gradients
reaching a high PSNR on one 8x8 digit through the crafting engine, DLG lowering the gradient distance and
finding the label jointly, and the reconstruction metrics (PSNR, SSIM, best assignment)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mlaudit.attacks.federated import (
    FEDERATED_ATTACKS,
    GradientInversion,
    Observation,
    dlg,
    idlg_label,
    inverting_gradients,
    label_accuracy,
    label_counts,
    labels_from_counts,
    last_linear,
    match,
    psnr,
    ssim,
)
from mlaudit.data import load_dataset
from mlaudit.errors import ConfigError
from mlaudit.federated import secure_aggregate, user_gradients
from mlaudit.query import param_grad


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_dataset("digits")
    return d.train.x[:64], d.train.y[:64]


def mlp(seed: int = 0, bias: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10, bias=bias)).eval()


def single(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Observation:
    return Observation(param_grad(model, (x[None], y[None])), users=1, batch=1, input_shape=tuple(x.shape))


@pytest.mark.parametrize("bias", [True, False])
def test_idlg_recovers_the_label_of_one_image_exactly(digits: tuple[torch.Tensor, torch.Tensor], bias: bool) -> None:
    x, y = digits
    for i in range(20):
        model = mlp(i, bias=bias)
        assert idlg_label(model, single(model, x[i], y[i])) == int(y[i])
        assert labels_from_counts(label_counts(model, single(model, x[i], y[i]))).tolist() == [int(y[i])]
    assert last_linear(mlp(bias=bias)) == ("3.weight", "3.bias" if bias else None)


def test_batch_label_counts_from_the_aggregate(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = digits
    model = mlp(3)
    xs, ys = x[:32].view(8, 4, 1, 8, 8), y[:32].view(8, 4)
    obs = Observation(secure_aggregate(user_gradients(model, xs, ys)), users=8, batch=4, input_shape=(1, 8, 8))
    probs = torch.softmax(model(x[32:]), 1).mean(0).detach()
    counts = label_counts(model, obs, mean_probs=probs)
    assert int(counts.sum()) == 32
    assert label_accuracy(labels_from_counts(counts), ys.flatten()) >= 0.9
    assert label_accuracy(torch.tensor([1, 1, 2]), torch.tensor([1, 2, 3])) == pytest.approx(2 / 3)


def test_inverting_gradients_recovers_one_digit(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = digits
    model = mlp(0)
    obs = single(model, x[5], y[5])
    rec = FEDERATED_ATTACKS.get("inverting-gradients")(model, obs, steps=300, tv=1e-4,
                                                       generator=torch.Generator().manual_seed(0))
    assert rec.x.shape == (1, 1, 8, 8) and float(rec.x.min()) >= 0 and float(rec.x.max()) <= 1
    assert rec.labels.tolist() == [int(y[5])] and rec.info["labels_recovered"]
    assert float(psnr(rec.x, x[5:6], data_range=1.0)[0]) > 35.0
    assert float(ssim(rec.x, x[5:6], data_range=1.0)[0]) > 0.95


def test_dlg_lowers_the_gradient_distance_and_finds_the_label(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = digits
    model = mlp(1)
    obs = single(model, x[7], y[7])
    objective = GradientInversion(model, obs, y[7:8], distance="l2")
    start = float(objective(torch.full((1, 1, 8, 8), 0.5), torch.arange(1)).detach())
    rec = dlg(model, obs, steps=300, generator=torch.Generator().manual_seed(0))
    assert rec.labels.tolist() == [int(y[7])] and rec.info["soft_labels"]
    assert float(objective(rec.x, torch.arange(1)).detach()) < 1e-2 * start
    assert float(psnr(rec.x, x[7:8], data_range=1.0)[0]) > 25.0


def test_a_penalty_adds_to_every_distance(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = digits
    model = mlp(1)
    obs = single(model, x[7], y[7])
    v = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    for distance in ("cosine", "l2", "l2+l1"):
        plain = GradientInversion(model, obs, y[7:8], distance=distance, l1=0.1)
        with_pen = GradientInversion(model, obs, y[7:8], distance=distance, l1=0.1, penalty=lambda u: 2.5 * u.sum())
        torch.testing.assert_close(with_pen(v, torch.arange(1)), plain(v, torch.arange(1)) + 2.5 * v.sum())


def test_inversion_of_a_small_aggregate_gets_the_inputs_in_some_order(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = digits
    model = mlp(2)
    xs, ys = x[10:14].view(2, 2, 1, 8, 8), y[10:14].view(2, 2)
    obs = Observation(secure_aggregate(user_gradients(model, xs, ys)), users=2, batch=2, input_shape=(1, 8, 8))
    rec = inverting_gradients(model, obs, labels=ys.flatten(), steps=400, generator=torch.Generator().manual_seed(0))
    m = match(xs.flatten(0, 1), rec.x, data_range=1.0)
    assert int(m.recovered(20.0).sum()) >= 2


def test_metrics_match_a_shuffled_copy() -> None:
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    m = match(x, torch.cat([x[perm], torch.rand(2, 1, 8, 8)]), data_range=1.0)
    assert torch.equal(perm[m.candidate], torch.arange(6))
    assert bool((m.psnr == 200.0).all()) and torch.allclose(m.ssim, torch.ones(6, dtype=torch.float64))
    few = match(x, x[:2], data_range=1.0)
    assert int(few.recovered(30.0).sum()) == 2 and int(torch.isnan(few.psnr).sum()) == 4
    noisy = (x + 0.1).clamp(0, 1)
    assert 15 < float(psnr(noisy[:1], x[:1], data_range=1.0)[0]) < 25
    assert ssim(x.flatten(1), x.flatten(1), data_range=1.0) is None


def test_bad_inputs_are_refused(digits: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = digits
    model = mlp()
    obs = single(model, x[0], y[0])
    with pytest.raises(ConfigError, match="labels must be int \\[1\\]"):
        GradientInversion(model, obs, torch.tensor([1, 2]))
    with pytest.raises(ConfigError, match="does not fit the model"):
        inverting_gradients(mlp().append(nn.Linear(10, 3)), obs, steps=1)
    with pytest.raises(ConfigError, match="users >= 1 and batch >= 1"):
        Observation(obs.grad, users=0, batch=1, input_shape=(1, 8, 8))
