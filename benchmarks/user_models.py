"""Architectures standing in for a user's own model in benchmark runs (import them as ``user_models:Name`` with
``PYTHONPATH=benchmarks``)."""

from torch import nn


class PassConv(nn.Sequential):
    """Digits-sized conv net without pooling: two size-keeping 3x3 convolutions (4 channels) with ReLU, then Linear
    256 -> 256, ReLU, Linear -> classes. The parameter-only imprint sets the convolutions to carry the input through
    and plants its bins in the first Linear (docs/federated.md)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, num_classes))
