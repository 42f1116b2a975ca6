"""Zero-shot classification by prompt (Radford et al. 2021, sec. 3.1.4 "prompt ensembling").

For class c with prompts t_1..t_T (the templates filled with its name), the class embedding is

    w_c = normalize( 1/T sum_t normalize(encode_text(t_t(c))) )          [K, D]

and an image x is classified as argmax_c <normalize(encode_image(x)), w_c> (cosine similarity).
The rank of a class is 1 + the number of classes with a strictly larger similarity (rank 1 = predicted),
the quantity Carlini & Terzis (2022) use to measure how far a poison moved an image towards its target.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def class_embeddings(model: nn.Module, names: Sequence[str], templates: Sequence[str],
                     tokenize: Callable[[Sequence[str]], Tensor], *, device: str | torch.device = "cpu") -> Tensor:
    """w [K, D] (module docstring) for classes ``names`` and ``templates`` (``"... {c} ..."``)."""
    model.eval()
    out = []
    for n in names:
        toks = tokenize([t.format(c=n) for t in templates]).to(device)
        f = F.normalize(model.encode_text(toks).float(), dim=-1).mean(0)
        out.append(F.normalize(f, dim=-1))
    return torch.stack(out)


@torch.no_grad()
def zero_shot_scores(model: nn.Module, x: Tensor, weights: Tensor, *, batch_size: int = 1024) -> Tensor:
    """Cosine similarities [N, K] of images ``x`` [N, C, H, W] with class embeddings ``weights`` [K, D]."""
    model.eval()
    dev = weights.device
    rows = [F.normalize(model.encode_image(x[i:i + batch_size].to(dev)).float(), dim=-1) @ weights.T
            for i in range(0, len(x), batch_size)]
    return torch.cat(rows) if rows else torch.zeros(0, len(weights), device=dev)


def zero_shot_predict(model: nn.Module, x: Tensor, weights: Tensor, *, batch_size: int = 1024) -> Tensor:
    """Predicted class ids [N] (argmax of :func:`zero_shot_scores`)."""
    return zero_shot_scores(model, x, weights, batch_size=batch_size).argmax(-1)


def zero_shot_accuracy(model: nn.Module, x: Tensor, y: Tensor, weights: Tensor, *, batch_size: int = 1024) -> float:
    """Fraction of ``x`` [N, ...] whose zero-shot prediction is ``y`` [N]."""
    pred = zero_shot_predict(model, x, weights, batch_size=batch_size).cpu()
    return float((pred == y.cpu()).float().mean()) if len(y) else float("nan")


def class_rank(scores: Tensor, cls: Tensor | int) -> Tensor:
    """Rank [N] (1 = top) of class ``cls`` (an int or [N] ids) in each row of ``scores`` [N, K]."""
    c = torch.as_tensor(cls, device=scores.device).expand(scores.shape[0]).long()
    own = scores.gather(1, c[:, None])  # [N, 1]
    return 1 + (scores > own).sum(1)
