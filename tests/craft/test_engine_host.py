"""The engine's host-cost cuts of issue 16 (benchmarks/probes/evasion_host_overhead.py) change no number: the one-batch
evaluation is the general formula bitwise, the in-place projections are the out-of-place ones, the result fields
read back on first access are what an eager read gives, and a non-finite objective is still refused when ``craft``
returns. benchmarks/probes/evasion_same_results.py compares whole calls against an earlier tree."""

from __future__ import annotations

import copy
import dataclasses
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mlaudit.attacks.evasion import EvasionObjective
from mlaudit.craft import Box, CraftResult, Free, L2Ball, LinfBall, StepInfo, craft, engine
from mlaudit.craft.constraints import _row_norms, _unit_l2
from mlaudit.errors import ConfigError


def _model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    return model, torch.rand(12, 1, 4, 4), torch.randint(0, 5, (12,))


@pytest.mark.parametrize("flagged", [False, True])
@pytest.mark.parametrize("joint", [False, True])
def test_one_batch_evaluation_is_the_general_formula_bitwise(flagged: bool, joint: bool) -> None:
    model, x, y = _model()
    idx = torch.arange(len(x))

    def objective(xa: torch.Tensor, i: torch.Tensor):
        z = model(xa)
        loss = -F.cross_entropy(z, y[i], reduction="none")
        loss = loss.sum() if joint else loss
        return (loss, z.argmax(1) != y[i]) if flagged and not joint else loss

    start = (torch.rand(1, *x.shape) - 0.5) * 0.1
    d1, d2 = start.clone().requires_grad_(True), start.clone().requires_grad_(True)
    totals, per, done = engine._evaluate(objective, x, idx, d1, None, None, None, backward=True)
    # the general formula, as the loop over mini-batches computes it for one batch
    xa = (x + d2.squeeze(0)).unsqueeze(0)
    out = objective(xa[0], idx)
    flags = None
    if isinstance(out, tuple):
        out, flags = out
    out = out.unsqueeze(0)
    loss_g = out if joint else out.sum(1)
    loss_g.sum().backward()
    want = torch.zeros(1) + loss_g.detach().float()
    assert torch.equal(totals + 0.0, want) and torch.equal(d1.grad, d2.grad)
    if joint:
        assert per is None and done is None
    else:
        assert torch.equal(per, out.detach().float())
        assert (done is None) == (not flagged) and (done is None or torch.equal(done, flags.view(1, -1)))


@pytest.mark.parametrize("eps", [0.05, 2])
def test_in_place_projections_are_the_out_of_place_formulas(eps: float) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 4, 4, generator=g)
    d = torch.randn(6, 3, 4, 4, generator=g) * 0.2
    lin, l2 = LinfBall(min(eps, 1.0)), L2Ball(eps)
    want = (x + d.clamp(-lin.eps, lin.eps)).clamp(0.0, 1.0) - x
    assert torch.equal(lin.project(d, x), want)
    assert torch.equal(lin.project(d.transpose(2, 3), x.transpose(2, 3)), want.transpose(2, 3))  # strided: as before
    assert torch.equal(lin.project(d[:1], x), (x + d[:1].clamp(-lin.eps, lin.eps)).clamp(0.0, 1.0) - x)  # broadcast
    norms = d.flatten(1).norm(dim=1).clamp_min(1e-12)
    scale = (eps / norms).clamp(max=1.0).view(-1, 1, 1, 1)
    assert torch.equal(l2.project(d, x), torch.addcmul(x, d, scale).clamp_(0.0, 1.0).sub_(x))
    assert torch.equal(_row_norms(d), d.flatten(1).norm(dim=1))
    assert torch.equal(_unit_l2(d), d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1))
    # a tensor eps keeps the division
    l2t = L2Ball(torch.tensor(float(eps)))  # type: ignore[arg-type]
    assert torch.equal(l2t.project(d, x), torch.addcmul(x, d, (torch.tensor(float(eps)) / norms).clamp(max=1.0)
                                                        .view(-1, 1, 1, 1)).clamp_(0.0, 1.0).sub_(x))
    # the projection still records no graph when gradients are on
    dg = d.clone().requires_grad_(True)
    assert not lin.project(dg, x).requires_grad and not l2.project(dg, x).requires_grad


