"""FAB in l1 (mlaudit.attacks.evasion.fab, norm="l1"; Croce & Hein 2020, sec. 3.1 and Alg. 1): the l1
hyperplane-and-box projection is the exact LP optimum (against scipy's HiGHS), FAB-l1 reaches the closed-form
minimal l1 distance of linear models and the LP optimum where the box binds, x_adv stays in the box and within
eps in l1, the l1 random start is uniform in the cross-polytope, the other attacks refuse l1 with a clear
message, and the robustness kind runs in l1."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from scipy.optimize import linprog
from test_fab import digits_mlp, linear_problem  # same folder (rootdir-relative import)
from torch import nn

from mlaudit.attacks.evasion import EVASION_ATTACKS, apgd, autoattack, fab, fab_targeted, fgsm, pgd, square
from mlaudit.errors import ConfigError
from mlaudit.experiments import run_experiment
from mlaudit.experiments.robustness_config import RobustnessConfig

FAB = sys.modules["mlaudit.attacks.evasion.fab"]


def l1(d: torch.Tensor) -> torch.Tensor:
    return d.flatten(1).abs().sum(1)


def lp_min_l1(p: np.ndarray, w: np.ndarray, r: float, lo: float, hi: float) -> float | None:
    """min ||delta||_1 s.t. <w, delta> = r, lo <= p + delta <= hi by scipy's HiGHS (delta = u - v, u, v >= 0);
    None where infeasible."""
    d = len(p)
    bounds = [(0.0, hi - p[i]) for i in range(d)] + [(0.0, p[i] - lo) for i in range(d)]
    res = linprog(np.ones(2 * d), A_eq=np.concatenate([w, -w])[None], b_eq=[r], bounds=bounds, method="highs")
    assert res.status in (0, 2), res.message
    return float(res.fun) if res.status == 0 else None


@settings(max_examples=60, deadline=None)
@given(d=st.integers(1, 8), seed=st.integers(0, 10_000), scale=st.sampled_from([0.05, 0.5, 2.0, 8.0]),
       box=st.sampled_from([(0.0, 1.0), (-1.0, 2.0)]), zeros=st.integers(0, 3))
def test_l1_projection_is_the_lp_optimum(d: int, seed: int, scale: float, box: tuple[float, float],
                                         zeros: int) -> None:
    """Against scipy's LP solver on random small instances (some far enough that the box binds or the plane is
    out of reach): the same optimal l1 norm, on the hyperplane, in the box; unreachable planes give the box
    corner that maximises <w, delta> (the LP max over the box)."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = box
    b = 6
    p = lo + (hi - lo) * torch.rand(b, d, generator=g, dtype=torch.float64)
    p[0, 0] = hi  # a point on the box's edge
    w = torch.randn(b, d, generator=g, dtype=torch.float64)
    w[1, : min(zeros, d)] = 0  # coordinates the normal does not touch
    w[2] = w[2].round()  # ties in |w_i|
    r = scale * torch.randn(b, generator=g, dtype=torch.float64)
    delta = FAB.project_hyperplane_box(p, w, r, lo, hi, "l1")
    assert ((p + delta) >= lo - 1e-12).all() and ((p + delta) <= hi + 1e-12).all()
    for i in range(b):
        want = lp_min_l1(p[i].numpy(), w[i].numpy(), float(r[i]), lo, hi)
        got = float(delta[i].abs().sum())
        if want is None:  # out of reach: every touched coordinate at its bound in the direction sign(w r)
            corner = torch.where(w[i] * r[i].sign() > 0, hi - p[i], lo - p[i]) * (w[i] != 0)
            torch.testing.assert_close(delta[i], corner, rtol=0, atol=1e-12)
            assert abs(float((w[i] * delta[i]).sum())) < abs(float(r[i])) + 1e-9
        else:
            assert float((w[i] * delta[i]).sum()) == pytest.approx(float(r[i]), rel=1e-9, abs=1e-9)
            assert got == pytest.approx(want, rel=1e-7, abs=1e-9)


