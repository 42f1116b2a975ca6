"""MobileNetV2 (Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks"), CIFAR
variant: the first conv and the second bottleneck stage use stride 1 instead of 2, so a 32x32 input
is downsampled 8x (to 4x4) rather than 32x.
"""

from __future__ import annotations

import torch
from torch import nn

from .norm import kaiming_init_, make_norm2d, scale_channels, uses_bias
from .registry import ModelSpec, register_model

DEFAULT_WIDTH = 32
STEM_CHANNELS = 32
LAST_CHANNELS = 1280
# (expansion t, output channels c, repeats n, first stride s) - Table 2 of the paper, CIFAR strides.
STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _conv_norm_act(
    c_in: int, c_out: int, *, kernel: int, stride: int, groups: int, norm: str
) -> list[nn.Module]:
    return [
        nn.Conv2d(
            c_in, c_out, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=uses_bias(norm)
        ),
        make_norm2d(norm, c_out),
        nn.ReLU6(inplace=False),
    ]


class InvertedResidual(nn.Module):
    """1x1 expand (t x) -> 3x3 depthwise (stride s) -> 1x1 linear projection; identity shortcut when
    the stride is 1 and the channel count is unchanged. ``[B, c_in, H, W] -> [B, c_out, H/s, W/s]``."""

    def __init__(self, c_in: int, c_out: int, *, expansion: int, stride: int, norm: str) -> None:
        super().__init__()
        hidden = c_in * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += _conv_norm_act(c_in, hidden, kernel=1, stride=1, groups=1, norm=norm)
        layers += _conv_norm_act(hidden, hidden, kernel=3, stride=stride, groups=hidden, norm=norm)
        self.expand = nn.Sequential(*layers)
        self.project = nn.Conv2d(hidden, c_out, 1, bias=uses_bias(norm))  # linear bottleneck: no activation
        self.project_norm = make_norm2d(norm, c_out)
        self.use_shortcut = stride == 1 and c_in == c_out  # fixed at build time, not data-dependent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project_norm(self.project(self.expand(x)))
        return x + out if self.use_shortcut else out


class MobileNetV2(nn.Module):
    """``[B, in_channels, H, W] -> logits [B, num_classes]`` for any H, W >= 8 (global average pool)."""

    def __init__(self, *, in_channels: int, num_classes: int, width: int | None, norm: str) -> None:
        super().__init__()
        alpha = 1.0 if width is None else width / DEFAULT_WIDTH
        c_in = scale_channels(STEM_CHANNELS, width, DEFAULT_WIDTH)
        layers = _conv_norm_act(in_channels, c_in, kernel=3, stride=1, groups=1, norm=norm)
        for expansion, c, n, s in STAGES:
            c_out = scale_channels(c, width, DEFAULT_WIDTH)
            for i in range(n):
                layers.append(
                    InvertedResidual(c_in, c_out, expansion=expansion, stride=s if i == 0 else 1, norm=norm)
                )
                c_in = c_out
        # The paper keeps the last conv at 1280 channels for multipliers < 1 and scales it otherwise.
        last = LAST_CHANNELS if alpha <= 1.0 else scale_channels(LAST_CHANNELS, width, DEFAULT_WIDTH)
        layers += _conv_norm_act(c_in, last, kernel=1, stride=1, groups=1, norm=norm)
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(last, num_classes)
        if norm == "none":  # He init; zero-init residual branches, as for ResNet (Zhang et al. 2019, Fixup)
            kaiming_init_(self)
            for block in self.features:
                if isinstance(block, InvertedResidual) and block.use_shortcut:
                    nn.init.zeros_(block.project.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(-2, -1)))


@register_model("mobilenetv2", residual=True, image_only=True, min_size=8)
def build_mobilenetv2(
    spec: ModelSpec, *, input_shape: tuple[int, ...], in_channels: int, num_classes: int
) -> nn.Module:
    """MobileNetV2 (Sandler et al. 2018), CIFAR variant: inverted residuals (t=6), stride-1 stem.

    ``spec.width`` is the stem width (default 32); the width multiplier ``width / 32`` scales every
    layer (channels rounded to the nearest integer, at least 1; no rounding to multiples of 8), except
    that the final 1x1 conv keeps 1280 channels for multipliers < 1, as in the paper. ReLU6
    activations; global average pooling, so any ``H, W >= 8`` works.
    """
    return MobileNetV2(in_channels=in_channels, num_classes=num_classes, width=spec.width, norm=spec.norm)
