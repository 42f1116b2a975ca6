"""Targeted poisoning methods behind one call: ``brew(method, inputs, ...) -> BrewResult``.

Each method only says what it optimises (an objective for :func:`mlaudit.craft.craft`) or, for the
methods that optimise nothing, how it builds its poison; the crafting engine does the rest
(signed Adam / PGD, step schedule, restarts keeping the best, differentiable augmentation, poison
mini-batches). Methods (seed 002 Table 1.2 and section 1.5):

``gradient-matching``
    Witches' Brew (Geiping et al. 2021, Algorithm 1, eq. 1.3), averaged over an ensemble of crafting
    models; ``dp_clip`` / ``dp_noise`` give the DP-aware variant of section 1.5.5.
``poison-frogs``
    Feature collision (Shafahi et al. 2018) at the penultimate layer, averaged over the models.
``bullseye``
    Bullseye Polytope (Aghakhani et al. 2021): the mean of the poisons' features onto the target's.
``watermark``
    The target image blended into every poison at the opacity that ``eps`` allows (Shafahi et al.).
``label-flip``
    Targeted label flipping, a *dirty-label* baseline outside the clean-label threat model: the P
    training images of the target's class closest to the target in the crafting model's feature
    space are relabelled to the adversarial class (no pixel changes).

Shapes: ``x_target`` [T, *shape] (T targets, one class), ``x_poison`` [P, *shape] in [0, 1],
``y_poison`` [P]; the result's ``delta`` is [P, *shape] with ||delta_i||_inf <= eps and
x + delta in [0, 1].
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from ...craft import LinfBall, craft
from ...data.augment import AugmentSpec
from ...errors import ConfigError
from ...registry import Registry
from .bullseye import Bullseye
from .feature_collision import FeatureCollision
from .features import penultimate_features
from .gradient_matching import GradientMatching
from .watermark import watermark


@dataclass
class BrewInputs:
    """What a method may use: crafting ``models`` (eval mode, on one device), the targets and their
    adversarial class, the poison base images and labels, and the training split (label-flip)."""

    models: list[nn.Module]
    x_target: Tensor
    adv_class: int
    x_poison: Tensor
    y_poison: Tensor
    train_x: Tensor | None = None
    train_y: Tensor | None = None
    target_class: int | None = None


@dataclass
class BrewOptions:
    """Crafting options (eps in [0, 1] pixel units; lr in units of eps).

    ``channels_last`` and ``cudnn_benchmark`` only matter on CUDA: the crafting models and the poisons
    are put in channels-last memory format for the duration of the crafting (the models' format is
    restored after), and cuDNN picks its convolution algorithms by timing them. Neither changes the
    objective; cuDNN's timed choice can make runs not bit-identical. Both are off by default: on an
    H100 (2026-11-23, ResNet-18, 500 poisons, benchmarks/results/targeted_poison_speed_layouts.md) they
    made crafting no faster (15.6 s vs 12.9 s per 100-step restart, the tuned run first and without
    warm-up; the full R = 8 runs with them on crafted at 128-140 ms per step, plain's rate)."""

    eps: float
    steps: int = 250
    restarts: int = 8
    lr: float = 0.1
    optimizer: Literal["signed-adam", "pgd", "adam"] = "signed-adam"
    schedule: Literal["step", "cosine", "constant"] = "step"
    augment: AugmentSpec | None = None
    batch_size: int | None = None
    bf16: bool = False
    dp_clip: float | None = None
    dp_noise: float = 0.0
    opacity: float = 1.0
    seed: int = 0
    parallel_restarts: int = 1
    channels_last: bool = False
    cudnn_benchmark: bool = False


@dataclass
class BrewResult:
    """``delta`` [P, ...] (None for label-flip), ``relabel`` ([P] ids, [P] labels) for label-flip, the
    best restart's final ``objective`` (None when nothing was optimised), every restart's final
    objective and the best restart's per-step history."""

    delta: Tensor | None
    relabel: tuple[Tensor, Tensor] | None = None
    objective: float | None = None
    restarts: list[float] = field(default_factory=list)
    history: list[float] = field(default_factory=list)


Method = Callable[[BrewInputs, BrewOptions, Callable[[int, float], None] | None], BrewResult]
METHODS: Registry[Method] = Registry("targeted poisoning method")


def brew(method: str, inputs: BrewInputs, options: BrewOptions, *,
         on_step: Callable[[int, float], None] | None = None) -> BrewResult:
    """Run ``method`` (a name in :data:`METHODS`) on ``inputs``; see the module docstring."""
    if not inputs.models:
        raise ConfigError("brew needs at least one crafting model")
    if not 0 < options.eps <= 1:
        raise ConfigError(f"eps must lie in (0, 1] pixel units (16/255 = {16 / 255:.4f}), got {options.eps}")
    return METHODS.get(method)(inputs, options, on_step)


def _autocast(options: BrewOptions, x: Tensor) -> contextlib.AbstractContextManager:
    if options.bf16 and x.is_cuda:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _Cast:
    """An objective (and its restart-batched form, when it has one) under the options' autocast,
    returning float32 losses."""

    def __init__(self, objective: Callable[[Tensor, Tensor], Tensor], options: BrewOptions) -> None:
        self.objective, self.options = objective, options
        self.can_batch = callable(getattr(objective, "batched", None))

    def _layout(self, xa: Tensor) -> Tensor:
        if self.options.channels_last and xa.is_cuda and xa.dim() == 4:  # images [B, C, H, W]
            return xa.contiguous(memory_format=torch.channels_last)
        return xa

    def __call__(self, xa: Tensor, idx: Tensor) -> Tensor:
        with _autocast(self.options, xa):
            return self.objective(self._layout(xa), idx).float()

    def batched(self, xa: Tensor, idx: Tensor) -> Tensor:
        with _autocast(self.options, xa):
            return self.objective.batched(xa, idx).float()  # type: ignore[attr-defined]


@contextlib.contextmanager
def _cuda_layout(models: list[nn.Module], options: BrewOptions, x: Tensor) -> Iterator[None]:
    """Channels-last crafting models and timed cuDNN algorithms on CUDA (see :class:`BrewOptions`);
    the models' memory format and cuDNN's flags are restored on exit."""
    if not x.is_cuda:
        yield
        return
    with contextlib.ExitStack() as stack:
        if options.cudnn_benchmark:
            stack.enter_context(torch.backends.cudnn.flags(enabled=True, benchmark=True,
                                                           deterministic=torch.backends.cudnn.deterministic))
        if options.channels_last:
            before = [_memory_format(m) for m in models]
            for m in models:
                m.to(memory_format=torch.channels_last)
            stack.callback(lambda: [m.to(memory_format=f) for m, f in zip(models, before, strict=True)])
        yield


def _memory_format(model: nn.Module) -> torch.memory_format:
    """channels_last when the model's 4-d (conv) weights are stored that way, else contiguous."""
    convs = [p for p in model.parameters() if p.dim() == 4]
    if convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs):
        return torch.channels_last
    return torch.contiguous_format


