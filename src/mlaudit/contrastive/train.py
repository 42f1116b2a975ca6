"""Contrastive (CLIP) training of one dual encoder on image-caption pairs.

Why not :func:`mlaudit.train.loop.train_stack`: that loop is built around (x [K, B, ...], y [K, B])
classification batches of K stacked models (vmap over stacked weights, per-model cross-entropy on
class labels, DP-SGD and adversarial steps that need labels, views that gather (x, y)). A contrastive
step has no labels: it needs (image, token) pairs and a loss over the whole B x B similarity matrix,
and there is no ``step=`` seam in that loop to plug it in. So this is one small flat loop that reuses
what the recipe defines: the same optimizer (:func:`mlaudit.train.optim.make_optimizer`, unstacked),
the same learning-rate schedule (:func:`mlaudit.train.recipe.lr_at`), epochs, batch size, bf16
autocast on CUDA, and the same seeding rules (initial weights from ``torch.manual_seed(seed)`` on the
CPU, data order from a CPU generator seeded from ``seed``, so a run is the same on every device up
to float rounding). Augmentation, DP-SGD, adversarial and noise training of the recipe are not used.

    for epoch: one permutation of the N pairs (CPU generator)
        for step: batch of B pairs (the last one smaller; B + 1 rather than a lone pair) -> image/text
                  features -> InfoNCE
                  -> grads -> optimizer step at lr_at(recipe, lr, progress) -> clamp logit_scale
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from ..errors import ConfigError, TrainingError
from ..train.loop import use_bf16
from ..train.optim import make_optimizer
from ..train.recipe import Recipe, lr_at
from .data import CaptionedData
from .model import clip_logit_scale, info_nce

ORDER_SEED = 0x5EED
"""Offset of the data-order generator's seed (as in the classification loop)."""


def train_contrastive(model: nn.Module, data: CaptionedData, recipe: Recipe, *, seed: int,
                      device: str | torch.device = "cpu", lr: float | None = None,
                      on_epoch: Callable[[int, float], None] | None = None) -> float:
    """Train ``model`` (open_clip interface: ``encode_image``, ``encode_text``, ``logit_scale``) in place
    on ``data`` (x [N, C, H, W], tokens [N, L]) with the symmetric InfoNCE loss
    (:func:`~mlaudit.contrastive.model.info_nce`); its current weights are the initialisation.

    ``lr`` defaults to ``recipe.resolved_lr(residual=False)``; ``on_epoch(epoch, mean loss)`` after each
    epoch. The model ends in eval mode on ``device``. Returns the last epoch's mean loss.

    Raises :class:`TrainingError` naming epoch and step when the loss becomes NaN or inf.
    """
    if recipe.dp is not None or recipe.adversarial is not None or recipe.noise_sigma > 0:
        raise ConfigError("contrastive training uses the recipe's optimizer, schedule, epochs and batch size only; "
                          "drop recipe.dp, recipe.adversarial and recipe.noise_sigma")
    dev = torch.device(device)
    model.to(dev).train()
    x, tokens = data.x.to(dev), data.tokens.to(dev)
    n, bsz = len(data), recipe.batch_size
    # batch starts; a last batch of one pair joins the one before it: InfoNCE over a single pair is
    # constant (no gradient) and BatchNorm cannot normalise one example
    starts = list(range(0, n, bsz))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    spe = len(starts)
    names, params = zip(*[(k, p) for k, p in model.named_parameters() if p.requires_grad], strict=True)
    base_lr = recipe.resolved_lr(residual=False) if lr is None else lr
    opt = make_optimizer(recipe, list(params), names=list(names), leading_k=False, base_lr=base_lr)
    gen = torch.Generator().manual_seed(int(seed) + ORDER_SEED)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16(recipe, dev) else contextlib.nullcontext()
    check_every_step = dev.type == "cpu"
    last = float("nan")
    for epoch in range(recipe.epochs):
        order = torch.randperm(n, generator=gen).to(dev)
        total = torch.zeros((), device=dev)
        for s in range(spe):
            idx = order[starts[s]:starts[s + 1] if s + 1 < spe else n]
            with autocast:
                u = model.encode_image(x[idx])
                v = model.encode_text(tokens[idx])
            loss = info_nce(u, v, model.logit_scale.exp())
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
            opt.step(grads, lr_at(recipe, base_lr, epoch + s / spe), progress=epoch + s / spe)
            clip_logit_scale(model)
            total = total + loss.detach()
            if check_every_step or s == spe - 1:  # one host sync per epoch on CUDA
                _check_finite(total, seed=seed, epoch=epoch, step=s)
        last = float(total) / spe
        if on_epoch is not None:
            on_epoch(epoch, last)
    model.eval()
    return last


def _check_finite(total: torch.Tensor, *, seed: int, epoch: int, step: int) -> None:
    if not bool(torch.isfinite(total)):
        raise TrainingError(f"contrastive loss became NaN/inf in epoch {epoch + 1} by step {step + 1} (seed {seed}); "
                            "lower the learning rate", seed=seed, epoch=epoch + 1, step=step + 1)


def init_seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``build()`` with the CPU RNG seeded from ``seed`` (and the global RNG left as it was), so a
    model's initial weights are the same on every device."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return build()
