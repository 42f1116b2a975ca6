"""Zero-shot classification by prompt on a hand-built dual encoder whose embeddings are known."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mlaudit.contrastive import (
    CaptionSpace,
    class_embeddings,
    class_rank,
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
