"""Evasion attacks (mlaudit.attacks.evasion): budgets and boxes always hold, PGD raises the loss, CW
finds the closed-form minimal l2 distance of a linear model (and less than PGD), the ensemble's
per-example result is the worst case over its members (FAB-T among them), APGD is at least as strong as
PGD. FAB's own tests are in test_fab.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mlaudit.attacks.evasion import EVASION_ATTACKS, apgd, cw_l2, fgsm, margin, pgd, run_ensemble


def mlp(seed: int = 0, classes: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, classes)).eval()


def data(n: int = 24, seed: int = 0, box: tuple[float, float] = (0.0, 1.0)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lo, hi = box
    return lo + (hi - lo) * torch.rand(n, 1, 4, 4, generator=g), torch.randint(0, 5, (n,), generator=g)


BOUNDED = {
    "fgsm": {}, "pgd": {"steps": 3, "restarts": 2}, "apgd": {"steps": 4, "loss": "dlr"},
    "apgd-t": {"steps": 3, "targets": 2}, "square": {"n_queries": 15}, "fab": {"steps": 5},
    "fab-t": {"steps": 5, "n_target_classes": 2, "restarts": 2},
    "autoattack": {"members": (("pgd", {"steps": 2}), ("apgd", {"steps": 3}), ("square", {})), "square_queries": 10},
}


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(sorted(BOUNDED)), norm=st.sampled_from(["linf", "l2"]), eps=st.floats(0.0, 1.0),
       box=st.sampled_from([(0.0, 1.0), (-1.0, 1.0)]), seed=st.integers(0, 50))
def test_every_perturbation_stays_in_its_ball_and_the_box(name: str, norm: str, eps: float, box: tuple[float, float],
                                                          seed: int) -> None:
    x, y = data(6, seed, box)
    model = mlp(seed)
    x_adv = EVASION_ATTACKS.get(name)(model, x, y, eps=eps, norm=norm, box=box, **BOUNDED[name])
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert x_adv.min() >= box[0] - 1e-6 and x_adv.max() <= box[1] + 1e-6
    d = (x_adv - x).flatten(1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    assert (size <= eps + 1e-5).all()


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 50), box=st.sampled_from([(0.0, 1.0), (-0.5, 2.0)]))
def test_cw_stays_in_the_box(seed: int, box: tuple[float, float]) -> None:
    x, y = data(4, seed, box)
    x_adv = cw_l2(mlp(seed), x, y, steps=5, search_steps=2, box=box)
    assert x_adv.min() >= box[0] - 1e-6 and x_adv.max() <= box[1] + 1e-6


def test_pgd_increases_the_loss() -> None:
    x, _ = data(32)
    model = mlp()
    y = model(x).argmax(1)  # correctly classified: each example runs until fooled or out of steps
    clean = F.cross_entropy(model(x), y, reduction="none")
    for norm, eps in (("linf", 0.05), ("l2", 0.3)):
        adv = F.cross_entropy(model(pgd(model, x, y, eps=eps, norm=norm, steps=10, random_start=False)), y,
                              reduction="none")
        assert (adv > clean).all()


def _linear_problem(n: int = 12, classes: int = 2) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A linear model on 10 inputs near the centre of the box; the minimal l2 distance to a
    misclassification is min_j margin_j / ||w_y - w_j|| (the union of half-spaces z_j >= z_y)."""
    torch.manual_seed(1)
    lin = nn.Linear(10, classes)
    g = torch.Generator().manual_seed(2)
    x = 0.45 + 0.1 * torch.rand(n, 10, generator=g)
    with torch.no_grad():  # logits nearly tied at the centre of the box: boundaries close to every x
        lin.bias.copy_(-lin.weight @ torch.full((10,), 0.5) + 0.05 * torch.randn(classes, generator=g))
    with torch.no_grad():
        z = lin(x)
    y = z.argmax(1)
    w = lin.weight.detach()
    dist = torch.full((n,), float("inf"))
    for j in range(classes):
        dj = (z.gather(1, y[:, None])[:, 0] - z[:, j]) / (w[y] - w[j]).norm(dim=1)
        dist = torch.where(y == j, dist, torch.minimum(dist, dj))
    return lin.eval(), x, y, dist


