"""Gradient matching (Witches' Brew; Geiping et al. 2021, seed 002 section 1.3, eq. 1.3) as an
objective for :func:`mlaudit.craft.craft`.

Threat model: clean-label, targeted. The attacker perturbs P training images of the adversarial
class (keeping their true labels) within an l-inf ball, so that a victim trained from scratch on the
poisoned set classifies the target image(s) as ``adv_label``. The attacker knows a pretrained
crafting model (not the victim's initialisation or training run).

    obj = GradientMatching(model, x_target, adv_label, poison_labels=y_poison)
    res = craft(obj, x_poison, constraint=LinfBall(16 / 255), steps=250, restarts=8,
                augment=AugmentSpec(crop_pad=4, flip=True))

Objective (eq. 1.3), over ALL trainable parameters theta of the fixed crafting model:

    B(Delta) = 1 - <g_t, g_p> / (||g_t|| ||g_p||),
    g_t = grad_theta sum_t L(F(x_t), y_adv),   g_p = grad_theta sum_i L(F(x_i + Delta_i), y_i).

``g_p`` is computed with ``create_graph=True`` so that B is differentiable w.r.t. the poisons.
Gradients flow into detached aliases of the parameters, so ``model``'s ``.grad`` are never touched.

Mini-batches: :func:`craft` calls the objective once per poison mini-batch and sums the results, so
with ``batch_size < P`` the crafted quantity is the *sum of per-batch cosines* (each batch's summed
gradient matched to g_t), not the paper's cosine against the full poison gradient. With one batch
(the default) the two coincide.

DP-aware variant (section 1.5.5): with ``dp_clip`` the poison gradient g_p is clipped to l2 norm
``dp_clip`` and, with ``dp_noise`` > 0, Gaussian noise of std ``dp_noise * dp_clip`` is added, redrawn
at every evaluation (the paper's "naive strategy"). As in the paper, clipping is at the mini-batch
level (the summed poison gradient), not per example.

Adaptive variant (against a known filtering defence; docs/defend.md): with ``penalty`` (a
:class:`~.adaptive.FilterPenalty`) the objective is ``1 - cos(g_t, g_p) + lambda * mean_i R(x_i)``, R the
poisons' squared distance to their clean class centroid and/or their squared projection on the clean
class's top singular direction(s) in the crafting model's penultimate features (:mod:`.adaptive`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn
from torch.func import functional_call

from ....errors import ConfigError
from ....query import ParamVector, evaluating, param_grad, training
from ..contract import Poison, PoisonTask
from ..registry import register_poisoner
from .adaptive import AdaptiveOptions, FilterPenalty
from .crafting import TARGETED, TARGETED_CRAFTING, craft_poison

LossFn = Callable[[Tensor, Tensor], Tensor]


def per_sample_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy per sample: logits [N, C], labels [N] -> [N]."""
    return F.cross_entropy(logits, labels, reduction="none")


def adversarial_gradient(model: nn.Module, x: Tensor, labels: Tensor, *, loss: LossFn = per_sample_cross_entropy,
                         params: ParamVector | None = None, batch_size: int | None = None) -> ParamVector:
    """g_adv = grad_theta sum_i loss(F(x_i), labels_i) over ``x`` [T, ...], ``labels`` [T] (detached),
    summed over chunks of ``batch_size`` rows (None: one pass); the model's mode is the caller's."""
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"target_batch_size must be >= 1 or None (one pass), got {batch_size}")
    bs = batch_size or max(len(x), 1)
    total: ParamVector | None = None
    for i in range(0, len(x), bs):
        xb, yb = x[i:i + bs], labels[i:i + bs]
        g = param_grad(model, lambda f, xb=xb, yb=yb: loss(f(xb), yb).sum(), params=params)
        total = g if total is None else total + g
    if total is None:
        raise ConfigError("the adversarial gradient needs at least one image, got none")
    return total


