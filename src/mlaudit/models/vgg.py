"""VGG-11 (configuration "A" of Simonyan & Zisserman 2015, "Very Deep Convolutional Networks for
Large-Scale Image Recognition"), in the CIFAR form common in the poisoning literature: a norm layer
after every conv and a single linear classifier on the 512-channel feature vector.
"""

from __future__ import annotations

import torch
from torch import nn

from .norm import kaiming_init_, make_norm2d, scale_channels, uses_bias
from .registry import ModelSpec, register_model

DEFAULT_WIDTH = 64
POOL = "M"
VGG11: tuple[int | str, ...] = (64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL)


class VGG(nn.Module):
    """``[B, in_channels, H, W] -> logits [B, num_classes]`` for a VGG layer configuration.

    A 2x2 max-pool ("M") is skipped when it would shrink a spatial side below 1 (decided at build time
    from ``input_shape``: on 8x8 inputs only the first three pools run); the final map is then averaged
    to 1x1 (global average pool, the identity on the 1x1 map of 32x32 inputs) before the classifier.
    Convs that run on a 1x1 map (only with inputs < 16x16) are built as 1x1 convs: the same function
    class as a zero-padded 3x3 conv there, with 9x fewer weights and a fan-in that He init gets right.
    """

    def __init__(
        self,
        config: tuple[int | str, ...],
        *,
        input_hw: tuple[int, int],
        in_channels: int,
        num_classes: int,
        width: int | None,
        norm: str,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in, side = in_channels, min(input_hw)
        for item in config:
            if item == POOL:
                if side >= 2:
                    layers.append(nn.MaxPool2d(2))
                    side //= 2
                continue
            c_out = scale_channels(int(item), width, DEFAULT_WIDTH)
            kernel = 1 if side == 1 else 3  # on a 1x1 map a padded 3x3 conv only uses its centre tap
            layers += [
                nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=uses_bias(norm)),
                make_norm2d(norm, c_out),
                nn.ReLU(inplace=False),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)
        if norm == "none":  # He init keeps the signal alive without normalisation layers
            kaiming_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(-2, -1)))


@register_model("vgg11", residual=False, image_only=True, min_size=8)
def build_vgg11(
    spec: ModelSpec, *, input_shape: tuple[int, ...], in_channels: int, num_classes: int
) -> nn.Module:
    """VGG-11 (Simonyan & Zisserman 2015) with norm after each conv: 8 convs 64..512, 5 max-pools.

    ``spec.width`` scales all conv widths by ``width / 64``. Pools that would reduce a side below 1
    are skipped, then global average pooling feeds a linear classifier (see :class:`VGG`).
    """
    return VGG(
        VGG11,
        input_hw=(input_shape[1], input_shape[2]),
        in_channels=in_channels,
        num_classes=num_classes,
        width=spec.width,
        norm=spec.norm,
    )
