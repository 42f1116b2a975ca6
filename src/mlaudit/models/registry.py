"""Model registry and the `ModelSpec` config model.

A zoo entry is a builder ``build(spec, *, input_shape, num_classes) -> nn.Module`` registered with
``@register_model("name", residual=..., image_only=...)``. ``build_model(spec, input_shape=...,
num_classes=...)`` builds one. Every builder honours ``width`` (base channel/hidden width, ``None``
for the architecture's default), ``norm`` (``batch``/``group``/``none``; DP-SGD needs a model
without BatchNorm) and derives ``in_channels``/``num_classes`` from the data unless the spec sets them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from ..registry import Registry

Norm = Literal["batch", "group", "none"]


class ModelSpec(BaseModel):
    """Which architecture to build: ``name`` (registered), ``width``, ``norm``, optional overrides."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    width: int | None = Field(None, ge=1, le=4096)
    norm: Norm = "batch"
    num_classes: int | None = Field(None, ge=2)
    in_channels: int | None = Field(None, ge=1)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        _ensure_zoo_loaded()
        if v not in MODELS:
            raise ValueError(f"unknown model {v!r}; valid models: {', '.join(MODELS.names())}")
        return v


Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    """A registered architecture. ``residual`` selects lr 0.1 vs 0.01 in the witches-brew recipe;
    ``image_only`` models need [C, H, W] inputs; ``min_size`` is the smallest H=W they accept."""

    name: str
    build: Builder
    residual: bool = False
    image_only: bool = True
    min_size: int = 1
    description: str = ""


MODELS: Registry[ModelEntry] = Registry("model")


def register_model(
    name: str, *, residual: bool = False, image_only: bool = True, min_size: int = 1, description: str = ""
) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        MODELS.register(name)(ModelEntry(name, fn, residual, image_only, min_size, description or (fn.__doc__ or "").strip().split("\n")[0]))
        return fn

    return deco


def _ensure_zoo_loaded() -> None:
    from . import zoo  # noqa: F401  (registers every architecture)


def resolve_model_spec(value: str | dict[str, Any] | ModelSpec) -> ModelSpec:
    if isinstance(value, ModelSpec):
        return value
    if isinstance(value, str):
        return ModelSpec(name=value)
    return ModelSpec(**value)


def model_entry(name: str) -> ModelEntry:
    _ensure_zoo_loaded()
    return MODELS.get(name)


def build_model(
    value: str | dict[str, Any] | ModelSpec, *, input_shape: tuple[int, ...], num_classes: int
) -> nn.Module:
    """Build a fresh (randomly initialised, global-RNG) model for data of ``input_shape``.

    Raises :class:`ConfigError` when the architecture cannot take this input (e.g. a conv net on
    vector data, or images smaller than the net's ``min_size``).
    """
    spec = resolve_model_spec(value)
    entry = model_entry(spec.name)
    if entry.image_only and len(input_shape) != 3:
        raise UnsupportedModelError(
            f"model {spec.name!r} needs image inputs [C, H, W] but the data has shape {list(input_shape)}; "
            "use 'mlp' or 'logistic' for vector data"
        )
    if len(input_shape) == 3 and min(input_shape[1:]) < entry.min_size:
        raise UnsupportedModelError(
            f"model {spec.name!r} needs images of at least {entry.min_size}x{entry.min_size}, got "
            f"{input_shape[1]}x{input_shape[2]}; use a smaller model (e.g. 'mlp', 'fastcnn')"
        )
    in_ch = spec.in_channels or (input_shape[0] if len(input_shape) == 3 else None)
    if spec.in_channels is not None and len(input_shape) == 3 and spec.in_channels != input_shape[0]:
        raise ConfigError(f"model.in_channels={spec.in_channels} but the data has {input_shape[0]} channels")
    return entry.build(
        spec,
        input_shape=tuple(input_shape),
        in_channels=in_ch,
        num_classes=spec.num_classes or num_classes,
    )


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