def _craft(objective: Callable[[Tensor, Tensor], Tensor], inputs: BrewInputs, options: BrewOptions,
           on_step: Callable[[int, float], None] | None) -> BrewResult:
    obj = _Cast(objective, options)
    gen = torch.Generator(device=inputs.x_poison.device).manual_seed(options.seed)
    with _cuda_layout(inputs.models, options, inputs.x_poison):
        res = craft(obj, inputs.x_poison, constraint=LinfBall(options.eps), steps=options.steps,
                    optimizer=options.optimizer, lr=options.lr, schedule=options.schedule, restarts=options.restarts,
                    augment=options.augment, batch_size=options.batch_size, generator=gen, on_step=on_step,
                    parallel_restarts=options.parallel_restarts if obj.can_batch else 1)
    return BrewResult(res.delta, None, res.objective, res.restarts, res.history)


def _mean(objectives: list[Callable[[Tensor, Tensor], Tensor]]) -> Callable[[Tensor, Tensor], Tensor]:
    if len(objectives) == 1:
        return objectives[0]
    return lambda xa, idx: torch.stack([o(xa, idx) for o in objectives]).mean(0)


@METHODS.register("gradient-matching")
def _gradient_matching(inputs: BrewInputs, options: BrewOptions,
                       on_step: Callable[[int, float], None] | None) -> BrewResult:
    objs = [GradientMatching(m, inputs.x_target, inputs.adv_class, poison_labels=inputs.y_poison,
                             dp_clip=options.dp_clip, dp_noise=options.dp_noise, seed=options.seed + k)
            for k, m in enumerate(inputs.models)]
    return _craft(GradientMatching.ensemble(objs), inputs, options, on_step)


@METHODS.register("poison-frogs")
def _poison_frogs(inputs: BrewInputs, options: BrewOptions,
                  on_step: Callable[[int, float], None] | None) -> BrewResult:
    # one target for all poisons (the first, in the multi-target setting its features are the anchor)
    objs = [FeatureCollision(penultimate_features(m), inputs.x_target[:1], inputs.x_poison) for m in inputs.models]
    return _craft(_mean(objs), inputs, options, on_step)


@METHODS.register("bullseye")
def _bullseye(inputs: BrewInputs, options: BrewOptions,
              on_step: Callable[[int, float], None] | None) -> BrewResult:
    objs = [Bullseye(penultimate_features(m), inputs.x_target) for m in inputs.models]
    return _craft(_mean(objs), inputs, options, on_step)


@METHODS.register("watermark")
def _watermark(inputs: BrewInputs, options: BrewOptions,
               on_step: Callable[[int, float], None] | None) -> BrewResult:
    delta = watermark(inputs.x_poison, inputs.x_target[:1], eps=options.eps, opacity=options.opacity)
    return BrewResult(delta)


@METHODS.register("label-flip")
def _label_flip(inputs: BrewInputs, options: BrewOptions,
                on_step: Callable[[int, float], None] | None) -> BrewResult:
    if inputs.train_x is None or inputs.train_y is None or inputs.target_class is None:
        raise ConfigError("label-flip needs the training split and the target class")
    p = inputs.x_poison.shape[0]
    cand = (inputs.train_y == inputs.target_class).nonzero().flatten()
    if len(cand) < p:
        raise ConfigError(f"label-flip needs {p} training images of the target class {inputs.target_class}, "
                          f"there are {len(cand)}")
    feats = penultimate_features(inputs.models[0])
    dev = inputs.x_target.device
    with torch.no_grad():
        ft = feats(inputs.x_target.to(dev)).float().mean(0, keepdim=True)
        dist = torch.cat([torch.cdist(feats(inputs.train_x[c].to(dev)).float(), ft).flatten()
                          for c in cand.split(1024)])
    chosen = cand[dist.argsort()[:p].cpu()]
    return BrewResult(None, (chosen.sort().values, torch.full((p,), inputs.adv_class, dtype=torch.long)))
