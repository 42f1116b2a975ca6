"""The packed device buffer of ``mlaudit.train.stacked._moved``: every tensor of a model starts on an aligned
address (a ResNet-18 packed end to end failed in cuDNN's BatchNorm with "misaligned address" on an H100), and the
views hold the originals. The CUDA path itself is tests/gpu/test_cuda_factory.py; the packing runs on any device."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mlaudit.models import build_model
from mlaudit.train.stacked import _ALIGN, _aligned_offsets, _packed


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5000), min_size=1, max_size=40), st.sampled_from([1, 2, 4, 8]))
def test_aligned_offsets_start_every_tensor_on_the_boundary_without_overlap(numels: list[int], size: int) -> None:
    off = _aligned_offsets(numels, size)
    step = _ALIGN // size
    assert off[0] == 0 and len(off) == len(numels) + 1
    for start, nxt, n in zip(off, off[1:], numels):
        assert start % step == 0
        assert start + n <= nxt < start + n + step  # room for it, and less than one step of padding


def test_packed_views_are_aligned_and_equal_the_originals() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", input_shape=(3, 32, 32), num_classes=10)
    group = [t for t in [*model.parameters(), *model.buffers()] if t.dtype == torch.float32]
    assert any(t.numel() * 4 % _ALIGN for t in group)  # some tensor (fc.bias: 10 floats) would misalign the next
    pieces = _packed(group, torch.device("cpu"))
    base = pieces[0].untyped_storage().data_ptr()
    for t, p in zip(group, pieces, strict=True):
        assert p.shape == t.shape and torch.equal(p, t)
        assert p.untyped_storage().data_ptr() == base  # one buffer, one copy to the device
        assert (p.data_ptr() - base) % _ALIGN == 0