def test_l1_projection_without_a_binding_box_moves_the_largest_coordinate() -> None:
    """The unconstrained l1 projection (the dual of l-inf): all of r on the coordinate of largest |w_i|,
    delta = r / w_k e_k, of l1 norm |r| / ||w||_inf."""
    g = torch.Generator().manual_seed(3)
    p = 0.4 + 0.2 * torch.rand(32, 9, generator=g, dtype=torch.float64)
    w = torch.randn(32, 9, generator=g, dtype=torch.float64)
    r = 0.01 * torch.randn(32, generator=g, dtype=torch.float64)
    delta = FAB.project_hyperplane_box(p, w, r, 0.0, 1.0, "l1")
    k = w.abs().argmax(1)
    want = torch.zeros_like(delta).scatter(1, k[:, None], (r / w.gather(1, k[:, None])[:, 0])[:, None])
    torch.testing.assert_close(delta, want)
    torch.testing.assert_close(l1(delta), r.abs() / w.abs().amax(1))


@pytest.mark.parametrize("classes", [2, 5])
def test_fab_l1_finds_the_closed_form_minimal_distance_of_a_linear_model(classes: int) -> None:
    """min ||delta||_1 to the class-j boundary of a linear model is (z_y - z_j) / ||w_y - w_j||_inf (Hoelder:
    l-inf is the dual of l1), when the box does not bind; FAB-l1 reaches the minimum over j."""
    model, x, y, _ = linear_problem(classes)
    w = model.weight.detach()
    with torch.no_grad():
        z = model(x)
    d_min = torch.full((len(x),), float("inf"))
    for j in range(classes):
        dj = (z.gather(1, y[:, None])[:, 0] - z[:, j]) / (w[y] - w[j]).abs().amax(1)
        d_min = torch.where(y == j, d_min, torch.minimum(d_min, dj))
    assert d_min.max() < 0.4  # one coordinate moves by at most 0.4 from [0.45, 0.55]: inside the box
    x_adv = fab(model, x, y, norm="l1", steps=100)
    assert (model(x_adv).argmax(1) != y).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    d = l1(x_adv - x)
    assert (d >= d_min * (1 - 1e-4)).all()  # nothing beats the minimum
    assert (d <= d_min * 1.01).all(), (d / d_min).max()  # measured 0.52% above (eta = 1.05's overshoot)


