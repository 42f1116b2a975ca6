"""Per-example membership signals computed from logits: cross-entropy loss and LiRA's scaled confidence.

Both are computed in float64 in log space, so extreme but finite logits (|z| ~ 1e4) give exact,
finite values. Non-finite logits (NaN, +-inf, e.g. from a diverged model) are never dropped: they
are *clipped* (NaN -> 0, +-inf -> +-:data:`LOGIT_CLIP`) and *counted*, and the count is returned so
that callers can report it (attacks warn with :func:`warn_clipped`).

Shapes: ``logits`` float [M, N, A, C] (model, example, augmented query, class), ``labels`` int64 [N].
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from ...errors import DataError

LOGIT_CLIP = 1e4
"""Magnitude that replaces +-inf logits: e^1e4 already means probability 1 to float64 precision."""

MODEL_CHUNK = 8
"""Models converted to float64 at a time (bounds the temporary memory to 8 * N * A * C * 8 bytes)."""


def clip_nonfinite(t: Tensor, *, bound: float = LOGIT_CLIP) -> tuple[Tensor, int]:
    """Replace non-finite entries of ``t`` (NaN -> 0, +inf -> ``bound``, -inf -> ``-bound``).

    Returns ``(clipped copy, number of non-finite entries)``; finite entries are unchanged (also
    those beyond ``bound``). ``t`` itself is not modified.
    """
    bad = ~torch.isfinite(t)
    count = int(bad.sum())
    if count == 0:
        return t, 0
    return torch.nan_to_num(t, nan=0.0, posinf=bound, neginf=-bound), count


def rank_nonfinite(scores: Tensor) -> tuple[Tensor, int]:
    """Replace non-finite attack scores so that every pair is still ranked, never dropped: NaN ->
    the lowest finite score, +inf -> the highest, -inf -> the lowest (all -> 0 when none is finite).

    Returns ``(copy, number of non-finite entries)``; ``scores`` itself is not modified.
    """
    bad = ~torch.isfinite(scores)
    count = int(bad.sum())
    if count == 0:
        return scores, 0
    fin = scores[~bad]
    lo, hi = (float(fin.min()), float(fin.max())) if fin.numel() else (0.0, 0.0)
    return torch.nan_to_num(scores, nan=lo, posinf=hi, neginf=lo), count


def _check(logits: Tensor, labels: Tensor) -> None:
    if logits.dim() < 2 or logits.shape[-1] < 2:
        raise DataError(f"logits must be [..., N, A, C] with C >= 2 classes, got shape {list(logits.shape)}")
    if logits.dim() != 4 or tuple(labels.shape) != (logits.shape[1],):
        raise DataError(f"logits must be [M, N, A, C] and labels [N]; got {list(logits.shape)} and "
                        f"{list(labels.shape)}")
    c = logits.shape[-1]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= c):
        raise DataError(f"labels must lie in [0, {c - 1}] for {c}-class logits, got range "
                        f"[{int(labels.min())}, {int(labels.max())}]")


def _map_chunks(logits: Tensor, labels: Tensor, fn: Callable[[Tensor, Tensor, Tensor], Tensor]) -> tuple[Tensor, int]:
    """Apply ``fn(z float64 [m, N, A, C], z_y [m, N, A], index of y [m, N, A, 1]) -> [m, N, A]`` to
    chunks of models (clipped); returns the concatenation and the number of rows that were clipped."""
    _check(logits, labels)
    y = labels.to(logits.device).long().view(1, -1, 1, 1)
    parts, bad_rows = [], 0
    for i in range(0, logits.shape[0], MODEL_CHUNK):
        z = logits[i:i + MODEL_CHUNK].double()
        bad_rows += int((~torch.isfinite(z)).any(-1).sum())
        z, _ = clip_nonfinite(z)
        idx = y.expand(z.shape[0], -1, z.shape[2], 1)
        parts.append(fn(z, z.gather(-1, idx).squeeze(-1), idx))
    return torch.cat(parts), bad_rows


def cross_entropy(logits: Tensor, labels: Tensor, *, temperature: float = 1.0) -> tuple[Tensor, int]:
    """Cross-entropy loss of every query: ``loss = logsumexp_j z_j - z_y``, of the logits divided by
    ``temperature`` (in float64) when it is not 1.

    Args:
        logits: float [M, N, A, C].
        labels: int64 [N].
        temperature: softmax temperature T > 0 (BASE's scaled log-likelihood).

    Returns:
        ``(loss float64 [M, N, A] (>= 0), n_clipped)`` where ``n_clipped`` counts the [M, N, A]
        outputs whose logit row had at least one non-finite entry (clipped, see the module docstring).
    """
    if temperature == 1.0:
        loss, bad = _map_chunks(logits, labels, lambda z, zy, _: torch.logsumexp(z, dim=-1) - zy)
    else:
        loss, bad = _map_chunks(logits, labels,
                                lambda z, zy, _: torch.logsumexp(z / temperature, dim=-1) - zy / temperature)
    return loss.clamp_min(0.0), bad


def scaled_confidence(logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """LiRA's logit-scaled confidence ``phi = log(p_y) - log(1 - p_y)``.

    Carlini et al. 2022, "Membership Inference Attacks From First Principles", Sec. IV-B (and
    Fig. 4): the model's confidence p_y = softmax(z)_y is far from Gaussian across models, but its
    logit ``phi(p) = log(p / (1 - p))`` is approximately Gaussian, which the likelihood-ratio test
    assumes. Computed stably without ever forming p_y:

        phi = log p_y - log(1 - p_y) = z_y - logsumexp_{j != y} z_j

    (log p_y = z_y - LSE(z) and log(1 - p_y) = LSE_{j != y}(z) - LSE(z)), which stays exact when p_y
    rounds to 1 in floating point (e.g. a logit margin of 1e4, where phi = 1e4).

    Args:
        logits: float [M, N, A, C], C >= 2.
        labels: int64 [N].

    Returns:
        ``(phi float64 [M, N, A], n_clipped)``; ``n_clipped`` counts [M, N, A] outputs whose logit
        row had a non-finite entry (NaN -> 0, +-inf -> +-:data:`LOGIT_CLIP`), never dropped.
    """
    def phi(z: Tensor, zy: Tensor, idx: Tensor) -> Tensor:
        return zy - torch.logsumexp(z.scatter(-1, idx, float("-inf")), dim=-1)

    return _map_chunks(logits, labels, phi)


def softmax_probs(logits: Tensor) -> tuple[Tensor, int]:
    """Softmax probabilities in float64 of ``logits`` [..., C] after clipping non-finite entries
    (returns ``(probs [..., C], number of non-finite logits)``)."""
    z, bad = clip_nonfinite(logits.double())
    return torch.softmax(z, dim=-1), bad


def warn_clipped(n_clipped: int, total: int, *, attack: str) -> None:
    """Warn (RuntimeWarning) when ``n_clipped`` of ``total`` model outputs had non-finite logits."""
    if n_clipped:
        warnings.warn(f"{attack}: {n_clipped} of {total} model outputs had non-finite logits (NaN/inf); they were "
                      f"clipped (NaN -> 0, inf -> +-{LOGIT_CLIP:g}) and scored, not dropped. A model probably "
                      "diverged: check its training loss.", RuntimeWarning, stacklevel=3)
