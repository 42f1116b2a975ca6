"""Feature-space detector, feature collision and the detector-aware adaptive attack
(mlaudit.attacks.evasion.detector)."""

from __future__ import annotations

import functools

import pytest
import torch
from test_adaptive import digits_model

from mlaudit.attacks.evasion.detector import (
    FeatureDetector,
    choose_guides,
    evaluate_detector,
    feature_collision,
)
from mlaudit.data import load_dataset
from mlaudit.errors import ConfigError
from mlaudit.models import build_model
from mlaudit.query import features_batched, forward_batched
from mlaudit.train import train


@functools.lru_cache(maxsize=1)
def fitted() -> FeatureDetector:
    model, _, _ = digits_model()
    data = load_dataset({"name": "digits"})
    return FeatureDetector.fit(model, data.train.x[:1000], data.train.y[:1000], data.train.x[1000:],
                               method="mahalanobis", fpr=0.05)


def test_threshold_flags_about_fpr_of_held_out_clean_inputs() -> None:
    data = load_dataset({"name": "digits"})
    det = fitted()
    assert float(det.flags(data.train.x[1000:]).float().mean()) == pytest.approx(0.05, abs=0.02)
    knn = FeatureDetector.fit(det.model, data.train.x[:500], data.train.y[:500], data.train.x[1000:], method="knn",
                              k=5, fpr=0.1)
    assert float(knn.flags(data.train.x[1000:]).float().mean()) == pytest.approx(0.1, abs=0.03)


def test_bad_detector_options() -> None:
    model, x, y = digits_model()
    with pytest.raises(ConfigError, match="fpr"):
        FeatureDetector.fit(model, x, y, x, fpr=1.0)
    with pytest.raises(ConfigError, match="method"):
        FeatureDetector.fit(model, x, y, x, method="lof")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="k = "):
        FeatureDetector.fit(model, x, y, x, method="knn", k=10_000)


def test_detector_catches_pgd_and_the_adaptive_attack_walks_past_it() -> None:
    """Non-adaptive PGD is flagged almost always; the detector-aware attack (margin loss plus the
    detector's score) is misclassified without being flagged far more often."""
    model, x, y = digits_model()
    data = load_dataset({"name": "digits"})
    r = evaluate_detector(model, x, y, fitted(), pool_x=data.train.x[:1000], pool_y=data.train.y[:1000], eps=0.2,
                          steps=50)
    assert r["pgd"]["misclassified"] > 0.9 and r["pgd"]["undetected_success"] < 0.1
    assert r["detector-aware"]["undetected_success"] > r["pgd"]["undetected_success"] + 0.2
    assert 0.0 <= r["feature-collision"]["undetected_success"] <= r["feature-collision"]["misclassified"]
    assert torch.isfinite(torch.tensor(r["threshold"]))


def test_feature_collision_lands_on_its_guides_features_and_class() -> None:
    """Feature collision on the digits MLP (120 test examples, l-inf eps 0.2, 50 steps; guides: the nearest
    natural input of another class among 1000 training inputs): the outputs are classified as their guide's
    class and their penultimate features land next to the guide's, closer than most natural inputs of that
    class are. Measured (training seeds 0 / 1): 95.0% / 91.7% classified as the guide's class; feature distance
    to the guide 0.438 / 0.425 of the clean input's (median); closer to the guide than its 10th nearest
    same-class training input for 99.2% / 95.0% of examples (the clean inputs: 10.0% / 7.5%)."""
    data = load_dataset({"name": "digits"})
    torch.manual_seed(0)
    model = train(build_model("mlp", input_shape=data.input_shape, num_classes=10), data,
                  {"name": "fast", "epochs": 6}, seed=0).eval()
    x, y = data.test.x[:120], data.test.y[:120]
    pool_x, pool_y = data.train.x[:1000], data.train.y[:1000]
    x_adv = feature_collision(model, x, y, pool_x=pool_x, pool_y=pool_y, eps=0.2, steps=50)
    assert float((x_adv - x).abs().max()) <= 0.2 + 1e-6 and 0 <= float(x_adv.min()) and float(x_adv.max()) <= 1
    guide_f, guide_y = choose_guides(model, x, y, pool_x, pool_y)
    assert bool((guide_y != y).all())
    as_guide = float((forward_batched(model, x_adv).argmax(1) == guide_y).float().mean())
    assert as_guide > 0.75
    before = (features_batched(model, x) - guide_f).norm(dim=1)
    after = (features_batched(model, x_adv) - guide_f).norm(dim=1)
    assert float((after / before).median()) < 0.6
    # the guide's 10th nearest natural neighbour of its own class (column 0 is the guide itself, at distance 0)
    d = torch.cdist(guide_f, features_batched(model, pool_x))
    d[guide_y[:, None] != pool_y[None, :]] = float("inf")
    tenth = d.sort(1).values[:, 10]
    assert float((before < tenth).float().mean()) < 0.3
    assert float((after < tenth).float().mean()) > 0.8
