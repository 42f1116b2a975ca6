"""Backdoor triggers as data: a trigger is a ``mask`` and a ``pattern``, and stamping it is one blend

    x' = (1 - m) * x + m * p          (per pixel; m in [0, 1], p in [0, 1], so x' stays in [0, 1])

on images ``x`` [N, C, H, W]. Two families of triggers, both this one formula:

* **patch** (BadNets, Gu et al. 2017): m = ``alpha`` on a k x k square at a location (a corner, the
  centre, an explicit (row, col), or all four corners mirrored left-right as in Turner et al. 2019,
  so a horizontal flip keeps it) and 0 elsewhere; p a checkerboard, white, black, seeded noise or a
  given k x k pattern; ``alpha`` 1 pastes the patch, < 1 is a reduced-amplitude patch (Turner et al.);
* **blend** (Chen et al. 2017, "blended injection"): m = ``alpha`` everywhere, p seeded uniform noise
  (the paper's random pattern) or a given H x W image, so x' = (1 - alpha) x + alpha p.

A trigger is applied to test inputs when a backdoor is evaluated and to the poison rows when it is
planted; :class:`TriggerSpec` is its config form (the ``attack.trigger`` block), and
:meth:`TriggerSpec.build` gives the same tensors whenever it is called with the same image shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor

from ....errors import ConfigError

Location = Literal["bottom-right", "bottom-left", "top-right", "top-left", "center", "four-corners"]
PatternName = Literal["checkerboard", "white", "black", "noise"]
DEFAULT_ALPHA = {"patch": 1.0, "blend": 0.2}
"""The blend ratio when none is given: a pasted patch (BadNets), 0.2 for a blended pattern (Chen et al. 2017)."""


@dataclass(frozen=True)
class Trigger:
    """``mask`` [C, H, W] in [0, 1] and ``pattern`` [C, H, W] in [0, 1]; :func:`apply_trigger` stamps it."""

    mask: Tensor
    pattern: Tensor

    def __post_init__(self) -> None:
        if self.mask.shape != self.pattern.shape or self.mask.dim() != 3:
            raise ConfigError(f"a trigger's mask and pattern must both be [C, H, W]; got {list(self.mask.shape)} "
                              f"and {list(self.pattern.shape)}")
        for name, t in (("mask", self.mask), ("pattern", self.pattern)):
            if not bool(((t >= 0) & (t <= 1)).all()):
                raise ConfigError(f"a trigger's {name} must lie in [0, 1], got [{float(t.min()):.4g}, {float(t.max()):.4g}]")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.mask.shape)

    @property
    def region(self) -> Tensor:
        """bool [C, H, W]: the pixels the trigger changes (mask > 0)."""
        return self.mask > 0

    def picture(self, background: float = 0.5) -> Tensor:
        """[C, H, W]: the trigger stamped on a uniform grey image (for figures)."""
        return apply_trigger(torch.full((1, *self.shape), background), self)[0]


def apply_trigger(x: Tensor, trigger: Trigger) -> Tensor:
    """``x`` [N, C, H, W] in [0, 1] -> a new tensor with the trigger stamped on every image (module
    docstring); ``x`` is not changed. A convex blend of two images in [0, 1] stays in [0, 1]; the clamp
    only removes float rounding."""
    if x.dim() != 4 or tuple(x.shape[1:]) != trigger.shape:
        raise ConfigError(f"apply_trigger needs images [N, {', '.join(map(str, trigger.shape))}] (the trigger's "
                          f"shape), got {list(x.shape)}")
    m, p = trigger.mask.to(x), trigger.pattern.to(x)
    return ((1 - m) * x + m * p).clamp(0, 1)


def _named(name: str, shape: tuple[int, int, int], seed: int) -> Tensor:
    """A named pattern [C, h, w]: a checkerboard with a white top-left pixel, white, black or seeded
    uniform noise."""
    c, h, w = shape
    if name == "checkerboard":
        board = ((torch.arange(h).view(-1, 1) + torch.arange(w).view(1, -1)) % 2 == 0).float()
        return board.expand(c, h, w).clone()
    if name in ("white", "black"):
        return torch.full(shape, 1.0 if name == "white" else 0.0)
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def _given(pattern: Tensor, shape: tuple[int, int, int], where: str) -> Tensor:
    """A user's pattern [h, w] (one value for every channel) or [C, h, w], checked against ``shape``."""
    c, h, w = shape
    p = pattern.float()
    if p.dim() == 2:
        p = p.unsqueeze(0).expand(c, h, w) if tuple(p.shape) == (h, w) else p
    if tuple(p.shape) != shape:
        raise ConfigError(f"{where} has shape {list(pattern.shape)}; this trigger needs [{h}, {w}] or [{c}, {h}, {w}]")
    return p.clone()


