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

Extra releases. ``releases`` (a tuple of ``(noise_multiplier, count)``) adds ``count`` Gaussian mechanism
releases of l2 sensitivity C with noise std ``noise_multiplier * C`` that see the whole dataset (no subsampling),
e.g. the private normalisation statistics of :mod:`mlaudit.privacy.normstats`. They compose with DP-SGD's
steps: in RDP by adding :func:`gaussian_rdp` (``count * a / (2 sigma^2)`` at order a, Mironov 2017, Prop. 7 and
Prop. 1) to the subsampled Gaussian's RDP at every order before the one conversion; with ``prv`` as extra
entries of sampling rate 1 in the composed history.

Every function validates its inputs and raises :class:`~mlaudit.errors.ConfigError` naming the field.
Opacus is imported lazily (inside the functions) so ``import mlaudit`` stays fast.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Literal

from ..errors import ConfigError
from ..registry import Registry

AccountantName = Literal["rdp", "prv"]
Releases = tuple[tuple[float, int], ...]
"""Non-subsampled Gaussian releases composed with DP-SGD: ``((noise_multiplier, count), ...)``."""
EpsilonFn = Callable[[float, float, int, float, Releases], float]
ACCOUNTANTS: Registry[EpsilonFn] = Registry("accountant")
"""name -> ``fn(noise_multiplier, sample_rate, steps, delta, releases) -> epsilon`` (steps may be 0 when
``releases`` is not empty: the releases alone)."""

MAX_NOISE_MULTIPLIER = 1e4
"""Calibration searches sigma in (0, MAX_NOISE_MULTIPLIER]."""


def _with_history(mechanism: str, sigma: float, q: float, steps: int, releases: Releases = ()):  # noqa: ANN202
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=mechanism)
    acc.history = ([(float(sigma), float(q), int(steps))] if steps > 0 else []) + [
        (float(s), 1.0, int(c)) for s, c in releases]
    return acc


RELEASE_ONLY_ORDERS = [80.0, 100.0, 128.0, 192.0, 256.0, 384.0, 512.0, 768.0, 1024.0]
"""Orders added to Opacus's defaults (up to 63) for releases without DP-SGD steps (:func:`releases_epsilon`):
the Gaussian's RDP is exact at every order, and these let a small epsilon (below ~0.1 at delta 1e-5) be reached.
DP-SGD's composition keeps Opacus's orders, so with no releases it is Opacus's accountant exactly."""


def gaussian_rdp(orders: Sequence[float], noise_multiplier: float, count: int = 1) -> list[float]:
    """RDP of ``count`` releases of the Gaussian mechanism with noise multiplier sigma (noise std sigma times
    the l2 sensitivity), at each order a > 1: ``count * a / (2 sigma^2)`` (Mironov 2017, Prop. 7; RDP adds
    under composition, Prop. 1)."""
    return [count * a / (2.0 * noise_multiplier**2) for a in orders]


def composed_rdp(orders: Sequence[float], *, noise_multiplier: float, sample_rate: float, steps: int,
                 releases: Releases = ()) -> list[float]:
    """RDP at ``orders`` of ``steps`` subsampled Gaussian steps (Mironov, Talwar & Zhang 2019, via Opacus)
    composed with the Gaussian ``releases``: the sum of the two, order by order."""
    from opacus.accountants.analysis.rdp import compute_rdp

    total = ([float(v) for v in compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=steps,
                                            orders=list(orders))]
             if steps > 0 else [0.0] * len(orders))
    for s, c in releases:
        total = [t + r for t, r in zip(total, gaussian_rdp(orders, s, c))]
    return total


@ACCOUNTANTS.register("rdp")
def _rdp(sigma: float, q: float, steps: int, delta: float, releases: Releases = ()) -> float:
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is still valid
        warnings.simplefilter("ignore", UserWarning)
        if not releases:
            return float(_with_history("rdp", sigma, q, steps).get_epsilon(delta=delta))
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis.rdp import get_privacy_spent

        orders = RDPAccountant.DEFAULT_ALPHAS + (RELEASE_ONLY_ORDERS if steps == 0 else [])
        rdp = composed_rdp(orders, noise_multiplier=sigma, sample_rate=q, steps=steps, releases=releases)
        return float(get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])


@ACCOUNTANTS.register("prv")
def _prv(sigma: float, q: float, steps: int, delta: float, releases: Releases = ()) -> float:
    with warnings.catch_warnings():  # sampling rate 1 (the releases): numpy's log(0) and the RDP domain bound's
        warnings.simplefilter("ignore", RuntimeWarning)  # "optimal order is the largest alpha"; both harmless
        warnings.simplefilter("ignore", UserWarning)
        return float(_with_history("prv", sigma, q, steps, releases).get_epsilon(delta=delta, eps_error=0.01))


def _check(*, sample_rate: float, steps: int, delta: float, accountant: str) -> None:
    if not (0.0 < sample_rate <= 1.0):
        raise ConfigError(f"sample_rate (q) must lie in (0, 1], got {sample_rate}; q = batch_size / n_examples")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be an integer >= 1, got {steps!r}")
    if not (0.0 < delta < 1.0):
        raise ConfigError(f"delta must lie in (0, 1), got {delta}; the usual choice is well below 1/n_examples")
    ACCOUNTANTS.get(accountant)  # unknown name -> ConfigError listing the valid ones


def epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
            accountant: AccountantName = "rdp", releases: Releases = ()) -> float:
    """Epsilon of DP-SGD after ``steps`` Poisson-sampled steps at rate ``sample_rate`` with Gaussian
    noise of std ``noise_multiplier * C`` (C = clipping norm), at the given ``delta``, composed with the
    non-subsampled Gaussian ``releases`` ``((sigma_r, count), ...)`` (module docstring; none by default).

    Raises: :class:`ConfigError` for sigma <= 0, q outside (0, 1], steps < 1, delta outside (0, 1),
    a release with sigma_r <= 0 or count < 1, or an unknown accountant.
    """
    _check(sample_rate=sample_rate, steps=steps, delta=delta, accountant=accountant)
    if not (noise_multiplier > 0 and math.isfinite(noise_multiplier)):
        raise ConfigError(f"noise_multiplier (sigma) must be a positive finite number, got {noise_multiplier}; "
                          "sigma = 0 gives no privacy (epsilon = inf)")
    return _epsilon_cached(accountant, float(noise_multiplier), float(sample_rate), int(steps), float(delta),
                           _check_releases(releases))


def releases_epsilon(*, releases: Releases, delta: float, accountant: AccountantName = "rdp") -> float:
    """Epsilon of the Gaussian ``releases`` alone (no DP-SGD steps), at ``delta`` (``rdp``: over Opacus's
    orders and :data:`RELEASE_ONLY_ORDERS`)."""
    _check(sample_rate=1.0, steps=1, delta=delta, accountant=accountant)
    rel = _check_releases(releases)
    if not rel:
        raise ConfigError("releases_epsilon needs at least one (noise_multiplier, count) release")
    return _epsilon_cached(accountant, 1.0, 1.0, 0, float(delta), rel)


def _check_releases(releases: Releases) -> Releases:
    out = []
    for s, c in releases:
        if not (s > 0 and math.isfinite(s)):
            raise ConfigError(f"a Gaussian release's noise multiplier must be a positive finite number, got {s}")
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ConfigError(f"a Gaussian release's count must be an integer >= 1, got {c!r}")
        out.append((float(s), int(c)))
    return tuple(out)


@functools.lru_cache(maxsize=4096)
def _epsilon_cached(accountant: str, sigma: float, q: float, steps: int, delta: float,
                    releases: Releases = ()) -> float:
    """One accountant evaluation (~0.1 s for rdp), cached: a factory run reports the same
    (sigma, q, steps, delta) for every model, and calibration repeats per chunk of models."""
    return ACCOUNTANTS.get(accountant)(sigma, q, steps, delta, releases)


def calibrate_noise(*, target_epsilon: float, sample_rate: float, steps: int, delta: float,
                    accountant: AccountantName = "rdp", rel_tol: float = 1e-3, releases: Releases = ()) -> float:
    """The smallest noise multiplier (to ``rel_tol``) whose epsilon, composed with ``releases``, is <=
    ``target_epsilon``.

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
        return epsilon(noise_multiplier=s, sample_rate=sample_rate, steps=steps, delta=delta, accountant=accountant,
                       releases=releases)

    extra = f" composed with the Gaussian releases {list(releases)}" if releases else ""
    return _bisect(eps, target_epsilon, rel_tol, lambda floor: (
        f"target epsilon {target_epsilon} cannot be reached with q={sample_rate}, {steps} steps{extra}, "
        f"delta={delta} and the {accountant!r} accountant: even sigma={MAX_NOISE_MULTIPLIER:g} gives "
        f"epsilon {floor:.4g}; ask for epsilon >= {floor:.3g}, a larger delta"
        + (", or the 'prv' accountant (tighter for small epsilon)" if accountant == "rdp" else "")))


def calibrate_releases(*, target_epsilon: float, count: int, delta: float, accountant: AccountantName = "rdp",
                       rel_tol: float = 1e-3) -> float:
    """The smallest noise multiplier (to ``rel_tol``) for which ``count`` Gaussian releases alone have
    epsilon <= ``target_epsilon`` at ``delta``; :class:`ConfigError` (stating the smallest reachable epsilon)
    when none up to :data:`MAX_NOISE_MULTIPLIER` does."""
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ConfigError(f"target epsilon must be a positive finite number, got {target_epsilon}")

    def eps(s: float) -> float:
        return releases_epsilon(releases=((s, count),), delta=delta, accountant=accountant)

    return _bisect(eps, target_epsilon, rel_tol, lambda floor: (
        f"{count} Gaussian release(s) cannot reach epsilon {target_epsilon} at delta={delta} with the "
        f"{accountant!r} accountant: even sigma={MAX_NOISE_MULTIPLIER:g} gives epsilon {floor:.4g}"))


def _bisect(eps: Callable[[float], float], target: float, rel_tol: float, unreachable: Callable[[float], str]
            ) -> float:
    """The smallest sigma in (0, MAX_NOISE_MULTIPLIER] (to ``rel_tol``) with ``eps(sigma) <= target`` (eps
    decreasing); ConfigError(unreachable(eps(MAX))) when there is none."""
    hi = 1.0
    while eps(hi) > target:
        if hi >= MAX_NOISE_MULTIPLIER:
            raise ConfigError(unreachable(eps(MAX_NOISE_MULTIPLIER)))
        hi = min(hi * 2, MAX_NOISE_MULTIPLIER)
    lo = 0.0
    while hi - lo > rel_tol * hi:
        mid = (lo + hi) / 2
        if mid > 0 and eps(mid) <= target:
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