def test_cw_finds_the_closed_form_minimal_l2_distance_and_less_than_pgd() -> None:
    model, x, y, dist = _linear_problem()
    assert dist.max() < 0.3  # the nearest boundary is well inside the box: the closed form holds there
    x_cw = cw_l2(model, x, y, steps=100, lr=0.01, search_steps=5, c=1.0)
    x_pgd = pgd(model, x, y, eps=float(dist.max()) * 1.5, norm="l2", steps=20)
    ok_cw, ok_pgd = model(x_cw).argmax(1) != y, model(x_pgd).argmax(1) != y
    assert ok_cw.all() and ok_pgd.all()  # equal success
    d_cw, d_pgd = (x_cw - x).norm(dim=1), (x_pgd - x).norm(dim=1)
    assert (d_cw >= dist * (1 - 1e-4)).all()  # nothing beats the minimum
    assert (d_cw <= dist * 1.01).all()  # binary linear: the problem is convex, CW reaches the minimum
    assert d_cw.mean() < d_pgd.mean()


def test_ensemble_result_is_the_min_over_its_members() -> None:
    x, y = data(40, 3)
    model = mlp(3)
    members = [("fgsm", {}), ("pgd", {"steps": 5, "random_start": False}), ("apgd", {"steps": 8, "random_start": False}),
               ("fab-t", {"steps": 10, "n_target_classes": 3})]
    res = run_ensemble(model, x, y, eps=0.06, members=members)
    margins = []
    for name, opts in members:
        adv = EVASION_ATTACKS.get(name)(model, x, y, eps=0.06, **opts)
        margins.append(margin(model(adv), y).detach())
    stacked = torch.stack(margins)
    robust_all = (stacked >= 0).all(0) & (margin(model(x), y) >= 0)
    assert torch.equal(res.robust, robust_all)
    assert 0 < int(robust_all.sum()) < len(x)  # both kinds of example occur
    torch.testing.assert_close(res.margin[robust_all], stacked.min(0).values[robust_all], atol=1e-5, rtol=0)
    torch.testing.assert_close(margin(model(res.x_adv), y).detach(), res.margin, atol=1e-5, rtol=0)
    first = torch.where(res.fooled_by >= 0)[0]
    assert all(stacked[int(res.fooled_by[i]), i] < 0 for i in first)


def test_apgd_is_at_least_as_strong_as_pgd() -> None:
    x, y = data(64, 5)
    model = mlp(5)
    y = model(x).argmax(1)  # every example starts correctly classified
    for norm, eps in (("linf", 0.04), ("l2", 0.15)):
        acc_pgd = (model(pgd(model, x, y, eps=eps, norm=norm, steps=50)).argmax(1) == y).float().mean()
        acc_apgd = (model(apgd(model, x, y, eps=eps, norm=norm, steps=50)).argmax(1) == y).float().mean()
        assert acc_apgd <= acc_pgd
        assert 0 < acc_pgd < 1


def test_fgsm_is_one_signed_step() -> None:
    x, y = data(8)
    model = mlp()
    xr = x.clone().requires_grad_(True)
    F.cross_entropy(model(xr), y, reduction="sum").backward()
    expect = (x + 0.03 * xr.grad.sign()).clamp(0, 1)
    torch.testing.assert_close(fgsm(model, x, y, eps=0.03), expect)


class _UserNet(nn.Module):
    """A user's own module: a conv, BatchNorm (eval mode: running statistics), a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.bn(self.conv(x))).flatten(1))


@pytest.mark.parametrize("name", sorted(EVASION_ATTACKS.names()))
def test_every_registered_attack_on_a_user_module(name: str) -> None:
    torch.manual_seed(0)
    model = _UserNet().eval()
    x, y = data(6)
    flags = [p.requires_grad for p in model.parameters()]
    opts = {"steps": 3, "search_steps": 2} if name == "cw" else {"eps": 0.1}
    if name in ("pgd", "apgd", "apgd-t", "fab", "fab-t"):
        opts["steps"] = 3
    if name == "square":
        opts["n_queries"] = 20
    if name == "autoattack":
        opts["square_queries"] = 20
    x_adv = EVASION_ATTACKS.get(name)(model, x, y, **opts)
    assert x_adv.shape == x.shape and x_adv.device == x.device and not x_adv.requires_grad
    assert not model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
