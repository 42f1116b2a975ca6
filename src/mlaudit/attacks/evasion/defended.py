"""Input-transformation defences and the adaptive attacks that break them (seed 003, Tramèr: defences
over-estimate robustness because their evaluations are not adaptive; Athalye, Carlini & Wagner 2018,
"Obfuscated Gradients Give a False Sense of Security").

A defence here is a preprocessing ``t`` in front of the classifier f: the defended model is
f(t(x)). :class:`Defended` wraps any ``nn.Module`` with one of the built-in transforms:

* ``bit-depth`` (Xu et al. 2018, feature squeezing): round each pixel to ``bits`` bits;
* ``jpeg`` (Guo et al. 2018; Dziugaite et al. 2016): JPEG-compress each image at ``quality`` (PIL,
  on the CPU);
* ``resize-pad`` (Xie et al. 2018): resize to a random side in [H, ``max_size``) and zero-pad at a
  random offset to ``max_size``, then resize back to H x W (randomised);
* ``noise``: add N(0, ``sigma``^2) (the base classifier of randomised smoothing, Cohen et al. 2019).

How gradients flow through t is the choice that decides the evaluation (``gradient``):

* ``"true"``: what autograd gives. Rounding and JPEG have zero (or no) gradient, so gradient attacks
  see nothing and the defence looks strong: the *obfuscated gradients* of Athalye et al.;
* ``"bpda"``: Backward Pass Differentiable Approximation (Athalye et al. 2018, sec. 4.1): the forward
  pass is t(x), the backward pass the identity's (t(x) ~ x), written x + (t(x) - x).detach();

and randomised transforms need **expectation over transformation** (EOT, Athalye et al. 2018, sec.
4.3): the ``eot`` option of :func:`~mlaudit.attacks.evasion.pgd` / ``apgd`` averages the loss over that
many draws per step. The forward value is the same in every mode, so accuracy is always the defended
model's own; only what an attacker can differentiate changes.
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConfigError

Transform = Literal["bit-depth", "jpeg", "resize-pad", "noise"]
Gradient = Literal["true", "bpda"]
TRANSFORMS: tuple[str, ...] = ("bit-depth", "jpeg", "resize-pad", "noise")
RANDOMISED = frozenset({"resize-pad", "noise"})
"""Transforms that draw randomness on every forward pass (attack them with EOT)."""
NON_DIFFERENTIABLE = frozenset({"bit-depth", "jpeg"})
"""Transforms without a useful autograd gradient (attack them with BPDA)."""


def bit_depth(x: Tensor, bits: int) -> Tensor:
    """Round x [N, ...] in [0, 1] to 2^bits levels (no useful gradient: zero almost everywhere)."""
    levels = 2**bits - 1
    return torch.round(x.clamp(0, 1) * levels) / levels


def jpeg(x: Tensor, quality: int) -> Tensor:
    """JPEG-compress each image of x [N, C, H, W] in [0, 1] (C = 1 or 3) at ``quality`` with PIL; the
    result is detached (JPEG has no autograd gradient)."""
    from PIL import Image

    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ConfigError(f"jpeg defence needs images [N, 1 or 3, H, W], got {list(x.shape)}")
    arr = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = np.empty_like(arr)
    for i, a in enumerate(arr):
        img = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        dec = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
        out[i] = dec[..., None] if dec.ndim == 2 else dec
    return torch.from_numpy(out).to(x.device).permute(0, 3, 1, 2).to(x.dtype) / 255


def resize_pad(x: Tensor, max_size: int, generator: torch.Generator | None = None) -> Tensor:
    """Random resize to side s in [H, max_size) and zero-pad at a random offset to max_size, then resize
    back to H x W (Xie et al. 2018; one draw per batch, differentiable in x). x [N, C, H, W]."""
    n, c, h, w = x.shape
    if max_size <= max(h, w):
        raise ConfigError(f"resize-pad: max_size = {max_size}; allowed > the image side {max(h, w)}")
    dev = "cpu" if generator is None else generator.device
    s = int(torch.randint(max(h, w), max_size, (1,), generator=generator, device=dev))
    top = int(torch.randint(0, max_size - s + 1, (1,), generator=generator, device=dev))
    left = int(torch.randint(0, max_size - s + 1, (1,), generator=generator, device=dev))
    r = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
    padded = F.pad(r, (left, max_size - s - left, top, max_size - s - top))
    return F.interpolate(padded, size=(h, w), mode="bilinear", align_corners=False)


class Defended(nn.Module):
    """f(t(x)): ``model`` behind the input transform ``transform`` (see the module docstring).

    Options: ``bits`` (bit-depth, 1..8), ``quality`` (jpeg, 1..95), ``max_size`` (resize-pad, default
    H + H // 8 + 1), ``sigma`` (noise, > 0), ``gradient`` ("true" or "bpda"), ``box`` (pixel range the
    transform assumes; bit-depth and jpeg work on [0, 1]).
    """

    def __init__(self, model: nn.Module, transform: Transform, *, bits: int = 4, quality: int = 75,
                 max_size: int | None = None, sigma: float = 0.25, gradient: Gradient = "true") -> None:
        super().__init__()
        if transform not in TRANSFORMS:
            raise ConfigError(f"defence transform {transform!r}; allowed: {', '.join(TRANSFORMS)}")
        if gradient not in ("true", "bpda"):
            raise ConfigError(f"defence gradient {gradient!r}; allowed: true, bpda")
        if not 1 <= bits <= 8:
            raise ConfigError(f"bit-depth bits = {bits}; allowed 1 <= bits <= 8")
        if not 1 <= quality <= 95:
            raise ConfigError(f"jpeg quality = {quality}; allowed 1 <= quality <= 95")
        if not sigma > 0:
            raise ConfigError(f"noise sigma = {sigma}; allowed sigma > 0")
        self.model, self.transform, self.gradient = model, transform, gradient
        self.bits, self.quality, self.max_size, self.sigma = bits, quality, max_size, sigma
        self.training = model.training  # mirror the wrapped model's mode without changing it

    @property
    def randomised(self) -> bool:
        return self.transform in RANDOMISED

    def with_gradient(self, gradient: Gradient) -> Defended:
        """The same defence (same model object) with another gradient mode."""
        return Defended(self.model, self.transform, bits=self.bits, quality=self.quality,  # type: ignore[arg-type]
                        max_size=self.max_size, sigma=self.sigma, gradient=gradient)

    def preprocess(self, x: Tensor) -> Tensor:
        """t(x) with this mode's gradient."""
        if self.transform == "bit-depth":
            t = bit_depth(x, self.bits)
        elif self.transform == "jpeg":
            t = jpeg(x, self.quality) + 0 * x  # autograd sees x with a zero gradient, as for rounding
        elif self.transform == "resize-pad":
            t = resize_pad(x, self.max_size or x.shape[-1] + x.shape[-1] // 8 + 1)
        else:
            t = x + self.sigma * torch.randn_like(x)
        if self.gradient == "bpda":
            return x + (t - x).detach()
        return t

    def forward(self, x: Tensor) -> Tensor:
        return self.model(self.preprocess(x))
