"""scikit-learn's bundled handwritten digits (UCI optdigits test set; Alpaydin & Kaynak 1998).

1,797 grey-scale 8x8 images with values 0..16, ten classes ``"0".."9"``. No download: the data
ships with scikit-learn. The images are scaled to float32 [N, 1, 8, 8] in [0, 1] (``x / 16``) and
split into train and test with a stratified split seeded by ``spec.seed`` that sends a fraction
``spec.test_fraction`` (default 0.2) of each class to test. The same spec always gives the same
tensors. The source takes no options.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from ..base import DataBundle, TensorDataset
from ..registry import DatasetSpec, register_source
from ._util import parse_options, stratified_split


class DigitsOptions(BaseModel):
    """The digits source has no options."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@register_source("digits")
def load(spec: DatasetSpec) -> DataBundle:
    """Load the 8x8 digits as float32 [N, 1, 8, 8] in [0, 1] with a seeded stratified split."""
    parse_options(DigitsOptions, spec.options, source="digits")
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = torch.from_numpy((raw.images / 16.0).astype(np.float32)).unsqueeze(1)
    y = np.asarray(raw.target, dtype=np.int64)
    train_idx, test_idx = stratified_split(y, spec.test_fraction, spec.seed)
    classes = tuple(str(i) for i in range(10))
    yt = torch.from_numpy(y)
    train = TensorDataset(x[train_idx], yt[train_idx], classes)
    test = TensorDataset(x[test_idx], yt[test_idx], classes)
    return DataBundle("digits", train, test,
                      {"format": "sklearn", "test_fraction": spec.test_fraction, "seed": spec.seed})
