"""Zero-shot classification by prompt on a hand-built dual encoder whose embeddings are known."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from mlaudit.contrastive import (
    CaptionSpace,
    backdoor_z_score,
    class_embeddings,
    class_rank,
    image_embeddings,
    zero_shot_accuracy,
    zero_shot_predict,
)


class Known(nn.Module):
    """Images [N, 1, 1, 3] embed to their 3 pixel values; a caption embeds to the one-hot of the class word it
    contains (word ids: see the tokenizer below), so class c's prompt average is e_c."""

    def __init__(self, class_ids: list[int]) -> None:
        super().__init__()
        self.class_ids = class_ids
        self.logit_scale = nn.Parameter(torch.tensor(0.0))

    def encode_image(self, x: Tensor, normalize: bool = False) -> Tensor:
        return x.flatten(1)

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        return torch.stack([(tokens == i).any(1).float() for i in self.class_ids], 1)


def test_zero_shot_on_a_model_with_known_embeddings() -> None:
    names = ("cat", "dog", "frog")
    space = CaptionSpace.build(names, ("a photo of a {c}", "the {c} is here"))
    ids = [space.tokenizer.index[n] for n in names]
    m = Known(ids)
    w = class_embeddings(m, names, space.templates, space.tokenizer)
    assert torch.allclose(w, torch.eye(3))
    x = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.1], [0.0, 0.4, 2.0], [1.0, 0.0, 0.5]]).view(4, 1, 1, 3)
    assert zero_shot_predict(m, x, w).tolist() == [0, 1, 2, 0]
    assert zero_shot_accuracy(m, x, torch.tensor([0, 1, 2, 2]), w) == 0.75
    scores = x.flatten(1)
    assert class_rank(scores, 2).tolist() == [3, 3, 1, 2] and class_rank(scores, torch.tensor([0, 1, 2, 0])).tolist() == [1, 1, 1, 1]


def _direct_z(clean: Tensor, trig: Tensor) -> float:
    """The z-score from every pair's similarity, one by one."""
    n = len(clean)
    c = [float(clean[i] @ clean[j]) for i in range(n) for j in range(i + 1, n)]
    t = [float(trig[i] @ trig[j]) for i in range(n) for j in range(i + 1, n)]
    mc, mt = sum(c) / len(c), sum(t) / len(t)
    sd = (sum((v - mc) ** 2 for v in c) / len(c)) ** 0.5
    return (mt - mc) / sd


@settings(max_examples=25, deadline=None)
@given(n=st.integers(3, 12), d=st.integers(2, 6), seed=st.integers(0, 2**31 - 1))
def test_backdoor_z_score_equals_the_pairwise_definition(n: int, d: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    clean = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    trig = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    assert backdoor_z_score(clean, trig) == pytest.approx(_direct_z(clean, trig), rel=1e-6, abs=1e-9)
    assert backdoor_z_score(clean, clean) == pytest.approx(0.0, abs=1e-9)  # a trigger that moves nothing


def test_backdoor_z_score_of_a_trigger_that_collapses_the_embeddings() -> None:
    """A model that maps every triggered image to one direction: all triggered pairs have similarity 1, so
    z = (1 - mean_clean) / std_clean exactly; the embeddings come through ``image_embeddings``."""

    class Collapse(nn.Module):
        def encode_image(self, x: Tensor) -> Tensor:
            flat = x.flatten(1)
            hit = flat[:, -1:] > 5  # the "trigger": a huge last pixel
            return torch.where(hit, torch.ones_like(flat), flat)

    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 1, 4, generator=g)
    xt = x.clone()
    xt[..., -1] = 10.0
    m = Collapse()
    e, et = image_embeddings(m, x, device="cpu", batch_size=7), image_embeddings(m, xt, device="cpu")
    assert torch.allclose(e.norm(dim=1), torch.ones(40)) and torch.allclose(et, torch.full((40, 4), 0.5))
    c = [float(e[i] @ e[j]) for i in range(40) for j in range(i + 1, 40)]
    mc = sum(c) / len(c)
    sd = (sum((v - mc) ** 2 for v in c) / len(c)) ** 0.5
    assert backdoor_z_score(e, et) == pytest.approx((1 - mc) / sd, rel=1e-5)
    with pytest.raises(ValueError, match=r"\[N >= 3, D\]"):
        backdoor_z_score(e[:2], et[:2])
