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

from ..data.augment import AugmentParams, apply_augment
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


TTA_VIEWS: dict[str, tuple[tuple[int, bool, float], ...]] = {
    "none": ((0, False, 1.0),),
    "flip": ((0, False, 0.5), (0, True, 0.5)),
    "flip-translate": ((0, False, 0.25), (0, True, 0.25), (-1, False, 0.125), (-1, True, 0.125),
                       (1, False, 0.125), (1, True, 0.125)),
}
"""Test-time augmentation as (diagonal shift, flip, weight) views whose logits are averaged: ``flip``
mirrors; ``flip-translate`` is airbench's level 2 (Jordan 2024, section 3.7): half the weight on the
image and its mirror, half on both shifted one pixel up-left and down-right (reflect padding)."""


@torch.no_grad()
def predict_tta(stack: StackedModels, x: Tensor, *, tta: str = "none", batch_size: int = 1024,
                bf16: bool = False) -> Tensor:
    """Weighted mean of :func:`predict` over the :data:`TTA_VIEWS` of ``tta``: x [N, C, H, W] ->
    float32 [K, N, C]; ``none`` (or non-image data) is plain :func:`predict`."""
    views = TTA_VIEWS[tta]
    if len(views) == 1 or x.dim() != 4:
        return predict(stack, x, batch_size=batch_size, bf16=bf16)
    out = None
    for shift, flip, w in views:
        n = x.shape[0]
        params = AugmentParams(shift=torch.full((n, 2), shift, dtype=torch.int64), flip=torch.full((n,), flip))
        xv = apply_augment(x, params.to(x.device), pad_mode="reflect")
        lg = predict(stack, xv, batch_size=batch_size, bf16=bf16) * w
        out = lg if out is None else out + lg
    assert out is not None
    return out


@torch.no_grad()
def evaluate(stack: StackedModels, data: TensorDataset, *, batch_size: int = 1024, bf16: bool = False,
             tta: str = "none") -> dict[str, Tensor]:
    """Per-model ``accuracy`` [K] and mean cross-entropy ``loss`` [K] on ``data`` (logits averaged over
    the test-time augmentation views of ``tta``, see :data:`TTA_VIEWS`)."""
    logits = predict_tta(stack, data.x, tta=tta, batch_size=batch_size, bf16=bf16)
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