def test_signed_steepest_directions_skip_the_per_sample_view() -> None:
    grad = torch.randn(2, 5, 3, 4)
    x = torch.rand(5, 3, 4)
    for c in (LinfBall(0.1), Box(), Free(), L2Ball(0.5)):
        info = StepInfo(c, x, None, 0, 1)
        assert torch.equal(info.steepest(grad), c.steepest(grad.flatten(0, 1)).view_as(grad))


def _objective(model: nn.Module, y: torch.Tensor):
    def obj(xa: torch.Tensor, idx: torch.Tensor):
        z = model(xa)
        return -F.cross_entropy(z, y[idx], reduction="none"), z.argmax(1) != y[idx]
    return obj


def test_results_are_read_back_on_first_access_with_the_eager_values() -> None:
    model, x, y = _model()
    kw = dict(constraint=LinfBall(0.1), steps=4, optimizer="pgd", lr=0.25, schedule="constant")
    res = craft(_objective(model, y), x, **kw)
    assert isinstance(res, CraftResult) and "objective" not in vars(res)  # nothing read yet
    assert res.per_sample is not None and res.done is not None and res.done.dtype == torch.bool
    assert res.objective == float(res.per_sample.sum()) and res.restarts == [res.objective]
    assert len(res.history) == 4 and all(isinstance(v, float) for v in res.history)
    # the same fields as the per-step totals the objective saw
    seen: list[float] = []
    again = craft(_objective(model, y), x, on_step=lambda s, v: seen.append(v), **kw)
    assert again.history == seen and torch.equal(again.delta, res.delta)
    # copies, pickles and dataclasses.replace carry every field
    for other in (copy.deepcopy(again), pickle.loads(pickle.dumps(again)), dataclasses.replace(again)):
        assert torch.equal(other.delta, res.delta) and other.history == res.history
        assert other.objective == res.objective and torch.equal(other.per_sample, res.per_sample)
        assert other.restarts == res.restarts and torch.equal(other.done, res.done)
    # restarts: every group's objective, read for the ranking
    many = craft(_objective(model, y), x, restarts=3, init="random", keep_best=True, early_stop=True,
                 generator=torch.Generator().manual_seed(0), **kw)
    assert 1 <= len(many.restarts) <= 3 and many.objective <= min(many.restarts) + 1e-4


def test_losses_of_negative_zero_give_totals_of_zero() -> None:
    """The one-batch evaluation does not add the totals to zeros; the readers turn -0.0 into 0.0 as that sum did."""
    x = torch.rand(5, 3)
    seen: list[float] = []
    res = craft(lambda xa, idx: -(xa.sum(1) * 0.0), x, constraint=LinfBall(0.1), steps=2, optimizer="pgd",
                on_step=lambda s, v: seen.append(v))
    assert all(math.copysign(1.0, v) == 1.0 for v in [*res.history, *seen, res.objective])
    assert res.per_sample is not None and bool(res.per_sample.signbit().all())  # the per-sample values as returned
    joint = craft(lambda xa, idx: -(xa.sum() * 0.0), x, constraint=LinfBall(0.1), steps=2, optimizer="pgd")
    assert all(math.copysign(1.0, v) == 1.0 for v in [*joint.history, joint.objective, *joint.restarts])


@pytest.mark.parametrize("early_stop", [False, True])
@pytest.mark.parametrize("final_eval", [False, True])
def test_a_non_finite_objective_is_refused_when_craft_returns(early_stop: bool, final_eval: bool) -> None:
    model, x, y = _model()
    calls = [0]

    def obj(xa: torch.Tensor, idx: torch.Tensor):
        calls[0] += 1
        loss, done = _objective(model, y)(xa, idx)
        return (loss * float("inf") if calls[0] == 3 else loss), done & False

    with pytest.raises(ConfigError, match=r"non-finite value \(\[-?inf\]\) at step 2"):
        craft(obj, x, constraint=LinfBall(0.1), steps=4, optimizer="pgd", early_stop=early_stop,
              final_eval=final_eval)