def test_fab_l1_on_a_binary_linear_model_where_the_box_binds_is_the_lp_optimum() -> None:
    """A 2-class linear model whose decision boundary is one hyperplane, inputs near the edge the largest
    weight pushes towards: the closed form would leave the box, the minimum is the LP over the box (several
    coordinates saturated, found by scipy), and FAB-l1 reaches it within 1%."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.0] * 6, [3.0, 2.0, 1.5, 1.0, 0.5, 0.25]]))
        lin.bias.copy_(torch.tensor([0.0, -5.5]))
    g = torch.Generator().manual_seed(1)
    x = 0.2 + 0.2 * torch.rand(10, 6, generator=g)
    x[:, 0] = 0.9 + 0.05 * torch.rand(10, generator=g)  # the best coordinate has little room up
    y = torch.zeros(10, dtype=torch.long)
    with torch.no_grad():
        z = lin(x)
    assert (z.argmax(1) == 0).all()
    wd = (lin.weight[1] - lin.weight[0]).detach().double().numpy()
    want = torch.tensor([lp_min_l1(x[i].double().numpy(), wd, float(z[i, 0] - z[i, 1]), 0.0, 1.0)
                         for i in range(10)], dtype=torch.float32)
    closed = (z[:, 0] - z[:, 1]) / 3.0
    assert (want > closed * 1.2).all()  # the box binds: the unconstrained closed form is well below
    x_adv = fab(lin.eval(), x, y, norm="l1", steps=100)
    assert (lin(x_adv).argmax(1) == 1).all() and x_adv.min() >= 0 and x_adv.max() <= 1
    d = l1(x_adv - x)
    assert (d >= want * (1 - 1e-4)).all()
    assert (d <= want * 1.01).all(), (d / want).max()  # measured 0.49% above (the LP optimum is 1.37x the closed form)


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(["fab", "fab-t"]), eps=st.one_of(st.none(), st.floats(0.0, 4.0)),
       box=st.sampled_from([(0.0, 1.0), (-1.0, 2.0)]), restarts=st.integers(1, 3), seed=st.integers(0, 50))
def test_fab_l1_stays_in_the_box_and_returns_x_or_a_point_within_eps(name: str, eps: float | None,
                                                                     box: tuple[float, float], restarts: int,
                                                                     seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    lo, hi = box
    x = lo + (hi - lo) * torch.rand(6, 1, 4, 4, generator=g)
    x[0] = lo
    x[1] = hi
    y = torch.randint(0, 4, (6,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4)).eval()
    opts = {"n_target_classes": 2} if name == "fab-t" else {}
    x_adv = EVASION_ATTACKS.get(name)(model, x, y, eps=eps, norm="l1", box=box, steps=8, restarts=restarts,
                                      generator=torch.Generator().manual_seed(seed), **opts)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert x_adv.min() >= lo - 1e-6 and x_adv.max() <= hi + 1e-6
    changed = (x_adv != x).flatten(1).any(1)
    if eps is not None:
        assert (l1(x_adv - x)[changed] <= eps + 1e-5).all()
    assert (model(x_adv[changed]).argmax(1) != y[changed]).all()


def test_fab_l1_with_eps_is_the_minimal_run_read_at_eps() -> None:
    """On the digits MLP (64 pixels in [0, 1]): with one restart (no random draw) an example is broken at eps
    exactly when the run without eps found a point of l1 norm <= eps; robust accuracy falls with eps, and
    FAB-T-l1 is at least as strong at eps as untargeted FAB-l1 within 5 points."""
    model, x, y = digits_mlp()
    x, y = x[:60], y[:60]
    with torch.no_grad():
        ok = model(x).argmax(1) == y
        x_min = fab(model, x, y, norm="l1", steps=50)
        fooled = ok & (model(x_min).argmax(1) != y)
    size = l1(x_min - x)
    robust = []
    for eps in (1.0, 2.0, 3.0):
        x_adv = fab(model, x, y, eps=eps, norm="l1", steps=50)
        assert (l1(x_adv - x) <= eps + 1e-5).all()
        with torch.no_grad():
            r = ok & (model(x_adv).argmax(1) == y)
        assert torch.equal(~r & ok, fooled & (size <= eps))
        robust.append(float(r.float().mean()))
    assert robust[0] > robust[1] > robust[2]
    assert 0.1 < robust[1] < 0.9, robust  # measured 0.75, 0.22, 0.03 at eps 1, 2 (the benchmark's), 3
    with torch.no_grad():
        by_t = float((model(fab_targeted(model, x, y, eps=2.0, norm="l1", steps=50)).argmax(1) == y).float().mean())
    assert by_t <= robust[1] + 0.05, (by_t, robust[1])  # measured 0.22 vs 0.22


def test_l1_random_start_is_uniform_in_the_cross_polytope() -> None:
    """For U uniform in the unit l1 ball of dimension D, P(||U||_1 <= t) = t^D (the volume scales as t^D), so
    E||U||_1 = D / (D + 1); each coordinate is symmetric; points stay in the ball; restarts use radius / 2."""
    x0 = torch.zeros(4000, 1, 2, 3)
    gen = torch.Generator().manual_seed(0)
    u = FAB._uniform_l1_ball(x0, gen)
    n = l1(u)
    assert u.shape == x0.shape and (n <= 1 + 1e-6).all()
    assert float(n.mean()) == pytest.approx(6 / 7, abs=0.01)
    assert float((n <= 0.8).float().mean()) == pytest.approx(0.8 ** 6, abs=0.03)
    assert float(u.flatten(1).mean(0).abs().max()) < 0.01
    start = FAB._random_start(torch.full((50, 10), 0.5), torch.full((50,), 0.4), "l1", (0.0, 1.0), gen)
    assert (l1(start - 0.5) <= 0.4 + 1e-6).all() and start.min() >= 0 and start.max() <= 1


def test_l1_is_refused_where_there_is_no_l1_version() -> None:
    model, x, y = digits_mlp()
    x, y = x[:4], y[:4]
    for attack in (lambda: pgd(model, x, y, eps=1.0, norm="l1"), lambda: apgd(model, x, y, eps=1.0, norm="l1"),
                   lambda: fgsm(model, x, y, eps=1.0, norm="l1"),
                   lambda: square(model, x, y, eps=1.0, norm="l1", n_queries=5),
                   lambda: autoattack(model, x, y, eps=1.0, norm="l1")):
        with pytest.raises(ConfigError, match=r"norm: 'l1' is not supported by this attack; allowed: linf, l2 "
                                              r"\(l1 only in fab, fab-t"):
            attack()
    with pytest.raises(ConfigError, match=r"eps: 65.0 .*allowed 0 <= eps <= 64 for norm l1"):
        fab(model, x, y, eps=65.0, norm="l1")  # the l1 norm of the whole box [0, 1]^64
    with pytest.raises(ConfigError, match=r"norm: unknown norm 'l0'; allowed: linf, l2, l1"):
        fab(model, x, y, norm="l0")  # type: ignore[arg-type]
    torch.testing.assert_close(fab(model, x, y, eps=0.0, norm="l1"), x)


def test_the_robustness_kind_takes_l1_with_fab_and_refuses_the_rest(tmp_path: Path) -> None:
    base = {"kind": "robustness", "name": "rob", "dataset": "digits", "model": "mlp",
            "recipe": {"name": "fast", "epochs": 4}, "threat": {"norm": "l1", "eps": [1.0, 2.0, 4.0]},
            "sanity": False, "grid": 0, "examples": 40, "seed": 0}
    for bad, words in (({"attacks": ["fab", "pgd"]}, ["attacks ['pgd'] have no l1 version", "fab, fab-t, cw"]),
                       ({"attacks": ["fab"], "sanity": True}, ["sanity: True", "threat.norm l1", "sanity: false"]),
                       ({"attacks": ["fab"], "defence": {"transform": "noise"}}, ["defence:", "no defence"])):
        with pytest.raises(ValidationError) as err:
            RobustnessConfig.model_validate({**base, **bad})
        for w in words:
            assert w in str(err.value), str(err.value)
    with pytest.raises(ConfigError, match=r"threat.eps 65.0 is above the pixel range; allowed 0 <= eps <= 64 for "
                                          r"norm l1"):
        run_experiment({**base, "attacks": ["fab"], "threat": {"norm": "l1", "eps": [1.0, 65.0]}},
                       out=tmp_path / "bad", device="cpu", store=tmp_path / "bad.db", quiet=True)
    cfg = {**base, "attacks": ["fab", "fab-t"], "attack_options": {"fab": {"steps": 20},
                                                                   "fab-t": {"steps": 20, "n_target_classes": 3}}}
    m = run_experiment(cfg, out=tmp_path / "run", device="cpu", store=tmp_path / "runs.db", quiet=True).results["metrics"]
    assert m["norm"] == "l1" and m["min_perturbation"]["fab"]["norm"] == "l1"
    saved = np.load(tmp_path / "run" / "artifacts" / "min_perturbation.npz")
    assert list(saved["norms"]) == ["l1", "l1"]
    k = [m["robust_accuracy"]["fab"][f"{e:g}"]["k"] for e in (1.0, 2.0, 4.0)]
    assert k[0] >= k[1] >= k[2] and k[0] > k[2]
    for i, e in enumerate((1.0, 2.0, 4.0)):  # read off the saved l1 norms
        assert k[i] == m["clean_accuracy"]["k"] - int((saved["fab"][0] <= e * (1 + 1e-5)).sum())
