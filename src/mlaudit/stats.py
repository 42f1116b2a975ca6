"""Statistics shared by every experiment: means with standard errors, exact binomial intervals,
ROC curves with bootstrap intervals, and the empirical epsilon lower bound used in DP auditing.

numpy/scipy, except the sort of the ROC functions and the bootstrap of :func:`roc_metrics`, which run in
torch on their ``device`` (see :func:`_bootstrap_roc_stats`); every function accepts array-likes. Convention for attack
scores: a *higher* score means "predicted member / positive"; labels are 0/1 (or bool), 1 = positive.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike
from scipy.special import betaincinv

from .errors import ConfigError

__all__ = [
    "MeanSE", "mean_se", "describe", "mean_difference", "separation", "clopper_pearson", "roc_curve", "auc",
    "tpr_at_fpr", "balanced_accuracy_best", "bootstrap_ci", "roc_metrics", "fpr_key", "eps_lower_bound",
    "format_number", "random_removal",
]

BOOT_MEMORY_BYTES = {"cpu": 0, "cuda": 8 * 2**30}
"""Working memory of one batch of bootstrap replicates of :func:`roc_metrics`, per device type
(:data:`BOOT_BYTES_PER_PAIR` per replicate and pair; at least one replicate a batch); other device
types use the CPU figure. The CPU takes one replicate at a time: measured on a 2-core CPU
(2026-12-02, 3.2M pairs) at 0.16 s per replicate alone, 0.24 s two at a time, 0.44 s ten at a time
(memory bound; larger temporaries cost more than they save)."""

BOOT_BYTES_PER_PAIR = 64
"""Peak bytes per (replicate, pair) of :func:`_bootstrap_roc_stats` (int64 counts and cumulative sums)."""


def format_number(x: float) -> str:
    """Short human form of a number: 3 decimals in [1e-3, 1e4), else 3 significant digits."""
    x = float(x)
    if math.isnan(x) or math.isinf(x):
        return str(x)
    if x == 0 or 1e-3 <= abs(x) < 1e4:
        return f"{x:.3f}"
    return f"{x:.3g}"


def mean_se(values: ArrayLike) -> tuple[float, float]:
    """Mean and standard error ``std(ddof=1) / sqrt(n)`` of ``values`` (any shape, flattened).

    With a single value the standard error is undefined and returned as ``nan`` (not 0, which
    would claim certainty). NaNs in ``values`` propagate. Raises ConfigError when empty.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ConfigError("mean_se needs at least one value, got an empty array")
    mean = float(v.mean())
    se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan
    return mean, se


@dataclass(frozen=True)
class MeanSE:
    """A mean with its standard error over ``n`` values (``se`` is nan when n == 1)."""

    mean: float
    se: float
    n: int

    @classmethod
    def of(cls, values: ArrayLike) -> MeanSE:
        """Summarise ``values`` (see :func:`mean_se`)."""
        m, s = mean_se(values)
        return cls(m, s, int(np.asarray(values).size))

    def to_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "se": self.se, "n": self.n}

    def __str__(self) -> str:
        return f"{format_number(self.mean)} ± {format_number(self.se)}"


def describe(values: ArrayLike) -> dict[str, float]:
    """:class:`MeanSE` of ``values`` as a dict, with their ``min``, ``median`` and ``max``."""
    v = np.asarray(values, dtype=np.float64).ravel()
    return {**MeanSE.of(v).to_dict(), "min": float(v.min()), "median": float(np.median(v)), "max": float(v.max())}


