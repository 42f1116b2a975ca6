"""The 5-conv "ConvNet" of Geiping et al. 2021 ("Witches' Brew: Industrial Scale Data Poisoning via
Gradient Matching"), used there as a small non-residual victim.

The paper's model has **no normalisation layers** (seed 002 section 1.7.3: every conv is followed by a
ReLU only); ``ModelSpec(name="convnet6", norm="none")`` builds it. The zoo's default ``norm="batch"``
adds BatchNorm after every conv, like the other zoo models: it trains to a higher accuracy (84.7% vs
82.4% on CIFAR-10 (JPEG), witches-brew recipe) but is a different victim. Gradient matching at eps 32
poisoned 6 of 8 victims of the paper's model and 0 of 4 of the BatchNorm one
(``docs/targeted_poisoning.md``).

Layers (widths at the default ``width=64``): conv 64 -> conv 128 -> conv 128 -> conv 256 -> 3x3 max-pool
-> conv 256 -> 3x3 max-pool -> flatten -> linear. Every conv is 3x3 with padding 1 and is followed by
norm and ReLU. On 32x32 inputs the pools give 10x10 then 3x3 maps, i.e. 256 * 9 = 2304 features.
"""

from __future__ import annotations

import torch
from torch import nn

from .norm import kaiming_init_, make_norm2d, scale_channels, uses_bias
from .registry import ModelSpec, register_model

DEFAULT_WIDTH = 64
WIDTHS = (64, 128, 128, 256, 256)
POOL = 3
POOL_AFTER = (3, 4)  # indices of the convs followed by a max-pool


def _conv_block(c_in: int, c_out: int, norm: str) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=uses_bias(norm)),
        make_norm2d(norm, c_out),
        nn.ReLU(inplace=False),
    ]


class ConvNet6(nn.Module):
    """``[B, in_channels, H, W] -> logits [B, num_classes]``; the classifier size is fixed by (H, W).

    A 3x3 max-pool is applied only while both spatial sides are still >= 3 (decided once, at build
    time, from ``input_shape``; never from the data), so 8x8 inputs keep a 2x2 map instead of
    collapsing to zero. 32x32 inputs get both pools, exactly as in the paper.
    """

    def __init__(
        self, *, input_hw: tuple[int, int], in_channels: int, num_classes: int, width: int | None, norm: str
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in, (h, w) = in_channels, input_hw
        for i, base in enumerate(WIDTHS):
            c_out = scale_channels(base, width, DEFAULT_WIDTH)
            layers += _conv_block(c_in, c_out, norm)
            if i in POOL_AFTER and min(h, w) >= POOL:
                layers.append(nn.MaxPool2d(POOL))
                h, w = h // POOL, w // POOL
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in * h * w, num_classes)
        if norm == "none":  # He init keeps the signal alive without normalisation layers
            kaiming_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), start_dim=-3))


@register_model("convnet6", residual=False, image_only=True, min_size=8)
def build_convnet6(
    spec: ModelSpec, *, input_shape: tuple[int, ...], in_channels: int, num_classes: int
) -> nn.Module:
    """Witches' Brew ConvNet (Geiping et al. 2021): 5 convs 64-128-128-256-256, two 3x3 max-pools.

    ``norm="none"`` is the paper's model; the default ``norm="batch"`` adds BatchNorm (module docstring).

    ``spec.width`` scales all conv widths by ``width / 64``. The linear layer's input size follows
    from ``input_shape`` (2304 features at width 64 on 32x32); on inputs smaller than 9x9 the second
    max-pool is skipped (see :class:`ConvNet6`).
    """
    return ConvNet6(
        input_hw=(input_shape[1], input_shape[2]),
        in_channels=in_channels,
        num_classes=num_classes,
        width=spec.width,
        norm=spec.norm,
    )
