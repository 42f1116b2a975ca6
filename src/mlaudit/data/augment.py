"""Batched image augmentation as tensor maths: random translation (= crop with zero padding) + flip.

One parameterisation, two implementations:

* :func:`apply_augment` — the fast training path. Exactly equals the classic "zero-pad by ``pad``,
  crop an H x W window at offset (pad + dy, pad + dx), then mirror left-right if ``flip``", done
  as two index gathers for the whole batch (no loop over samples, no padded copy).
* :func:`apply_augment_differentiable` — the same maps through ``F.affine_grid`` +
  ``F.grid_sample`` (bilinear, zero padding, ``align_corners=False``) so gradients reach ``x``;
  used when crafting poisons that must survive augmentation (expectation over transformations,
  e.g. Geiping et al. 2021, "Witches' Brew", differentiable data augmentation). For integer
  shifts it matches the fast path to ~1e-6; it also accepts fractional (float) shifts.

Per sample, ``out[c, i, j] = x[c, i + dy, j' + dx]`` with ``j' = W-1-j`` when flipped (else ``j``),
and 0 where the source pixel lies outside the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from ..errors import ConfigError


@dataclass(frozen=True, eq=False)
class AugmentParams:
    """Per-sample augmentation: ``shift`` [n, 2] as (dx, dy) and ``flip`` bool [n].

    ``shift`` is int64 for :func:`apply_augment`; :func:`apply_augment_differentiable` also takes
    a floating-point ``shift`` (sub-pixel translation by bilinear interpolation).
    """

    shift: Tensor
    flip: Tensor

    def __post_init__(self) -> None:
        n = self.flip.shape[0] if self.flip.dim() == 1 else -1
        if self.flip.dtype != torch.bool or tuple(self.shift.shape) != (n, 2):
            raise ConfigError(
                f"AugmentParams needs shift [n, 2] and flip bool [n]; got shift {tuple(self.shift.shape)} "
                f"and flip {self.flip.dtype} {tuple(self.flip.shape)}"
            )
        if self.shift.dtype == torch.bool or self.shift.is_complex():
            raise ConfigError(f"shift must be an integer or float tensor, got {self.shift.dtype}")

    def __len__(self) -> int:
        return int(self.flip.shape[0])

    def to(self, device: torch.device | str) -> AugmentParams:
        return AugmentParams(self.shift.to(device), self.flip.to(device))


def sample_augment_params(
    n: int, *, pad: int, flip: bool, generator: torch.Generator, device: torch.device | str | None = None
) -> AugmentParams:
    """Draw ``n`` independent translations (dx, dy uniform ints in [-pad, pad]) and flips (p = 1/2).

    Draws on ``generator``'s device (shift first, then flip) and moves the result to ``device``
    (default: the generator's device), so a seeded generator gives the same params everywhere.
    """
    if n < 0 or pad < 0:
        raise ConfigError(f"sample_augment_params needs n >= 0 and pad >= 0, got n={n}, pad={pad}")
    gdev = generator.device
    shift = torch.randint(-pad, pad + 1, (n, 2), generator=generator, device=gdev, dtype=torch.int64)
    if flip:
        flips = torch.rand(n, generator=generator, device=gdev) < 0.5
    else:
        flips = torch.zeros(n, dtype=torch.bool, device=gdev)
    params = AugmentParams(shift, flips)
    return params if device is None else params.to(device)


def _check(x: Tensor, params: AugmentParams) -> None:
    if x.dim() != 4:
        raise ConfigError(f"augmentation needs images [n, C, H, W], got shape {tuple(x.shape)}")
    if len(params) != x.shape[0]:
        raise ConfigError(f"augmentation params are for {len(params)} samples but the batch has {x.shape[0]}")


def apply_augment(x: Tensor, params: AugmentParams, *, pad_mode: str = "zeros") -> Tensor:
    """Translate, then flip: ``x`` [n, C, H, W] -> [n, C, H, W] (same dtype/device).

    Bit-exact equal to "``F.pad(x, (pad,) * 4, mode)`` then crop at (pad + dy, pad + dx), then flip",
    with ``pad_mode`` ``zeros`` (zero fill) or ``reflect`` (mirror about the edge pixel, as
    ``F.pad(..., mode="reflect")``; shifts must be smaller than the image side).
    Non-differentiable use intended (gradients flow, but only through the gathered pixels).
    """
    _check(x, params)
    if params.shift.is_floating_point():
        raise ConfigError("apply_augment needs integer shifts; use apply_augment_differentiable for float shifts")
    n, c, h, w = x.shape
    if n == 0:
        return x.clone()
    shift, flip = params.shift.to(x.device), params.flip.to(x.device)
    ar_h, ar_w = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    rows = ar_h + shift[:, 1:2]  # [n, H] source row of each output row
    cols = torch.where(flip[:, None], (w - 1) - ar_w, ar_w) + shift[:, 0:1]  # [n, W] source column
    if pad_mode == "reflect":  # index -i -> i and (side-1)+i -> (side-1)-i
        rows = (h - 1) - ((h - 1) - rows.abs()).abs()
        cols = (w - 1) - ((w - 1) - cols.abs()).abs()
    elif pad_mode != "zeros":
        raise ConfigError(f"pad_mode must be 'zeros' or 'reflect', got {pad_mode!r}")
    rows_in, cols_in = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    valid = (rows_in == rows)[:, :, None] & (cols_in == cols)[:, None, :]  # [n, H, W] inside the image
    flat = (rows_in[:, :, None] * w + cols_in[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    out = x.reshape(n, c, h * w).gather(2, flat).view(n, c, h, w)  # one gather for the whole batch
    return torch.where(valid[:, None], out, torch.zeros((), dtype=x.dtype, device=x.device))


def apply_augment_differentiable(x: Tensor, params: AugmentParams) -> Tensor:
    """Same maps as :func:`apply_augment` via ``affine_grid`` + bilinear ``grid_sample``.

    ``x`` [n, C, H, W] floating point -> [n, C, H, W]; differentiable w.r.t. ``x`` (and w.r.t. a
    float ``shift``). With ``align_corners=False`` a pixel j sits at normalised 2(j + 0.5)/W - 1,
    so sampling pixel ``s * j + dx`` (s = -1 when flipped, mirrored about the centre) is the affine
    map ``u -> s * u + 2 dx / W`` (and ``v -> v + 2 dy / H`` for rows).
    """
    _check(x, params)
    n, _, h, w = x.shape
    if n == 0:
        return x.clone()
    shift = params.shift.to(device=x.device, dtype=x.dtype)
    sign = 1.0 - 2.0 * params.flip.to(device=x.device, dtype=x.dtype)
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = sign
    theta[:, 0, 2] = 2.0 * shift[:, 0] / w
    theta[:, 1, 1] = 1.0
    theta[:, 1, 2] = 2.0 * shift[:, 1] / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class AugmentSpec(BaseModel):
    """Augmentation config: ``crop_pad`` (max translation in pixels, >= 0), ``flip`` (left-right) and
    ``pad_mode`` (what a translation brings in at the border: ``zeros`` or ``reflect``).

    ``flip: alternating`` (Jordan 2024, airbench, section 3.6) flips each training example at random in
    the first epoch and then the opposite way to the previous epoch, so every pair of epochs sees both
    orientations; outside the training loop (crafting, queries) it acts as random flipping.
    The defaults are the usual CIFAR-10 recipe (pad 4, flip). ``crop_pad=0, flip=False`` is the
    identity (:attr:`is_identity`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    crop_pad: int = Field(4, ge=0)
    flip: bool | Literal["alternating"] = True
    pad_mode: Literal["zeros", "reflect"] = "zeros"

    @property
    def is_identity(self) -> bool:
        return self.crop_pad == 0 and not self.flip

    def sample(
        self, n: int, *, generator: torch.Generator, device: torch.device | str | None = None
    ) -> AugmentParams:
        """Draw params for ``n`` samples (see :func:`sample_augment_params`)."""
        return sample_augment_params(n, pad=self.crop_pad, flip=bool(self.flip), generator=generator, device=device)

    def __call__(self, x: Tensor, *, generator: torch.Generator, differentiable: bool = False) -> Tensor:
        """Sample params for the batch ``x`` [n, C, H, W] and apply them (fast or differentiable path)."""
        params = self.sample(x.shape[0], generator=generator, device=x.device)
        if differentiable:
            return apply_augment_differentiable(x, params)
        return apply_augment(x, params, pad_mode=self.pad_mode)
