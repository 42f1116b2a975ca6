"""Indiscriminate attacks (mlaudit.attacks.poisoning.indiscriminate, seed 001): tau matches a direct computation
and its multiclass constant is the true infimum; GradPC stays within eps_w and raises the training
loss; gradient canceling's chunked gradient is exact, it drives the residual down and never below the
tau lower bound; label flips behave; bad inputs are refused."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from mlaudit.attacks.poisoning import POISONERS
from mlaudit.attacks.poisoning.indiscriminate import (
    SEED_CONSTANT,
    GradientCanceling,
    flipped_losses,
    gradient_canceling,
    gradpc,
    label_flip,
    logits_linear_in_params,
    loss_bound,
    reachability_threshold,
    tau_from,
)
from mlaudit.attacks.poisoning.indiscriminate._functional import mean_loss, num_poisons
from mlaudit.errors import ConfigError, UnsupportedModelError
from mlaudit.models import build_model
from mlaudit.query import ParamVector

K = 4


def problem(n: int = 120, d: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable-ish K-class data in the pixel box: x [n, 1, 3, 4] in [0, 1], y [n]."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    centers = torch.rand(K, d, generator=g)
    x = (centers[y] + 0.25 * torch.randn(n, d, generator=g)).clamp(0, 1)
    return x.view(n, 1, 3, 4), y


def logistic(seed: int = 0, train_on: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = build_model("logistic", input_shape=(1, 3, 4), num_classes=K)
    if train_on is not None:  # a few full-batch steps: a reasonable clean model w_c
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        for _ in range(100):
            opt.zero_grad()
            F.cross_entropy(m(train_on[0]), train_on[1]).backward()
            opt.step()
    return m.eval()


def mlp(norm: str = "none") -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model({"name": "mlp", "width": 8, "norm": norm}, input_shape=(1, 3, 4), num_classes=K).eval()


# ---------------------------------------------------------------- threshold tau
def test_registry_lists_the_three_methods() -> None:
    assert POISONERS.names("indiscriminate") == ["gradient-canceling", "label-flip", "param-corruption"]
    assert POISONERS.get("param-corruption").acts_on == "model"
    with pytest.raises(ConfigError, match="valid methods: gradient-canceling, label-flip, param-corruption"):
        POISONERS.get("nope", family="indiscriminate")
    with pytest.raises(ConfigError, match="families"):  # label-flip is a targeted and an indiscriminate method
        POISONERS.get("label-flip")


def test_constant_is_seed_value_for_two_classes_and_the_infimum_for_k() -> None:
    assert loss_bound(2) == pytest.approx(SEED_CONSTANT) and SEED_CONSTANT == pytest.approx(0.2785, abs=1e-4)
    for k in (3, 10):
        # inf over logits u (u_y = 0) of sum_k softmax(u)_k u_k, by numerical minimisation from several starts
        def h(v: torch.Tensor) -> float:
            u = torch.cat([torch.zeros(1), torch.as_tensor(v, dtype=torch.float64)])
            return float((torch.softmax(u, 0) * u).sum())

        best = min(minimize(h, x0, method="Nelder-Mead", options={"xatol": 1e-9, "fatol": 1e-12, "maxiter": 20000}).fun
                   for x0 in ([-1.0] * (k - 1), [0.5] * (k - 1), list(torch.linspace(-2, 1, k - 1).tolist())))
        assert best == pytest.approx(-loss_bound(k), abs=1e-4)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-30, 30), min_size=2, max_size=10), st.integers(0, 9))
def test_radial_derivative_never_below_minus_constant(logits: list[float], y: int) -> None:
    s = torch.tensor(logits, dtype=torch.float64)
    y = y % len(logits)
    value = float((torch.softmax(s, 0) * (s - s[y])).sum())  # <w, grad_w CE> for logits linear in w
    assert value >= -loss_bound(len(logits)) - 1e-9


@pytest.mark.parametrize("eps_w", [None, 2.0], ids=["clean", "gradpc-target"])
def test_tau_matches_direct_computation_for_logistic_regression(eps_w: float | None) -> None:
    x, y = problem()
    m = logistic(train_on=(x, y))
    if eps_w is not None:
        m = gradpc(m, x, y, eps_w=eps_w, steps=20).model
    w = torch.cat([m.net[1].weight.detach().flatten(), m.net[1].bias.detach()])
    with torch.no_grad():
        s = m(x).double()
        p = torch.softmax(s, 1)
        inner = float((p * (s - s.gather(1, y[:, None]))).sum(1).mean())  # <w, g(mu)> in closed form
    assert (inner > 0) == (eps_w is not None)  # clean model: <w, g> < 0 (tau 0); GradPC target: tau > 0
    for wd in (0.0, 1e-3):
        th = reachability_threshold(m, x, y, num_classes=K, weight_decay=wd)
        sq = float((w.double() ** 2).sum())
        assert th.inner == pytest.approx(inner, rel=1e-4, abs=1e-6)
        assert th.sq_norm == pytest.approx(sq, rel=1e-5)
        c = loss_bound(K)
        a = inner + wd * sq
        want = 0.0 if a <= 0 else a / (c - wd * sq)
        assert th.tau == pytest.approx(want, rel=1e-4, abs=1e-6)
        assert th.exact and th.tau_seed == pytest.approx(max(inner / SEED_CONSTANT, 0.0), rel=1e-4, abs=1e-6)
        assert th.reachable(th.tau)
        if eps_w is not None:
            assert th.tau > 0 and not th.reachable(0.99 * th.tau)


def test_tau_cases_and_linearity_check() -> None:
    assert tau_from(-0.1, 4.0, constant=0.5) == 0.0
    assert tau_from(0.2, 4.0, constant=0.5) == pytest.approx(0.4)
    assert tau_from(0.2, 4.0, constant=0.5, weight_decay=0.2) == math.inf  # decay alone exceeds the bound
    x, _ = problem(8)
    assert logits_linear_in_params(logistic(), x)
    assert not logits_linear_in_params(mlp(), x)
    with pytest.raises(ConfigError):
        loss_bound(1)


# ---------------------------------------------------------------- GradPC
@pytest.mark.parametrize("make", [lambda: logistic(train_on=problem()), mlp], ids=["logistic", "mlp"])
@pytest.mark.parametrize("eps_w", [0.05, 0.5])
def test_gradpc_stays_within_eps_w_and_increases_training_loss(make, eps_w: float) -> None:
    x, y = problem()
    m = make()
    before = {k: v.clone() for k, v in ParamVector.from_module(m).items()}
    res = gradpc(m, x, y, eps_w=eps_w, steps=20, lr=0.2)
    w_t = ParamVector.from_module(res.model)
    dist = float(torch.sqrt(sum(((w_t[k] - before[k]) ** 2).sum() for k in before)))
    assert dist == pytest.approx(res.distance, rel=1e-5) and dist <= eps_w * (1 + 1e-5)
    assert res.loss_corrupted > res.loss_clean
    assert res.loss_corrupted == pytest.approx(mean_loss(res.model, w_t, x, y), rel=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in ParamVector.from_module(m).items())  # the clean model is untouched


def test_one_gradpc_step_is_the_first_order_corruption() -> None:
    x, y = problem()
    m = logistic(train_on=(x, y))
    res = gradpc(m, x, y, eps_w=0.3, steps=1, lr=1.0)
    m.zero_grad()
    F.cross_entropy(m(x), y).backward()
    g = {n: p.grad for n, p in m.named_parameters()}
    gn = math.sqrt(sum(float((v ** 2).sum()) for v in g.values()))
    for n, p in res.model.named_parameters():
        assert torch.allclose(p, dict(m.named_parameters())[n] + 0.3 * g[n] / gn, atol=1e-6)


# ---------------------------------------------------------------- gradient canceling
def test_chunked_objective_and_gradient_equal_the_direct_formula() -> None:
    x, y = problem()
    m = mlp()
    xp, yp = x[:7].clone(), (y[:7] + 1) % K
    obj = GradientCanceling(m, x, y, labels=yp, weight_decay=1e-2, label_smoothing=0.1, chunk_size=3)
    w = {k: v.requires_grad_(True) for k, v in ParamVector.from_module(m).items()}
    xr = xp.clone().requires_grad_(True)

    def mean_grad(xx: torch.Tensor, yy: torch.Tensor) -> list[torch.Tensor]:
        out = torch.func.functional_call(m, w, (xx,))
        return torch.autograd.grad(F.cross_entropy(out, yy, label_smoothing=0.1), list(w.values()), create_graph=True)

    eps = 7 / x.shape[0]
    r = [gm + 1e-2 * wv + eps * (gp + 1e-2 * wv)
         for gm, gp, wv in zip(mean_grad(x, y), mean_grad(xr, yp), w.values())]
    direct = 0.5 * sum((t ** 2).sum() for t in r)
    (gx,) = torch.autograd.grad(direct, xr)
    xa = xp.clone().requires_grad_(True)
    val = obj(xa, torch.arange(7))
    val.backward()
    assert val.item() == pytest.approx(float(direct), rel=1e-5)
    assert torch.allclose(xa.grad, gx, atol=1e-6, rtol=1e-4)
    with pytest.raises(ConfigError, match="batch_size=None"):
        obj(xp[:3], torch.arange(3))


def test_label_scores_are_the_first_order_objective_change() -> None:
    x, y = problem()
    m = mlp()
    obj = GradientCanceling(m, x, y, labels=y[:5].clone())
    r = obj.residual(x[:5])
    scores = obj.label_scores(x[:5], r)  # [P, K]
    w = {k: v.requires_grad_(True) for k, v in ParamVector.from_module(m).items()}
    for c in range(K):
        out = torch.func.functional_call(m, w, (x[:1],))
        g = torch.autograd.grad(F.cross_entropy(out, torch.tensor([c])), list(w.values()))
        lhs = float(sum((r[k] * gi).sum() for k, gi in zip(w, g)))  # <R, grad l(x_0, c)>
        p = torch.softmax(out.detach()[0], 0)
        assert lhs == pytest.approx(float((p * scores[0]).sum() - scores[0, c]), rel=1e-4, abs=1e-6)


def test_canceling_drives_the_target_gradient_down_and_respects_tau() -> None:
    x, y = problem()
    target = gradpc(logistic(train_on=(x, y)), x, y, eps_w=2.0, steps=20).model
    wd = 1e-3
    th = reachability_threshold(target, x, y, num_classes=K, weight_decay=wd)
    assert 0.05 < th.tau < 1.0  # eps_d = 0.05 cannot reach this target, eps_d = 1 may
    w = ParamVector.from_module(target)
    for eps_d in (0.05, 1.0):
        res = gradient_canceling(target, x, y, eps_d=eps_d, steps=150, lr=0.05, weight_decay=wd)
        assert res.x.shape == (num_poisons(eps_d, len(y)), 1, 3, 4) and res.y.shape == (res.x.shape[0],)
        assert float(res.x.min()) >= 0 and float(res.x.max()) <= 1
        assert res.objective < res.objective_init and res.history[-1] <= res.history[0]
        obj = GradientCanceling(target, x, y, labels=res.y, weight_decay=wd)
        assert obj.value(res.x) == pytest.approx(res.objective, rel=1e-4)
        # theory (seed 001): <w, R> >= a - eps (c - b), so ||R|| >= (a - eps (c - b)) / ||w|| when eps < tau
        e = res.y.numel() / len(y)
        bound = (th.inner + wd * th.sq_norm - e * (th.constant - wd * th.sq_norm)) / math.sqrt(th.sq_norm)
        assert (bound > 0) == (e < th.tau)
        assert res.residual_norm >= bound - 1e-6
        assert float(w.dot(obj.residual(res.x))) >= bound * math.sqrt(th.sq_norm) - 1e-5
    assert res.relative < 0.1  # eps_d = 1: the target becomes (nearly) stationary


def test_gradient_methods_refuse_batchnorm_and_bad_budgets() -> None:
    x, y = problem()
    with pytest.raises(UnsupportedModelError, match="BatchNorm"):
        gradpc(mlp("batch"), x, y, eps_w=0.1)
    with pytest.raises(UnsupportedModelError, match="BatchNorm"):
        GradientCanceling(mlp("batch"), x, y, labels=y[:3])
    with pytest.raises(ConfigError, match="eps_w"):
        gradpc(mlp(), x, y, eps_w=0.0)
    for bad in (0.0, -0.1, math.nan, 1e-4):
        with pytest.raises(ConfigError, match="eps_d"):
            gradient_canceling(mlp(), x, y, eps_d=bad, steps=1)
        with pytest.raises(ConfigError, match="eps_d"):
            label_flip(x, y, eps_d=bad, num_classes=K)


# ---------------------------------------------------------------- label flip
def test_random_flip_inserts_wrong_labels_deterministically() -> None:
    x, y = problem()
    a = label_flip(x, y, eps_d=0.25, num_classes=K, generator=torch.Generator().manual_seed(3))
    b = label_flip(x, y, eps_d=0.25, num_classes=K, generator=torch.Generator().manual_seed(3))
    assert a.y.numel() == 30 and torch.equal(a.y, b.y) and torch.equal(a.rows, b.rows)
    assert a.rows.unique().numel() == 30 and bool((a.y != y[a.rows]).all())
    assert torch.equal(a.x, x[a.rows])
    big = label_flip(x, y, eps_d=2.0, num_classes=K)  # more poisons than points: every row twice
    assert torch.equal(torch.bincount(big.rows, minlength=len(y)), torch.full((len(y),), 2))
    many = label_flip(x, y, eps_d=50.0, num_classes=K)  # the wrong labels are spread over all K - 1 classes
    shift = (many.y - y[many.rows]) % K
    assert set(shift.tolist()) == {1, 2, 3} and torch.bincount(shift)[1:].min() > 0.25 * len(shift)


def test_loss_max_flip_picks_least_likely_labels_of_the_most_confident_points() -> None:
    x, y = problem()
    m = logistic(train_on=(x, y))
    res = label_flip(x, y, eps_d=0.1, num_classes=K, strategy="loss-max", models=[m])
    losses = flipped_losses([m], x)
    losses[torch.arange(len(y)), y] = -math.inf
    best, cls = losses.max(1)
    assert torch.equal(res.y, cls[res.rows]) and bool((res.y != y[res.rows]).all())
    assert float(best[res.rows].min()) >= float(best.sort(descending=True).values[res.y.numel() - 1]) - 1e-6
    rnd = label_flip(x, y, eps_d=0.1, num_classes=K, models=[m])
    assert res.loss > rnd.loss
    with pytest.raises(ConfigError, match="attacker model"):
        label_flip(x, y, eps_d=0.1, num_classes=K, strategy="loss-max")