def mean_difference(a: ArrayLike, b: ArrayLike) -> dict[str, float | int]:
    """Mean +- SE of a - b (e.g. clean minus poisoned accuracy): paired, the mean of a[i] - b[i], when
    both have the same length (pairs sharing a seed), else the difference of the means with SE
    sqrt(se_a^2 + se_b^2) and ``n`` the smaller count."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.size == b.size:
        return MeanSE.of(a - b).to_dict()
    ca, cb = MeanSE.of(a), MeanSE.of(b)
    return {"mean": ca.mean - cb.mean, "se": float(np.hypot(ca.se, cb.se)), "n": min(a.size, b.size)}


def separation(scores: ArrayLike, labels: ArrayLike) -> float:
    """Standardised gap (mean positive score - mean negative score) / pooled sd (each group's ddof-1
    variance, pooled over n - 2 degrees of freedom); nan when the pooled sd is 0 or undefined."""
    s, y = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(labels).ravel().astype(bool)
    a, b = s[y], s[~y]
    with np.errstate(all="ignore"), warnings.catch_warnings():  # an empty or 1-value group: nan, no warning
        warnings.simplefilter("ignore", RuntimeWarning)
        sd = math.sqrt((a.var(ddof=1) * (a.size - 1) + b.var(ddof=1) * (b.size - 1)) / max(s.size - 2, 1))
        gap = a.mean() - b.mean()
    return float(gap / sd) if sd > 0 else math.nan


def _check_alpha(alpha: float) -> float:
    if not 0.0 < float(alpha) < 1.0:
        raise ConfigError(f"alpha must lie in (0, 1), got {alpha!r}; 0.05 gives 95% intervals")
    return float(alpha)


def clopper_pearson(k: int, n: int, *, alpha: float = 0.05, one_sided: bool = False) -> tuple[float, float]:
    """Exact two-sided (1 - alpha) Clopper-Pearson interval for a binomial proportion k / n.

    lo = BetaQuantile(alpha/2; k, n-k+1) (0 when k == 0), hi = BetaQuantile(1-alpha/2; k+1, n-k) (1 when k == n).
    Each one-sided bound therefore holds with probability >= 1 - alpha/2. With ``one_sided`` each bound
    is the one-sided (1 - alpha) bound (alpha in place of alpha/2): P(p >= lo) >= 1 - alpha, and
    lo = alpha ** (1/n) exactly when k == n (randomized smoothing's CERTIFY, Cohen et al. 2019).
    """
    alpha = _check_alpha(alpha)
    if int(k) != k or int(n) != n or not 0 <= k <= n or n < 1:
        raise ConfigError(f"clopper_pearson needs integers 0 <= k <= n and n >= 1, got k={k!r}, n={n!r}")
    k, n = int(k), int(n)
    tail = alpha if one_sided else alpha / 2
    lo = 0.0 if k == 0 else float(betaincinv(k, n - k + 1, tail))
    hi = 1.0 if k == n else float(betaincinv(k + 1, n - k, 1 - tail))
    return lo, hi


def _prepare(scores: ArrayLike, labels: ArrayLike, device: torch.device | str = "cpu"
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort by descending score; return (sorted scores, sorted bool labels, last index of each tie group).

    Sorted with ``torch.sort(stable=True)`` on ``device`` (the same tie groups and counts as any
    other sort: ties are never split, so the order inside a group is moot).
    """
    s = np.asarray(scores.cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64).ravel()
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).ravel()
    if s.shape != y.shape:
        raise ConfigError(f"scores and labels must have the same length, got {s.size} and {y.size}")
    if np.isnan(s).any():
        raise ConfigError(f"scores contain {int(np.isnan(s).sum())} NaN values; drop or replace them first")
    if not np.isin(y, (0, 1)).all():
        raise ConfigError("labels must be 0/1 or bool (1 = positive / member)")
    yb = y.astype(bool)
    if yb.all() or not yb.any():
        raise ConfigError(f"ROC needs both classes; got {int(yb.sum())} positives out of {yb.size} examples")
    order = torch.sort(torch.from_numpy(s).to(device), descending=True, stable=True).indices.cpu().numpy()
    s, yb = s[order], yb[order]
    ends = np.append(np.flatnonzero(np.diff(s) != 0), s.size - 1)
    return s, yb, ends


