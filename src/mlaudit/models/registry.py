"""Model registry and the `ModelSpec` config model.

``model:`` in a config names a zoo entry (``resnet18``, ``{name: resnet18, width: 32}``) or the
user's own architecture as an import string ``"package.module:factory"`` (a class or function returning
an ``nn.Module``; ``kwargs`` are passed to it, plus ``num_classes`` and ``input_shape`` when it declares
them and ``kwargs`` does not set them). The string travels to process and Ray workers. It is imported
only when a model is built (the runner's preflight), never while the config validates.

A zoo entry is a builder ``build(spec, *, input_shape, num_classes) -> nn.Module`` registered with
``@register_model("name", residual=..., image_only=...)``. ``build_model(spec, input_shape=...,
num_classes=...)`` builds one. Every builder honours ``width`` (base channel/hidden width, ``None``
for the architecture's default), ``norm`` (``batch``/``group``/``none``; DP-SGD needs a model
without BatchNorm) and derives ``in_channels``/``num_classes`` from the data unless the spec sets them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from ..errors import ConfigError, UnsupportedModelError
from ..imports import accepted_kwargs, is_import_string, resolve_import
from ..registry import Registry
from .freeze import TrainPart, classifier_head, freeze_to_head

Norm = Literal["batch", "group", "none", "dp-stats"]
DP_STATS_MODELS = ("scatter-linear", "scatter-cnn")
"""Zoo models that take ``norm: dp-stats`` (fixed per-channel statistics estimated with DP before training:
``recipe.dp.normalisation``, :mod:`mlaudit.privacy.normstats`)."""


class ModelSpec(BaseModel):
    """Which architecture to build: ``name`` (a zoo entry or ``package.module:factory``), ``width``,
    ``norm``, optional overrides (zoo only), ``kwargs`` (import strings only)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    width: int | None = Field(None, ge=1, le=4096)
    norm: Norm = "batch"
    num_classes: int | None = Field(None, ge=2)
    in_channels: int | None = Field(None, ge=1)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    init: str | None = Field(None, max_length=4096)
    """A state_dict file (``torch.save(model.state_dict(), path)``) every model built from this spec starts
    from instead of its seeded random init: fine-tuning a pretrained model, or the crafted initial weights
    of a last-iterate DP audit (Annamalai & De Cristofaro 2024). Loaded weights-only, every key required."""
    init_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    """The sha256 the ``init`` file must have (checked before it is loaded)."""
    train: TrainPart = "all"
    """Which parameters train: ``all``, or ``head`` (only the last ``nn.Linear``, the classifier; everything
    else frozen, its BatchNorm statistics included: transfer learning on ``init``'s features). See
    :mod:`mlaudit.models.freeze`."""
    reset_head: bool = False
    """With ``init``: the classifier (last ``nn.Linear``) keeps its seeded random init instead of the file's
    (a new classifier on pretrained features; the file's classifier keys are ignored, so they may be of another
    number of classes)."""

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if is_import_string(v):
            return v
        _ensure_zoo_loaded()
        if v not in MODELS:
            raise ValueError(f"unknown model {v!r}; valid models: {', '.join(MODELS.names())}, or your own "
                             "architecture as an import string 'package.module:factory'")
        return v

    @field_validator("init")
    @classmethod
    def _init_exists(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).is_file():
            raise ValueError(f"model.init = {v!r} is not a file; give the path of a saved state_dict "
                             "(torch.save(model.state_dict(), path))")
        return None if v is None else str(Path(v).resolve())  # worker processes may start elsewhere

    @model_validator(mode="after")
    def _options_fit(self) -> ModelSpec:
        if self.init_sha256 is not None and self.init is None:
            raise ValueError("model.init_sha256 is given without model.init; give the state_dict file it checks")
        if self.reset_head and self.init is None:
            raise ValueError("model.reset_head re-initialises the classifier of a pretrained model; it needs "
                             "model.init (the pretrained state_dict file)")
        if self.is_user and (self.width is not None or self.in_channels is not None):
            raise ValueError(f"model {self.name!r} is your own architecture: width and in_channels are zoo options; "
                             "pass your factory's own arguments in model.kwargs")
        if self.norm == "dp-stats" and self.name not in DP_STATS_MODELS:
            raise ValueError(f"model.norm = 'dp-stats' (privately estimated normalisation statistics) is built for "
                             f"{', '.join(DP_STATS_MODELS)} only, got model {self.name!r}; allowed norms for it: "
                             "batch, group, none")
        if not self.is_user and self.kwargs:
            raise ValueError(f"model.kwargs = {self.kwargs!r} is for import-string models; zoo model {self.name!r} "
                             "takes width, norm, num_classes and in_channels")
        return self

    def __hash__(self) -> int:  # kwargs is a dict: hash the canonical JSON (specs key caches and sets)
        return hash(self.model_dump_json())

    @property
    def is_user(self) -> bool:
        """True for the user's own architecture (an import string)."""
        return is_import_string(self.name)

    @property
    def residual(self) -> bool:
        """Whether ``lr: auto`` recipes treat it as residual (zoo entries say; user models are not)."""
        return False if self.is_user else model_entry(self.name).residual


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
    """Build a fresh (randomly initialised, global-RNG) model for data of ``input_shape``; with
    ``init`` in the spec, its weights are then those of that state_dict file (but for the classifier with
    ``reset_head``); with ``train: head`` all but the classifier is frozen (:mod:`.freeze`).

    Raises :class:`ConfigError` when the architecture cannot take this input (e.g. a conv net on
    vector data, or images smaller than the net's ``min_size``).
    """
    spec = resolve_model_spec(value)
    model = _build(spec, input_shape=input_shape, num_classes=num_classes)
    if spec.init is not None:
        _load_init(model, spec, num_classes=spec.num_classes or num_classes)
        setattr(model, PRETRAINED_FLAG, True)
    if spec.train == "head":
        freeze_to_head(model, num_classes=spec.num_classes or num_classes, name=spec.name)
    return model