def _corner(location: str, h: int, w: int, k: int, margin: int) -> tuple[int, int]:
    row = margin if location.startswith("top") else h - k - margin
    col = margin if location.endswith("left") else w - k - margin
    return (row, col) if location != "center" else ((h - k) // 2, (w - k) // 2)


def patch_trigger(shape: tuple[int, ...], *, size: int = 3, location: Location | tuple[int, int] = "bottom-right",
                  pattern: PatternName | Tensor = "checkerboard", alpha: float = 1.0, margin: int = 0,
                  seed: int = 0) -> Trigger:
    """A k x k patch (k = ``size``) on images of ``shape`` [C, H, W] (module docstring); ``location`` a
    named place (``margin`` pixels from the border) or the patch's top-left (row, col)."""
    c, h, w = _image_shape(shape)
    if not 0 < alpha <= 1:
        raise ConfigError(f"trigger alpha (the blend ratio) must lie in (0, 1], got {alpha}")
    if not 1 <= size <= min(h, w):
        raise ConfigError(f"trigger size = {size} does not fit {h}x{w} images; allowed 1 <= size <= {min(h, w)}")
    p = _named(pattern, (c, size, size), seed) if isinstance(pattern, str) else _given(pattern, (c, size, size),
                                                                                         "trigger pattern")
    places: list[tuple[int, int, bool]] = []  # (row, col, mirrored)
    if location == "four-corners":
        places = [(*_corner(f"{v}-{u}", h, w, size, margin), u == "right") for v in ("top", "bottom")
                  for u in ("left", "right")]
    elif isinstance(location, str):
        places = [(*_corner(location, h, w, size, margin), False)]
    else:
        places = [(int(location[0]), int(location[1]), False)]
    mask, full = torch.zeros(c, h, w), torch.zeros(c, h, w)
    for r, col, mirrored in places:
        if not (0 <= r <= h - size and 0 <= col <= w - size):
            raise ConfigError(f"a {size}x{size} trigger at (row {r}, col {col}) leaves the {h}x{w} image; the top-left "
                              f"corner must lie in rows 0..{h - size} and columns 0..{w - size}")
        mask[:, r:r + size, col:col + size] = alpha
        full[:, r:r + size, col:col + size] = p.flip(-1) if mirrored else p
    return Trigger(mask, full)


def blend_trigger(shape: tuple[int, ...], *, alpha: float = 0.2, pattern: PatternName | Tensor = "noise",
                  seed: int = 0) -> Trigger:
    """The whole image blended with ``pattern`` at ratio ``alpha`` (Chen et al. 2017): x' = (1 - a) x + a p."""
    c, h, w = _image_shape(shape)
    if not 0 < alpha <= 1:
        raise ConfigError(f"trigger alpha (the blend ratio) must lie in (0, 1], got {alpha}")
    p = _named(pattern, (c, h, w), seed) if isinstance(pattern, str) else _given(pattern, (c, h, w), "trigger pattern")
    return Trigger(torch.full((c, h, w), float(alpha)), p)


def _image_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise ConfigError(f"backdoor triggers are stamped on images [C, H, W]; this data has examples of shape "
                          f"{list(shape)}")
    return int(shape[0]), int(shape[1]), int(shape[2])


Values = tuple[tuple[float, ...], ...] | tuple[tuple[tuple[float, ...], ...], ...]


class TriggerSpec(BaseModel):
    """The ``attack.trigger`` block (module docstring): ``type`` patch or blend; ``alpha`` the blend
    ratio in (0, 1] (default 1 for a patch, 0.2 for a blend); ``pattern`` a name (checkerboard, white,
    black, noise; default checkerboard for a patch, noise for a blend) or the values as nested lists
    ([h, w] or [C, h, w] in [0, 1]); ``seed`` of a noise pattern; for a patch only: ``size`` k,
    ``location`` (bottom-right, bottom-left, top-right, top-left, center, four-corners, or [row, col] of
    its top-left pixel) and ``margin`` (pixels from the border of a named location)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["patch", "blend"] = "patch"
    size: int | None = Field(None, ge=1, le=4096)
    location: Location | tuple[int, int] | None = None
    margin: int | None = Field(None, ge=0, le=4096)
    pattern: PatternName | Values | None = None
    alpha: float | None = Field(None, gt=0.0, le=1.0)
    seed: int = Field(0, ge=0, lt=2**32)

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("type", "patch"), str) \
                or data.get("type", "patch") not in DEFAULT_ALPHA:
            return data  # pydantic reports the type
        data = dict(data)
        kind = data.get("type", "patch")
        if kind == "blend":
            given = [k for k in ("size", "location", "margin") if data.get(k) is not None]
            if given:
                raise ValueError(f"trigger.{given[0]} = {data[given[0]]!r} applies to patch triggers only; a blend "
                                 "trigger covers the whole image (leave it out or use type: patch)")
        else:
            for k, v in (("size", 3), ("location", "bottom-right"), ("margin", 0)):
                if data.get(k) is None:
                    data[k] = v
        if data.get("alpha") is None:
            data["alpha"] = DEFAULT_ALPHA[kind]
        if data.get("pattern") is None:
            data["pattern"] = "checkerboard" if kind == "patch" else "noise"
        return data

    @field_validator("pattern")
    @classmethod
    def _values(cls, v: Any) -> Any:
        if isinstance(v, tuple):
            try:
                t = torch.tensor(v, dtype=torch.float64)
            except (ValueError, TypeError):
                raise ValueError("trigger.pattern must be a name or a rectangular list of values, [h, w] or "
                                 "[C, h, w]; its rows have different lengths") from None
            if t.numel() == 0 or not bool(((t >= 0) & (t <= 1)).all()):  # (NaN fails both comparisons)
                raise ValueError(f"trigger.pattern values must lie in [0, 1] and not be empty (got shape {list(t.shape)})")
        return v

    @field_validator("location")
    @classmethod
    def _location(cls, v: Any) -> Any:
        if isinstance(v, tuple) and min(v) < 0:
            raise ValueError(f"trigger.location [row, col] must be >= 0, got {list(v)}")
        return v

    def check(self, shape: tuple[int, ...], *, where: str = "trigger") -> None:
        """A ConfigError naming ``<where>.<field>``, its value and what is allowed when the trigger does not
        fit images of ``shape`` [C, H, W]: a patch larger than the image or placed outside it, a given
        pattern of another shape."""
        c, h, w = _image_shape(shape)
        k, margin, loc = self.size or 1, self.margin or 0, self.location
        if self.type == "patch":
            if k > min(h, w):
                raise ConfigError(f"{where}.size = {k} is larger than the {h}x{w} images; allowed 1 <= {where}.size "
                                  f"<= {min(h, w)}")
            if isinstance(loc, tuple) and not (loc[0] <= h - k and loc[1] <= w - k):
                raise ConfigError(f"{where}.location = {list(loc)} puts the {k}x{k} patch outside the {h}x{w} images; "
                                  f"allowed rows 0..{h - k} and columns 0..{w - k} (its top-left pixel)")
            if isinstance(loc, str) and loc != "center" and k + margin > min(h, w):
                raise ConfigError(f"{where}.margin = {margin} with size {k} leaves the {h}x{w} images; allowed "
                                  f"{where}.margin <= {min(h, w) - k}")
        if isinstance(self.pattern, tuple):
            got = list(torch.tensor(self.pattern).shape)
            side = (k, k) if self.type == "patch" else (h, w)
            if got not in ([*side], [c, *side]):
                raise ConfigError(f"{where}.pattern has shape {got}; allowed [{side[0]}, {side[1]}] or "
                                  f"[{c}, {side[0]}, {side[1]}] for this {self.type} on {c}x{h}x{w} images")

    def build(self, shape: tuple[int, ...]) -> Trigger:
        """The trigger on images of ``shape`` [C, H, W] (:meth:`check` first)."""
        self.check(shape)
        pattern = self.pattern if isinstance(self.pattern, str) else torch.tensor(self.pattern, dtype=torch.float32)
        if self.type == "blend":
            return blend_trigger(shape, alpha=float(self.alpha or DEFAULT_ALPHA["blend"]), pattern=pattern,
                                 seed=self.seed)
        assert self.size is not None and self.location is not None
        return patch_trigger(shape, size=self.size, location=self.location, pattern=pattern,
                             alpha=float(self.alpha or 1.0), margin=self.margin or 0, seed=self.seed)

    def describe(self) -> str:
        """One line for reports: e.g. ``3x3 checkerboard patch at bottom-right`` or ``noise blend, alpha 0.2``."""
        pat = self.pattern if isinstance(self.pattern, str) else "given"
        if self.type == "blend":
            return f"{pat} blend, alpha {self.alpha:g}"
        at = self.location if isinstance(self.location, str) else f"(row {self.location[0]}, col {self.location[1]})"  # type: ignore[index]
        amp = "" if self.alpha == 1 else f", alpha {self.alpha:g}"
        return f"{self.size}x{self.size} {pat} patch at {at}{amp}"
