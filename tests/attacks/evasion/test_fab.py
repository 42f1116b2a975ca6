"""FAB and FAB-T (mlaudit.attacks.evasion.fab; Croce & Hein 2020): the exact hyperplane-and-box
projection, the closed-form minimal l2 / l-inf distance of linear models, the box and eps-ball always
hold (x_adv is x or within eps), targeted runs land in their target, FAB-T on a digits model is as
strong as APGD-T, and it joins the AutoAttack-style ensemble and the robustness kind's config."""

from __future__ import annotations

import functools
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from torch import nn

from mlaudit.attacks.evasion import (
    DEFAULT_MEMBERS,
    EVASION_ATTACKS,
    apgd_targeted,
    fab,
    fab_targeted,
    margin,
    run_ensemble,
)
from mlaudit.data import load_dataset
from mlaudit.errors import ConfigError
from mlaudit.experiments.robustness_config import RobustnessConfig
from mlaudit.models import build_model
from mlaudit.train import train

FAB = sys.modules["mlaudit.attacks.evasion.fab"]  # the package attribute `fab` is the function


@functools.lru_cache(maxsize=1)
def digits_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The zoo's mlp trained 6 epochs on sklearn digits (0.3 s) and the first 100 test examples [100, 1, 8, 8]."""
    torch.manual_seed(0)
    data = load_dataset({"name": "digits"})
    model = train(build_model("mlp", input_shape=data.input_shape, num_classes=10), data,
                  {"name": "fast", "epochs": 6}, seed=0).eval()
    return model, data.test.x[:100], data.test.y[:100]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def size(d: torch.Tensor, norm: str) -> torch.Tensor:
    flat = d.flatten(1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


def linear_problem(classes: int, n: int = 12) -> tuple[nn.Module, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """A linear model on 10 inputs near the centre of the box, logits nearly tied there; the minimal
    distance to a misclassification is min_{j != y} (z_y - z_j) / ||w_y - w_j||_q (q = 2 for l2, q = 1
    for l-inf: the dual norm), as long as the box does not bind."""
    torch.manual_seed(1)
    lin = nn.Linear(10, classes)
    g = torch.Generator().manual_seed(2)
    x = 0.45 + 0.1 * torch.rand(n, 10, generator=g)
    with torch.no_grad():
        lin.bias.copy_(-lin.weight @ torch.full((10,), 0.5) + 0.05 * torch.randn(classes, generator=g))
        z = lin(x)
    y = z.argmax(1)
    w = lin.weight.detach()
    dist = {"l2": torch.full((n,), float("inf")), "linf": torch.full((n,), float("inf"))}
    for j in range(classes):
        gap = z.gather(1, y[:, None])[:, 0] - z[:, j]
        for norm, q in (("l2", 2), ("linf", 1)):
            dj = gap / (w[y] - w[j]).norm(p=q, dim=1)
            dist[norm] = torch.where(y == j, dist[norm], torch.minimum(dist[norm], dj))
    return lin.eval(), x, y, dist


@pytest.mark.parametrize("classes", [2, 5])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_fab_finds_the_closed_form_minimal_distance_of_a_linear_model(norm: str, classes: int) -> None:
    model, x, y, dist = linear_problem(classes)
    d_min = dist[norm]
    assert d_min.max() < 0.3  # the nearest boundary is well inside the box: the closed form holds there
    x_adv = fab(model, x, y, norm=norm, steps=100)
    assert (model(x_adv).argmax(1) != y).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    d = size(x_adv - x, norm)
    assert (d >= d_min * (1 - 1e-4)).all()  # nothing beats the minimum
    assert (d <= d_min * 1.03).all(), (d / d_min).max()  # within 3% of it (measured: under 0.1%)


def test_the_projection_is_exact_and_feasible() -> None:
    """min ||delta||_p s.t. <w, delta> = r and the box: on the hyperplane, in the box, no feasible point of
    the hyperplane nearby is shorter; without a binding box the l2 step is r w / ||w||^2 and the l-inf
    step r sign(w) / ||w||_1; an unreachable plane gives the box corner furthest towards it."""
    g = torch.Generator().manual_seed(0)
    p = 0.2 + 0.6 * torch.rand(64, 7, generator=g, dtype=torch.float64)
    w = torch.randn(64, 7, generator=g, dtype=torch.float64)
    w[:4, :2] = 0  # coordinates the normal does not touch stay put
    r = torch.randn(64, generator=g, dtype=torch.float64)
    for norm in ("l2", "linf"):
        d = FAB.project_hyperplane_box(p, w, r, 0.0, 1.0, norm)
        torch.testing.assert_close((w * d).sum(1), r)
        assert ((p + d) >= -1e-12).all() and ((p + d) <= 1 + 1e-12).all()
        assert (d[:4, :2] == 0).all()
        best = size(d, norm)
        for _ in range(200):  # random feasible moves inside the hyperplane never shorten it
            v = 0.05 * torch.randn(64, 7, generator=g, dtype=torch.float64)
            v -= (v * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True) * w
            ok = ((p + d + v) >= 0).all(1) & ((p + d + v) <= 1).all(1)
            assert (size(d + v, norm)[ok] >= best[ok] - 1e-12).all()
    small = 0.01 * r  # the box does not bind: the unconstrained closed forms
    torch.testing.assert_close(FAB.project_hyperplane_box(p, w, small, 0.0, 1.0, "l2"),
                               small[:, None] * w / (w * w).sum(1, keepdim=True))
    torch.testing.assert_close(FAB.project_hyperplane_box(p, w, small, 0.0, 1.0, "linf"),
                               small[:, None] * w.sign() / w.abs().sum(1, keepdim=True))
    far = FAB.project_hyperplane_box(p, w, 100 * r.sign(), 0.0, 1.0, "l2")  # unreachable
    corner = torch.where(w * r.sign()[:, None] > 0, 1 - p, -p) * (w != 0)
    torch.testing.assert_close(far, corner)


def _conv(classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, classes)).eval()


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(["fab", "fab-t"]), norm=st.sampled_from(["linf", "l2"]),
       eps=st.one_of(st.none(), st.floats(0.0, 1.0)), box=st.sampled_from([(0.0, 1.0), (-1.0, 2.0)]),
       restarts=st.integers(1, 2), seed=st.integers(0, 50))
