"""RMIA (Zarifzadeh et al. 2024), LiRA's global variance, reference caps and the label-only attacks
(Choquette-Choo et al. 2021): each against a direct, loop-based computation from its formula, the
label-only ones shown to depend on labels alone, and the errors for too few reference models.

CPU only, tiny tensors (well under a few seconds).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm
from test_membership_attacks import make_obs  # same folder (rootdir-relative import)
from torch import nn

from mlaudit.attacks.membership import (
    ATTACKS,
    LabelOracle,
    Observations,
    reference_weights,
    score_all_targets,
)
from mlaudit.errors import ConfigError


def _true_prob(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Pr(x | theta) [M, N]: softmax probability of the label, mean over queries, by loops."""
    z = logits.double().numpy()
    m, n, a, _ = z.shape
    out = np.zeros((m, n))
    for i in range(m):
        for j in range(n):
            out[i, j] = np.mean([np.exp(z[i, j, q, labels[j]]) / np.exp(z[i, j, q]).sum() for q in range(a)])
    return out


def rmia_direct(obs: Observations, target: int, *, online: bool, gamma: float, a: float,
                pool_out: bool = False) -> np.ndarray:
    """The paper's score written out: Pr_z[(Pr(x|t)/Pr(x)) / (Pr(z|t)/Pr(z)) >= gamma]."""
    p, keep = _true_prob(obs.logits, obs.labels), obs.keep.numpy()
    m, n = keep.shape

    def marginal(col: np.ndarray, kcol: np.ndarray, refs: list[int]) -> float:
        if online:
            return float(np.mean([col[j] for j in refs]))
        p_out = np.mean([col[j] for j in refs if not kcol[j]])
        return 0.5 * ((1 + a) * p_out + (1 - a))

    others = [j for j in range(m) if j != target]
    if pool_out:
        zs = [(p[:, j], keep[:, j]) for j in range(n) if not keep[target, j]]
    else:
        pz = _true_prob(obs.population_logits, obs.population_labels)
        zs = [(pz[:, j], np.zeros(m, dtype=bool)) for j in range(pz.shape[1])]
    rz = [col[target] / marginal(col, kcol, others) for col, kcol in zs]
    out = np.zeros(n)
    for j in range(n):
        rx = p[target, j] / marginal(p[:, j], keep[:, j], others)
        out[j] = np.mean([rx / r >= gamma for r in rz])
    return out


@pytest.mark.parametrize("pool_out", [False, True])
@pytest.mark.parametrize("online,gamma,a", [(True, 1.0, 1.0), (True, 2.0, 1.0), (False, 2.0, 0.3), (False, 1.5, 0.0)])
def test_rmia_equals_its_formula(online: bool, gamma: float, a: float, pool_out: bool) -> None:
    obs = make_obs(m=6, n=16, a=2, c=3, seed=11, signal=0.8)
    name = "rmia-online" if online else "rmia-offline"
    opts = {"gamma": gamma, "population": "pool-out" if pool_out else "external"} | ({} if online else {"a": a})
    for target in (0, 5):
        got = ATTACKS.get(name)(obs, target, **opts).numpy()
        np.testing.assert_array_equal(got, rmia_direct(obs, target, online=online, gamma=gamma, a=a,
                                                       pool_out=pool_out))


def test_rmia_offline_with_one_reference_uses_the_first_out_model() -> None:
    obs = make_obs(m=8, n=20, seed=12)
    refs, _, w_out = reference_weights(obs.keep, 3, references=1, online=False, seed=0, attack="t")
    assert (w_out.sum(0) == 1).all() and 3 not in refs.tolist()
    chosen = [[int(refs[w_out[:, j]][0])] for j in range(20)]
    got = ATTACKS.get("rmia-offline")(obs, 3, references=1, population="external", a=0.5, gamma=2.0).numpy()
    # x: its first OUT model in the seeded order; z (OUT for every model): the first model in that order
    p = _true_prob(obs.population_logits, obs.population_labels)
    px = _true_prob(obs.logits, obs.labels)
    first = int(refs[0])
    rz = p[3] / (0.5 * (1.5 * p[first] + 0.5))
    rx = np.array([px[3, j] / (0.5 * (1.5 * px[chosen[j][0], j] + 0.5)) for j in range(20)])
    np.testing.assert_array_equal(got, [(rx[j] / rz >= 2.0).mean() for j in range(20)])


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), online=st.booleans(), refs=st.sampled_from([None, 1, 2]))
def test_rmia_scores_follow_a_permutation_of_the_examples(seed: int, online: bool, refs: int | None) -> None:
    obs = make_obs(m=6, n=12, seed=seed % 50)
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(12))
    shuffled = dataclasses.replace(obs, logits=obs.logits[:, perm], labels=obs.labels[perm], keep=obs.keep[:, perm])
    name = "rmia-online" if online else "rmia-offline"
    base = score_all_targets(name, obs, references=refs)
    assert torch.equal(score_all_targets(name, shuffled, references=refs), base[:, perm])
    assert ((base >= 0) & (base <= 1)).all()


