"""Which reference (shadow) models an attack uses for a target: all of them, or a capped number per
example to reproduce the few-reference regime of Zarifzadeh et al. 2024 (RMIA, Fig. 1 / Table 2: 1, 2,
4 reference models) and of Carlini et al. 2022 (LiRA with few shadows, Fig. 9).

For target t the other M - 1 models are put in a seeded random order (``seed``, t). With
``references=k`` every example n keeps, in that order,
* offline: its first k OUT models (models not trained on n), as offline reference models are;
* online: its first k // 2 IN and first k - k // 2 OUT models (the paper's paired IN/OUT design).
``references=None`` keeps every other model. Shapes: keep bool [M, N] (any set of columns: pool
examples or population examples), returns refs int64 [R], w_in and w_out bool [R, N].
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ...errors import ConfigError


def reference_split(references: int | None, *, online: bool) -> tuple[int, int]:
    """(IN, OUT) reference models per example for a cap ``references`` (None: (0, 1), at least one OUT)."""
    if references is None:
        return 0, 1
    if int(references) != references or references < 1:
        raise ConfigError(f"option references must be a positive integer or None (all other models), got {references!r}")
    k = int(references)
    return (k // 2, k - k // 2) if online else (0, k)


def reference_requirements(*, online: bool, references: int | None = None, **_: object) -> tuple[int, int]:
    """Fewest (IN, OUT) reference models every example needs for an attack that averages over its references
    (RMIA, BASE): offline >= 1 OUT (or the cap's k), online any (or k // 2 IN and k - k // 2 OUT for a cap k)."""
    k_in, k_out = reference_split(references, online=online)
    return (k_in, k_out) if references is not None or not online else (0, 0)


def reference_weights(keep: Tensor, target: int, *, references: int | None, online: bool, seed: int,
                      attack: str) -> tuple[Tensor, Tensor, Tensor]:
    """(refs [R], w_in [R, N], w_out [R, N]) for ``target``; with a cap, raises ConfigError naming
    ``references``, how many IN/OUT models every example needs and how many the pool gives, when it
    gives too few (without a cap the attack checks its own needs)."""
    m = keep.shape[0]
    if not 0 <= target < m:
        raise ConfigError(f"target must be a model index in [0, {m - 1}], got {target}")
    others = np.array([i for i in range(m) if i != target], dtype=np.int64)
    refs = torch.from_numpy(np.random.default_rng([seed, target]).permutation(others) if references else others)
    k_in, k_out = reference_split(references, online=online)
    ks = keep[refs.to(keep.device)].bool()
    if references is None:
        w_in, w_out = ks, ~ks
    else:
        w_in = ks & (ks.long().cumsum(0) <= k_in)
        w_out = ~ks & ((~ks).long().cumsum(0) <= k_out)
    short_in, short_out = w_in.sum(0) < k_in, w_out.sum(0) < k_out
    if references is not None and bool((short_in | short_out).any()):
        n_bad = int((short_in | short_out).sum())
        raise ConfigError(
            f"{attack} with references={references} needs {k_in} IN and {k_out} OUT reference models (models other "
            f"than the target) for every example, but for target {target} {n_bad} of {keep.shape[1]} examples have "
            f"fewer (fewest: {int(ks.sum(0).min())} IN, {int((~ks).sum(0).min())} OUT among the {m - 1} other models); "
            "lower references or train more models (pool.models)")
    return refs, w_in, w_out
