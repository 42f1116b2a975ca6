"""GPU check of the text inversion and of user gradients through attention (``pytest -m gpu`` on a CUDA machine;
skipped elsewhere). On CUDA, scaled_dot_product_attention picks the flash or memory-efficient kernels, whose backward
has no derivative and no vmap rule, as on the CPU (where the fix was found): the gradient-matching objective and
``user_gradients`` must run the math kernel there too."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from mlaudit.attacks.federated import Observation
from mlaudit.attacks.federated.objective import GradientInversion
from mlaudit.attacks.federated.text_inversion import EmbeddingsIn, text_inversion, text_recovery
from mlaudit.federated import secure_aggregate, user_gradients
from mlaudit.models.gpt import TinyGPT
from mlaudit.query import ParamVector, param_grad

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

V, L = 32, 6


class Attention(nn.Module):
    """A causal LM through nn.MultiheadAttention, the mask on the tokens' device."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.attn, self.head = nn.Embedding(7, 8), nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 7)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        h = self.tok(t)
        mask = torch.triu(torch.ones(t.shape[1], t.shape[1], dtype=torch.bool, device=t.device), 1)
        return self.head(h + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]).transpose(1, 2)


def test_user_gradients_through_attention_on_cuda_equal_a_per_user_loop_and_differentiate_again() -> None:
    torch.manual_seed(0)
    model = Attention().cuda().eval()
    t = torch.randint(0, 7, (3, 2, 5), generator=torch.Generator().manual_seed(1)).cuda()
    y = torch.randint(0, 7, (3, 2, 5), generator=torch.Generator().manual_seed(2)).cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no per-user fallback loop
        got = user_gradients(model, t, y)
    for u in range(3):
        want = param_grad(model, (t[u], y[u]))
        for n in got:
            torch.testing.assert_close(got[n][u], want[n], rtol=1e-4, atol=1e-5)
    obs = Observation(ParamVector({f"lm.{k}": v.sum(0) for k, v in got.items()}), users=3, batch=2, input_shape=(5, 8))
    objective = GradientInversion(EmbeddingsIn(model, model.tok), obs, y.flatten(0, 1),
                                  params=[k for k in obs.grad if k != "lm.tok.weight"])
    v = torch.randn(6, 5, 8, device="cuda", requires_grad=True)
    objective(v, torch.arange(6, device="cuda")).backward()
    assert v.grad is not None and torch.isfinite(v.grad).all() and float(v.grad.abs().sum()) > 0


def test_text_inversion_of_a_tiny_gpt_on_cuda() -> None:
    # the CPU test's seed 2 (tests/attacks/federated/test_text_inversion.py) recovers the sequence exactly there
    g = torch.Generator().manual_seed(2)
    seqs = torch.randint(0, V, (1, 1, L + 1), generator=g).cuda()
    torch.manual_seed(2)
    model = TinyGPT(V, L, d_model=32, heads=2, layers=2).cuda()
    agg = secure_aggregate(user_gradients(model, seqs[..., :L], seqs[..., 1:]))
    obs = Observation(ParamVector(agg), users=1, batch=1, input_shape=(L,))
    rec = text_inversion(model, obs, steps=200, refine=100, generator=torch.Generator().manual_seed(0))
    assert rec.x.shape == (1, L)
    assert rec.info["objective"] < rec.info["start"]
    assert text_recovery(seqs[..., :L].flatten(0, 1).cpu(), rec.x.cpu())["pairs"] >= 0.5
