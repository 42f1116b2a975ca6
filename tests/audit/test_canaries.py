"""DP-audit canaries: the mislabeled example, the crafted (ClipBKD-style) input canary and the
white-box Dirac gradient canary."""

from __future__ import annotations

import functools

import pytest
import torch

from mlaudit.audit.canaries import (
    CANARIES,
    blank_canary,
    crafted_canary,
    gradient_canary,
    mislabeled_canary,
    second_moment_quotient,
    with_canary,
)
from mlaudit.data import load_dataset
from mlaudit.errors import ConfigError
from mlaudit.models.registry import build_model


@functools.lru_cache(maxsize=1)
def digits():
    return load_dataset("digits")


def logistic_fn():
    return functools.partial(build_model, "logistic", input_shape=(1, 8, 8), num_classes=10)


def test_mislabeled_canary() -> None:
    train = digits().train
    a, b = mislabeled_canary(train, seed=3), mislabeled_canary(train, seed=3)
    assert (a.source_index, a.y) == (b.source_index, b.y)
    assert a.y != a.source_label == int(train.y[a.source_index])
    assert a.x.shape == (1, *train.shape) and bool((a.x == train.x[a.source_index]).all())
    c = mislabeled_canary(train, seed=4)
    assert (c.source_index, c.y) != (a.source_index, a.y)


def test_gradient_canary_picks_a_coordinate_the_data_never_moves() -> None:
    """Pixels 0, 32 and 39 are 0 in every digits training image: the weights on them get no data
    gradient, and the canary's coordinate is one of those 30 (seeded choice among the ties)."""
    b = digits()
    assert (b.train.x.flatten(1)[:, [0, 32, 39]] == 0).all()
    picks = set()
    for seed in range(4):
        c = gradient_canary(b.train, seed=seed, model_fn=logistic_fn())
        assert c.gradient is not None and not c.has_input
        assert c.gradient.index == len(b.train) and c.gradient.parameter == "net.1.weight"
        assert c.gradient.coordinate % 64 in (0, 32, 39)
        assert c.details["gradient_energy"] == 0.0 and c.details["tied_coordinates"] == 30
        picks.add(c.gradient.coordinate)
    assert len(picks) > 1
    with pytest.raises(ConfigError, match="needs trainer: mlaudit"):
        gradient_canary(b.train, seed=0)
    with pytest.raises(ConfigError, match="no input"):
        with_canary(b.train, c)


def test_crafted_canary_lies_where_the_data_has_no_energy() -> None:
    """ClipBKD-style: the crafted input's second-moment quotient is < 3% of a training image's; it is a
    valid image with its brightest pixel at 1; the same seed gives the same canary."""
    b = digits()
    c = crafted_canary(b.train, seed=0)
    assert c.x.shape == (1, 1, 8, 8) and float(c.x.min()) >= 0.0 and float(c.x.max()) == 1.0
    q = float(second_moment_quotient(c.x, b.train.x))
    images = float(second_moment_quotient(b.train.x[:200], b.train.x).mean())
    assert q < 0.03 * images and c.details["quotient"] == pytest.approx(q, rel=1e-3)
    assert c.source_index == -1 and 0 <= c.y < 10 and c.has_input
    again = crafted_canary(b.train, seed=0)
    assert torch.equal(c.x, again.x) and c.y == again.y
    assert CANARIES.get("crafted") is crafted_canary


def test_blank_canary_is_zero_with_the_initial_models_least_likely_class() -> None:
    """Annamalai & De Cristofaro's blank target: the all-zero input, labelled with the class of lowest logit of
    the model the audit starts from (so its loss, and clipped gradient, are as large as they can be)."""
    train = digits().train
    fn = logistic_fn()
    c = blank_canary(train, seed=5, model_fn=fn)
    assert c.x.shape == (1, *train.shape) and not c.x.any() and c.has_input
    torch.manual_seed(5)
    with torch.no_grad():
        logits = fn()(c.x)[0]
    assert c.y == int(logits.argmin())
    assert c.details["initial_loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits[None],
                                                                                            torch.tensor([c.y]))))
    # the label follows the model, and without one it is the last class
    assert {blank_canary(train, seed=s, model_fn=fn).y for s in range(8)} != {c.y}
    assert blank_canary(train, seed=5).y == len(train.classes) - 1
    assert CANARIES.get("blank") is blank_canary
