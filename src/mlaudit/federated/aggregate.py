"""Secure aggregation as the server sees it: only the sum (or mean) of the users' updates.

    agg = secure_aggregate(updates)                                   # {name: [*shape]} = sum over users
    agg = secure_aggregate(updates, clip=1.0, noise_multiplier=0.5, generator=g)   # user-level DP
    agg = fedsgd_aggregate(model, x, y, chunk=64)        # the same for FedSGD, 64 users' gradients at a time

A secure-aggregation protocol (Bonawitz et al., CCS 2017) reveals to the server exactly
sum_u Delta_u and nothing else about the individual Delta_u; simulating it is therefore taking the
sum. Optional defences act on each user's update before the sum, with DP-SGD's mechanism
(:mod:`mlaudit.privacy.mechanism`, the users in the place of examples): ``clip`` scales each user's
update to l2 norm <= clip over all parameters jointly, and ``noise_multiplier`` sigma adds
N(0, sigma^2 clip^2 I) to the sum (user-level DP in the style of McMahan et al., ICLR 2018; here added
once to the aggregate, as a trusted aggregator or distributed noise would).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..privacy.mechanism import clip_per_example, gaussian_noise
from ..query import ParamVector
from .updates import user_gradients


def secure_aggregate(updates: Mapping[str, Tensor], *, clip: float | None = None, noise_multiplier: float = 0.0,
                     generator: torch.Generator | None = None, mean: bool = False) -> ParamVector:
    """The sum over users (``mean``: the average) of ``updates`` {name: [U, *shape]}, each user's update
    clipped to ``clip`` first when given, plus Gaussian noise of std ``noise_multiplier * clip`` on the sum."""
    if not updates:
        raise ConfigError("secure_aggregate needs at least one parameter's updates")
    _check(clip, noise_multiplier, generator)
    users = next(iter(updates.values())).shape[0]
    total = add_noise(clipped_sum(updates, clip), noise_multiplier, clip, generator)
    return total / users if mean else total


def fedsgd_aggregate(model: nn.Module, x: Tensor, y: Tensor, *, clip: float | None = None,
                     noise_multiplier: float = 0.0, generator: torch.Generator | None = None, chunk: int | None = None,
                     train_mode: bool = False) -> ParamVector:
    """What the server receives from a FedSGD round of users x [U, B, *shape], y [U, B] under secure
    aggregation: :func:`secure_aggregate` of :func:`~mlaudit.federated.user_gradients`, computed ``chunk``
    users at a time so that memory holds chunk (not U) copies of the parameters."""
    _check(clip, noise_multiplier, generator)
    step = chunk or x.shape[0]
    total: ParamVector | None = None
    for i in range(0, x.shape[0], step):
        part = clipped_sum(user_gradients(model, x[i:i + step], y[i:i + step], train_mode=train_mode), clip)
        total = part if total is None else total + part
    assert total is not None
    return add_noise(total, noise_multiplier, clip, generator)


def clipped_sum(updates: Mapping[str, Tensor], clip: float | None) -> ParamVector:
    """sum_u of each user's update {name: [U, *shape]}, scaled to l2 norm <= clip (all parameters jointly)."""
    names = list(updates)
    rows = [updates[n].unsqueeze(0) for n in names]  # [1, U, *s]: the mechanism's [G, B, *s] with users as B
    if clip is not None:
        rows = clip_per_example(rows, clip)
    return ParamVector({n: r[0].sum(0) for n, r in zip(names, rows, strict=True)})


def add_noise(total: ParamVector, noise_multiplier: float, clip: float | None,
              generator: torch.Generator | None) -> ParamVector:
    """total + N(0, (noise_multiplier * clip)^2 I), drawn from ``generator`` (unchanged without noise)."""
    if noise_multiplier == 0:
        return total
    assert generator is not None and clip is not None
    first = next(iter(total.values()))
    z = gaussian_noise([t.shape for t in total.values()], [generator], first.device)
    return ParamVector({n: t + noise_multiplier * clip * zi[0].to(t.dtype)
                        for (n, t), zi in zip(total.items(), z, strict=True)})


def _check(clip: float | None, noise_multiplier: float, generator: torch.Generator | None) -> None:
    if clip is not None and not clip > 0:
        raise ConfigError(f"aggregation clip = {clip}; allowed clip > 0 (or none)")
    if noise_multiplier < 0 or (noise_multiplier > 0 and (clip is None or generator is None)):
        raise ConfigError(f"aggregation noise_multiplier = {noise_multiplier}; allowed >= 0, and noise needs a clip "
                          "norm (its std is noise_multiplier * clip) and a generator")
