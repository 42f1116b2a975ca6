"""Spectral signatures (Tran, Li & Madry, "Spectral Signatures in Backdoor Attacks", NeurIPS 2018): in
each class, centre the learned representations, take the top right singular vector of the centred
matrix and score every row by its projection on it; poisons that a backdoored model maps to a shared
feature direction get the largest scores. The paper removes the 1.5 * eps highest-scoring rows of each
class (eps an upper bound on the poisoned fraction); here ``rate`` is that fraction of each class."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import per_class, register_filter, remove_top


@register_filter("spectral", paper="Tran, Li & Madry 2018 (spectral signatures)")
def spectral(features: Tensor, labels: Tensor, *, rate: float) -> Tensor:
    """Remove, per class, the ``rate`` fraction of rows with the largest |projection| of the centred
    features on their top singular vector (the paper squares it: the same order)."""
    f = features.double()
    scores = torch.zeros(len(f), dtype=torch.float64, device=f.device)
    for rows in per_class(labels):
        centred = f[rows] - f[rows].mean(0)
        if len(rows) < 2:
            continue
        top = torch.linalg.svd(centred, full_matrices=False).Vh[0]
        scores[rows] = (centred @ top).abs()
    return remove_top(scores, labels, rate)
