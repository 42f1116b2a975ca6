"""In-memory datasets as plain tensors.

Every source returns a :class:`DataBundle` (train + test :class:`TensorDataset`). Images are
float32 in [0, 1] with shape [N, C, H, W]; vector data is float32 [N, D]. Labels are int64 [N].
Nothing here is ever mutated: attacks express their changes as a :class:`~mlaudit.data.view.DataView`
over a base dataset, looked up by index, so the clean data stays the reference.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import DataError


@dataclass(frozen=True, eq=False)
class TensorDataset:
    """One split: ``x`` float32 [N, *shape], ``y`` int64 [N], and the class names."""

    x: Tensor
    y: Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise DataError(f"x has {self.x.shape[0]} rows but y has {self.y.shape[0]}")
        if self.y.dtype != torch.int64:
            raise DataError(f"labels must be int64, got {self.y.dtype}")
        if not self.x.is_floating_point():
            raise DataError(f"inputs must be floating point, got {self.x.dtype}")
        if self.y.numel() and (int(self.y.min()) < 0 or int(self.y.max()) >= len(self.classes)):
            raise DataError(
                f"labels must lie in [0, {len(self.classes) - 1}], got [{int(self.y.min())}, {int(self.y.max())}]"
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one example (without the leading N)."""
        return tuple(self.x.shape[1:])

    @property
    def device(self) -> torch.device:
        return self.x.device

    def to(self, device: torch.device | str) -> TensorDataset:
        """Copy to ``device`` (a no-op when already there)."""
        return TensorDataset(self.x.to(device), self.y.to(device), self.classes)

    def subset(self, index: Tensor) -> TensorDataset:
        """Rows ``index`` (int64 [M] or bool [N])."""
        return TensorDataset(self.x[index], self.y[index], self.classes)

    def fingerprint(self) -> str:
        """sha256 of the exact bytes of x and y (hex, 16 chars); identifies the split."""
        h = hashlib.sha256()
        h.update(str(tuple(self.x.shape)).encode())
        h.update(self.x.detach().cpu().contiguous().numpy().tobytes())
        h.update(self.y.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


@dataclass(frozen=True, eq=False)
class DataBundle:
    """A named dataset: train and test splits plus provenance.

    ``name`` is the source name (``digits``, ``cifar10``, ...); ``meta`` holds source details
    (root, files, split fraction) that go into results.json.
    """

    name: str
    train: TensorDataset
    test: TensorDataset
    meta: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.train.shape != self.test.shape:
            raise DataError(f"train examples have shape {self.train.shape} but test {self.test.shape}")
        if self.train.classes != self.test.classes:
            raise DataError("train and test splits disagree on the class names")

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.train.shape

    @property
    def is_image(self) -> bool:
        """True for [C, H, W] inputs (augmentation applies), False for vectors."""
        return len(self.input_shape) == 3

    @property
    def id(self) -> str:
        """Stable dataset id: ``name`` plus the fingerprints of both splits."""
        return f"{self.name}:{self.train.fingerprint()}:{self.test.fingerprint()}"

    def to(self, device: torch.device | str) -> DataBundle:
        return DataBundle(self.name, self.train.to(device), self.test.to(device), dict(self.meta))

    def describe(self) -> dict[str, object]:
        """Summary for `mlaudit data info`."""
        return {
            "name": self.name,
            "id": self.id,
            "train_size": len(self.train),
            "test_size": len(self.test),
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "classes": list(self.train.classes),
            **{k: v for k, v in self.meta.items() if isinstance(v, (str, int, float, bool, list))},
        }
