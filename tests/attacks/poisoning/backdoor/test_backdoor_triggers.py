"""Backdoor triggers (mlaudit.attacks.poisoning.backdoor.trigger): a patch changes only its k x k square
(or the four corners) and pastes its pattern there, a blended trigger is exactly (1 - a) x + a p, the
four-corner trigger survives a horizontal flip, the config form builds the same tensors every time,
and triggers that do not fit the images are refused naming the field, the value and what is allowed."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mlaudit.attacks.poisoning.backdoor import TriggerSpec, apply_trigger, blend_trigger, patch_trigger
from mlaudit.errors import ConfigError


def images(n: int = 5, shape: tuple[int, int, int] = (1, 8, 8), seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("location", "rows", "cols"), [
    ("bottom-right", slice(5, 8), slice(5, 8)), ("top-left", slice(0, 3), slice(0, 3)),
    ("top-right", slice(0, 3), slice(5, 8)), ("bottom-left", slice(5, 8), slice(0, 3)),
    ("center", slice(2, 5), slice(2, 5)), ((1, 4), slice(1, 4), slice(4, 7)),
])
def test_a_patch_changes_only_its_square_and_pastes_its_pattern(location, rows, cols) -> None:
    x = images()
    t = patch_trigger((1, 8, 8), size=3, location=location, pattern="checkerboard")
    out = apply_trigger(x, t)
    inside = torch.zeros(1, 8, 8, dtype=torch.bool)
    inside[:, rows, cols] = True
    assert torch.equal(t.region, inside)
    assert torch.equal(out[:, ~inside], x[:, ~inside])  # untouched outside
    board = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    assert torch.equal(out[:, 0, rows, cols], board.expand(5, 3, 3))
    assert not torch.equal(out, x) and torch.equal(x, images())  # a new tensor; the input is unchanged


def test_margin_alpha_and_named_patterns() -> None:
    x = images()
    t = patch_trigger((1, 8, 8), size=2, location="bottom-right", margin=1, pattern="white", alpha=0.5)
    out = apply_trigger(x, t)
    assert torch.allclose(out[:, 0, 5:7, 5:7], 0.5 * x[:, 0, 5:7, 5:7] + 0.5)
    assert torch.equal(out[:, 0, 7], x[:, 0, 7]) and torch.equal(out[:, 0, :, 7], x[:, 0, :, 7])
    black = apply_trigger(x, patch_trigger((1, 8, 8), size=2, pattern="black"))
    assert float(black[:, 0, 6:, 6:].abs().max()) == 0.0


def test_a_blended_trigger_is_the_convex_blend() -> None:
    x = images(shape=(3, 6, 6))
    t = blend_trigger((3, 6, 6), alpha=0.2, pattern="noise", seed=7)
    assert torch.allclose(apply_trigger(x, t), 0.8 * x + 0.2 * t.pattern, atol=1e-7)
    assert bool(t.region.all())
    assert torch.equal(t.pattern, blend_trigger((3, 6, 6), alpha=0.5, seed=7).pattern)  # the seed fixes the noise
    assert not torch.equal(t.pattern, blend_trigger((3, 6, 6), seed=8).pattern)
    given_pattern = torch.linspace(0, 1, 36).view(6, 6)  # [H, W]: the same on every channel
    g = blend_trigger((3, 6, 6), alpha=1.0, pattern=given_pattern)
    assert torch.equal(apply_trigger(x, g), given_pattern.expand(5, 3, 6, 6))


def test_the_four_corner_trigger_survives_a_horizontal_flip() -> None:
    """Turner et al. 2019 stamp the pattern in all four corners, mirrored left-right, so the flips of the
    victims' augmentation keep the trigger."""
    x = images(shape=(3, 10, 10))
    t = patch_trigger((3, 10, 10), size=3, location="four-corners", pattern="noise", seed=3)
    assert int(t.region[0].sum()) == 4 * 9
    assert torch.equal(apply_trigger(x, t).flip(-1), apply_trigger(x.flip(-1), t))


