"""Label-only membership inference by distance to the decision boundary (Choquette-Choo et al. 2021,
"Label-Only Membership Inference Attacks", ICML, Sec. 5), estimated without HopSkipJump.

The paper measures the L2 distance from an example to the target's decision boundary (HopSkipJump
or, white-box, Carlini-Wagner), and also a cheaper estimate by random Gaussian noise: members sit
farther from the boundary. Here, for each of ``draws`` seeded Gaussian directions e (shared by all
models), the smallest noise scale s with label(x + s e) != y is found by bisection on labels alone:
``steps`` halvings of [0, ``max_scale``] (in units of the input's standard deviation over the pool;
default 8). A scale that never flips the label counts as ``max_scale``; an example the model
already misclassifies has distance 0. Score = mean flip scale over the draws, float64 [N] (higher =
member). The bisection assumes the label flips once along the ray (it finds *a* flip point, the
first one when the label does not flip back); document any other use accordingly.

Cost: draws * (steps + 2) oracle calls on all models (inputs one per model, [M, N, *shape]),
in chunks of ``chunk`` examples (default: as many as fit 512 MiB of queries), built on the oracle's device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...errors import ConfigError
from .base import Observations, register_attack
from .label_augment import needs_oracle


def _check(draws: int, steps: int, max_scale: float, chunk: int | None) -> None:
    for name, v in (("draws", draws), ("steps", steps), ("chunk", 1 if chunk is None else chunk)):
        if int(v) != v or v < 1:
            raise ConfigError(f"label-boundary option {name} must be a positive integer, got {v!r}")
    if not max_scale > 0 or max_scale == float("inf"):
        raise ConfigError(f"label-boundary option max_scale must be a positive finite number, got {max_scale!r}")


_QUERY_BYTES = 512 * 2**20
"""Size of one oracle call's noisy inputs [M, chunk, *shape] (float32) when ``chunk`` is not given."""


def _auto_chunk(m: int, n: int, example_numel: int) -> int:
    """Examples per oracle call: as many as keep [M, chunk, *shape] float32 within :data:`_QUERY_BYTES`."""
    return max(1, min(n, _QUERY_BYTES // max(1, 4 * m * example_numel)))


def label_boundary_all_targets(obs: Observations, *, draws: int = 4, steps: int = 10, max_scale: float = 8.0,
                               chunk: int | None = None, seed: int = 0) -> Tensor:
    """Scores float64 [M, N] of every model as the target.

    The directions e are drawn on the CPU from ``seed`` (the same on every device and for every ``chunk``); the
    noisy queries x + s e [M, chunk, *shape] are built on the oracle's device (``oracle.device``), so a GPU pool is
    not fed ~100 MB host copies per call. ``chunk`` (examples per call) changes the cost, not the scores."""
    _check(draws, steps, max_scale, chunk)
    oracle = needs_oracle(obs, "label-boundary")
    x, y = oracle.x, obs.labels.cpu()
    m, n = oracle.num_models, x.shape[0]
    dev = oracle.device
    chunk = chunk or _auto_chunk(m, n, x[0].numel())
    unit = float(x.float().std()) or 1.0
    g = torch.Generator().manual_seed(int(seed))
    out = torch.zeros(m, n, dtype=torch.float64)
    ones = (1,) * (x.dim() - 1)  # a scale per (model, example), broadcast over the example's shape
    for _ in range(draws):
        e = torch.randn(x.shape, generator=g, dtype=torch.float32)
        for i in range(0, n, chunk):
            xb, eb, yb = x[i:i + chunk].to(dev).float(), e[i:i + chunk].to(dev), y[i:i + chunk]

            def wrong(scale: Tensor, xb: Tensor = xb, eb: Tensor = eb, yb: Tensor = yb) -> Tensor:
                # scale float64 [M, b] (CPU) -> bool [M, b]: the label at x + scale e differs from y
                s = (scale * unit).to(dev, torch.float32).view(m, -1, *ones)
                return oracle(xb.unsqueeze(0) + s * eb.unsqueeze(0)) != yb

            lo = torch.zeros(m, xb.shape[0], dtype=torch.float64)
            hi = torch.full_like(lo, max_scale)
            flips = wrong(hi)
            for _ in range(steps):
                mid = (lo + hi) / 2
                w = wrong(mid)
                hi, lo = torch.where(w, mid, hi), torch.where(w, lo, mid)
            dist = torch.where(flips, hi, torch.full_like(hi, max_scale))
            dist = torch.where(oracle(xb) != yb, torch.zeros_like(dist), dist)
            out[:, i:i + chunk] += dist
    return out / draws


@register_attack("label-boundary", all_targets=label_boundary_all_targets, needs_oracle=True)
def label_boundary(obs: Observations, target: int, *, draws: int = 4, steps: int = 10, max_scale: float = 8.0,
                   chunk: int | None = None, seed: int = 0) -> Tensor:
    """Mean noise scale that flips the target's label (bisection on labels) -> float64 [N]."""
    if not 0 <= target < obs.num_models:
        raise ConfigError(f"target must be a model index in [0, {obs.num_models - 1}], got {target}")
    return label_boundary_all_targets(obs, draws=draws, steps=steps, max_scale=max_scale, chunk=chunk,
                                      seed=seed)[target]