def lira_global_direct(obs: Observations, target: int, *, online: bool, eps: float = 1e-6) -> np.ndarray:
    """LiRA with one variance per side: np.var over all IN (OUT) phi of all shadows, examples, queries."""
    z = obs.logits.double().numpy()
    y = obs.labels.numpy()
    m, n, a, c = z.shape
    phi = np.zeros((m, n, a))
    for i in range(m):
        for j in range(n):
            for q in range(a):
                py = np.exp(z[i, j, q, y[j]]) / np.exp(z[i, j, q]).sum()
                phi[i, j, q] = np.log(py) - np.log(1 - py)
    keep = obs.keep.numpy()
    shadows = [i for i in range(m) if i != target]
    side_values = {s: [phi[i, j, q] for i in shadows for j in range(n) for q in range(a) if keep[i, j] == s]
                   for s in (True, False)}
    var = {s: np.var(v) + eps for s, v in side_values.items()}
    out = np.zeros(n)
    for j in range(n):
        for q in range(a):
            x = phi[target, j, q]
            mu = {s: np.mean([phi[i, j, q] for i in shadows if keep[i, j] == s]) for s in (True, False)}
            sd = {s: np.sqrt(var[s]) for s in (True, False)}
            if online:
                out[j] += norm.logpdf(x, mu[True], sd[True]) - norm.logpdf(x, mu[False], sd[False])
            else:
                out[j] += norm.logcdf((x - mu[False]) / sd[False])
    return out


@pytest.mark.parametrize("name", ["lira-online", "lira-offline"])
def test_lira_global_variance_matches_direct_computation(name: str) -> None:
    obs = make_obs(m=7, n=10, a=2, c=3, seed=13, signal=0.6)
    for target in (0, 6):
        got = ATTACKS.get(name)(obs, target, variance="global").numpy()
        np.testing.assert_allclose(got, lira_global_direct(obs, target, online=name == "lira-online"),
                                   rtol=1e-7, atol=1e-7)
    fixed = ATTACKS.get(name)(obs, 0, variance="fixed")
    assert not torch.allclose(fixed, ATTACKS.get(name)(obs, 0, variance="global"))


def test_too_few_reference_models_are_refused_with_the_numbers() -> None:
    obs = make_obs(m=6, n=20, seed=14)  # each example IN for 3 models: 2 or 3 OUT among the 5 others
    with pytest.raises(ConfigError, match=r"references=4 needs 0 IN and 4 OUT reference models"):
        ATTACKS.get("rmia-offline")(obs, 0, references=4)
    with pytest.raises(ConfigError, match=r"references >= 4; got references=2"):
        ATTACKS.get("lira-online")(obs, 0, references=2)  # per-example variance: 2 IN and 2 OUT
    with pytest.raises(ConfigError, match="references must be a positive integer"):
        ATTACKS.get("rmia-online")(obs, 0, references=0)
    bare = Observations(obs.logits, obs.labels, obs.keep, obs.queries)
    with pytest.raises(ConfigError, match="population='external' needs population logits"):
        ATTACKS.get("rmia-online")(bare, 0, population="external")
    with pytest.raises(ConfigError, match="gamma"):
        ATTACKS.get("rmia-online")(obs, 0, gamma=0.0)
    assert ATTACKS.get("rmia-offline").required(references=4) == (0, 4)
    assert ATTACKS.get("lira-online").required(variance="global", references=4) == (2, 2)


# ---------------------------------------------------------------- label-only

class Scaled(nn.Module):
    """Logits of ``inner`` under a map that keeps every argmax: positive scale, per-row shift."""

    def __init__(self, inner: nn.Module, scale: float) -> None:
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.inner(x)
        return z * self.scale + 7.0 * z.max(-1, keepdim=True).values.tanh()  # argmax kept, values changed


