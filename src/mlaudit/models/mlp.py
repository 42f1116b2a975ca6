"""Fully connected models that accept any input shape: vectors ``[D]`` or images ``[C, H, W]``
(flattened to ``D = prod(input_shape)``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .norm import make_norm1d, uses_bias
from .registry import ModelSpec, register_model

DEFAULT_WIDTH = 256
DEFAULT_DEPTH = 2


class MLP(nn.Module):
    """``[B, *input_shape] -> logits [B, num_classes]``: flatten, ``depth`` x (linear -> norm -> ReLU),
    linear. ``depth=0`` is multinomial logistic regression (a single linear layer)."""

    def __init__(self, *, in_features: int, num_classes: int, hidden: int, depth: int, norm: str) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten(start_dim=1)]
        d_in = in_features
        for _ in range(depth):
            layers += [
                nn.Linear(d_in, hidden, bias=uses_bias(norm)),
                make_norm1d(norm, hidden),
                nn.ReLU(inplace=False),
            ]
            d_in = hidden
        layers.append(nn.Linear(d_in, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register_model("mlp", residual=False, image_only=False, min_size=1)
def build_mlp(
    spec: ModelSpec, *, input_shape: tuple[int, ...], in_channels: int | None, num_classes: int
) -> nn.Module:
    """Multi-layer perceptron: flatten -> 2 hidden layers (width 256) with norm + ReLU -> linear.

    ``spec.width`` is the hidden width (default 256). ``spec.norm``: ``batch`` -> BatchNorm1d,
    ``group`` -> GroupNorm, ``none`` -> no normalisation (hidden layers then keep their bias).
    Works for vector data ``[D]`` and images ``[C, H, W]`` alike.
    """
    return MLP(
        in_features=math.prod(input_shape),
        num_classes=num_classes,
        hidden=spec.width or DEFAULT_WIDTH,
        depth=DEFAULT_DEPTH,
        norm=spec.norm,
    )


@register_model("logistic", residual=False, image_only=False, min_size=1)
def build_logistic(
    spec: ModelSpec, *, input_shape: tuple[int, ...], in_channels: int | None, num_classes: int
) -> nn.Module:
    """Multinomial logistic regression: flatten -> one linear layer (with bias) -> logits.

    A convex model, useful for DP auditing and membership-inference baselines. ``spec.width`` and
    ``spec.norm`` are ignored (there is no hidden layer to widen or normalise), so ``has_batchnorm``
    is always False.
    """
    return MLP(in_features=math.prod(input_shape), num_classes=num_classes, hidden=0, depth=0, norm="none")


class CharMLP(nn.Module):
    """A fixed-context next-token model: ``x`` [B, k] float token ids (exact integers, as the training
    loop's float inputs) -> logits [B, V] over the vocabulary of the next token. Embedding (V x
    ``embed``) of each of the k previous tokens, concatenated, one hidden layer with ReLU, linear head
    (Bengio et al. 2003's neural n-gram model; the Secret Sharer's canaries only need next-token
    probabilities, :mod:`mlaudit.audit.exposure`)."""

    def __init__(self, *, context: int, vocab: int, embed: int, hidden: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.embed = nn.Embedding(vocab, embed)
        self.net = nn.Sequential(nn.Flatten(start_dim=1), nn.Linear(context * embed, hidden), nn.ReLU(),
                                 nn.Linear(hidden, vocab))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.embed(x.round().long().clamp(0, self.vocab - 1)))
