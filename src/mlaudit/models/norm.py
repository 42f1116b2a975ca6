"""Normalisation layers selected by ``ModelSpec.norm`` (``batch`` / ``group`` / ``none``).

Every zoo architecture builds its normalisation layers through :func:`make_norm2d` (after
convolutions, input ``[B, C, H, W]``) or :func:`make_norm1d` (after linear layers, input
``[B, C]``), so the ``norm`` option means the same thing everywhere:

* ``batch`` - ``BatchNorm2d`` / ``BatchNorm1d`` (Ioffe & Szegedy 2015), running statistics tracked.
* ``group`` - ``GroupNorm`` (Wu & He 2018) with :func:`group_count` groups (at least 8 channels per
  group after convs, 16 features per group after linear layers); per-example, so it is compatible
  with DP-SGD's per-sample gradients.
* ``none`` - ``Identity``; layers before it then keep their bias (see :func:`uses_bias`).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..errors import ConfigError

MAX_GROUPS = 32
"""Upper bound on GroupNorm groups (the default recommended by Wu & He 2018)."""
MIN_GROUP_SIZE_2D = 8
"""Fewest channels per group after a conv. Small inputs (8x8 digits) shrink to 1x1 maps in the last
stages, where a group of 1-2 channels is normalised over 1-2 numbers (outputs ~ +-1, huge gradients)."""
MIN_GROUP_SIZE_1D = 16
"""Fewest features per group after a linear layer (Wu & He's "16 channels per group" setting): a
vector has no spatial extent, so small groups would normalise away almost all information."""


def group_count(channels: int, *, min_group_size: int = MIN_GROUP_SIZE_2D) -> int:
    """Number of GroupNorm groups for ``channels``.

    Rule: the largest divisor ``g`` of ``channels`` with ``g <= 32`` and ``channels / g >=
    min_group_size``; 1 group (LayerNorm-like) when no larger one qualifies. With the default
    ``min_group_size=8``: 512 -> 32 groups, 256 -> 32, 128 -> 16, 64 -> 8, 24 -> 3, 16 -> 2, 8 -> 1
    (Wu & He 2018 find 8-32 groups within 0.3% of each other on ImageNet); the result always divides
    ``channels`` exactly, as ``GroupNorm`` requires.
    """
    if channels < 1:
        raise ConfigError(f"norm channels must be >= 1, got {channels}")
    if min_group_size < 1:
        raise ConfigError(f"min_group_size must be >= 1, got {min_group_size}")
    limit = min(MAX_GROUPS, channels // min_group_size)
    return max((g for g in range(1, limit + 1) if channels % g == 0), default=1)


NormFactory = Callable[[int, float], nn.Module]

_NORM2D: dict[str, NormFactory] = {
    "batch": lambda c, momentum: nn.BatchNorm2d(c, momentum=momentum),
    "group": lambda c, momentum: nn.GroupNorm(group_count(c), c),
    "none": lambda c, momentum: nn.Identity(),
}

_NORM1D: dict[str, NormFactory] = {
    "batch": lambda c, momentum: nn.BatchNorm1d(c, momentum=momentum),
    "group": lambda c, momentum: nn.GroupNorm(group_count(c, min_group_size=MIN_GROUP_SIZE_1D), c),
    "none": lambda c, momentum: nn.Identity(),
}


def _lookup(table: dict[str, NormFactory], kind: str) -> NormFactory:
    try:
        return table[kind]
    except KeyError:
        raise ConfigError(f"unknown norm {kind!r}; valid norms: {', '.join(sorted(table))}") from None


def make_norm2d(kind: str, channels: int, *, momentum: float = 0.1) -> nn.Module:
    """Normalisation for conv feature maps ``[B, channels, H, W]`` -> same shape.

    ``momentum`` is PyTorch's BatchNorm momentum (weight of the *new* batch statistic in the running
    average); it is ignored by ``group`` and ``none``.
    """
    return _lookup(_NORM2D, kind)(channels, momentum)


def make_norm1d(kind: str, features: int, *, momentum: float = 0.1) -> nn.Module:
    """Normalisation for hidden vectors ``[B, features]`` -> same shape (see :func:`make_norm2d`)."""
    return _lookup(_NORM1D, kind)(features, momentum)


def uses_bias(kind: str) -> bool:
    """Whether a conv/linear layer followed by norm ``kind`` needs its own bias.

    BatchNorm and GroupNorm have an affine shift that makes a preceding bias redundant; with ``none``
    the bias is kept so the network can still represent offsets.
    """
    _lookup(_NORM2D, kind)
    return kind == "none"


def scale_channels(base: int, width: int | None, default: int) -> int:
    """Channels of a layer with ``base`` channels at the default width, rescaled to ``width``.

    ``round(base * width / default)``, at least 1; ``width=None`` keeps ``base``. Shared by the zoo
    so that ``ModelSpec.width`` always scales every layer of an architecture proportionally.
    """
    if width is None:
        return base
    return max(1, round(base * width / default))


def kaiming_init_(model: nn.Module) -> nn.Module:
    """He et al. 2015 initialisation of every conv in ``model`` (in place; returns ``model``).

    Conv weights ~ N(0, 2 / fan_in) (variance-preserving through ReLU/GELU), conv biases zero.
    The zoo applies it only with ``norm="none"``: PyTorch's default conv init shrinks the signal ~3x
    in variance per layer, which is harmless with BatchNorm/GroupNorm (and trains slightly better
    there) but stalls deep nets without normalisation. Draws from the global RNG, so it is
    deterministic under ``torch.manual_seed``. Linear layers keep PyTorch's default init.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model
