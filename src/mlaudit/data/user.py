"""The user's own data: ``dataset: "package.module:attr"`` in a config, or objects in the library API.

The import string names either a callable (called with ``dataset.options`` as keyword arguments) or
the data itself. Accepted forms, converted once to mlaudit's device-resident tensors:

* ``(train, test)`` or ``(train, test, classes)``;
* ``train`` alone: split into train/test with ``dataset.test_fraction`` (seeded, stratified);
* a :class:`~mlaudit.data.base.DataBundle`;

where each split is a ``(x, y)`` pair of tensors or arrays, or any map-style
``torch.utils.data.Dataset`` whose items are ``(input, label)``. Inputs become float32 [N, *shape]:
uint8 tensors, arrays and PIL images are scaled to [0, 1] (PIL images and HWC uint8 arrays of 3 or 4
channels become [C, H, W]); labels become int64 [N]. Class names come from ``classes`` (third tuple
element), else the dataset's ``classes`` attribute (torchvision's convention), else ``"0" ... "C-1"``.

Every problem raises :class:`~mlaudit.errors.DataError` naming the split, the index and what is
wrong (variable-size samples, non-numeric labels, mismatched lengths, an empty split).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, DataError
from ..imports import resolve_import
from .base import DataBundle, TensorDataset
from .sources._util import stratified_split, uint8_to_float

MAX_ITEMS = 10_000_000
"""Largest split converted item by item (a guard against unbounded or streaming datasets)."""


def load_user_dataset(name: str, *, options: dict[str, Any], test_fraction: float, seed: int) -> DataBundle:
    """Import ``name`` (``package.module:attr``), call it with ``options`` when it is callable, and
    convert what it gives (see the module docstring) into a :class:`DataBundle` named ``name``."""
    obj = resolve_import(name, what="dataset")
    if callable(obj) and not isinstance(obj, (torch.utils.data.Dataset, DataBundle)):
        try:
            obj = obj(**options)
        except Exception as e:  # noqa: BLE001 - the user's loader
            raise DataError(f"dataset {name!r} failed when called with options {options!r}: "
                            f"{type(e).__name__}: {e}") from None
    elif options:
        raise ConfigError(f"dataset.options = {options!r}, but dataset {name!r} is data, not a function to call "
                          "with options; drop the options or name a function")
    return as_bundle(obj, name=name, test_fraction=test_fraction, seed=seed)


def as_bundle(obj: Any, *, name: str, test_fraction: float = 0.2, seed: int = 0) -> DataBundle:
    """Convert the user's data (see the module docstring) into a :class:`DataBundle`."""
    if isinstance(obj, DataBundle):
        return obj
    classes: Sequence[str] | None = None
    if isinstance(obj, tuple) and len(obj) == 3 and not _is_pair(obj):
        obj, classes = obj[:2], [str(c) for c in obj[2]]
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and not _is_pair(obj):
        (xtr, ytr), (xte, yte) = as_tensors(obj[0], "train"), as_tensors(obj[1], "test")
        classes = classes or _classes(obj[0], ytr, yte)
    else:
        x, y = as_tensors(obj, "train")
        classes = classes or _classes(obj, y)
        tr, te = stratified_split(y.numpy(), test_fraction, seed)
        if len(te) == 0:
            raise DataError(f"dataset {name!r}: one split was given and test_fraction {test_fraction} leaves no test "
                            "examples; return (train, test) or raise test_fraction")
        xtr, ytr, xte, yte = x[tr], y[tr], x[te], y[te]
    if len(ytr) == 0 or len(yte) == 0:
        raise DataError(f"dataset {name!r}: the {'train' if len(ytr) == 0 else 'test'} split is empty")
    top = max(int(ytr.max()), int(yte.max()))
    if top >= len(classes):
        raise DataError(f"dataset {name!r}: labels reach {top} but there are {len(classes)} class names")
    cls = tuple(classes)
    return DataBundle(name, TensorDataset(xtr, ytr, cls), TensorDataset(xte, yte, cls),
                      {"format": "user", "source": name})


def _is_pair(obj: Any) -> bool:
    """An ``(x, y)`` pair of array-likes (as opposed to ``(train, test)`` splits)."""
    return (isinstance(obj, (tuple, list)) and len(obj) == 2
            and all(isinstance(v, (Tensor, np.ndarray)) for v in obj))


