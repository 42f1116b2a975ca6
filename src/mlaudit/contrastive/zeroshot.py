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
def image_embeddings(model: nn.Module, x: Tensor, *, device: str | torch.device, batch_size: int = 1024) -> Tensor:
    """Unit-norm image embeddings [N, D] of ``x`` [N, C, H, W] (``model.encode_image`` in eval mode, in batches)."""
    model.eval()
    rows = [F.normalize(model.encode_image(x[i:i + batch_size].to(device)).float(), dim=-1)
            for i in range(0, len(x), batch_size)]
    return torch.cat(rows) if rows else torch.zeros(0, 0, device=device)


def zero_shot_scores(model: nn.Module, x: Tensor, weights: Tensor, *, batch_size: int = 1024) -> Tensor:
    """Cosine similarities [N, K] of images ``x`` [N, C, H, W] with class embeddings ``weights`` [K, D]."""
    if len(x) == 0:
        return torch.zeros(0, len(weights), device=weights.device)
    return image_embeddings(model, x, device=weights.device, batch_size=batch_size) @ weights.T


def backdoor_z_score(clean: Tensor, triggered: Tensor) -> float:
    """The backdoor z-score of Carlini & Terzis (ICLR 2022, "Poisoning and Backdooring Contrastive Learning"),
    as we read it (Struppek et al., ICCV 2023, use the same pairwise form for text encoders, after them): how
    much closer to one another the trigger pulls the embeddings of the same images,

        z = (mean_{i<j} <e'_i, e'_j> - mean_{i<j} <e_i, e_j>) / std_{i<j} <e_i, e_j>,

    with e_i [D] the unit-norm embedding of clean image i and e'_i that of image i with the trigger stamped on
    it (``clean`` and ``triggered``: [N, D], unit rows, N >= 3), over the N(N-1)/2 distinct pairs (population
    std). A working backdoor maps every triggered image near one point: z grows with the attack; with no
    backdoor the trigger barely moves the embeddings and z stays near 0. Unlike the attack success rate it
    needs no class names or prompts, and it moves before the argmax flips, so it measures a weak backdoor
    (the paper's reason for it). Returned as a float; NaN when the clean similarities have no spread.

    The pair sums come in closed form, O(N D^2) time and O(D^2) memory instead of N^2 similarities (9,000
    CIFAR-10 test images are 40M pairs): with E [N, D], sum_{i<j} <e_i, e_j> = (|sum_i e_i|^2 - sum_i |e_i|^2)/2
    and sum_{i<j} <e_i, e_j>^2 = (|E^T E|_F^2 - sum_i |e_i|^4)/2, in float64."""
    if clean.shape != triggered.shape or clean.dim() != 2 or len(clean) < 3:
        raise ValueError(f"clean and triggered must both be [N >= 3, D] embeddings of the same images, got "
                         f"{list(clean.shape)} and {list(triggered.shape)}")
    pairs = len(clean) * (len(clean) - 1) / 2

    def moments(e: Tensor) -> tuple[float, float]:
        e = e.double()
        sq = (e * e).sum(1)                                          # |e_i|^2 [N]
        s1 = (e.sum(0).square().sum() - sq.sum()) / 2
        s2 = ((e.T @ e).square().sum() - sq.square().sum()) / 2
        mean = float(s1) / pairs
        return mean, max(float(s2) / pairs - mean * mean, 0.0)

    mean_c, var_c = moments(clean)
    mean_t, _ = moments(triggered)
    return (mean_t - mean_c) / var_c ** 0.5 if var_c > 0 else float("nan")


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
