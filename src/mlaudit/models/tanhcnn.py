"""The end-to-end CNN of DP-SGD studies on CIFAR-10: six 3x3 convs with tanh and a two-layer head.

The network of Papernot, Thakurta, Song, Chien & Erlingsson ("Tempered Sigmoid Activations for Deep
Learning with Differential Privacy", AAAI 2021), used as the end-to-end DP baseline by Tramèr & Boneh
("Differentially Private Learning Needs Better Features (or Much More Data)", ICLR 2021) and as the
audited CIFAR-10 model by Annamalai & De Cristofaro ("Nearly Tight Black-Box Auditing of Differentially
Private Machine Learning", NeurIPS 2024). Layers at the default width 32 (widths scale with
``width / 32``)::

    [conv3x3(32) tanh] x 2 -> maxpool2 -> [conv3x3(64) tanh] x 2 -> maxpool2
    -> [conv3x3(128) tanh] x 2 -> maxpool2 -> flatten -> linear(128) -> tanh -> linear(classes)

Every conv has padding 1; the pools use ``ceil_mode`` so odd sides lose no pixels (32x32 -> 4x4, 2048
features). ``norm`` (the zoo's option, :mod:`.norm`) inserts a normalisation layer after each conv, before
tanh; the papers' network is ``norm: none`` (no normalisation; PyTorch's default initialisation here).
Tanh rather than ReLU is the papers' point: bounded activations keep gradient norms, and so the clipping
bias of DP-SGD, small.
"""

from __future__ import annotations

import torch
from torch import nn

from .norm import make_norm2d, scale_channels, uses_bias
from .registry import ModelSpec, register_model

DEFAULT_WIDTH = 32
STAGES = (32, 64, 128)  # conv widths per stage at the default width, two convs each
HIDDEN = 128  # the head's hidden units at the default width


class TanhCNN(nn.Module):
    """``[B, in_channels, H, W] -> logits [B, num_classes]``; the head's input size is fixed by (H, W)."""

    def __init__(self, *, input_hw: tuple[int, int], in_channels: int, num_classes: int, width: int | None,
                 norm: str) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in, (h, w) = in_channels, input_hw
        for base in STAGES:
            c_out = scale_channels(base, width, DEFAULT_WIDTH)
            for _ in range(2):
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=uses_bias(norm)), make_norm2d(norm, c_out),
                           nn.Tanh()]
                c_in = c_out
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
            h, w = -(-h // 2), -(-w // 2)
        self.features = nn.Sequential(*layers)
        hidden = scale_channels(HIDDEN, width, DEFAULT_WIDTH)
        self.classifier = nn.Sequential(nn.Linear(c_in * h * w, hidden), nn.Tanh(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), start_dim=-3))


@register_model("tanhcnn", residual=False, image_only=True, min_size=4)
def build_tanhcnn(spec: ModelSpec, *, input_shape: tuple[int, ...], in_channels: int, num_classes: int) -> nn.Module:
    """End-to-end DP-SGD CNN (Papernot et al. 2021; Tramèr & Boneh 2021): 6 convs 32-64-128, tanh.

    ``norm="none"`` is the papers' model; the default ``norm="batch"`` adds BatchNorm after each conv like the
    other zoo models (not usable under DP-SGD). ``spec.width`` scales every layer by ``width / 32``.
    """
    return TanhCNN(input_hw=(int(input_shape[-2]), int(input_shape[-1])), in_channels=in_channels,
                   num_classes=num_classes, width=spec.width, norm=spec.norm)
