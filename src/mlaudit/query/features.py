"""Penultimate-layer features of any classifier: the input of its last ``nn.Linear`` (the feature space
of Poison Frogs and Bullseye Polytope, Shafahi et al. 2018, Aghakhani et al. 2021, and of the filtering
defences, Tran et al. 2018, Chen et al. 2018, Peri et al. 2020).

    feats = penultimate_features(model)            # x -> [N, D], differentiable (crafting objectives)
    f = features_batched(model, x)                  # [N, D] on the CPU: eval mode, no gradient, in chunks
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .logits import forward_batched


def classification_head(model: nn.Module) -> nn.Linear:
    """The model's last ``nn.Linear`` (in module registration order): the layer whose input is the
    penultimate feature vector. Raises :class:`ConfigError` when the model has none."""
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not heads:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear layer; feature-space attacks and defences "
                          "(poison-frogs, bullseye, the filtering defences) need a linear classification head")
    return heads[-1]


def penultimate_features(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """``x [N, ...] -> [N, D]``: the flattened input of the model's last ``nn.Linear`` (in module
    registration order), captured with a forward hook while the whole model runs (differentiable).

    Raises :class:`ConfigError` when the model has no ``nn.Linear`` head.
    """
    head = classification_head(model)

    def features(x: Tensor) -> Tensor:
        box: list[Tensor] = []
        handle = head.register_forward_hook(lambda mod, inp, out: box.append(inp[0]))
        try:
            model(x)
        finally:
            handle.remove()
        return box[-1].flatten(1)

    return features


class _Features(nn.Module):
    """``model`` seen through :func:`penultimate_features` (a module, so the query guard sets its mode)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self._features = penultimate_features(model)

    def forward(self, x: Tensor) -> Tensor:
        return self._features(x)


def features_batched(model: nn.Module, x: Tensor, *, batch_size: int = 1024,
                     device: torch.device | str | None = None) -> Tensor:
    """Penultimate features float32 [N, D] of ``model`` on ``x`` [N, *shape], on the CPU: the query of
    :func:`~mlaudit.query.logits.forward_batched` (eval mode with every flag restored, no gradient,
    ``batch_size`` inputs per forward pass, on ``device``: default the model's)."""
    return forward_batched(_Features(model), x, batch_size=batch_size, device=device).float().cpu()
