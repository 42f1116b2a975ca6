"""Privately estimated normalisation statistics (Tramèr & Boneh, "Differentially Private Learning Needs
Better Features (or Much More Data)", ICLR 2021, "data normalization": the data-dependent alternative to
GroupNorm for ScatterNet features), for models built with ``norm: dp-stats``
(:class:`~mlaudit.models.scatternet.DPStatsNorm`) and a recipe with ``dp.normalisation``.

The mechanism (our choices where the paper's exact details are not restated here; docs/privacy.md):

1. For each training example i, the normalised layer's input z_i [F, h, w] gives its per-channel mean
   m_i[c] = mean_{h,w} z_i[c] and per-channel second moment s_i[c] = mean_{h,w} z_i[c]^2 (vectors in R^F).
2. Clipping in l2 over the F channels: m_i <- m_i min(1, C_m / ||m_i||), s_i <- s_i min(1, C_s / ||s_i||),
   so one example moves each sum by at most C_m (resp. C_s) in l2.
3. Two Gaussian mechanism releases over the whole training set (no subsampling):
   M = sum_i m_i + N(0, sigma^2 C_m^2 I), S = sum_i s_i + N(0, sigma^2 C_s^2 I).
4. Divided by the public count n (as DP-SGD divides by the public q n): mean = M / n, and
   var = max(S / n - mean^2, sigma C_s / n) (post-processing: the floor, the noise std of S / n, keeps a
   channel whose noisy variance is tiny or negative from being blown up).

Accounting: the two releases have RDP 2 a / (2 sigma^2) at order a, added to DP-SGD's
(:func:`mlaudit.privacy.accountant.epsilon` with ``releases=((sigma, 2),)``). ``sigma`` is
``dp.normalisation.noise_multiplier`` or, from ``dp.normalisation.share`` s, the smallest sigma whose two
releases alone cost s * dp.epsilon; DP-SGD's sigma is then calibrated for the composition
(:meth:`mlaudit.privacy.dpsgd.DPTraining.start`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..train.recipe import DPConfig
from .accountant import Releases, calibrate_releases

RELEASES = 2
"""Gaussian releases of the statistics: the sum of clipped means and the sum of clipped second moments."""
FEATURE_BATCH = 512
"""Examples per batch when computing the statistics."""


def example_stats(z: Tensor) -> tuple[Tensor, Tensor]:
    """Per-example per-channel mean and second moment of ``z`` [B, F, *spatial] -> ([B, F], [B, F]), float64."""
    flat = z.detach().double().flatten(2)
    return flat.mean(-1), flat.pow(2).mean(-1)


def clip_rows(v: Tensor, bound: float) -> Tensor:
    """Each row of ``v`` [B, F] scaled to l2 norm <= ``bound`` (rows already inside are unchanged)."""
    norms = v.norm(dim=1, keepdim=True)
    return v * (bound / norms.clamp_min(1e-300)).clamp(max=1.0)


def clipped_stat_sums(z: Tensor, *, clip_mean: float, clip_second: float) -> tuple[Tensor, Tensor]:
    """sum_i clip(m_i, C_m) and sum_i clip(s_i, C_s) over the examples of ``z`` [B, F, *spatial] -> ([F], [F])."""
    m, s = example_stats(z)
    return clip_rows(m, clip_mean).sum(0), clip_rows(s, clip_second).sum(0)


def noisy_stats(sum_mean: Tensor, sum_second: Tensor, n: int, *, clip_mean: float, clip_second: float,
                noise_multiplier: float, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(mean [F], var [F]) from the clipped sums of ``n`` examples, each sum with Gaussian noise of std
    ``noise_multiplier * clip`` (drawn on the CPU from ``generator``); var floored at
    ``noise_multiplier * clip_second / n`` (module docstring). Returned as float32 on the sums' device."""
    if n < 1:
        raise ConfigError(f"private normalisation statistics need n >= 1 training examples, got {n}")
    f = sum_mean.numel()
    z = torch.randn(2, f, generator=generator, dtype=torch.float64)
    m = (sum_mean.double().cpu() + noise_multiplier * clip_mean * z[0]) / n
    second = (sum_second.double().cpu() + noise_multiplier * clip_second * z[1]) / n
    var = (second - m.pow(2)).clamp_min(noise_multiplier * clip_second / n)
    return m.float().to(sum_mean.device), var.float().to(sum_mean.device)


