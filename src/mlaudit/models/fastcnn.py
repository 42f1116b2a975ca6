"""A small, fast CNN for training many models (shadow models, poisoning trials, DP-audit runs), in the
spirit of airbench (Jordan 2024, "94% on CIFAR-10 in 3.29 Seconds on a Single GPU").

Design taken from airbench's public description (our own code): a narrow conv stem, three blocks of
``conv3x3 -> maxpool2 -> norm -> GELU -> conv3x3 -> norm -> GELU`` with widths ``(w, 4w, 4w)``,
global max pooling and a bias-free linear head whose logits are multiplied by a fixed ``1/9``.
Not reproduced: airbench's frozen whitening stem, frozen BatchNorm scale, lookahead/TTA tricks.
"""

from __future__ import annotations

import torch
from torch import nn

from .norm import kaiming_init_, make_norm2d, scale_channels, uses_bias
from .registry import ModelSpec, register_model

DEFAULT_WIDTH = 64
STEM_CHANNELS = 24  # at the default width (airbench's whitening stem has 24 output channels)
BLOCK_MULTIPLIERS = (1, 4, 4)  # block widths w, 4w, 4w -> 64, 256, 256 at the default width
BN_MOMENTUM = 0.4
"""PyTorch BatchNorm momentum (weight of the new batch statistic). airbench states its momentum as 0.6
in the "keep" convention, i.e. ``running = 0.6 * running + 0.4 * batch``; short runs need fast stats."""
LOGIT_SCALE = 1.0 / 9.0
"""Fixed multiplier on the logits (airbench's output scaling) of the normalised nets. With
``norm="none"`` the features are not normalised and already small, so the logits are left unscaled."""


class ConvBlock(nn.Module):
    """``[B, c_in, H, W] -> [B, c_out, ceil(H/2), ceil(W/2)]``: conv -> maxpool2 -> norm -> GELU ->
    conv -> norm -> GELU. The 2x2 pool uses ``ceil_mode`` so odd sides (e.g. 9) lose no pixels."""

    def __init__(self, c_in: int, c_out: int, *, norm: str) -> None:
        super().__init__()
        bias = uses_bias(norm)
        self.net = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias),
            nn.MaxPool2d(2, ceil_mode=True),
            make_norm2d(norm, c_out, momentum=BN_MOMENTUM),
            nn.GELU(),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=bias),
            make_norm2d(norm, c_out, momentum=BN_MOMENTUM),
            nn.GELU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FastCNN(nn.Module):
    """``[B, in_channels, H, W] -> logits [B, num_classes]`` for H, W >= 8 (three 2x pools: 8 -> 1)."""

    def __init__(self, *, in_channels: int, num_classes: int, width: int | None, norm: str) -> None:
        super().__init__()
        stem = scale_channels(STEM_CHANNELS, width, DEFAULT_WIDTH)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem, 3, padding=1, bias=True), nn.GELU())
        blocks: list[nn.Module] = []
        c_in = stem
        for mult in BLOCK_MULTIPLIERS:
            c_out = scale_channels(DEFAULT_WIDTH * mult, width, DEFAULT_WIDTH)
            blocks.append(ConvBlock(c_in, c_out, norm=norm))
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c_in, num_classes, bias=False)
        if norm == "none":  # He init keeps the signal alive without normalisation layers
            kaiming_init_(self)
        self.logit_scale = 1.0 if norm == "none" else LOGIT_SCALE  # a constant, fixed at build time

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # global max pool over the remaining map, taken in at least float32: under torch.compile + bf16 autocast the
        # backward of a bf16 amax gave NaN gradients to every layer below the head (torch 2.13 CPU and 2.11 H100,
        # 2026-12-07; the compiled step's loss was NaN at step 2, benchmarks/results/compile_graph_nan_h100.md). In
        # eager mode the upcast changes nothing: bf16 values are exact in float32, the head casts back under autocast,
        # and the gradient is rounded to bf16 once either way (tests/models/test_zoo.py checks the two bitwise).
        h = self.blocks(self.stem(x))
        h = h.to(torch.promote_types(h.dtype, torch.float32)).amax(dim=(-2, -1))  # float64 stays float64
        return self.head(h) * self.logit_scale


@register_model("fastcnn", residual=False, image_only=True, min_size=8)
def build_fastcnn(
    spec: ModelSpec, *, input_shape: tuple[int, ...], in_channels: int, num_classes: int
) -> nn.Module:
    """Small fast CNN for many-model work, after airbench (Jordan 2024): 3 conv blocks 64-256-256.

    ``spec.width`` is the first block width ``w`` (default 64; blocks ``w, 4w, 4w``, stem ``24 w/64``).
    BatchNorm momentum 0.4 (PyTorch convention), GELU activations, 2x2 max-pools (ceil mode) in each
    block, global max pooling, bias-free linear head with logits scaled by 1/9 (unscaled with
    ``norm="none"``). Meant for SGD with Nesterov momentum and label smoothing; works on 8x8 digits
    as well as 32x32 CIFAR images.
    """
    return FastCNN(in_channels=in_channels, num_classes=num_classes, width=spec.width, norm=spec.norm)
