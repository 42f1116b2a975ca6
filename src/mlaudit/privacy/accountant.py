"""Privacy accounting for DP-SGD with a maintained library (Opacus's accountants), as pure functions.

DP-SGD (Abadi et al. 2016) with Poisson sampling rate ``q``, noise multiplier ``sigma`` and ``T``
steps is the T-fold composition of the subsampled Gaussian mechanism. Two accountants turn
(sigma, q, T, delta) into the epsilon of an (epsilon, delta)-DP guarantee:

``rdp``  Renyi DP of the subsampled Gaussian (Mironov, Talwar & Zhang 2019) composed over T steps,
         converted to (epsilon, delta) with Theorem 21 of Balle et al., "Hypothesis testing
         interpretations and Renyi differential privacy" (AISTATS 2020) -- the conversion Opacus's
         ``get_privacy_spent`` uses: eps = min_a [RDP(a) + log((a-1)/a) - (log delta + log a)/(a-1)],
         over Opacus's default orders a in {1.1, ..., 10.9, 12, ..., 63}. It is tighter than the
         classic conversion eps = min_a [RDP(a) - log(delta)/(a-1)] (Mironov 2017, Prop. 3) that
         TensorFlow Privacy's tutorials used; with only orders up to 63 it cannot certify epsilon
         below about ``(log(1/delta) - log 63)/62`` (~0.1 at delta = 1e-5).
``prv``  Numerical composition of privacy loss random variables (Gopi, Lee & Wutschitz, "Numerical
         composition of differential privacy", NeurIPS 2021); near-exact, so usually 5-15 % below
         ``rdp``. Reports the upper end of its error interval (eps_error 0.01).

Every function validates its inputs and raises :class:`~mlaudit.errors.ConfigError` naming the field.
Opacus is imported lazily (inside the functions) so ``import mlaudit`` stays fast.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import Literal

from ..errors import ConfigError
from ..registry import Registry

AccountantName = Literal["rdp", "prv"]
EpsilonFn = Callable[[float, float, int, float], float]
ACCOUNTANTS: Registry[EpsilonFn] = Registry("accountant")
"""name -> ``fn(noise_multiplier, sample_rate, steps, delta) -> epsilon``."""

MAX_NOISE_MULTIPLIER = 1e4
"""Calibration searches sigma in (0, MAX_NOISE_MULTIPLIER]."""


def _with_history(mechanism: str, sigma: float, q: float, steps: int):  # noqa: ANN202
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=mechanism)
    acc.history = [(float(sigma), float(q), int(steps))]
    return acc


@ACCOUNTANTS.register("rdp")
def _rdp(sigma: float, q: float, steps: int, delta: float) -> float:
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is still valid
        warnings.simplefilter("ignore", UserWarning)
        return float(_with_history("rdp", sigma, q, steps).get_epsilon(delta=delta))


@ACCOUNTANTS.register("prv")
def _prv(sigma: float, q: float, steps: int, delta: float) -> float:
    return float(_with_history("prv", sigma, q, steps).get_epsilon(delta=delta, eps_error=0.01))


def _check(*, sample_rate: float, steps: int, delta: float, accountant: str) -> None:
    if not (0.0 < sample_rate <= 1.0):
        raise ConfigError(f"sample_rate (q) must lie in (0, 1], got {sample_rate}; q = batch_size / n_examples")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be an integer >= 1, got {steps!r}")
    if not (0.0 < delta < 1.0):
        raise ConfigError(f"delta must lie in (0, 1), got {delta}; the usual choice is well below 1/n_examples")
    ACCOUNTANTS.get(accountant)  # unknown name -> ConfigError listing the valid ones


def epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
            accountant: AccountantName = "rdp") -> float:
    """Epsilon of DP-SGD after ``steps`` Poisson-sampled steps at rate ``sample_rate`` with Gaussian
    noise of std ``noise_multiplier * C`` (C = clipping norm), at the given ``delta``.

    Raises: :class:`ConfigError` for sigma <= 0, q outside (0, 1], steps < 1, delta outside (0, 1)
    or an unknown accountant.
    """
    _check(sample_rate=sample_rate, steps=steps, delta=delta, accountant=accountant)
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise ConfigError(f"noise_multiplier (sigma) must be a positive finite number, got {noise_multiplier}; "
                          "sigma = 0 gives no privacy (epsilon = inf)")
    return _epsilon_cached(accountant, float(noise_multiplier), float(sample_rate), int(steps), float(delta))


@functools.lru_cache(maxsize=4096)
def _epsilon_cached(accountant: str, sigma: float, q: float, steps: int, delta: float) -> float:
    """One accountant evaluation (~0.1 s for rdp), cached: a factory run reports the same
    (sigma, q, steps, delta) for every model, and calibration repeats per chunk of models."""
    return ACCOUNTANTS.get(accountant)(sigma, q, steps, delta)


def calibrate_noise(*, target_epsilon: float, sample_rate: float, steps: int, delta: float,
                    accountant: AccountantName = "rdp", rel_tol: float = 1e-3) -> float:
    """The smallest noise multiplier (to ``rel_tol``) whose epsilon is <= ``target_epsilon``.

    Bisection on sigma over :func:`epsilon` (monotone decreasing in sigma); the returned sigma always
    satisfies ``epsilon(sigma) <= target_epsilon``.

    Raises: :class:`ConfigError` for bad inputs, and when even sigma =
    :data:`MAX_NOISE_MULTIPLIER` cannot reach the target (the message gives the smallest epsilon
    reachable and how to get lower ones).
    """
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ConfigError(f"target epsilon must be a positive finite number, got {target_epsilon}")
    _check(sample_rate=sample_rate, steps=steps, delta=delta, accountant=accountant)

    def eps(s: float) -> float:
        return epsilon(noise_multiplier=s, sample_rate=sample_rate, steps=steps, delta=delta, accountant=accountant)

    hi = 1.0
    while eps(hi) > target_epsilon:
        if hi >= MAX_NOISE_MULTIPLIER:
            floor = eps(MAX_NOISE_MULTIPLIER)
            raise ConfigError(
                f"target epsilon {target_epsilon} cannot be reached with q={sample_rate}, {steps} steps, "
                f"delta={delta} and the {accountant!r} accountant: even sigma={MAX_NOISE_MULTIPLIER:g} gives "
                f"epsilon {floor:.4g}; ask for epsilon >= {floor:.3g}, a larger delta"
                + (", or the 'prv' accountant (tighter for small epsilon)" if accountant == "rdp" else ""))
        hi = min(hi * 2, MAX_NOISE_MULTIPLIER)
    lo = 0.0
    while hi - lo > rel_tol * hi:
        mid = (lo + hi) / 2
        if mid > 0 and eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


def check_delta(delta: float, n: int, *, force: bool = False) -> None:
    """Refuse ``delta >= 1/n`` (a mechanism that publishes one random example outright is
    (0, 1/n)-DP, so such a delta promises nothing); with ``force`` only warn.

    Raises: :class:`ConfigError` unless ``force``; set ``dp.allow_large_delta: true`` to force.
    """
    if n < 1:
        raise ConfigError(f"n (training examples) must be >= 1, got {n}")
    if delta >= 1.0 / n:
        msg = (f"delta={delta} >= 1/N = {1.0 / n:.3g} for N={n} training examples: such a delta allows "
               f"leaking whole examples; use delta < {1.0 / n:.3g} (e.g. {_suggest(n):.0e})")
        if not force:
            raise ConfigError(msg + ", or set dp.allow_large_delta: true to accept it")
        warnings.warn(msg, UserWarning, stacklevel=2)


def _suggest(n: int) -> float:
    return 10.0 ** math.floor(math.log10(1.0 / n) - 1)