def _curve(yb: np.ndarray, ends: np.ndarray, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(tp, fp) counts at each distinct threshold, with a leading (0, 0); ``w`` = per-example weights."""
    if w is None:
        pos, neg = yb.astype(np.int64), (~yb).astype(np.int64)
    else:
        pos, neg = np.where(yb, w, 0), np.where(yb, 0, w)
    tp = np.concatenate(([0], np.cumsum(pos)[ends]))
    fp = np.concatenate(([0], np.cumsum(neg)[ends]))
    return tp, fp


def roc_curve(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve of ``scores`` [N] against ``labels`` [N] (1 = positive, higher score = positive).

    Returns ``(fpr, tpr, thresholds)``, each [T + 1] for T distinct scores: a point per distinct
    threshold (ties are never split), predicting positive when ``score >= threshold``, preceded by
    the point (0, 0) at threshold +inf. fpr and tpr are non-decreasing; the last point is (1, 1).
    """
    s, yb, ends = _prepare(scores, labels)
    tp, fp = _curve(yb, ends)
    return fp / fp[-1], tp / tp[-1], np.concatenate(([np.inf], s[ends]))


def auc(fpr: ArrayLike, tpr: ArrayLike) -> float:
    """Area under a curve by the trapezoidal rule; ``fpr`` must be non-decreasing."""
    x, y = np.asarray(fpr, dtype=np.float64).ravel(), np.asarray(tpr, dtype=np.float64).ravel()
    if x.shape != y.shape or x.size < 2:
        raise ConfigError(f"auc needs fpr and tpr of equal length >= 2, got {x.size} and {y.size}")
    if np.any(np.diff(x) < 0):
        raise ConfigError("auc needs fpr sorted in non-decreasing order (as returned by roc_curve)")
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


def _idx_at_fpr(fpr: np.ndarray, target: float) -> int:
    return int(np.searchsorted(fpr, target, side="right")) - 1


def tpr_at_fpr(fpr: ArrayLike, tpr: ArrayLike, target: float) -> float:
    """Largest TPR among ROC points with ``FPR <= target`` (no interpolation, so never optimistic).

    With N negatives, targets below 1/N can only use points with zero false positives. Returns 0.0
    when no point qualifies (never the case for curves from :func:`roc_curve`, which start at (0, 0)).
    """
    if not 0.0 <= float(target) <= 1.0:
        raise ConfigError(f"FPR target must lie in [0, 1], got {target!r}")
    x, y = np.asarray(fpr, dtype=np.float64).ravel(), np.asarray(tpr, dtype=np.float64).ravel()
    mask = x <= target
    return float(y[mask].max()) if mask.any() else 0.0


def balanced_accuracy_best(fpr: ArrayLike, tpr: ArrayLike) -> float:
    """Best balanced accuracy over thresholds: max of (TPR + 1 - FPR) / 2 (>= 0.5 on a full ROC)."""
    x, y = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
    return float(np.max((y + 1.0 - x) / 2.0))


def _percentiles(values: np.ndarray, alpha: float) -> tuple[float, float]:
    finite = values[~np.isnan(values)]
    if finite.size == 0:
        return math.nan, math.nan
    if finite.size < values.size:
        warnings.warn(f"{values.size - finite.size} of {values.size} bootstrap statistics were NaN "
                      "and were left out of the interval", RuntimeWarning, stacklevel=3)
    lo, hi = np.quantile(finite, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def bootstrap_ci(statistic_fn: Callable[..., float], *arrays: ArrayLike, n_boot: int = 1000,
                 alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) interval of ``statistic_fn(*arrays)``.

    Rows (axis 0) of all ``arrays`` are resampled jointly with replacement, ``n_boot`` times.
    Resamples whose statistic is NaN are left out (with a RuntimeWarning).
    """
    alpha = _check_alpha(alpha)
    if not arrays or n_boot < 1:
        raise ConfigError(f"bootstrap_ci needs at least one array and n_boot >= 1, got n_boot={n_boot}")
    arrs = [np.asarray(a) for a in arrays]
    n = arrs[0].shape[0] if arrs[0].ndim else 0
    if n == 0 or any(a.ndim == 0 or a.shape[0] != n for a in arrs):
        raise ConfigError(f"bootstrap arrays must be non-empty with equal length, got {[a.shape for a in arrs]}")
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    for b in range(n_boot):
        idx = rng.integers(0, n, n)
        stats[b] = float(statistic_fn(*(a[idx] for a in arrs)))
    return _percentiles(stats, alpha)


def fpr_key(target: float) -> str:
    """Key of an FPR target in :func:`roc_metrics` output, e.g. 1e-3 -> "0.001", 1e-5 -> "1e-05"."""
    return f"{float(target):g}"


def _roc_stats(tp: np.ndarray, fp: np.ndarray, targets: Sequence[float]) -> list[float]:
    """[auc, balanced accuracy, tpr@target...] from cumulative counts (nan if a class is empty)."""
    if tp[-1] <= 0 or fp[-1] <= 0:
        return [math.nan] * (2 + len(targets))
    tpr, fpr = tp / tp[-1], fp / fp[-1]
    out = [auc(fpr, tpr), balanced_accuracy_best(fpr, tpr)]
    out += [float(tpr[_idx_at_fpr(fpr, t)]) for t in targets]
    return out


def _boot_counts(n: int, b: int, rng: np.random.Generator, gen: torch.Generator | None,
                 device: torch.device) -> torch.Tensor:
    """Multinomial resample counts int64 [b, n] (each row sums to n): n draws with replacement of a
    position in [0, n). CPU: ``rng`` (numpy), one row after the other; else ``gen`` on ``device``."""
    if gen is None:
        return torch.from_numpy(np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(b)]))
    idx = torch.randint(0, n, (b, n), generator=gen, device=device)
    idx += torch.arange(b, device=device).unsqueeze(1) * n
    return torch.bincount(idx.flatten(), minlength=b * n).view(b, n)


def _bootstrap_roc_stats(yb: np.ndarray, ends: np.ndarray, targets: Sequence[float], *, n_boot: int, seed: int,
                         device: torch.device, memory_bytes: int | None = None) -> np.ndarray:
    """Bootstrap replicates of :func:`_roc_stats`: float64 [n_boot, 2 + len(targets)] (auc, balanced
    accuracy, tpr@target...), NaN rows where a resample lacks a class.

    ``yb`` bool [n] are the labels in descending score order and ``ends`` int [T] the last position
    of each tie group (from :func:`_prepare`). Replicate r draws counts w_r [n] (multinomial, n
    draws); its ROC points are the cumulative counts TP_r = cumsum(w_r * yb)[ends] and FP_r =
    cumsum(w_r * ~yb)[ends], so no resample is sorted again. B replicates at a time are int64
    [B, n] tensors on ``device`` (B from ``memory_bytes``, default :data:`BOOT_MEMORY_BYTES`), and every statistic
    is exact integer arithmetic until its last division: with P, Q the positives and negatives of the
    resample, AUC = sum_i (FP_i - FP_i-1)(TP_i + TP_i-1) / (2 P Q) (the trapezoid; without ties
    2 * sum(w * ~yb * TP) / (2 P Q)); the best balanced accuracy is taken at argmax_i TP_i Q - FP_i P;
    TPR at FPR <= t is read at the last point with FP_i <= k, k the largest integer with
    k / Q <= t in float64, which is the point :func:`_roc_stats` picks.
    """
    n, k = yb.size, len(targets)
    out = np.full((n_boot, 2 + k), np.nan)
    if n_boot == 0:
        return out
    budget = BOOT_MEMORY_BYTES.get(device.type, BOOT_MEMORY_BYTES["cpu"]) if memory_bytes is None else memory_bytes
    chunk = int(max(1, min(n_boot, budget // (BOOT_BYTES_PER_PAIR * n))))
    rng = np.random.default_rng(seed)
    gen = None if device.type == "cpu" else torch.Generator(device=device).manual_seed(seed)
    pos = torch.from_numpy(yb).to(device)
    at = None if ends.size == n else torch.from_numpy(ends).to(device)
    tgt = torch.tensor(targets, dtype=torch.float64, device=device)
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        w = _boot_counts(n, b, rng, gen, device).to(device)  # [b, n]
        wp = w * pos
        w -= wp  # now the negatives' counts
        tp, fp = wp.cumsum(1), w.cumsum(1)
        if at is None:
            area2 = 2 * (w * tp).sum(1, keepdim=True)  # a negative's strip has height TP at its position
        else:
            tp, fp = tp[:, at], fp[:, at]
            area2 = ((fp - F.pad(fp[:, :-1], (1, 0))) * (tp + F.pad(tp[:, :-1], (1, 0)))).sum(1, keepdim=True)
        del w, wp
        p, q = tp[:, -1:], fp[:, -1:]  # positives, negatives [b, 1]
        best = (tp * q - fp * p).argmax(1, keepdim=True)
        pd, qd = p.double(), q.double()
        stats = [area2.double() / (2 * p * q).double(),
                 ((tp.gather(1, best) / pd + 1.0) - fp.gather(1, best) / qd).clamp_min(0.0) / 2]
        if k:
            lim = (tgt * qd).floor().long() + torch.arange(-1, 2, device=device).view(3, 1, 1)  # [3, b, k]
            lim = torch.where(lim.double() / qd <= tgt, lim, -1).amax(0).clamp_min(0)  # largest k / Q <= t
            idx = torch.searchsorted(fp, lim, right=True) - 1  # -1: only the leading (0, 0) point
            stats.append(torch.where(idx >= 0, tp.gather(1, idx.clamp_min(0)) / pd, 0.0))
        res = torch.cat(stats, 1)
        res[((p <= 0) | (q <= 0)).squeeze(1)] = math.nan
        out[start:start + b] = res.cpu().numpy()
    return out

def roc_metrics(scores: ArrayLike, labels: ArrayLike, *, fpr_targets: Sequence[float] = (1e-5, 1e-3, 1e-2),
                n_boot: int = 200, alpha: float = 0.05, seed: int = 0,
                device: torch.device | str = "cpu") -> dict[str, Any]:
    """See :func:`roc_analysis` (this is its metrics without the curve)."""
    return roc_analysis(scores, labels, fpr_targets=fpr_targets, n_boot=n_boot, alpha=alpha, seed=seed,
                        device=device)[0]


def roc_analysis(scores: ArrayLike, labels: ArrayLike, *, fpr_targets: Sequence[float] = (1e-5, 1e-3, 1e-2),
                 n_boot: int = 200, alpha: float = 0.05, seed: int = 0, device: torch.device | str = "cpu",
                 boot_memory_bytes: int | None = None) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray]]:
    """AUC, best balanced accuracy and TPR at fixed FPRs of an attack, with (1 - alpha) intervals.

    ``scores`` [N] and ``labels`` [N] as in :func:`roc_curve`. Returns::

        {"auc": {"value", "lo", "hi", "method": "bootstrap"},
         "balanced_accuracy": {...same...},
         "tpr_at_fpr": {fpr_key(t): {"value", "lo", "hi", "method": "bootstrap", "fpr", "threshold",
                                     "clopper_pearson": {"value", "lo", "hi", "k", "n"}}},
         "n_pos", "n_neg", "n_boot"}

    Intervals are percentile bootstraps over examples. The sort is done once (on ``device``); each
    resample is a vector of multinomial counts over the sorted examples, so a resample costs O(N),
    and batches of resamples are matrix operations in torch on ``device``
    (:func:`_bootstrap_roc_stats`). On the CPU the counts come from ``numpy.random.default_rng(seed)``
    exactly as in the per-resample loop this replaced, so CPU intervals are reproducible across
    versions; on CUDA they come from a CUDA ``torch.Generator`` seeded with ``seed`` (same
    distribution, other draws). The point estimates do not depend on ``device``. The
    Clopper-Pearson interval is on the TPR count at the point-estimate threshold (it ignores the
    randomness of choosing that threshold). ``n_boot=0`` skips the bootstrap (lo/hi are NaN).
    ``boot_memory_bytes``: working memory of one batch of replicates (default :data:`BOOT_MEMORY_BYTES` of the
    device type; callers running several analyses at once give each a share). It sets how many replicates share a
    batch: on the CPU the draws do not depend on it; on CUDA they do (one ``randint`` per batch; the same
    distribution, other draws), so it is part of what makes a CUDA interval reproducible.

    Also returns the curve ``(fpr, tpr)`` of :func:`roc_curve` from the same sort, so a report that draws it
    does not sort again (12.8M scores of a 256-model pool: ~10 s a curve on one CPU thread).
    """
    alpha = _check_alpha(alpha)
    targets = [float(t) for t in fpr_targets]
    for t in targets:
        if not 0.0 <= t <= 1.0:
            raise ConfigError(f"fpr_targets must lie in [0, 1], got {t!r}")
    if n_boot < 0:
        raise ConfigError(f"n_boot must be >= 0, got {n_boot}")
    dev = torch.device(device)
    s, yb, ends = _prepare(scores, labels, dev)
    tp, fp = _curve(yb, ends)
    point = _roc_stats(tp, fp, targets)
    boot = _bootstrap_roc_stats(yb, ends, targets, n_boot=n_boot, seed=seed, device=dev,
                                memory_bytes=boot_memory_bytes)
    intervals = [_percentiles(boot[:, j], alpha) if n_boot else (math.nan, math.nan) for j in range(len(point))]
    method = "bootstrap" if n_boot else "none"

    def entry(j: int) -> dict[str, Any]:
        return {"value": point[j], "lo": intervals[j][0], "hi": intervals[j][1], "method": method}

    thresholds = np.concatenate(([np.inf], s[ends]))
    fpr = fp / fp[-1]
    per_target: dict[str, Any] = {}
    for j, t in enumerate(targets):
        i = _idx_at_fpr(fpr, t)
        k, n = int(tp[i]), int(tp[-1])
        cp_lo, cp_hi = clopper_pearson(k, n, alpha=alpha)
        per_target[fpr_key(t)] = {
            **entry(2 + j), "fpr": float(fpr[i]), "threshold": float(thresholds[i]),
            "clopper_pearson": {"value": k / n, "lo": cp_lo, "hi": cp_hi, "k": k, "n": n},
        }
    return ({"auc": entry(0), "balanced_accuracy": entry(1), "tpr_at_fpr": per_target,
             "n_pos": int(tp[-1]), "n_neg": int(fp[-1]), "n_boot": int(n_boot)}, (fpr, tp / tp[-1]))


def eps_lower_bound(fp: int, fn: int, n_neg: int, n_pos: int, *, delta: float, alpha: float = 0.05) -> float:
    """Empirical lower bound on epsilon of an (epsilon, delta)-DP mechanism from a distinguishing attack.

    Threat model: the auditor runs the mechanism ``n_neg`` times on D (the "negative" world) and
    ``n_pos`` times on D' = D + canary; the attack made ``fp`` false positives on D and ``fn``
    false negatives on D'. (eps, delta)-DP implies FPR + e^eps * FNR >= 1 - delta and the
    symmetric inequality (Kairouz et al. 2015), so, with Clopper-Pearson upper bounds FPR_hi and
    FNR_hi (two-sided level ``alpha``, hence jointly valid with probability >= 1 - alpha)::

        eps_LB = max(ln((1 - delta - FNR_hi) / FPR_hi), ln((1 - delta - FPR_hi) / FNR_hi), 0)

    (Jagielski et al. 2020, "Auditing Differentially Private Machine Learning", Eq. in Sec. 3;
    Nasr et al. 2021, "Adversary Instantiation"). Terms with a non-positive numerator are dropped.
    The bound holds with confidence >= 1 - alpha. A random-guessing attack gives 0.
    """
    if not 0.0 <= float(delta) < 1.0:
        raise ConfigError(f"delta must lie in [0, 1), got {delta!r}")
    fpr_hi = clopper_pearson(fp, n_neg, alpha=alpha)[1]
    fnr_hi = clopper_pearson(fn, n_pos, alpha=alpha)[1]
    best = 0.0
    for num_rate, den_rate in ((fnr_hi, fpr_hi), (fpr_hi, fnr_hi)):
        num = 1.0 - float(delta) - num_rate
        if num > 0 and den_rate > 0:
            best = max(best, math.log(num / den_rate))
    return best


def random_removal(sizes: Sequence[int], marked: Sequence[int], draws: Sequence[int], *, observed: int
                   ) -> dict[str, float]:
    """How many marked rows a *random* filter removes: from each group g (a class) it removes ``draws[g]``
    of its ``sizes[g]`` rows uniformly at random, ``marked[g]`` of which are marked (poisons). The count
    removed is a sum of independent hypergeometric variables; returns its ``expected`` value
    (sum of draws * marked / sizes) and ``p_value`` = P(count >= ``observed``), exact (the groups'
    probability mass functions convolved): how surprising ``observed`` would be under random filtering."""
    from scipy.stats import hypergeom

    if not len(sizes) == len(marked) == len(draws):
        raise ConfigError(f"sizes, marked and draws need one entry per group, got {len(sizes)}, {len(marked)}, "
                          f"{len(draws)}")
    pmf = np.ones(1)
    expected = 0.0
    for n, m, d in zip(sizes, marked, draws, strict=True):
        n, m, d = int(n), int(m), int(d)
        if not (0 <= m <= n and 0 <= d <= n):
            raise ConfigError(f"each group needs 0 <= marked <= size and 0 <= draws <= size, got size {n}, "
                              f"marked {m}, draws {d}")
        if n == 0 or m == 0 or d == 0:
            continue
        expected += d * m / n
        pmf = np.convolve(pmf, hypergeom.pmf(np.arange(min(m, d) + 1), n, m, d))
    tail = float(np.clip(pmf[int(observed):].sum(), 0.0, 1.0)) if observed > 0 else 1.0
    return {"expected": expected, "p_value": tail}

