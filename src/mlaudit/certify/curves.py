"""Certified accuracy (Cohen, Rosenfeld & Kolter, ICML 2019, their experiments): the fraction of test inputs
that CERTIFY classifies correctly with a certified l2 radius of at least r, as a function of r."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import ConfigError


def certified_mask(pred: Tensor, radius: Tensor, y: Tensor, radii: Sequence[float]) -> Tensor:
    """bool [R, N]: input i is certified correct at radii[j] (pred_i == y_i and radius_i >= radii[j]).

    pred int [N] (-1 = abstained, never correct), radius float [N], y int [N]."""
    pred, radius, y = pred.cpu(), radius.cpu(), y.cpu()
    if not (pred.shape == radius.shape == y.shape) or pred.dim() != 1:
        raise ConfigError(f"pred, radius and y must be [N] each, got {list(pred.shape)}, {list(radius.shape)}, "
                          f"{list(y.shape)}")
    r = torch.as_tensor(list(radii), dtype=torch.float64)
    return (pred == y)[None] & (radius.double()[None] >= r[:, None])


def certified_accuracy(pred: Tensor, radius: Tensor, y: Tensor, radii: Sequence[float]) -> Tensor:
    """Certified accuracy float64 [R] at each radius of ``radii`` (see :func:`certified_mask`)."""
    return certified_mask(pred, radius, y, radii).double().mean(1)


def certified_curve(pred: Tensor, radius: Tensor, y: Tensor, *, points: int = 41,
                    max_radius: float | None = None) -> tuple[Tensor, Tensor]:
    """The certified-accuracy curve on ``points`` evenly spaced radii from 0 to ``max_radius`` (default:
    the largest certified radius): (radii float64 [points], certified accuracy float64 [points])."""
    if points < 2:
        raise ConfigError(f"points must be >= 2, got {points}")
    top = float(radius.max()) if max_radius is None else float(max_radius)
    grid = torch.linspace(0.0, max(top, 1e-12), points, dtype=torch.float64)
    return grid, certified_accuracy(pred, radius, y, grid.tolist())
