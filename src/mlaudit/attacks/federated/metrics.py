"""How well candidates match the true inputs: PSNR, SSIM, and the best one-to-one assignment.

    m = match(x_true, rec.x, data_range=1.0)
    m.psnr      # [n] per true input, the PSNR of the candidate assigned to it (nan: none left for it)
    m.recovered(30.0)   # bool [n]: PSNR >= 30 dB
    m = match(x_true, rec.x, data_range=1.0, lpips=lpips_alexnet(alexnet_path, lin_path))
    m.lpips     # [n] LPIPS of the assigned pairs (lower is closer; :mod:`.lpips`), nan where unmatched

An attack's candidates come in an unknown order (and may be more or fewer than the inputs), so each true
input gets the candidate of the assignment that maximises the summed PSNR (Hungarian algorithm,
``scipy.optimize.linear_sum_assignment``), each candidate used at most once.

PSNR = 10 log10(range^2 / MSE) over all values of an input (capped at :data:`PSNR_CAP` dB for an exact
copy). SSIM (Wang, Bovik, Sheikh & Simoncelli 2004, eq. 13) is the mean over positions and channels of
the local statistic with an 11x11 Gaussian window of std 1.5 (smaller, odd, for small images: at most
the image side), C1 = (0.01 range)^2, C2 = (0.03 range)^2, 'valid' windows only; None for inputs that
are not images [C, H, W].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

PSNR_CAP = 200.0


def psnr_matrix(a: Tensor, b: Tensor, *, data_range: float) -> Tensor:
    """PSNR in dB of every pair: a [n, *shape], b [m, *shape] -> [n, m] (float64, CPU)."""
    fa, fb = a.detach().flatten(1).double().cpu(), b.detach().flatten(1).double().cpu()
    mse = torch.cdist(fa, fb).pow(2) / fa.shape[1]
    return (10 * torch.log10(data_range**2 / mse.clamp_min(1e-300))).clamp(max=PSNR_CAP)


def psnr(a: Tensor, b: Tensor, *, data_range: float) -> Tensor:
    """PSNR in dB of matching pairs a[i], b[i] (both [n, *shape]) -> [n]."""
    fa, fb = a.detach().flatten(1).double().cpu(), b.detach().flatten(1).double().cpu()
    mse = (fa - fb).pow(2).mean(1)
    return (10 * torch.log10(data_range**2 / mse.clamp_min(1e-300))).clamp(max=PSNR_CAP)


def ssim(a: Tensor, b: Tensor, *, data_range: float) -> Tensor | None:
    """Mean SSIM of matching pairs of images a[i], b[i] [n, C, H, W] -> [n]; None for non-images."""
    if a.dim() != 4:
        return None
    x, y = a.detach().double().cpu(), b.detach().double().cpu()
    c = x.shape[1]
    size = min(11, x.shape[2], x.shape[3])
    size -= 1 - size % 2  # odd
    t = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-t**2 / (2 * 1.5**2))
    g = g / g.sum()
    win = (g[:, None] * g[None, :]).expand(c, 1, size, size)

    def blur(v: Tensor) -> Tensor:
        return F.conv2d(v, win, groups=c)

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


@dataclass
class Match:
    """Per true input [n]: ``candidate`` (index into the candidates, -1 if none), ``psnr``, ``ssim`` and
    ``lpips`` (nan where unmatched; ssim None for non-images, lpips None unless a metric was given)."""

    candidate: Tensor
    psnr: Tensor
    ssim: Tensor | None
    lpips: Tensor | None = None

    def recovered(self, threshold_db: float) -> Tensor:
        """bool [n]: matched with PSNR >= ``threshold_db``."""
        return torch.nan_to_num(self.psnr, nan=-math.inf) >= threshold_db


def match(true: Tensor, candidates: Tensor, *, data_range: float, lpips: nn.Module | None = None) -> Match:
    """Assign candidates [m, *shape] to true inputs [n, *shape] one-to-one, maximising the summed PSNR;
    with ``lpips`` (an :class:`~.lpips.LPIPS`, images only) also the assigned pairs' LPIPS."""
    from scipy.optimize import linear_sum_assignment

    n = len(true)
    cand = torch.full((n,), -1, dtype=torch.long)
    score = torch.full((n,), math.nan, dtype=torch.float64)
    sim = torch.full((n,), math.nan, dtype=torch.float64) if true.dim() == 4 else None
    perceptual = torch.full((n,), math.nan, dtype=torch.float64) if lpips is not None else None
    if len(candidates) == 0 or n == 0:
        return Match(cand, score, sim, perceptual)
    p = psnr_matrix(true, candidates, data_range=data_range)
    rows, cols = linear_sum_assignment(p.numpy(), maximize=True)
    r, c = torch.from_numpy(np.asarray(rows)).long(), torch.from_numpy(np.asarray(cols)).long()
    cand[r] = c
    score[r] = p[r, c]
    if sim is not None:
        sim[r] = ssim(true[r].cpu(), candidates[c].cpu(), data_range=data_range)  # type: ignore[assignment]
    if perceptual is not None and len(r):
        dev = next(iter(lpips.buffers())).device  # type: ignore[union-attr]
        with torch.no_grad():
            perceptual[r] = lpips(true[r].to(dev), candidates[c].to(dev)).double().cpu()  # type: ignore[misc]
    return Match(cand, score, sim, perceptual)
