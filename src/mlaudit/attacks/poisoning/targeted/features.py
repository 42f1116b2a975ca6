"""Penultimate-layer features of any classifier: the input of its last ``nn.Linear`` (the feature
space of Poison Frogs and Bullseye Polytope, Shafahi et al. 2018; Aghakhani et al. 2021)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from ....errors import ConfigError


def penultimate_features(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """``x [N, ...] -> [N, D]``: the flattened input of the model's last ``nn.Linear`` (in module
    registration order), captured with a forward hook while the whole model runs (differentiable).

    Raises :class:`ConfigError` when the model has no ``nn.Linear`` head.
    """
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not heads:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear layer; feature-space attacks (poison-frogs, "
                          "bullseye) need a linear classification head")
    head = heads[-1]

    def features(x: Tensor) -> Tensor:
        box: list[Tensor] = []
        handle = head.register_forward_hook(lambda mod, inp, out: box.append(inp[0]))
        try:
            model(x)
        finally:
            handle.remove()
        return box[-1].flatten(1)

    return features
