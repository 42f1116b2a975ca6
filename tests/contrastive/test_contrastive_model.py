"""The dual encoder and the symmetric InfoNCE loss (Radford et al. 2021): the loss equals a direct loop over
the batch, the temperature is clamped at 100, the towers have the documented shapes, and a user's module
must have open_clip's interface."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mlaudit.contrastive import DualEncoder, build_dual_encoder, check_dual_encoder, info_nce
from mlaudit.contrastive.model import MAX_LOGIT_SCALE, clip_logit_scale
from mlaudit.errors import ConfigError


def direct_info_nce(u: torch.Tensor, v: torch.Tensor, scale: float) -> float:
    """-1/(2B) sum_i [log softmax_j s<u_i, v_j> at j=i + log softmax_j s<u_j, v_i> at j=i], one pair at a time."""
    b = len(u)
    u = [x / x.norm() for x in u.double()]
    v = [x / x.norm() for x in v.double()]
    total = 0.0
    for i in range(b):
        img = [scale * float(u[i] @ v[j]) for j in range(b)]  # image i against every caption
        txt = [scale * float(u[j] @ v[i]) for j in range(b)]  # caption i against every image
        total -= img[i] - math.log(sum(math.exp(z) for z in img))
        total -= txt[i] - math.log(sum(math.exp(z) for z in txt))
    return total / (2 * b)


@pytest.mark.parametrize("b,d,scale", [(1, 4, 1.0), (5, 8, 14.3), (16, 3, 100.0)])
def test_info_nce_equals_a_direct_loop_over_the_batch(b: int, d: int, scale: float) -> None:
    g = torch.Generator().manual_seed(b)
    u, v = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    got = float(info_nce(u, v, torch.tensor(scale)))
    assert got == pytest.approx(direct_info_nce(u, v, scale), rel=1e-5, abs=1e-5)


def test_info_nce_is_symmetric_and_small_for_matching_pairs() -> None:
    u = torch.eye(6)
    assert float(info_nce(u, u, 100.0)) < 1e-6
    v = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    assert float(info_nce(u, v, 3.0)) == pytest.approx(float(info_nce(v, u, 3.0)), rel=1e-6)


def test_dual_encoder_shapes_and_logit_scale_clamp() -> None:
    torch.manual_seed(0)
    for layers in (0, 1):
        m = build_dual_encoder("mlp", input_shape=(1, 8, 8), vocab_size=20, context_length=7, embed_dim=16,
                               text_width=8, text_layers=layers, text_heads=2)
        x, tok = torch.rand(3, 1, 8, 8), torch.tensor([[2, 3, 0, 0, 0, 0, 0], [4, 0, 0, 0, 0, 0, 0], [5] * 7])
        u, v, s = m(x, tok)
        assert u.shape == (3, 16) and v.shape == (3, 16)
        assert torch.allclose(u.norm(dim=1), torch.ones(3)) and float(s.detach()) == pytest.approx(1 / 0.07, rel=1e-5)
        with torch.no_grad():
            m.logit_scale.fill_(10.0)
        clip_logit_scale(m)
        assert float(m.logit_scale.detach().exp()) == pytest.approx(MAX_LOGIT_SCALE, rel=1e-5)


def test_padding_does_not_change_the_text_features() -> None:
    torch.manual_seed(0)
    m = build_dual_encoder("mlp", input_shape=(1, 8, 8), vocab_size=20, context_length=8, embed_dim=4, text_width=8,
                           text_layers=1, text_heads=2).eval()
    a = m.encode_text(torch.tensor([[2, 3, 4, 0, 0, 0]]))
    b = m.encode_text(torch.tensor([[2, 3, 4, 0, 0, 0, 0, 0]]))
    assert torch.allclose(a, b, atol=1e-6)


def test_user_modules_need_the_open_clip_interface() -> None:
    assert isinstance(check_dual_encoder(DualEncoder(nn.Flatten(), nn.Identity()), where="encoder.dual"), nn.Module)
    with pytest.raises(ConfigError, match="encoder.dual.*without encode_image, encode_text, logit_scale"):
        check_dual_encoder(nn.Linear(2, 2), where="encoder.dual")