def _pool(m: int = 4, n: int = 24, seed: int = 0) -> tuple[list[nn.Module], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 6, 6, generator=g)
    models = []
    for i in range(m):
        torch.manual_seed(seed * 100 + i)
        models.append(nn.Sequential(nn.Flatten(), nn.Linear(36, 3)))
    y = torch.randint(0, 3, (n,), generator=g)
    return models, x, y


@pytest.mark.parametrize("name,opts", [("label-augment", {}), ("label-boundary", {"draws": 2, "steps": 6})])
def test_label_only_attacks_see_labels_only(name: str, opts: dict) -> None:
    models, x, y = _pool()
    keep = torch.rand(4, 24, generator=torch.Generator().manual_seed(1)) < 0.5
    oracle = LabelOracle.from_modules(models, x)
    plain = Observations(torch.zeros(4, 24, 1, 3), y, keep, oracle=oracle)
    scores = score_all_targets(name, plain, **opts)
    assert oracle.queries > 0 and scores.shape == (4, 24) and torch.isfinite(scores).all()
    # other logits with the same argmax, and NaN pool logits: bit-identical scores
    other = LabelOracle.from_modules([Scaled(mdl, 3.5) for mdl in models], x)
    nan_obs = Observations(torch.full((4, 24, 1, 3), float("nan")), y, ~keep, oracle=other)
    assert torch.equal(score_all_targets(name, nan_obs, **opts), scores)
    assert torch.equal(ATTACKS.get(name)(plain, 2, **opts), scores[2])
    # what the oracle returns is a label per (model, input), nothing else
    answer = oracle(x)
    assert answer.dtype == torch.int64 and answer.shape == (4, 24)


def test_label_augment_is_the_fraction_of_correct_augmented_labels() -> None:
    models, x, y = _pool(m=3, n=10, seed=2)
    obs = Observations(torch.zeros(3, 10, 1, 3), y, torch.zeros(3, 10, dtype=torch.bool),
                       oracle=LabelOracle.from_modules(models, x))
    got = ATTACKS.get("label-augment")(obs, 1, queries=("identity", "flip"))
    with torch.no_grad():
        direct = ((models[1](x).argmax(-1) == y).double() + (models[1](x.flip(-1)).argmax(-1) == y).double()) / 2
    assert torch.equal(got, direct)


def test_label_boundary_is_zero_when_misclassified_and_bounded() -> None:
    models, x, y = _pool(m=2, n=16, seed=3)
    obs = Observations(torch.zeros(2, 16, 1, 3), y, torch.zeros(2, 16, dtype=torch.bool),
                       oracle=LabelOracle.from_modules(models, x))
    s = score_all_targets("label-boundary", obs, draws=2, steps=5, max_scale=4.0)
    with torch.no_grad():
        wrong = torch.stack([mdl(x).argmax(-1) != y for mdl in models])
    assert (s[wrong] == 0).all() and (s[~wrong] > 0).all() and (s <= 4.0).all()


def test_label_boundary_scores_do_not_depend_on_the_chunk() -> None:
    """The directions are drawn once per draw over all examples, so examples per oracle call (``chunk``, by default
    as many as fit 512 MiB) change the cost only."""
    models, x, y = _pool(m=3, n=23, seed=4)
    oracle = LabelOracle.from_modules(models, x)
    assert oracle.device == x.device  # where the attack builds its queries: the models' device
    obs = Observations(torch.zeros(3, 23, 1, 3), y, torch.zeros(3, 23, dtype=torch.bool), oracle=oracle)
    whole = score_all_targets("label-boundary", obs, draws=3, steps=6)
    calls = oracle.queries
    assert torch.equal(score_all_targets("label-boundary", obs, draws=3, steps=6, chunk=5), whole)
    assert oracle.queries == 2 * calls  # the same labels asked, in more calls
    with pytest.raises(ConfigError, match="chunk must be a positive integer"):
        score_all_targets("label-boundary", obs, chunk=0)


def test_label_only_attacks_need_an_oracle() -> None:
    obs = make_obs(m=3, n=5)
    with pytest.raises(ConfigError, match="label-only attack that queries the models itself"):
        ATTACKS.get("label-boundary")(obs, 0)