def test_fab_stays_in_the_box_and_returns_x_or_a_point_within_eps(name: str, norm: str, eps: float | None,
                                                                  box: tuple[float, float], restarts: int,
                                                                  seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    lo, hi = box
    x = lo + (hi - lo) * torch.rand(6, 1, 4, 4, generator=g)
    x[0] = lo  # pixels on the box's edges
    x[1] = hi
    y = torch.randint(0, 4, (6,), generator=g)
    opts = {"n_target_classes": 2} if name == "fab-t" else {}
    x_adv = EVASION_ATTACKS.get(name)(_conv(4, seed), x, y, eps=eps, norm=norm, box=box, steps=8, restarts=restarts,
                                      generator=torch.Generator().manual_seed(seed), **opts)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert x_adv.min() >= lo - 1e-6 and x_adv.max() <= hi + 1e-6
    changed = (x_adv != x).flatten(1).any(1)
    if eps is not None:
        assert (size(x_adv - x, norm)[changed] <= eps + 1e-6).all()
    model = _conv(4, seed)
    assert (model(x_adv[changed]).argmax(1) != y[changed]).all()  # a changed example is a fooled one


def test_fab_targeted_lands_in_the_target() -> None:
    model, x, y = digits_mlp()
    x, y = x[:40], y[:40]
    t = (y + 3) % 10
    x_adv = fab(model, x, y, target=t, steps=60)
    fooled = (x_adv != x).flatten(1).any(1)
    assert (model(x_adv[fooled]).argmax(1) == t[fooled]).all()
    clean_ok = model(x).argmax(1) == y
    assert fooled[clean_ok].float().mean() > 0.8  # measured 0.87 (no eps: any distance counts)
    with pytest.raises(ConfigError, match="target"):
        fab(model, x, y, target=y)


def test_fab_t_targets_are_the_highest_wrong_classes() -> None:
    z = torch.tensor([[5.0, 1.0, 3.0, 4.0, 2.0], [0.0, 9.0, 8.0, 7.0, 6.0]])
    y = torch.tensor([0, 2])
    assert FAB.fab_targets(z, y, 3).tolist() == [[3, 2, 4], [1, 3, 4]]
    model, x, y = digits_mlp()
    calls = []
    orig = FAB._single_run

    def spy(model, x0, y0, t, **kw):  # noqa: ANN001, ANN003, ANN202
        calls.append((len(x0), t.clone()))
        return orig(model, x0, y0, t, **kw)

    FAB._single_run = spy
    try:
        fab_targeted(model, x[:20], y[:20], eps=0.05, steps=5, n_target_classes=3)
    finally:
        FAB._single_run = orig
    z = model(x[:20]).detach()
    want = FAB.fab_targets(z, y[:20], 3)
    assert len(calls) == 3 and calls[0][0] == int((z.argmax(1) == y[:20]).sum())  # correctly classified first
    ok = (z.argmax(1) == y[:20]).nonzero()[:, 0]
    assert torch.equal(calls[0][1], want[ok, 0])
    assert calls[1][0] <= calls[0][0] and calls[2][0] <= calls[1][0]  # later targets: only the still-unbroken


def test_fab_t_on_digits_is_as_strong_as_apgd_t() -> None:
    model, x, y = digits_mlp()
    clean = accuracy(model, x, y)
    eps = 0.15
    by_fab = accuracy(model, fab_targeted(model, x, y, eps=eps, steps=100), y)
    by_apgd = accuracy(model, apgd_targeted(model, x, y, eps=eps, steps=100), y)
    assert by_fab <= clean
    assert abs(by_fab - by_apgd) <= 0.05, (by_fab, by_apgd)  # measured 0.07 vs 0.07 (eps 0.1: 0.55 vs 0.53)
    assert by_fab < 0.3


def test_ensemble_with_fab_t_is_the_min_over_its_members() -> None:
    model, x, y = digits_mlp()
    x, y = x[:60], y[:60]
    eps = 0.1
    members = [("apgd", {"steps": 10, "random_start": False}), ("fab-t", {"steps": 20, "n_target_classes": 3})]
    res = run_ensemble(model, x, y, eps=eps, members=members)
    assert res.names == ("apgd", "fab-t")
    margins = torch.stack([margin(model(EVASION_ATTACKS.get(n)(model, x, y, eps=eps, **o)), y).detach()
                           for n, o in members])
    robust_all = (margins >= 0).all(0) & (margin(model(x), y) >= 0)
    assert torch.equal(res.robust, robust_all)
    assert 0 < int(robust_all.sum()) < len(x) and int((res.fooled_by == 1).sum()) > 0  # FAB-T adds to APGD
    torch.testing.assert_close(res.margin[robust_all], margins.min(0).values[robust_all], atol=1e-5, rtol=0)
    assert (size(res.x_adv - x, "linf") <= eps + 1e-6).all()
    assert [name for name, _ in DEFAULT_MEMBERS] == ["apgd", "apgd-t", "fab-t", "square"]


def test_fab_bad_input_and_the_robustness_config() -> None:
    model, x, y = digits_mlp()
    for bad, word in (({"steps": 0}, "steps"), ({"alpha_max": 1.5}, "alpha_max"), ({"beta": 0}, "beta"),
                      ({"norm": "l3"}, "norm")):
        with pytest.raises(ConfigError, match=word):
            fab(model, x[:4], y[:4], **bad)
    with pytest.raises(ConfigError, match="n_target_classes"):
        fab_targeted(model, x[:4], y[:4], n_target_classes=0)
    torch.testing.assert_close(fab_targeted(model, x[:5], y[:5], eps=0.0), x[:5])
    base = {"kind": "robustness", "name": "rob", "dataset": "digits", "model": "mlp", "recipe": "fast"}
    cfg = RobustnessConfig.model_validate({**base, "attacks": ["fab", "fab-t", "autoattack"],
                                           "attack_options": {"fab-t": {"steps": 20, "n_target_classes": 3}}})
    assert cfg.options_for("fab-t") == {"steps": 20, "n_target_classes": 3}
    with pytest.raises(ValidationError, match="n_target_classes"):
        RobustnessConfig.model_validate({**base, "attacks": ["fab-t"], "attack_options": {"fab-t": {"targets": 3}}})
