"""BASE (Lassila et al. 2025): the score against a direct loop over its formula, online and offline, with
and without a reference cap; all-targets equal to single calls; ranking tied to RMIA's likelihood ratio
(online, T = 1: a monotone transform of Pr(x | theta) / Pr(x)); bad options refused with the field.

CPU only, tiny tensors.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_membership_attacks import make_obs  # same folder (rootdir-relative import)

from mlaudit.attacks.membership import ATTACKS, Observations, reference_weights, score_all_targets
from mlaudit.errors import ConfigError


def base_direct(obs: Observations, target: int, *, online: bool, temperature: float, a: float,
                references: int | None = None) -> np.ndarray:
    """s_t(x) - (a) log mean_r exp s_r(x) with s = log softmax(z / T)_y averaged over queries, by loops."""
    z = obs.logits.double().numpy() / temperature
    y = obs.labels.numpy()
    m, n, q, _ = z.shape
    s = np.zeros((m, n))
    for i in range(m):
        for j in range(n):
            s[i, j] = np.mean([z[i, j, k, y[j]] - math.log(np.exp(z[i, j, k]).sum()) for k in range(q)])
    refs, w_in, w_out = reference_weights(obs.keep.bool(), target, references=references, online=online, seed=0,
                                          attack="test")
    w = (w_in | w_out) if online else w_out
    out = np.zeros(n)
    for j in range(n):
        vals = [s[int(r), j] for r, use in zip(refs, w[:, j]) if use]
        thr = math.log(np.mean(np.exp(vals)))
        out[j] = s[target, j] - (thr if online else a * thr)
    return out


@pytest.mark.parametrize("references", [None, 2])
@pytest.mark.parametrize("online,temperature,a", [(True, 2.0, 1.0), (True, 1.0, 1.0), (False, 2.0, 0.33),
                                                  (False, 0.5, 1.0), (False, 3.0, 0.0)])
def test_base_equals_its_formula(online: bool, temperature: float, a: float, references: int | None) -> None:
    obs = make_obs(m=7, n=10, a=2, c=3, seed=21, signal=0.6)
    name = "base-online" if online else "base-offline"
    opts = {"temperature": temperature, "references": references} | ({} if online else {"a": a})
    for target in (0, 4, 6):
        got = ATTACKS.get(name)(obs, target, **opts).numpy()
        np.testing.assert_allclose(got, base_direct(obs, target, online=online, temperature=temperature, a=a,
                                                    references=references), rtol=1e-10, atol=1e-10)
    all_t = score_all_targets(name, obs, **opts)
    assert torch.equal(all_t[4], ATTACKS.get(name)(obs, 4, **opts))


def test_online_base_at_temperature_one_ranks_like_rmias_likelihood_ratio() -> None:
    """T = 1: score = log Pr(x|t) - log mean_r Pr(x|r) = log of RMIA-online's ratio Pr(x|theta) / Pr(x) (one
    query, so the mean over queries of the log equals the log of the mean)."""
    obs = make_obs(m=6, n=15, a=1, c=4, seed=22, signal=0.8)
    p = torch.softmax(obs.logits.double()[:, :, 0], -1).gather(-1, obs.labels.view(1, -1, 1).expand(6, -1, 1))[..., 0]
    got = ATTACKS.get("base-online")(obs, 2, temperature=1.0)
    ratio = p[2] / p[[0, 1, 3, 4, 5]].mean(0)
    torch.testing.assert_close(got, ratio.log(), rtol=1e-10, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), online=st.booleans())
def test_base_scores_follow_a_permutation_of_the_examples(seed: int, online: bool) -> None:
    obs = make_obs(m=6, n=12, seed=seed % 50)
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(12))
    shuffled = dataclasses.replace(obs, logits=obs.logits[:, perm], labels=obs.labels[perm], keep=obs.keep[:, perm])
    name = "base-online" if online else "base-offline"
    torch.testing.assert_close(score_all_targets(name, shuffled), score_all_targets(name, obs)[:, perm])


def test_members_score_higher_on_a_leaky_pool() -> None:
    obs = make_obs(m=16, n=60, seed=23, signal=1.5)
    for name in ("base-online", "base-offline"):
        s = score_all_targets(name, obs)
        keep = obs.keep.bool()
        assert float(s[keep].mean()) > float(s[~keep].mean())


def test_bad_options_are_refused() -> None:
    obs = make_obs(m=6, n=20, seed=24)
    with pytest.raises(ConfigError, match="temperature must be a positive finite number"):
        ATTACKS.get("base-online")(obs, 0, temperature=0.0)
    with pytest.raises(ConfigError, match=r"option a must lie in \[0, 1\]"):
        ATTACKS.get("base-offline")(obs, 0, a=1.5)
    with pytest.raises(ConfigError, match=r"references=4 needs 0 IN and 4 OUT reference models"):
        ATTACKS.get("base-offline")(obs, 0, references=4)
    lone = Observations(obs.logits[:1], obs.labels, obs.keep[:1], obs.queries)
    with pytest.raises(ConfigError, match="at least 1 reference model"):
        ATTACKS.get("base-online")(lone, 0)
    assert ATTACKS.get("base-offline").required(references=3) == (0, 3)
    assert ATTACKS.get("base-online").required() == (0, 0)