PRETRAINED_FLAG = "_mlaudit_pretrained"
"""Attribute set (True) on a model whose weights came from ``init``: the training loop then skips the
model's ``data_init`` (which would overwrite pretrained weights from the training data)."""


def _load_init(model: nn.Module, spec: ModelSpec, *, num_classes: int) -> None:
    """Overwrite ``model``'s weights with the state_dict of ``spec.init`` (sha256-checked when given; a
    ConfigError naming the missing, unexpected or mis-shaped keys). With ``reset_head`` the classifier's
    keys are left out of the file's state and keep the model's own init."""
    path = Path(str(spec.init))
    state = _init_state(str(path), spec.init_sha256, path.stat().st_mtime_ns if path.is_file() else 0)
    keep: set[str] = set()
    if spec.reset_head:
        head_name, head = classifier_head(model, num_classes=num_classes, name=spec.name, field="model.reset_head")
        keep = {f"{head_name}.{k}" if head_name else k for k in head.state_dict()}
        state = {k: v for k, v in state.items() if k not in keep}
    try:
        missing, unexpected = model.load_state_dict(state, strict=not keep)
    except RuntimeError as e:
        raise ConfigError(f"model.init = {spec.init!r} does not fit model {spec.name!r}: "
                          f"{str(e).splitlines()[0][:300]} (save the state_dict of this very architecture)") from None
    if set(missing) - keep or unexpected:
        raise ConfigError(f"model.init = {spec.init!r} does not fit model {spec.name!r}: missing keys "
                          f"{sorted(set(missing) - keep)[:8]}, unexpected keys {sorted(unexpected)[:8]} (save the "
                          "state_dict of this very architecture)")


@functools.lru_cache(maxsize=4)
def _init_state(path: str, sha256: str | None, mtime_ns: int) -> dict[str, Any]:
    """The state_dict of ``path`` (cached per path, hash and modification time: one read for many models)."""
    from ..train.checkpoint import load_checkpoint  # train imports models: import here

    return load_checkpoint(path, sha256=sha256)


def _build(spec: ModelSpec, *, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if spec.is_user:
        return _build_user(spec, input_shape=tuple(input_shape), num_classes=spec.num_classes or num_classes)
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


def _build_user(spec: ModelSpec, *, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Call the user's factory; a ConfigError when it fails or returns something other than a module."""
    factory = resolve_import(spec.name, what="model")
    if isinstance(factory, nn.Module) or not callable(factory):
        raise ConfigError(f"model {spec.name!r} is a {type(factory).__name__}, not a factory; name a class or "
                          "function that returns a new torch.nn.Module each call (mlaudit trains many from it)")
    kwargs = {**accepted_kwargs(factory, {"num_classes": num_classes, "input_shape": input_shape}), **spec.kwargs}
    try:
        model = factory(**kwargs)
    except Exception as e:  # noqa: BLE001 - the user's constructor
        raise ConfigError(f"model {spec.name!r} failed to build with kwargs {kwargs!r}: {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {spec.name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def check_output(model: nn.Module, *, input_shape: tuple[int, ...], num_classes: int, name: str) -> None:
    """Run ``model`` on two zero inputs [2, *input_shape] (eval mode, no grad, CPU) and raise
    :class:`ConfigError` unless it returns logits [2, num_classes] of floating type."""
    import torch

    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape))
    except Exception as e:  # noqa: BLE001 - the user's forward
        raise ConfigError(f"model {name!r} cannot run on the data's inputs [N, {', '.join(map(str, input_shape))}]: "
                          f"{type(e).__name__}: {e}") from None
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes) or not out.is_floating_point():
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"model {name!r} must return logits [N, {num_classes}] (one per class of the data) but "
                          f"returned {got} for N = 2; set num_classes from the data (declare a num_classes "
                          "argument) or fix its last layer")


def check_sequence_output(model: nn.Module, *, input_shape: tuple[int, ...], num_classes: int, name: str) -> None:
    """Run a sequence model on two token sequences of zeros, int64 [2, L] (``input_shape`` = (L,); eval mode,
    no grad, CPU), and raise :class:`ConfigError` unless it returns next-token logits [2, num_classes, L] of
    floating type (the layout of :class:`mlaudit.models.gpt.TinyGPT`, the vocabulary second)."""
    import torch

    if len(input_shape) != 1:
        raise ConfigError(f"model {name!r} is used as a sequence model, which reads token sequences [N, L]; the "
                          f"data's examples have shape {list(input_shape)}; use token data (e.g. dataset pydoc-text)")
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape, dtype=torch.int64))
    except Exception as e:  # noqa: BLE001 - the user's forward
        raise ConfigError(f"model {name!r} cannot run on token sequences int64 [N, {input_shape[0]}]: "
                          f"{type(e).__name__}: {e}") from None
    finally:
        model.train(was)
    want = (2, num_classes, input_shape[0])
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want or not out.is_floating_point():
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"model {name!r} must return next-token logits [N, V, L] = {list(want)} for N = 2 (V = "
                          f"{num_classes} tokens of the data, L = {input_shape[0]}) but returned {got}")