@settings(max_examples=30, deadline=None)
@given(size=st.integers(1, 8), alpha=st.floats(0.01, 1.0), seed=st.integers(0, 1000),
       kind=st.sampled_from(["patch", "blend"]))
def test_stamped_images_stay_in_the_box_and_change_only_the_region(size, alpha, seed, kind) -> None:
    x = images(seed=seed)
    x[0] = 0.0
    x[1] = 1.0
    spec = TriggerSpec(type=kind, alpha=alpha, seed=seed, pattern="noise", **({"size": size} if kind == "patch" else {}))
    t = spec.build((1, 8, 8))
    out = apply_trigger(x, t)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.equal(out[:, ~t.region], x[:, ~t.region])
    assert torch.equal(t.mask, spec.build((1, 8, 8)).mask) and torch.equal(t.pattern, spec.build((1, 8, 8)).pattern)


def test_spec_defaults_round_trip_and_describe() -> None:
    patch, blend = TriggerSpec(), TriggerSpec(type="blend")
    assert (patch.size, patch.location, patch.margin, patch.pattern, patch.alpha) == (3, "bottom-right", 0,
                                                                                       "checkerboard", 1.0)
    assert (blend.size, blend.location, blend.pattern, blend.alpha) == (None, None, "noise", 0.2)
    for spec in (patch, blend, TriggerSpec(size=2, location=(0, 1), pattern=[[0, 1], [1, 0]], alpha=0.5)):
        assert TriggerSpec.model_validate(spec.model_dump(mode="json")) == spec
    assert patch.describe() == "3x3 checkerboard patch at bottom-right"
    assert blend.describe() == "noise blend, alpha 0.2"


@pytest.mark.parametrize(("spec", "match"), [
    ({"size": 9}, r"attack\.trigger\.size = 9 is larger than the 8x8 images; allowed 1 <= attack\.trigger\.size <= 8"),
    ({"size": 3, "location": [6, 0]}, r"attack\.trigger\.location = \[6, 0\] .* allowed rows 0\.\.5 and columns 0\.\.5"),
    ({"size": 3, "margin": 6}, r"attack\.trigger\.margin = 6 .* allowed attack\.trigger\.margin <= 5"),
    ({"size": 2, "pattern": [[0, 1, 0], [1, 0, 1]]}, r"attack\.trigger\.pattern has shape \[2, 3\]; allowed \[2, 2\]"),
    ({"type": "blend", "pattern": [[0.5] * 4] * 4}, r"attack\.trigger\.pattern has shape \[4, 4\]; allowed \[8, 8\]"),
])
def test_triggers_that_do_not_fit_the_images_are_refused(spec, match) -> None:
    with pytest.raises(ConfigError, match=match):
        TriggerSpec(**spec).check((1, 8, 8), where="attack.trigger")
    with pytest.raises(ConfigError):
        TriggerSpec(**spec).build((1, 8, 8))


@pytest.mark.parametrize(("spec", "match"), [
    ({"alpha": 0.0}, "greater than 0"), ({"alpha": 1.5}, "less than or equal to 1"),
    ({"type": "blend", "alpha": -0.1}, "greater than 0"),
    ({"type": "blend", "size": 3}, "applies to patch triggers only"),
    ({"pattern": [[0, 2]]}, r"must lie in \[0, 1\]"), ({"pattern": [[0, 1], [1]]}, "rectangular"),
    ({"pattern": "stripes"}, "checkerboard"), ({"location": [-1, 0]}, ">= 0"), ({"size": 0}, "greater than"),
])
def test_bad_trigger_fields_are_refused_at_parse_time(spec, match) -> None:
    with pytest.raises(ValidationError, match=match):
        TriggerSpec(**spec)


def test_apply_trigger_checks_shapes() -> None:
    t = patch_trigger((1, 8, 8), size=2)
    with pytest.raises(ConfigError, match=r"images \[N, 1, 8, 8\]"):
        apply_trigger(torch.zeros(2, 3, 8, 8), t)
    with pytest.raises(ConfigError, match="images"):
        patch_trigger((64,), size=2)
