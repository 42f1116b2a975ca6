"""Seeded class-conditional synthetic data, for tests and quick experiments.

Each class ``c`` gets a mean pattern ``m_c ~ N(0, I)`` of the requested shape, drawn from a
``torch.Generator`` seeded with ``spec.seed``; an example of class ``c`` is

    x = clamp(0.5 + separation * 0.25 * m_c + noise * 0.25 * eps, 0, 1),   eps ~ N(0, I),

so the data lie in [0, 1] like images. Labels are balanced (class ``i % K`` for example ``i``) and
then shuffled. Train and test are drawn from the same distribution (test after train, from the same
generator). ``shape`` of three ints gives images [N, C, H, W]; one int gives vectors [N, D].
With the defaults the classes are easily separable by a linear model.

Options: ``n_train`` (512), ``n_test`` (256), ``shape`` ([3, 8, 8]), ``num_classes`` (4),
``noise`` (0.5), ``separation`` (1.0).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor

from ..base import DataBundle, TensorDataset
from ..registry import DatasetSpec, register_source
from ._util import parse_options


class SyntheticOptions(BaseModel):
    """Sizes, shape and difficulty of the synthetic data (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_train: int = Field(512, ge=1)
    n_test: int = Field(256, ge=1)
    shape: tuple[int, ...] = (3, 8, 8)
    num_classes: int = Field(4, ge=2)
    noise: float = Field(0.5, ge=0.0)
    separation: float = Field(1.0, ge=0.0)

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if len(v) not in (1, 3) or any(d < 1 for d in v):
            raise ValueError("shape must be [D] (vectors) or [C, H, W] (images) with positive sizes")
        return v


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
