"""CIFAR ResNet-18 (He et al. 2016, "Deep Residual Learning for Image Recognition").

CIFAR stem as in the paper's CIFAR experiments and the poisoning literature: one 3x3 conv, stride 1,
no max-pool; then four stages of two BasicBlocks with widths ``w, 2w, 4w, 8w`` (strides 1, 2, 2, 2),
global average pooling and a linear classifier.
"""

from __future__ import annotations

import torch
from torch import nn

from .norm import kaiming_init_, make_norm2d, scale_channels, uses_bias
from .registry import ModelSpec, register_model

DEFAULT_WIDTH = 64


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1 projection) shortcut: ``[B, c_in, H, W] -> [B, c_out, H/s, W/s]``."""

    def __init__(self, c_in: int, c_out: int, *, stride: int, norm: str) -> None:
        super().__init__()
        bias = uses_bias(norm)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = make_norm2d(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=bias)
        self.norm2 = make_norm2d(norm, c_out)
        self.act = nn.ReLU(inplace=False)
        if stride != 1 or c_in != c_out:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=bias), make_norm2d(norm, c_out)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: ``[B, in_channels, H, W] -> logits [B, num_classes]`` for any H, W >= 8."""

    def __init__(
        self, blocks: tuple[int, ...], *, in_channels: int, num_classes: int, width: int, norm: str
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=uses_bias(norm)),
            make_norm2d(norm, width),
            nn.ReLU(inplace=False),
        )
        layers: list[nn.Module] = []
        c_in = width
        for stage, n_blocks in enumerate(blocks):
            c_out = width * 2**stage
            for i in range(n_blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(c_in, c_out, stride=stride, norm=norm))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)
        if norm == "none":
            # Without normalisation: He init, and every residual branch starts at zero (Zhang et al.
            # 2019, Fixup; "zero-init residual"), so the net begins as its shortcut path and
            # activations do not grow with depth; conv2 still gets gradients, conv1 once conv2 != 0.
            kaiming_init_(self)
            for block in self.layers:
                nn.init.zeros_(block.conv2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(self.stem(x))
        return self.fc(h.mean(dim=(-2, -1)))  # global average pool == AdaptiveAvgPool2d(1)


@register_model("resnet18", residual=True, image_only=True, min_size=8)
def build_resnet18(
    spec: ModelSpec, *, input_shape: tuple[int, ...], in_channels: int, num_classes: int
) -> nn.Module:
    """CIFAR ResNet-18 (He et al. 2016): 3x3 stem, BasicBlocks [2,2,2,2], widths w..8w (w=64).

    ``spec.width`` is the stem/first-stage width ``w`` (default 64, i.e. 11.2M parameters for
    CIFAR-10). Global average pooling makes it work for any ``H, W >= 8`` (the three stride-2 stages
    reduce 8x8 to 1x1).
    """
    return ResNet(
        (2, 2, 2, 2),
        in_channels=in_channels,
        num_classes=num_classes,
        width=scale_channels(DEFAULT_WIDTH, spec.width, DEFAULT_WIDTH),
        norm=spec.norm,
    )
