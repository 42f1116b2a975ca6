"""Who trains on what: the inclusion design of a pool of shadow models for membership inference.

The LiRA reference construction (Carlini et al. 2022, "Membership Inference Attacks From First
Principles"): a uniform matrix u [M, N] from the seed, ``order = argsort(u, axis=0)`` and
``keep = order < int(keep_rate * M)``, so each example is IN for exactly ``int(keep_rate * M)``
models (a random subset per example) and each model holds about ``keep_rate * N`` examples
(:func:`inclusion_matrix`). :func:`shadow_coverage` checks a design before training,
:func:`models_needed_exact` and :func:`models_needed_random` size one for an attack's leave-one-out
shadow requirements (:func:`~.lira.lira_requirements`).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import binom
from torch import Tensor

from ...errors import ConfigError


def inclusion_matrix(models: int, examples: int, *, keep: float, seed: int) -> Tensor:
    """bool [models, examples]: the LiRA reference construction (the module docstring); every column has
    exactly ``int(keep * models)`` True entries. Deterministic in (models, examples, keep, seed)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x4C495241]))
    order = rng.random((models, examples)).argsort(0)
    return torch.from_numpy(order < int(keep * models))


def models_needed_exact(keep: float, min_in: int, min_out: int) -> int:
    """Smallest M for which the exact-count design gives every example >= min_in IN and >= min_out
    OUT leave-one-out shadows (k = int(keep * M) IN models: k - 1 >= min_in, M - k - 1 >= min_out)."""
    for m in range(2, 100_000):
        k = int(keep * m)
        if k - 1 >= min_in and m - k - 1 >= min_out and 1 <= k <= m - 1:
            return m
    return 100_000


def models_needed_random(num_examples: int, keep_rate: float, *, min_in: int, min_out: int) -> int:
    """Smallest M such that, when each of ``num_examples`` examples is IN each model independently
    with probability ``keep_rate``, every example is expected (with probability about 0.95) to have
    ``min_in`` IN and ``min_out`` OUT shadows for every target (i.e. >= min + 1 among all M models)."""
    p = min(max(float(keep_rate), 1e-6), 1 - 1e-6)
    for m in range(2, 100_000):
        fail = binom.cdf(min_in, m, p) if min_in else 0.0
        fail += binom.cdf(min_out, m, 1 - p) if min_out else 0.0
        if num_examples * fail <= 0.05:
            return m
    return 100_000


def shadow_coverage(keep: Tensor, *, min_in: int = 1, min_out: int = 1) -> dict[str, int]:
    """Leave-one-out shadow counts from ``keep`` bool [M, N] alone (usable before training).

    For every target m and example n, the IN count is the number of *other* models holding n and
    the OUT count the number of other models without it. Returns ``num_models``, ``num_examples``,
    ``min_in`` and ``min_out`` (smallest counts over all (m, n)), and ``examples_without_in`` /
    ``examples_without_out``: examples with fewer than ``min_in`` IN (``min_out`` OUT) shadows for at
    least one target (use :func:`~.lira.lira_requirements` for the numbers an attack needs).
    """
    if keep.dim() != 2:
        raise ConfigError(f"keep must be bool [M, N], got shape {list(keep.shape)}")
    k = keep.bool().long()
    m = k.shape[0]
    loo_in = k.sum(0, keepdim=True) - k
    loo_out = (m - 1) - loo_in
    return {
        "num_models": m, "num_examples": int(k.shape[1]),
        "min_in": int(loo_in.min()) if k.numel() else 0, "min_out": int(loo_out.min()) if k.numel() else 0,
        "examples_without_in": int((loo_in < min_in).any(0).sum()),
        "examples_without_out": int((loo_out < min_out).any(0).sum()),
    }