class GradientMatching:
    """Objective ``(x_adv [B, ...], idx [B]) -> scalar`` 1 - cos(g_t, g_p) (see the module docstring).

    ``target_x`` [T, ...] (one or more targets, section 1.5.11), ``adv_label`` [T] or an int (the
    adversarial class), ``poison_labels`` [P] the true labels of the poisons (indexed by ``idx``).
    ``loss(logits [N, C], labels [N]) -> [N]`` per-sample losses (summed here). The model is used in
    eval mode unless ``train_mode`` (its previous mode is restored after each call); its parameters
    are read at construction for g_t, so do not train it while crafting.

    The adversarial term is whatever ``(target_x, adv_label)`` say the victim should learn: targeted
    poisoning's target images to the adversarial class, or Sleeper Agent's triggered source images to
    the backdoor's target class (:mod:`mlaudit.attacks.poisoning.backdoor.sleeper_agent`), T in the
    thousands; ``target_batch_size`` then sums g_t over chunks of that many images (the same gradient
    in eval mode; in ``train_mode`` BatchNorm sees each chunk's statistics).

    ``penalty``: the adaptive attack's feature-space term (:class:`~.adaptive.FilterPenalty`, weight
    included), added to the mismatch for the poisons' labels; None (default) is the plain brew.
    """

    def __init__(self, model: nn.Module, target_x: Tensor, adv_label: Tensor | int, *, poison_labels: Tensor,
                 loss: LossFn = per_sample_cross_entropy, train_mode: bool = False,
                 dp_clip: float | None = None, dp_noise: float = 0.0, seed: int = 0,
                 target_batch_size: int | None = None, penalty: FilterPenalty | None = None) -> None:
        if target_x.dim() < 2 or target_x.shape[0] < 1:
            raise ConfigError(f"target_x must be [T>=1, ...], got shape {list(target_x.shape)}")
        if isinstance(adv_label, int):
            adv_label = torch.full((target_x.shape[0],), adv_label, dtype=torch.long)
        if adv_label.shape != (target_x.shape[0],):
            raise ConfigError(f"adv_label must be an int or [T={target_x.shape[0]}], got shape {list(adv_label.shape)}")
        if poison_labels.dim() != 1:
            raise ConfigError(f"poison_labels must be [P], got shape {list(poison_labels.shape)}")
        if dp_clip is not None and dp_clip <= 0:
            raise ConfigError(f"dp_clip must be > 0 or None (no clipping), got {dp_clip}")
        if dp_noise < 0 or (dp_noise > 0 and dp_clip is None):
            raise ConfigError(f"dp_noise must be >= 0 and needs dp_clip (noise std = dp_noise * dp_clip); "
                              f"got dp_noise={dp_noise}, dp_clip={dp_clip}")
        self.model = model
        self.loss = loss
        self.train_mode = train_mode
        self.dp_clip = dp_clip
        self.dp_noise = dp_noise
        self.penalty = penalty
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        if not self.names:
            raise ConfigError("GradientMatching needs a model with trainable parameters (requires_grad=True)")
        device = next(model.parameters()).device
        self.poison_labels = poison_labels.to(device=device, dtype=torch.long)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        with self._mode():
            self.target_grad = adversarial_gradient(model, target_x.to(device), adv_label.to(device), loss=loss,
                                                    params=self._params(), batch_size=target_batch_size)
        self.target_norm = self.target_grad.norm()
        if self.target_norm == 0:
            raise ConfigError("the target gradient is zero (the model fits the target with zero loss); "
                              "pick another target or crafting model")

    def _params(self) -> ParamVector:
        """The trainable parameters (as values: gradients flow into aliases, never the model's .grad)."""
        named = dict(self.model.named_parameters())
        return ParamVector({n: named[n].detach() for n in self.names})

    def _mode(self) -> AbstractContextManager[None]:
        return training(self.model) if self.train_mode else evaluating(self.model)

    def poison_grad(self, x_adv: Tensor, idx: Tensor) -> list[Tensor]:
        """g_p for the poisons ``x_adv`` [B, ...] with labels ``poison_labels[idx]`` (differentiable
        w.r.t. ``x_adv``), after DP clipping and noise when configured: one tensor per trainable
        parameter, in the model's order."""
        return list(self._poison_grad(x_adv, idx).values())

    def _poison_grad(self, x_adv: Tensor, idx: Tensor) -> ParamVector:
        labels = self.poison_labels[idx.to(self.poison_labels.device)]
        with self._mode():
            grads = param_grad(self.model, lambda f: self.loss(f(x_adv), labels).sum(), params=self._params(),
                               create_graph=True)
        grads = self._clip(grads)
        if self.dp_noise > 0:
            std = self.dp_noise * self.dp_clip  # type: ignore[operator]  (noise needs dp_clip)
            grads = grads.map(lambda g: g + std * torch.randn(g.shape, generator=self.generator, device=g.device,
                                                              dtype=g.dtype))
        return grads

    def _clip(self, grads: ParamVector) -> ParamVector:
        """The summed poison gradient scaled to l2 norm <= ``dp_clip`` (unchanged without it)."""
        if self.dp_clip is None:
            return grads
        scale = (self.dp_clip / (grads.norm() + 1e-12)).clamp(max=1.0)
        return grads * scale

    def _mismatch(self, grads: ParamVector) -> Tensor:
        """B = 1 - cos(g_t, g_p) of eq. 1.3."""
        return 1 - self.target_grad.dot(grads) / (self.target_norm * grads.norm().clamp_min(1e-12))

    def _penalised(self, mismatch: Tensor, x_adv: Tensor, labels: Tensor) -> Tensor:
        """The mismatch plus the adaptive penalty of the poisons (when there is one)."""
        return mismatch if self.penalty is None else mismatch + self.penalty(x_adv, labels)

    def __call__(self, x_adv: Tensor, idx: Tensor) -> Tensor:
        labels = self.poison_labels[idx.to(self.poison_labels.device)]
        return self._penalised(self._mismatch(self._poison_grad(x_adv, idx)), x_adv, labels)

    def batched(self, x_adv: Tensor, idx: Tensor) -> Tensor:
        """The objective of G restarts at once: ``x_adv`` [G, B, ...] -> [G] (for
        :func:`mlaudit.craft.craft` with ``parallel_restarts``). Each restart's poison gradient is
        taken with ``torch.func.grad`` under ``vmap`` over G, so one batched double backward serves
        all G restarts. Equal to calling the objective on each ``x_adv[g]`` (DP noise is drawn
        independently per restart)."""
        names = self.names
        params = {n: p.detach() for n, p in self.model.named_parameters() if n in names}
        frozen = {n: p.detach() for n, p in self.model.named_parameters() if n not in names}
        buffers = dict(self.model.named_buffers())
        labels = self.poison_labels[idx.to(self.poison_labels.device)]

        def poison_loss(p: dict[str, Tensor], xr: Tensor) -> Tensor:
            out = functional_call(self.model, ({**p, **frozen}, buffers), (xr,))
            return self.loss(out, labels).sum()

        def one(xr: Tensor) -> Tensor:
            g = torch.func.grad(poison_loss)(params, xr)
            grads = self._clip(ParamVector({n: g[n] for n in names}))
            if self.dp_noise > 0:  # vmap draws independent noise per restart
                grads = grads.map(lambda t: t + self.dp_noise * self.dp_clip * torch.randn_like(t))
            return self._penalised(self._mismatch(grads), xr, labels)

        with torch.enable_grad(), self._mode():
            return torch.func.vmap(one, randomness="different")(x_adv)

    @staticmethod
    def ensemble(objectives: Sequence[GradientMatching]) -> Callable[[Tensor, Tensor], Tensor]:
        """The average of several matching objectives (one per crafting model, possibly of different
        architectures; seed 002 section 1.3.4): ``(x_adv, idx) -> mean_k objectives[k](x_adv, idx)``."""
        objs = list(objectives)
        if not objs:
            raise ConfigError("GradientMatching.ensemble needs at least one objective")
        return _Ensemble(objs)


