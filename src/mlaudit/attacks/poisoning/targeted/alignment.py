"""Gradient alignment during victim training: the diagnostic of seed 002, Figure 1.3b.

Witches' Brew works if, while a victim trains on the poisoned set, the gradient of its training
mini-batches points along the gradient of the adversarial target loss, so ordinary descent also
descends on L(F(x_t), y_adv). The diagnostic trains a victim (the shared loop, one model) and after
every epoch measures

    cos( grad_theta L(F(x_t), y_adv),  grad_theta (1/B) sum_{i in batch} L(F(x_i), y_i) )

averaged over ``batches`` fixed training mini-batches drawn from the victim's (clean or poisoned)
training set, over all trainable parameters. Poisoned victims should show a clearly positive
alignment, clean victims one near zero.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ....data.base import TensorDataset
from ....data.view import DataView
from ....query import evaluating, param_grad
from ....train.loop import init_models, train_stack
from ....train.recipe import AugmentConfig, Recipe
from ....train.stacked import StackedModels


def gradient_cosine(model: nn.Module, x_target: Tensor, adv_label: int, x_batch: Tensor, y_batch: Tensor) -> float:
    """cos(grad L(F(x_t), y_adv), grad mean L(F(x_b), y_b)) over the trainable parameters, in eval mode
    (BatchNorm with its running statistics: a single target has no batch statistics); the model is
    restored to its previous mode after.

    ``x_target`` [T, ...], ``x_batch`` [B, ...], ``y_batch`` [B].
    """
    yt = torch.full((x_target.shape[0],), adv_label, dtype=torch.long, device=x_target.device)
    with evaluating(model):
        gt = param_grad(model, (x_target, yt))
        gb = param_grad(model, (x_batch, y_batch))
    return float(gt.cos(gb, eps=1e-12))


def alignment_curve(model_fn: Callable[[], nn.Module], data: TensorDataset, recipe: Recipe, *, seed: int, lr: float,
                    device: torch.device, x_target: Tensor, adv_label: int, view: DataView | None = None,
                    augment: AugmentConfig | None = None, batches: int = 4) -> list[float]:
    """Train one victim (seed ``seed``) on ``view`` (None = clean) and return the mean gradient cosine
    after each epoch (list of ``recipe.epochs`` floats); see the module docstring."""
    gen = torch.Generator().manual_seed(seed + 0xA11)
    n = view.num_total if view is not None else len(data)
    bs = min(recipe.batch_size, n)
    picks = [torch.randperm(n, generator=gen)[:bs] for _ in range(batches)]
    curve: list[float] = []

    def probe(epoch: int, stack: StackedModels) -> None:
        m = init_models(model_fn, [0])[0]
        m.load_state_dict(stack.state_dict(0))
        m = m.to(device)
        vals = []
        for idx in picks:
            idx = idx.to(device)
            xb, yb = view.gather(idx) if view is not None else (data.x[idx], data.y[idx])
            vals.append(gradient_cosine(m, x_target.to(device), adv_label, xb.to(device), yb.to(device)))
        curve.append(sum(vals) / len(vals))

    vdev = view.to(device) if view is not None else None
    train_stack(init_models(model_fn, [seed]), data.to(device), recipe, seeds=[seed], lr=lr, device=device,
                views=[vdev], augment=augment, on_epoch_models=probe)
    return curve


def alignment_curves(model_fn: Callable[[], nn.Module], data: TensorDataset, recipe: Recipe, *, seed: int, lr: float,
                     device: torch.device, x_target: Tensor, adv_label: int, view: DataView | None,
                     augment: AugmentConfig | None = None, on_victim: Callable[[], None] | None = None
                     ) -> dict[str, list[float]]:
    """Figure 1.3b of seed 002: the per-epoch curves (:func:`alignment_curve`) of one ``clean`` and
    one ``poisoned`` victim (trained on ``view``) of the same ``seed``; ``on_victim`` after each."""
    out = {}
    for name, v in (("clean", None), ("poisoned", view)):
        out[name] = alignment_curve(model_fn, data, recipe, seed=seed, lr=lr, device=device, x_target=x_target,
                                    adv_label=adv_label, view=v, augment=augment)
        if on_victim is not None:
            on_victim()
    return out
