"""Protective perturbations (mlaudit.attacks.protect): inside the budget, they move the attacked
extractor's features, Fawkes pulls toward the farthest identity, bad input is refused."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mlaudit.attacks.protect import FeatureMove, farthest_identity, protect
from mlaudit.data.registry import load_dataset
from mlaudit.errors import ConfigError
from mlaudit.models.registry import build_model
from mlaudit.query import features_batched, penultimate_features
from mlaudit.train.api import train


@functools.lru_cache(maxsize=1)
def setting():
    d = load_dataset({"name": "digits"})
    with torch.random.fork_rng(devices=[]):  # the same extractor whichever test builds it first on a worker
        torch.manual_seed(0)
        net = build_model({"name": "fastcnn", "width": 8}, input_shape=d.input_shape, num_classes=10)
    m = train(net, d, {"name": "fast", "epochs": 3}, seed=0)
    return d, m


@settings(max_examples=6, deadline=None)
@given(method=st.sampled_from(["fawkes", "lowkey"]), eps=st.sampled_from([4.0, 16.0, 64.0]), user=st.integers(0, 9))
def test_photos_stay_in_the_ball_and_the_box(method: str, eps: float, user: int) -> None:
    d, m = setting()
    x = d.train.x[d.train.y == user][:6]
    p = protect([m], x, method=method, eps=eps / 255, steps=5, user=user, guides_x=d.train.x[:200],
                guides_y=d.train.y[:200])
    assert p.x.shape == x.shape
    assert float((p.x - x).abs().max()) <= eps / 255 + 1e-6
    assert float(p.x.min()) >= 0 and float(p.x.max()) <= 1
    assert (p.target is None) == (method == "lowkey") and p.target != user


def test_both_attacks_move_the_features_more_than_random_signs_of_the_same_size() -> None:
    d, m = setting()
    x, eps = d.train.x[d.train.y == 3][:20], 16 / 255
    g = torch.Generator().manual_seed(0)
    noise = (x + eps * (torch.randint(0, 2, x.shape, generator=g) * 2 - 1)).clamp(0, 1)
    f0, fn = features_batched(m, x), features_batched(m, noise)
    random_shift = float(((fn - f0).norm(dim=1) / f0.norm(dim=1)).mean())
    for method in ("lowkey", "fawkes"):
        p = protect([m], x, method=method, eps=eps, steps=40, user=3, guides_x=d.train.x[:300],
                    guides_y=d.train.y[:300])
        assert float(p.feature_shift.mean()) > 2 * random_shift, method
    # Fawkes pulls the features toward its target identity: the attacked classifier now says "target" more
    p = protect([m], x, method="fawkes", eps=64 / 255, steps=60, user=3, guides_x=d.train.x[:300],
                guides_y=d.train.y[:300])
    pred = m(p.x).argmax(1)
    assert float((pred == p.target).float().mean()) > float((m(x).argmax(1) == p.target).float().mean())


def test_farthest_identity_is_the_centroid_farthest_from_the_user() -> None:
    user = torch.zeros(4, 2)
    other = torch.tensor([[1.0, 0], [1.0, 0], [0, 5.0], [0, 3.0], [-2.0, 0]])
    y = torch.tensor([7, 7, 8, 8, 9])
    assert farthest_identity(user, other, y) == 8  # centroid (0, 4): distance 4 > 2 > 1


def test_feature_move_sign_and_normalisation() -> None:
    phi = lambda x: x  # noqa: E731
    anchors = torch.tensor([[2.0, 0.0]])
    pull, push = FeatureMove([phi], [anchors], sign=1.0), FeatureMove([phi], [anchors], sign=-1.0)
    x, idx = torch.tensor([[0.0, 1.0]]), torch.tensor([0])
    assert float(pull(x, idx)) == pytest.approx(5 / 4)  # ||(0,1) - (2,0)||^2 / ||(2,0)||^2
    assert float(push(x, idx)) == pytest.approx(-5 / 4)
    assert penultimate_features  # the extractors of protect are the penultimate features of classifiers


def test_bad_input_is_refused() -> None:
    d, m = setting()
    x = d.train.x[:4]
    with pytest.raises(ConfigError, match="method"):
        protect([m], x, method="glaze")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="eps"):
        protect([m], x, eps=2.0)
    with pytest.raises(ConfigError, match="fawkes needs guides"):
        protect([m], x, method="fawkes")
    with pytest.raises(ConfigError, match=r"photos \[P, C, H, W\]"):
        protect([m], x.flatten(1))
    with pytest.raises(ConfigError, match="outside the box"):
        protect([m], x + 2)
    with pytest.raises(ConfigError, match="at least one extractor"):
        protect([], x)
