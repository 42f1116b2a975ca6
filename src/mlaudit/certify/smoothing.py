"""Randomized smoothing: Cohen, Rosenfeld & Kolter, "Certified Adversarial Robustness via Randomized
Smoothing" (ICML 2019).

The smoothed classifier of a base classifier f is g(x) = argmax_c P(f(x + eps) = c), eps ~ N(0, sigma^2 I).
If the top class cA has probability pA >= pA_lower > 1/2, g(x + delta) = cA for every ||delta||_2 < R with

    R = sigma * Phi^-1(pA_lower)                                   (Cohen et al., Theorem 1 with pB = 1 - pA)

* :func:`sample_counts` — SAMPLEUNDERNOISE: how often f votes for each class on n noisy copies of each
  input, [B, C]; the copies are drawn in chunks of ``batch_size`` (noise [m, *shape] on the model's
  device, one forward per chunk through :func:`mlaudit.query.forward_batched`, eval mode), never one
  Python step per sample.
* :func:`predict` — PREDICT (the paper's pseudocode of the same name): the top two counts nA, nB of n samples;
  return cA if the two-sided binomial test of nA successes in nA + nB trials at p = 1/2 has
  p-value <= alpha, else abstain (-1). It returns a class other than g(x) with probability <= alpha.
* :func:`certify` — CERTIFY (the paper's pseudocode of the same name): n0 selection samples guess cA; n further
  samples count cA; pA_lower is the one-sided (1 - alpha) Clopper-Pearson lower bound of nA / n
  (:func:`mlaudit.stats.clopper_pearson`); certify cA with radius R (equation above) if pA_lower > 1/2,
  else abstain. A certificate it returns is wrong with probability <= alpha.

Inputs are in the data's own units (pixels in [0, 1] for the built-in image sources): sigma and R are
measured there, and the noisy copies are not clipped (as in the paper).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import ndtri
from scipy.stats import binom
from torch import Tensor, nn

from ..errors import ConfigError
from ..query import forward_batched
from ..stats import clopper_pearson

ABSTAIN = -1
"""The prediction of PREDICT and CERTIFY when they abstain."""


@dataclass(frozen=True, eq=False)
class Certificate:
    """CERTIFY's answer for B inputs (CPU tensors).

    prediction: int64 [B], the certified class cA, or -1 (:data:`ABSTAIN`).
    radius: float64 [B], the certified l2 radius sigma * Phi^-1(pA_lower); 0 where abstained.
    pa_lower: float64 [B], the one-sided (1 - alpha) Clopper-Pearson lower bound on pA.
    counts: int64 [B, C], class votes of the n estimation samples.
    selection_counts: int64 [B, C], class votes of the n0 selection samples (they pick cA).
    """

    prediction: Tensor
    radius: Tensor
    pa_lower: Tensor
    counts: Tensor
    selection_counts: Tensor

    @property
    def abstained(self) -> Tensor:
        """bool [B]: where CERTIFY abstained."""
        return self.prediction == ABSTAIN


def _positive(name: str, value: float, *, integer: bool = False) -> None:
    bad = (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0
           or (integer and int(value) != value))
    if bad:
        raise ConfigError(f"{name} must be {'an integer >= 1' if integer else 'a finite number > 0'}, got {value!r}")


def _check_alpha(alpha: float) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ConfigError(f"alpha must lie in (0, 1), got {alpha!r}; 0.001 is Cohen et al.'s choice")


def _model_device(model: nn.Module, x: Tensor) -> torch.device:
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else x.device


def sample_counts(model: nn.Module, x: Tensor, *, sigma: float, n: int, batch_size: int = 1000,
                  num_classes: int | None = None, generator: torch.Generator | None = None,
                  seed: int = 0) -> Tensor:
    """SAMPLEUNDERNOISE of Cohen et al. (2019): class votes of ``model`` on ``n`` Gaussian-noised copies of each input.

    Args:
        model: the base classifier f, inputs [m, *shape] -> logits [m, C]; run in eval mode without
            gradient (every mode flag restored after), on the device of its first parameter (x's when it has none).
        x: inputs [B, *shape], moved to the model's device.
        sigma: the noise level, N(0, sigma^2 I) per copy, in x's units.
        n: noisy copies per input.
        batch_size: copies per forward pass (the B * n copies of all inputs are one stream cut into
            chunks of this size, so small inputs fill whole batches).
        num_classes: C (default: the model's output width).
        generator: where the noise comes from (drawn on its device, moved to the model's); default a
            generator on the model's device seeded with ``seed``.

    Returns: int64 [B, C] on the CPU, each row summing to n.
    """
    _positive("sigma", sigma)
    _positive("n", n, integer=True)
    _positive("batch_size", batch_size, integer=True)
    if x.dim() < 2 or x.shape[0] == 0:
        raise ConfigError(f"sample_counts needs inputs [B, *shape] with B >= 1, got shape {list(x.shape)}")
    device = _model_device(model, x)
    x = x.to(device)
    gen = generator if generator is not None else torch.Generator(device=device).manual_seed(int(seed))
    b, total = x.shape[0], x.shape[0] * int(n)
    counts: Tensor | None = None
    for start in range(0, total, batch_size):
        rows = torch.arange(start, min(start + batch_size, total), device=device) // int(n)  # input of each copy
        noise = torch.randn((len(rows), *x.shape[1:]), generator=gen, device=gen.device, dtype=x.dtype).to(device)
        logits = forward_batched(model, noise.mul_(sigma).add_(x[rows]), batch_size=len(rows), device=device)
        if counts is None:
            c = num_classes if num_classes is not None else logits.shape[1]
            if logits.dim() != 2 or logits.shape[1] != c:
                raise ConfigError(f"the model's outputs have shape {list(logits.shape)}; sample_counts needs logits "
                                  f"[m, C]{f' with C = num_classes = {c}' if num_classes is not None else ''}")
            counts = torch.zeros(b * c, dtype=torch.int64, device=device)
        c = counts.numel() // b
        counts.index_add_(0, rows * c + logits.argmax(1), torch.ones_like(rows))
    assert counts is not None  # total >= 1
    return counts.view(b, -1).cpu()


def binomial_pvalue(n_a: Tensor, n_b: Tensor) -> Tensor:
    """Two-sided binomial test of n_a successes in n_a + n_b trials against p = 1/2, per entry (float64).

    With p = 1/2 the distribution is symmetric, so the p-value is min(1, 2 P(X <= min(n_a, n_b))),
    X ~ Bin(n_a + n_b, 1/2) (equal to ``scipy.stats.binomtest(...).pvalue``)."""
    lo = torch.minimum(n_a, n_b).numpy()
    return torch.from_numpy(np.minimum(1.0, 2 * binom.cdf(lo, (n_a + n_b).numpy(), 0.5)))


def predict_from_counts(counts: Tensor, *, alpha: float) -> tuple[Tensor, Tensor]:
    """PREDICT's decision from class votes [B, C]: (prediction int64 [B], -1 where it abstains; p-value
    float64 [B] of the binomial test of the top count nA against the runner-up nB)."""
    _check_alpha(alpha)
    counts = counts.cpu().long()
    top = counts.topk(min(2, counts.shape[1]), dim=1)
    n_a = top.values[:, 0]
    n_b = top.values[:, 1] if counts.shape[1] > 1 else torch.zeros_like(n_a)
    pvalue = binomial_pvalue(n_a, n_b)
    return torch.where(pvalue <= alpha, top.indices[:, 0], ABSTAIN), pvalue


def predict(model: nn.Module, x: Tensor, *, sigma: float, n: int, alpha: float, batch_size: int = 1000,
            num_classes: int | None = None, generator: torch.Generator | None = None, seed: int = 0) -> Tensor:
    """PREDICT of Cohen et al. (2019): the smoothed classifier's class for each input of x
    [B, *shape] from ``n`` noise samples, or -1 (abstain) where the binomial test of the top two counts
    has p-value > ``alpha``. Returns int64 [B] (CPU). Options as in :func:`sample_counts`."""
    _check_alpha(alpha)
    counts = sample_counts(model, x, sigma=sigma, n=n, batch_size=batch_size, num_classes=num_classes,
                           generator=generator, seed=seed)
    return predict_from_counts(counts, alpha=alpha)[0]


def certify_from_counts(guess: Tensor, counts: Tensor, *, sigma: float, alpha: float,
                        selection_counts: Tensor | None = None) -> Certificate:
    """CERTIFY's decision: the guessed class cA [B] and the n estimation votes [B, C] (n = each row's sum).

    pA_lower = one-sided (1 - alpha) Clopper-Pearson lower bound of counts[cA] / n; certify cA with radius
    sigma * Phi^-1(pA_lower) when pA_lower > 1/2, else abstain (prediction -1, radius 0)."""
    _positive("sigma", sigma)
    _check_alpha(alpha)
    counts, guess = counts.cpu().long(), guess.cpu().long()
    n_a = counts.gather(1, guess[:, None])[:, 0].tolist()
    totals = counts.sum(1).tolist()
    lower = torch.tensor([clopper_pearson(k, t, alpha=alpha, one_sided=True)[0] for k, t in zip(n_a, totals)],
                         dtype=torch.float64)
    certified = lower > 0.5
    radius = torch.where(certified, sigma * torch.from_numpy(ndtri(lower.numpy())), torch.zeros_like(lower))
    sel = selection_counts.cpu().long() if selection_counts is not None else torch.zeros_like(counts)
    return Certificate(torch.where(certified, guess, ABSTAIN), radius, lower, counts, sel)


def certify(model: nn.Module, x: Tensor, *, sigma: float, n0: int, n: int, alpha: float, batch_size: int = 1000,
            num_classes: int | None = None, generator: torch.Generator | None = None, seed: int = 0) -> Certificate:
    """CERTIFY of Cohen et al. (2019) for each input of x [B, *shape].

    ``n0`` selection samples pick cA = the most voted class; ``n`` fresh samples (drawn after them from the
    same generator, so independent) count cA; see :func:`certify_from_counts` for the decision and
    :func:`sample_counts` for the options. Costs B * (n0 + n) forward passes. Each certificate is wrong
    (g is not cA everywhere in the radius) with probability <= ``alpha``.
    """
    _positive("n0", n0, integer=True)
    _positive("n", n, integer=True)
    if n0 >= n:
        raise ConfigError(f"n0 = {n0} must be smaller than n = {n}: n0 samples only pick the class, n estimate pA")
    _check_alpha(alpha)
    if generator is None:
        generator = torch.Generator(device=_model_device(model, x)).manual_seed(int(seed))
    sel = sample_counts(model, x, sigma=sigma, n=n0, batch_size=batch_size, num_classes=num_classes,
                        generator=generator)
    est = sample_counts(model, x, sigma=sigma, n=n, batch_size=batch_size, num_classes=sel.shape[1],
                        generator=generator)
    return certify_from_counts(sel.argmax(1), est, sigma=sigma, alpha=alpha, selection_counts=sel)


def min_certify_n(alpha: float) -> int:
    """The smallest n for which CERTIFY can certify anything at ``alpha``: with all n votes for cA,
    pA_lower = alpha ** (1/n), which must exceed 1/2, i.e. n > log2(1/alpha)."""
    _check_alpha(alpha)
    n = max(1, math.floor(math.log2(1 / alpha)) + 1)
    while n > 1 and alpha ** (1 / (n - 1)) > 0.5:  # float rounding of the log
        n -= 1
    while alpha ** (1 / n) <= 0.5:
        n += 1
    return n


def min_predict_n(alpha: float) -> int:
    """The smallest n for which PREDICT can return a class at ``alpha``: with all n votes for one class
    the p-value is 2 / 2**n (capped at 1), which must be <= alpha, i.e. n >= log2(2/alpha)."""
    _check_alpha(alpha)
    n = max(1, math.ceil(math.log2(2 / alpha)))
    while n > 1 and 2 * 0.5 ** (n - 1) <= alpha:
        n -= 1
    while 2 * 0.5 ** n > alpha:
        n += 1
    return n


def max_radius(*, sigma: float, n: int, alpha: float) -> float:
    """The largest radius CERTIFY can return with n samples: sigma * Phi^-1(alpha ** (1/n)) (all votes for
    cA); 0 when n < :func:`min_certify_n`."""
    _positive("sigma", sigma)
    _positive("n", n, integer=True)
    _check_alpha(alpha)
    return max(0.0, sigma * float(ndtri(alpha ** (1 / n))))
