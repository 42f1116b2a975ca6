"""Registry of data sources and the `DatasetSpec` config model.

A source is a function ``load(spec: DatasetSpec) -> DataBundle``. Register with
``@register_source("name")``. ``load_dataset("digits")`` or ``load_dataset({"name": "cifar10",
"root": "/data"})`` resolves a spec and loads it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..imports import is_import_string
from ..registry import Registry
from .base import DataBundle

MEMORY_NAME = re.compile(r"^memory:[0-9a-f]{32}$")
"""Data given as Python objects to the library API (:mod:`mlaudit.api`): named by its fingerprint."""

SOURCES: Registry[Callable[[DatasetSpec], DataBundle]] = Registry("dataset")

TEXT_SOURCES: tuple[str, ...] = ("pydoc-text",)
"""The registered sources of token sequences: x float32 [N, L] token ids (exact integers), y int64 [N] the
token that follows, the class names the vocabulary (what sequence models such as TinyGPT read)."""


def register_source(name: str) -> Callable[[Callable[[DatasetSpec], DataBundle]], Callable[[DatasetSpec], DataBundle]]:
    return SOURCES.register(name)


class DatasetSpec(BaseModel):
    """Which dataset to load and how. Extra source-specific options go in ``options``.

    Fields: ``name`` (a registered source, or ``package.module:attr`` naming the user's own data, see
    :mod:`mlaudit.data.user`), ``root`` (folder or file for file-based sources;
    default ``~/.mlaudit/data/<name>``), ``download`` (fetch when missing, where the source can),
    ``test_fraction`` (for sources without a fixed test split), ``limit_train``/``limit_test``
    (keep the first N examples of each split after a seeded shuffle; for quick runs),
    ``seed`` (for splits and synthetic data), ``options`` (source-specific, validated by the source; keyword arguments of a user's data function).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    root: str | None = None
    download: bool = False
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    limit_train: int | None = Field(None, ge=1)
    limit_test: int | None = Field(None, ge=1)
    seed: int = 0
    options: dict[str, Any] = Field(default_factory=dict)

    @property
    def in_memory(self) -> bool:
        """True for data given as objects to the library API (it cannot be reloaded by name)."""
        return bool(MEMORY_NAME.match(self.name))

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if is_import_string(v) or MEMORY_NAME.match(v):  # the user's own data (loaded later, not while validating)
            return v
        _ensure_sources_loaded()
        if v not in SOURCES:
            raise ValueError(f"unknown dataset {v!r}; valid datasets: {', '.join(SOURCES.names())}, "
                             "or your own data as an import string 'package.module:attr' (see docs/bring_your_own.md)")
        return v


def _ensure_sources_loaded() -> None:
    # Importing the package modules registers the sources (decorators run at import).
    from .sources import cifar10, digits, image_folder, mnist, pydoc_text, synthetic  # noqa: F401


def resolve_dataset_spec(value: str | dict[str, Any] | DatasetSpec) -> DatasetSpec:
    """Accept the config forms ``"digits"`` or ``{"name": "cifar10", ...}``."""
    if isinstance(value, DatasetSpec):
        return value
    if isinstance(value, str):
        return DatasetSpec(name=value)
    return DatasetSpec(**value)


def load_dataset(value: str | dict[str, Any] | DatasetSpec) -> DataBundle:
    """Load a dataset from a name, a mapping or a :class:`DatasetSpec`; applies the limits."""
    spec = resolve_dataset_spec(value)
    _ensure_sources_loaded()
    if MEMORY_NAME.match(spec.name):
        from ..errors import DataError

        raise DataError(f"dataset {spec.name!r} was given as Python objects to the library API and cannot be "
                        "loaded again from its name; pass the same data again (the run resumes), or name it by "
                        "an import string 'package.module:attr'")
    if is_import_string(spec.name):
        from .user import load_user_dataset

        bundle = load_user_dataset(spec.name, options=spec.options, test_fraction=spec.test_fraction, seed=spec.seed)
    else:
        bundle = SOURCES.get(spec.name)(spec)
    if spec.limit_train is None and spec.limit_test is None:
        return bundle
    import torch

    from .base import DataBundle as _DB

    g = torch.Generator().manual_seed(spec.seed)

    def cut(ds, limit):  # noqa: ANN001, ANN202
        if limit is None or limit >= len(ds):
            return ds
        idx = torch.randperm(len(ds), generator=g)[:limit].sort().values
        return ds.subset(idx)

    return _DB(bundle.name, cut(bundle.train, spec.limit_train), cut(bundle.test, spec.limit_test),
               {**bundle.meta, "limit_train": spec.limit_train, "limit_test": spec.limit_test})
