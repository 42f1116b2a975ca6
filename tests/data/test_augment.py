"""Batched augmentation: exactness vs a pad-and-crop loop, differentiable path, sampling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mlaudit.data.augment import (
    AugmentParams,
    AugmentSpec,
    apply_augment,
    apply_augment_differentiable,
    sample_augment_params,
)
from mlaudit.errors import ConfigError


def reference_crop(x: torch.Tensor, params: AugmentParams, pad: int) -> torch.Tensor:
    """Zero-pad by ``pad``, crop at (pad + dy, pad + dx), then flip: one sample at a time."""
    _, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    out = []
    for k in range(x.shape[0]):
        dx, dy = params.shift[k].tolist()
        crop = padded[k, :, pad + dy: pad + dy + h, pad + dx: pad + dx + w]
        out.append(crop.flip(-1) if bool(params.flip[k]) else crop)
    return torch.stack(out)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@settings(max_examples=50, deadline=None)
@given(
    n=st.integers(1, 6), c=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9),
    pad=st.integers(0, 5), flip=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_fast_path_equals_reference_and_differentiable_path(
    n: int, c: int, h: int, w: int, pad: int, flip: bool, seed: int
) -> None:
    g = gen(seed)
    x = torch.rand(n, c, h, w, generator=g)
    params = sample_augment_params(n, pad=pad, flip=flip, generator=g)
    assert params.shift.dtype == torch.int64 and int(params.shift.abs().max()) <= pad
    fast = apply_augment(x, params)
    assert torch.equal(fast, reference_crop(x, params, pad))
    assert torch.allclose(apply_augment_differentiable(x, params), fast, atol=1e-5, rtol=0)


def test_gradients_flow_and_match_the_fast_path() -> None:
    g = gen(1)
    x = torch.rand(5, 3, 6, 7, generator=g, requires_grad=True)
    weight = torch.rand(5, 3, 6, 7, generator=g)
    params = sample_augment_params(5, pad=2, flip=True, generator=g)
    (apply_augment_differentiable(x, params) * weight).sum().backward()
    grad = x.grad.clone()
    assert float(grad.abs().sum()) > 0
    x.grad = None
    (apply_augment(x, params) * weight).sum().backward()  # the gather path: exact adjoint of the crop
    assert torch.allclose(grad, x.grad, atol=1e-5, rtol=0)


def test_fractional_shift_interpolates() -> None:
    x = torch.arange(6, dtype=torch.float32).repeat(1, 1, 2, 1)  # rows 0..5
    params = AugmentParams(torch.tensor([[0.5, 0.0]]), torch.tensor([False]))
    out = apply_augment_differentiable(x, params)
    assert torch.allclose(out[0, 0, 0, :5], torch.arange(5) + 0.5, atol=1e-5)
    assert out[0, 0, 0, 5] == pytest.approx(2.5, abs=1e-5)  # half of pixel 5, half of the zero padding
    with pytest.raises(ConfigError, match="integer shifts"):
        apply_augment(x, params)


def test_flip_twice_is_identity_and_flip_mirrors() -> None:
    x = torch.rand(4, 2, 5, 6, generator=gen(2))
    params = AugmentParams(torch.zeros(4, 2, dtype=torch.int64), torch.ones(4, dtype=torch.bool))
    once = apply_augment(x, params)
    assert torch.equal(once, x.flip(-1))
    assert torch.equal(apply_augment(once, params), x)
    twice = apply_augment_differentiable(apply_augment_differentiable(x, params), params)
    assert torch.allclose(twice, x, atol=1e-5)


def test_no_pad_no_flip_is_identity() -> None:
    x = torch.rand(8, 3, 4, 4, generator=gen(3))
    spec = AugmentSpec(crop_pad=0, flip=False)
    assert spec.is_identity and not AugmentSpec().is_identity
    params = spec.sample(8, generator=gen(4))
    assert torch.equal(apply_augment(x, params), x)
    assert torch.allclose(apply_augment_differentiable(x, params), x, atol=1e-6)
    assert torch.equal(spec(x, generator=gen(5)), x)


def test_translation_direction_and_zero_fill() -> None:
    x = torch.arange(1, 10, dtype=torch.float32).reshape(1, 1, 3, 3)
    params = AugmentParams(torch.tensor([[1, -1]]), torch.tensor([False]))  # dx=1, dy=-1
    expected = torch.tensor([[0.0, 0.0, 0.0], [2.0, 3.0, 0.0], [5.0, 6.0, 0.0]])
    assert torch.equal(apply_augment(x, params)[0, 0], expected)


def test_params_apply_per_sample_independently() -> None:
    g = gen(6)
    x = torch.rand(6, 3, 5, 5, generator=g)
    params = sample_augment_params(6, pad=2, flip=True, generator=g)
    batch = apply_augment(x, params)
    for k in range(6):
        single = AugmentParams(params.shift[k: k + 1], params.flip[k: k + 1])
        assert torch.equal(batch[k: k + 1], apply_augment(x[k: k + 1], single))


def test_sampling_is_seeded_and_covers_the_range() -> None:
    a = sample_augment_params(2000, pad=3, flip=True, generator=gen(7))
    b = sample_augment_params(2000, pad=3, flip=True, generator=gen(7))
    assert torch.equal(a.shift, b.shift) and torch.equal(a.flip, b.flip)
    assert set(a.shift[:, 0].tolist()) == set(range(-3, 4)) == set(a.shift[:, 1].tolist())
    assert 800 < int(a.flip.sum()) < 1200
    assert not sample_augment_params(50, pad=3, flip=False, generator=gen(7)).flip.any()
    assert len(sample_augment_params(0, pad=3, flip=True, generator=gen(7))) == 0


def test_spec_validation_and_call() -> None:
    with pytest.raises(ValidationError):
        AugmentSpec(crop_pad=-1)
    with pytest.raises(ValidationError):
        AugmentSpec(crop_pad=4, rotate=True)  # type: ignore[call-arg]
    spec = AugmentSpec()
    with pytest.raises(ValidationError):
        spec.crop_pad = 2  # type: ignore[misc]
    x = torch.rand(4, 3, 8, 8, generator=gen(8))
    expected = apply_augment(x, spec.sample(4, generator=gen(9)))
    assert torch.equal(spec(x, generator=gen(9)), expected)
    assert torch.allclose(spec(x, generator=gen(9), differentiable=True), expected, atol=1e-5)


def test_bad_inputs_rejected() -> None:
    params = sample_augment_params(3, pad=1, flip=True, generator=gen(10))
    with pytest.raises(ConfigError, match=r"\[n, C, H, W\]"):
        apply_augment(torch.rand(3, 4, 4), params)
    with pytest.raises(ConfigError, match="batch has 2"):
        apply_augment_differentiable(torch.rand(2, 1, 4, 4), params)
    with pytest.raises(ConfigError, match="shift"):
        AugmentParams(torch.zeros(3, 3, dtype=torch.int64), torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ConfigError, match="pad"):
        sample_augment_params(3, pad=-1, flip=True, generator=gen(10))
