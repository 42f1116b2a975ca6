"""Feature-space detector, feature collision and the detector-aware adaptive attack
(mlaudit.attacks.evasion.detector)."""

from __future__ import annotations

import functools

import pytest
import torch
from test_adaptive import digits_model

from mlaudit.attacks.evasion.detector import FeatureDetector, evaluate_detector
from mlaudit.data import load_dataset
from mlaudit.errors import ConfigError


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
