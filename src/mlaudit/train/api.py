"""``train``: the high-level entry point for one user-supplied model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..data.base import DataBundle, TensorDataset
from ..data.view import DataView
from .loop import resolve_augment, train_stack
from .recipe import Recipe, resolve_recipe


def train(
    model: nn.Module,
    data: DataBundle | TensorDataset,
    recipe: str | dict[str, Any] | Recipe = "fast",
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    view: DataView | None = None,
    residual: bool = False,
    dataset_name: str | None = None,
) -> nn.Module:
    """Train ``model`` (its current weights are the initialisation) in place and return it.

    Uses the same loop as the factory with K = 1. ``data`` is a bundle (its train split is used)
    or a training split; ``view`` optionally poisons/relabels/subsets it; ``residual`` selects the
    lr for ``lr: auto`` recipes. The model ends on the CPU in eval mode.
    """
    recipe = resolve_recipe(recipe)
    split = data.train if isinstance(data, DataBundle) else data
    name = dataset_name or (data.name if isinstance(data, DataBundle) else "")
    dev = torch.device(device)
    out = train_stack([model], split, recipe, seeds=[seed], lr=recipe.resolved_lr(residual=residual), device=dev,
                      views=[view], augment=resolve_augment(recipe, name, split.shape))
    model.load_state_dict(out[0].state_dict)
    return model.eval()
