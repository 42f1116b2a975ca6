"""Seeded class-conditional synthetic data, for tests and quick experiments.

Each class ``c`` gets a mean pattern ``m_c ~ N(0, I)`` of the requested shape, drawn from a
``torch.Generator`` seeded with ``spec.seed``; an example of class ``c`` is

    x = clamp(0.5 + separation * 0.25 * m_c + noise * 0.25 * eps, 0, 1),   eps ~ N(0, I),

so the data lie in [0, 1] like images. Labels are balanced (class ``i % K`` for example ``i``) and
then shuffled. Train and test are drawn from the same distribution (test after train, from the same
generator). ``shape`` of three ints gives images [N, C, H, W]; one int gives vectors [N, D].
With the defaults the classes are easily separable by a linear model.

Options: ``n_train`` (512), ``n_test`` (256), ``shape`` ([3, 8, 8]), ``num_classes`` (4),
``noise`` (0.5), ``separation`` (1.0). Sizes are bounded (:data:`MAX_N`, :data:`MAX_CLASSES`,
:data:`MAX_EXAMPLE_SIZE` values per example, :data:`MAX_ELEMENTS` values in all) so that a config
cannot ask for more memory than a machine has; the error names the option and the allowed range.
"""

from __future__ import annotations

import math

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError
from torch import Tensor

from ..base import DataBundle, TensorDataset
from ..registry import DatasetSpec, register_source
from ._util import parse_options

MAX_N = 10_000_000  # examples per split
MAX_CLASSES = 100_000
MAX_EXAMPLE_SIZE = 1_000_000  # prod(shape)
MAX_ELEMENTS = 2**31  # values in the train and test sets and the class means together
_RANGES = {"n_train": (1, MAX_N), "n_test": (1, MAX_N), "num_classes": (2, MAX_CLASSES)}


class SyntheticOptions(BaseModel):
    """Sizes, shape and difficulty of the synthetic data (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_train: int = 512
    n_test: int = 256
    shape: tuple[int, ...] = (3, 8, 8)
    num_classes: int = 4
    noise: float = Field(0.5, ge=0.0, allow_inf_nan=False)
    separation: float = Field(1.0, ge=0.0, allow_inf_nan=False)

    @field_validator("n_train", "n_test", "num_classes")
    @classmethod
    def _count(cls, v: int, info: ValidationInfo) -> int:
        lo, hi = _RANGES[info.field_name]
        if not lo <= v <= hi:
            raise ValueError(f"{info.field_name} must be in {lo} <= {info.field_name} <= {hi:,} (got {v:,})")
        return v

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if len(v) not in (1, 3) or any(d < 1 for d in v):
            raise ValueError("shape must be [D] (vectors) or [C, H, W] (images) with positive sizes")
        if math.prod(v) > MAX_EXAMPLE_SIZE:
            raise ValueError(f"shape {list(v)} has {math.prod(v):,} values per example; allowed "
                             f"prod(shape) <= {MAX_EXAMPLE_SIZE:,}")
        return v

    @model_validator(mode="after")
    def _total(self) -> SyntheticOptions:
        total = (self.n_train + self.n_test + self.num_classes) * math.prod(self.shape)
        if total > MAX_ELEMENTS:  # reported at n_train (an error of the whole model would have no field)
            msg = (f"(n_train + n_test + num_classes) * prod(shape) = ({self.n_train:,} + {self.n_test:,} + "
                   f"{self.num_classes:,}) * {math.prod(self.shape):,} = {total:,} values; allowed <= "
                   f"{MAX_ELEMENTS:,} (2**31); lower n_train, n_test, num_classes or shape")
            err = InitErrorDetails(type=PydanticCustomError("too_large", msg), loc=("n_train",), input=self.n_train)
            raise ValidationError.from_exception_data(type(self).__name__, [err])
        return self


def _draw(means: Tensor, n: int, opts: SyntheticOptions, g: torch.Generator) -> tuple[Tensor, Tensor]:
    k = opts.num_classes
    y = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
    eps = torch.randn((n, *opts.shape), generator=g)
    x = 0.5 + opts.separation * 0.25 * means[y] + opts.noise * 0.25 * eps
    return x.clamp_(0.0, 1.0), y


@register_source("synthetic")
def load(spec: DatasetSpec) -> DataBundle:
    """Generate the synthetic bundle for ``spec.seed`` and ``spec.options``: float32 [N, *shape]."""
    opts = parse_options(SyntheticOptions, spec.options, source="synthetic")
    g = torch.Generator().manual_seed(spec.seed)
    means = torch.randn((opts.num_classes, *opts.shape), generator=g)
    classes = tuple(str(i) for i in range(opts.num_classes))
    x_train, y_train = _draw(means, opts.n_train, opts, g)
    x_test, y_test = _draw(means, opts.n_test, opts, g)
    return DataBundle("synthetic", TensorDataset(x_train, y_train, classes), TensorDataset(x_test, y_test, classes),
                      {"format": "generated", "seed": spec.seed, **opts.model_dump(mode="json")})
