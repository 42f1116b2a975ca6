"""The host-overhead cuts of issue 16 (benchmarks/probes/evasion_host_overhead.py) change no result: the one-pass
objective is bitwise the EOT formula at one copy, the CPU range reads give the values of the one-read path, the
checks still refuse what they refused, and FGSM / PGD are the hand-written steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mlaudit.attacks.evasion import EvasionObjective, fgsm, pgd
from mlaudit.attacks.evasion.base import _ranges
from mlaudit.attacks.evasion.losses import LOSSES
from mlaudit.errors import ConfigError


def _reference(model: nn.Module, loss: str, x_adv: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None,
               goal: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The EOT formula of EvasionObjective at one copy, as it was before the one-pass path."""
    b = x_adv.shape[0]
    z = model(x_adv)
    losses = LOSSES.get(loss)(z, y, t).view(1, b)
    pred = z.argmax(1).view(1, b)
    hits = pred == t if goal == "target" else pred != y
    return -losses.mean(0), hits.all(0)


@pytest.mark.parametrize("loss", ["ce", "dlr", "margin"])
@pytest.mark.parametrize("targeted", [False, True])
def test_one_pass_objective_is_the_eot_formula_bitwise(loss: str, targeted: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 6)).eval()
    y = torch.randint(0, 6, (12,))
    t = (y + 1 + torch.randint(0, 5, (12,))) % 6 if targeted else None
    idx = torch.tensor([0, 2, 3, 5, 7, 11])  # a subset, as the engine passes once rows leave
    goal = "target" if targeted else "misclassify"
    obj = EvasionObjective(model, y, loss=loss, target=t, goal=goal)
    x = torch.rand(len(idx), 1, 4, 4)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    got, done = obj(xa, idx)
    want, want_done = _reference(model, loss, xb, y[idx], None if t is None else t[idx], goal)
    assert torch.equal(got, want) and torch.equal(done, want_done) and done.dtype == torch.bool
    got.sum().backward()
    want.sum().backward()
    assert xa.grad is not None and torch.equal(xa.grad, xb.grad)


@pytest.mark.parametrize("x_dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("y_dtype", [torch.uint8, torch.int8, torch.int32, torch.int64])
def test_cpu_range_reads_give_the_values_of_the_one_read_path(x_dtype: torch.dtype, y_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(9, 3, 2, 2, generator=g) * 3 - 1).to(x_dtype)
    hi = {torch.uint8: 255, torch.int8: 127, torch.int32: 2**31 - 1, torch.int64: 2**40}[y_dtype]
    lo = 0 if y_dtype == torch.uint8 else -5
    y = torch.tensor([lo, 3, hi, 7, 0, 1, 2, 3, 4], dtype=y_dtype)
    one, four = _ranges(x, y, one_read=True), _ranges(x, y, one_read=False)
    assert one == four == (float(x.min()), float(x.max()), lo, hi)
    assert [type(v) for v in four] == [float, float, int, int]
    assert _ranges(x, y) == four  # CPU tensors: the default is the four reads


def _setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 3)).eval(), torch.rand(4, 3, 4, 4), torch.tensor([0, 1, 2, 0])


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_labels_out_of_range_are_refused_in_every_integer_dtype(dtype: torch.dtype) -> None:
    model, x, _ = _setup()
    for attack in (fgsm, pgd):
        with pytest.raises(ConfigError, match=r"y: labels in \[0, 3\] are out of range; allowed 0 <= y < 3"):
            attack(model, x, torch.tensor([0, 1, 3, 0], dtype=dtype), eps=0.1)
    if dtype != torch.uint8:
        with pytest.raises(ConfigError, match=r"y: labels in \[-1, 2\] are out of range"):
            pgd(model, x, torch.tensor([0, -1, 2, 0], dtype=dtype), eps=0.1)
    # labels in range, in any integer dtype, attack as int64 labels do (int16 / int32 used to fail in the loss)
    y = torch.tensor([0, 1, 2, 0])
    for attack in (fgsm, pgd):
        torch.testing.assert_close(attack(model, x, y.to(dtype), eps=0.1), attack(model, x, y, eps=0.1))


def test_the_range_and_eps_checks_still_name_the_values() -> None:
    model, x, y = _setup()
    with pytest.raises(ConfigError, match=r"x: values in \[-0.5, .*\] lie outside the declared pixel range \[0, 1\]"):
        fgsm(model, torch.cat([x[:1] - 0.5 - x[:1], x[1:]]), y)
    # the l2 bound is sqrt of the values per example: 3 x 4 x 4 = 48 here
    with pytest.raises(ConfigError, match=r"allowed 0 <= eps <= 6.928 for norm l2 on inputs in \[0, 1\] of 48 values"):
        pgd(model, x, y, eps=7.0, norm="l2")
    assert pgd(model, x, y, eps=6.9, norm="l2", steps=1).shape == x.shape


def _robust() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A linear model on 8x8 inputs whose 10 classes are orthogonal +-1 patterns with a margin no eps below closes:
    every step runs on the whole batch (no early stop), as in the hand-written loops."""
    h = torch.ones(1, 1)
    while h.shape[0] < 64:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10, bias=False)).eval()
    with torch.no_grad():
        model[1].weight.copy_(h[1:11])
    y = torch.arange(20) % 10
    g = torch.Generator().manual_seed(3)
    x = (0.5 + 0.4 * h[1:11][y] + 0.05 * torch.rand(20, 64, generator=g)).clamp(0, 1).view(20, 1, 8, 8)
    return model, x, y


def test_fgsm_and_pgd_are_the_hand_written_steps() -> None:
    model, x, y = _robust()
    eps, eps2 = 8 / 255, 0.5
    xr = x.clone().requires_grad_(True)
    g, = torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
    assert torch.equal(fgsm(model, x, y, eps=eps), (x + eps * g.sign()).clamp(0, 1))

    gen = torch.Generator().manual_seed(0)
    delta = (torch.rand(x.shape, generator=gen) * 2 - 1) * eps
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(20):
        delta.requires_grad_(True)
        g, = torch.autograd.grad(F.cross_entropy(model(x + delta), y, reduction="sum"), delta)
        delta = (x + (delta.detach() + eps / 8 * g.sign()).clamp(-eps, eps)).clamp(0, 1) - x
    ours = pgd(model, x, y, eps=eps, steps=20, step_size=eps / 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ours, x + delta)

    def unit(v: torch.Tensor) -> torch.Tensor:
        return v / v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)

    gen = torch.Generator().manual_seed(0)
    delta = unit(torch.randn(x.shape, generator=gen)) * (eps2 * torch.rand(len(x), generator=gen)).view(-1, 1, 1, 1)
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(10):
        delta.requires_grad_(True)
        g, = torch.autograd.grad(F.cross_entropy(model(x + delta), y, reduction="sum"), delta)
        delta = delta.detach() + eps2 / 4 * unit(g)
        delta = delta * (eps2 / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1.0).view(-1, 1, 1, 1)
        delta = (x + delta).clamp(0, 1) - x
    ours = pgd(model, x, y, eps=eps2, norm="l2", steps=10, step_size=eps2 / 4, generator=torch.Generator().manual_seed(0))
    # the engine projects with one addcmul (x + delta * scale in one rounding), the loop in two: float tolerance
    torch.testing.assert_close(ours, x + delta, rtol=0, atol=1e-6)
    assert (model(ours).argmax(1) == y).all()  # robust: the comparison above ran every step on every example