class _Ensemble:
    """Mean of member objectives, for single restarts (``__call__``) and batched ones (``batched``)."""

    def __init__(self, objs: Sequence[GradientMatching]) -> None:
        self.objs = list(objs)

    def __call__(self, x_adv: Tensor, idx: Tensor) -> Tensor:
        return torch.stack([o(x_adv, idx) for o in self.objs]).mean()

    def batched(self, x_adv: Tensor, idx: Tensor) -> Tensor:
        return torch.stack([o.batched(x_adv, idx) for o in self.objs]).mean(0)


class GradientMatchingOptions(BaseModel):
    """``dp_clip`` / ``dp_noise``: the DP-aware variant (section 1.5.5; noise std dp_noise * dp_clip);
    ``adaptive``: the adaptive attack against a known filtering defence (:class:`~.adaptive.AdaptiveOptions`:
    ``{penalty: centroid | spectral | both, weight, directions}``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dp_clip: float | None = Field(None, gt=0.0)
    dp_noise: float = Field(0.0, ge=0.0)
    adaptive: AdaptiveOptions | None = None

    @model_validator(mode="after")
    def _noise_needs_clip(self) -> GradientMatchingOptions:
        if self.dp_noise > 0 and self.dp_clip is None:
            raise ValueError(f"dp_noise = {self.dp_noise} needs dp_clip (noise std = dp_noise * dp_clip)")
        return self


@register_poisoner("gradient-matching", family="targeted", needs=TARGETED, options=GradientMatchingOptions,
                   defaults=TARGETED_CRAFTING)
def gradient_matching(task: PoisonTask) -> Poison:
    """Witches' Brew (Geiping et al. 2021, eq. 1.3), averaged over the crafting models; with ``adaptive``,
    each model's objective carries the feature-space penalty against the filters (:mod:`.adaptive`)."""
    opts: GradientMatchingOptions = task.options  # type: ignore[assignment]  (validated by the entry's call)
    target = task.targeted()
    _, y = task.poison_rows()
    objs = [GradientMatching(m, target.x, target.adv_class, poison_labels=y, dp_clip=opts.dp_clip,
                             dp_noise=opts.dp_noise, seed=task.seed + k, penalty=filter_penalty(m, task, y, opts))
            for k, m in enumerate(task.models)]
    return craft_poison(GradientMatching.ensemble(objs), task)


def filter_penalty(model: nn.Module, task: PoisonTask, poison_labels: Tensor,
                   opts: GradientMatchingOptions) -> FilterPenalty | None:
    """The adaptive penalty of ``opts.adaptive`` for ``model``, its clean statistics from the task's clean
    training rows of the poisons' class(es); None without ``adaptive``."""
    a = opts.adaptive
    if a is None:
        return None
    return FilterPenalty(model, task.train.x, task.train.y, kind=a.penalty, weight=a.weight,
                         directions=a.directions, classes=torch.unique(poison_labels.cpu()))