def as_tensors(split: Any, what: str) -> tuple[Tensor, Tensor]:
    """One split (an ``(x, y)`` pair or a map-style Dataset) as float32 [N, *shape] and int64 [N]."""
    if _is_pair(split):
        x, y = (torch.as_tensor(v) for v in split)
        if len(x) != len(y):
            raise DataError(f"{what} split: x has {len(x)} rows but y has {len(y)}; give one label per input")
        return _inputs(x, what), _labels(y, what)
    if isinstance(split, torch.utils.data.TensorDataset) and len(split.tensors) >= 2:
        return as_tensors(tuple(split.tensors[:2]), what)
    if not (hasattr(split, "__len__") and hasattr(split, "__getitem__")):
        raise DataError(f"{what} split is a {type(split).__name__}; give (x, y) tensors or a map-style "
                        "torch.utils.data.Dataset (with __len__ and __getitem__ returning (input, label))")
    n = len(split)
    if n == 0 or n > MAX_ITEMS:
        raise DataError(f"{what} split has {n} examples; it needs between 1 and {MAX_ITEMS}")
    xs, ys = [], []
    for i in range(n):
        item = split[i]
        if not (isinstance(item, (tuple, list)) and len(item) >= 2):
            raise DataError(f"{what} split item {i} is a {type(item).__name__}; items must be (input, label)")
        xs.append(_one_input(item[0], what, i))
        ys.append(item[1])
        if xs[-1].shape != xs[0].shape:
            raise DataError(f"{what} split: item {i} has shape {list(xs[-1].shape)} but item 0 has "
                            f"{list(xs[0].shape)}; variable-size samples cannot be stacked: resize or pad them "
                            "to one shape in your dataset")
    return _inputs(torch.stack(xs), what), _labels(ys, what)


def _one_input(v: Any, what: str, i: int) -> Tensor:
    if hasattr(v, "getbands"):  # a PIL image: HWC uint8 -> CHW
        a = np.array(v)  # a writable copy
        return torch.from_numpy(a if a.ndim == 3 else a[..., None]).permute(2, 0, 1).contiguous()
    try:
        return torch.as_tensor(np.asarray(v) if not isinstance(v, Tensor) else v)
    except (TypeError, ValueError, RuntimeError) as e:
        raise DataError(f"{what} split item {i}: input of type {type(v).__name__} is not numeric ({e})") from None


def _inputs(x: Tensor, what: str) -> Tensor:
    if x.dtype == torch.uint8:
        if x.dim() == 4 and x.shape[-1] in (3, 4) and x.shape[1] not in (1, 3, 4):  # NHWC images
            x = x.permute(0, 3, 1, 2)
        return uint8_to_float(x.numpy())
    if not (x.is_floating_point() or x.dtype in (torch.int16, torch.int32, torch.int64, torch.int8)):
        raise DataError(f"{what} split: inputs of dtype {x.dtype} are not numeric")
    x = x.to(torch.float32)
    if not torch.isfinite(x).all():
        raise DataError(f"{what} split: inputs contain NaN or infinite values")
    return x.contiguous()


def _labels(y: Any, what: str) -> Tensor:
    if isinstance(y, Tensor) and y.is_floating_point() and not torch.equal(y, y.round()):
        raise DataError(f"{what} split: labels are fractional floats; give integer class indices 0..C-1")
    try:
        t = torch.as_tensor(np.asarray([int(v) for v in (y.tolist() if isinstance(y, Tensor) else y)]), dtype=torch.int64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{what} split: labels must be integer class indices 0..C-1 ({e}); map names to "
                        "indices in your dataset") from None
    if len(t) and int(t.min()) < 0:
        raise DataError(f"{what} split: labels must be >= 0, got {int(t.min())}")
    return t


def _classes(split: Any, *ys: Tensor) -> list[str]:
    named = getattr(split, "classes", None)
    if isinstance(named, (list, tuple)) and named:
        return [str(c) for c in named]
    top = max(int(y.max()) for y in ys if len(y))
    return [str(i) for i in range(max(top + 1, 2))]