@functools.lru_cache(maxsize=64)
def _sigma_for_share(epsilon: float, share: float, delta: float, accountant: str) -> float:
    try:
        return calibrate_releases(target_epsilon=share * epsilon, count=RELEASES, delta=delta,
                                  accountant=accountant)  # type: ignore[arg-type]
    except ConfigError as e:
        raise ConfigError(f"dp.normalisation.share = {share} asks for epsilon {share * epsilon:.4g} on the statistics, "
                          f"which cannot be reached ({e}); allowed: a larger share (< 1) or give "
                          "dp.normalisation.noise_multiplier") from None


def norm_noise(cfg: DPConfig) -> float | None:
    """sigma of the statistics' releases for ``cfg`` (None without ``cfg.normalisation``)."""
    norm = cfg.normalisation
    if norm is None:
        return None
    share = norm.resolved_share
    if share is None:
        return float(norm.noise_multiplier)  # type: ignore[arg-type]
    return _sigma_for_share(float(cfg.epsilon), share, cfg.delta, cfg.accountant)  # type: ignore[arg-type]


def norm_releases(cfg: DPConfig) -> Releases:
    """The accountant's ``releases`` for ``cfg``'s statistics: ``((sigma, 2),)``, or () without them or when
    sigma is 0 (then no finite epsilon exists; :meth:`DPTraining.report` says inf)."""
    sigma = norm_noise(cfg)
    return ((sigma, RELEASES),) if sigma else ()


def dp_stats_norms(model: nn.Module) -> list[nn.Module]:
    """The :class:`~mlaudit.models.scatternet.DPStatsNorm` modules of ``model``."""
    from ..models.scatternet import DPStatsNorm  # models import train; keep the privacy package light

    return [m for m in model.modules() if isinstance(m, DPStatsNorm)]


def fit_dp_stats(model: nn.Module, batches: Iterable[Tensor], n: int, cfg: DPConfig,
                 generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Estimate and fix the statistics of ``model``'s one DPStatsNorm from its training inputs (``batches``
    of model inputs covering each of its ``n`` training examples once; fed through
    ``model.dp_stats_features``); returns (mean, var)."""
    norm = cfg.normalisation
    sigma = norm_noise(cfg)
    if norm is None or sigma is None:
        raise ConfigError("a model with norm dp-stats needs recipe.dp.normalisation (e.g. {share: 0.1, clip_mean: 1.0, "
                          "clip_second: 1.0})")
    mods = dp_stats_norms(model)
    features: Callable[[Tensor], Tensor] | None = getattr(model, "dp_stats_features", None)
    if len(mods) != 1 or features is None:
        raise ConfigError(f"private normalisation statistics need a model with one DPStatsNorm and a "
                          f"dp_stats_features method (scatter-linear, scatter-cnn with norm: dp-stats); "
                          f"{type(model).__name__} has {len(mods)} DPStatsNorm layer(s)")
    sum_m: Tensor | None = None
    sum_s: Tensor | None = None
    seen = 0
    with torch.no_grad():
        for x in batches:
            bm, bs = clipped_stat_sums(features(x), clip_mean=norm.clip_mean, clip_second=norm.clip_second)
            sum_m = bm if sum_m is None else sum_m + bm
            sum_s = bs if sum_s is None else sum_s + bs
            seen += len(x)
    if sum_m is None or sum_s is None or seen != n:
        raise ConfigError(f"private normalisation statistics saw {seen} examples, expected the model's {n}")
    mean, var = noisy_stats(sum_m, sum_s, n, clip_mean=norm.clip_mean, clip_second=norm.clip_second,
                            noise_multiplier=sigma, generator=generator)
    mods[0].set_stats(mean, var)  # type: ignore[operator]
    return mean, var
