"""Querying trained models: logits, losses and accuracy for a stack of K models at once.

Membership inference, poisoning success and test accuracy all start from ``predict`` on a stack:
the same vmapped forward as training, in eval mode (BatchNorm running statistics per model).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.base import TensorDataset
from .loop import StackedModels


@torch.no_grad()
def predict(stack: StackedModels, x: Tensor, *, batch_size: int = 1024, bf16: bool = False) -> Tensor:
    """Logits of every model on every input: x [N, *shape] -> float32 [K, N, C] (on x's device)."""
    device = stack.device
    out = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and device.type == "cuda" else contextlib.nullcontext()
    for i in range(0, x.shape[0], batch_size):
        xb = x[i:i + batch_size].to(device)
        with autocast:
            logits = stack.forward(xb.unsqueeze(0).expand(stack.k, *xb.shape), train=False)
        out.append(logits.float())
    return torch.cat(out, dim=1)


@torch.no_grad()
def evaluate(stack: StackedModels, data: TensorDataset, *, batch_size: int = 1024, bf16: bool = False) -> dict[str, Tensor]:
    """Per-model ``accuracy`` [K] and mean cross-entropy ``loss`` [K] on ``data``."""
    logits = predict(stack, data.x, batch_size=batch_size, bf16=bf16)
    y = data.y.to(logits.device)
    acc = (logits.argmax(-1) == y).float().mean(1)
    loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(stack.k), reduction="none").view(stack.k, -1).mean(1)
    return {"accuracy": acc.cpu(), "loss": loss.cpu()}


def stack_from_state_dicts(template: nn.Module, state_dicts: Sequence[dict[str, Tensor]],
                           device: torch.device | str) -> StackedModels:
    """Rebuild a stack from saved weights (e.g. checkpoints loaded with ``weights_only=True``).

    ``template`` is any module of the architecture (its weights are ignored; a meta-device
    template such as :attr:`StackedModels.template` works too); each state_dict is loaded strictly.
    """
    mods = []
    for sd in state_dicts:
        m = _fresh_copy(template)
        m.load_state_dict(sd)
        mods.append(m)
    return StackedModels.from_modules(mods, torch.device(device))


def _fresh_copy(template: nn.Module) -> nn.Module:
    m = copy.deepcopy(template)
    if any(p.is_meta for p in m.parameters()):
        m = m.to_empty(device="cpu")
    return m