@pytest.mark.parametrize("final_eval", [False, True])
def test_a_deferred_finite_check_raises_at_check_finite_or_at_the_first_read(final_eval: bool) -> None:
    """``defer_finite_check``: craft returns the iterate; ``check_finite`` (or reading a host-side field, whichever
    comes first) raises the same ConfigError as the eager check. (With early stop on the CPU each step reads its
    counts and finiteness at once, so craft itself raises there, as without deferral.)"""
    early_stop = False
    model, x, y = _model()

    def run(bad_call: int | None):
        calls = [0]

        def obj(xa: torch.Tensor, idx: torch.Tensor):
            calls[0] += 1
            loss, done = _objective(model, y)(xa, idx)
            return (loss * float("inf") if calls[0] == bad_call else loss), done & False

        return craft(obj, x, constraint=LinfBall(0.1), steps=4, optimizer="pgd", early_stop=early_stop,
                     final_eval=final_eval, defer_finite_check=True)

    bad = run(3)
    assert bad.delta.shape == x.shape  # returned, not refused
    with pytest.raises(ConfigError, match=r"non-finite value \(\[-?inf\]\) at step 2"):
        bad.check_finite()
    with pytest.raises(ConfigError, match=r"non-finite value \(\[-?inf\]\) at step 2"):
        _ = run(3).objective  # a field read checks too
    good = run(None)
    good.check_finite()
    eager = craft(_objective(model, y), x, constraint=LinfBall(0.1), steps=4, optimizer="pgd",
                  early_stop=early_stop, final_eval=final_eval)
    assert torch.equal(good.delta, eager.delta) and good.objective == eager.objective


def test_an_attack_on_a_model_with_infinite_logits_is_refused() -> None:
    """The evasion attacks defer the engine's finiteness check to after x + delta; it still raises."""
    from mlaudit.attacks.evasion import EVASION_ATTACKS

    class Inf(torch.nn.Module):  # finite logits for inputs whose first value is below 0.5, else all +inf (NaN loss)
        def forward(self, z: torch.Tensor) -> torch.Tensor:
            out = z.flatten(1)[:, :5] * 1.0
            return torch.where(z.flatten(1)[:, :1] > 0.5, torch.full_like(out, float("inf")), out)

    x = torch.full((6, 8), 0.2)
    x[2:, 0] = 0.8  # the probe's two rows (x[:2]) stay finite
    y = torch.arange(6) % 5
    for name, opts in (("fgsm", {}), ("pgd", {"steps": 3})):
        with pytest.raises(ConfigError, match="non-finite"):
            EVASION_ATTACKS.get(name)(Inf().eval(), x, y, eps=0.05, **opts)


def test_an_overflowing_total_of_finite_losses_is_not_refused() -> None:
    """The end check sums the unchecked totals (a finite sum has finite terms); an overflowing sum of finite totals
    is checked value by value."""
    big = torch.finfo(torch.float32).max / 2
    res = craft(lambda xa, idx: xa.sum() * 0.0 + big, torch.rand(4, 2), constraint=Box(), steps=3, optimizer="pgd")
    assert res.history == [big] * 3 and res.objective == big


def test_evasion_objective_label_gathers_are_kept_only_while_valid() -> None:
    model, x, y = _model()
    t = (y + 1) % 5
    obj = EvasionObjective(model, y, target=t, goal="target")
    idx = torch.tensor([0, 3, 5])
    a, _ = obj(x[idx], idx)
    assert torch.equal(obj._labels(idx)[0], y[idx]) and obj._labels(idx)[0] is obj._labels(idx)[0]
    idx[0] = 7  # changed in place: gathered again
    assert torch.equal(obj._labels(idx)[0], y[idx]) and torch.equal(obj._labels(idx)[1], t[idx])
    y[7] = (y[7] + 2) % 5  # the labels changed in place
    assert torch.equal(obj._labels(idx)[0], y[idx])
    obj.y = y.flip(0)  # replaced
    assert torch.equal(obj._labels(idx)[0], obj.y[idx])
    obj.target = None  # replaced by None
    assert obj._labels(idx)[1] is None
    # verdict=False: the same losses (and gradients) without the verdict
    plain = EvasionObjective(model, y, verdict=False)
    full = EvasionObjective(model, y)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    la, (lb, _) = plain(xa, torch.arange(len(x))), full(xb, torch.arange(len(x)))
    assert isinstance(la, torch.Tensor) and torch.equal(la, lb)
    la.sum().backward()
    lb.sum().backward()
    assert torch.equal(xa.grad, xb.grad)
