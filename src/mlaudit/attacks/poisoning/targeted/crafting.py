"""Crafting targeted poisons through the one engine (:func:`mlaudit.craft.craft`): a method only
says what it optimises; this module runs it under the task's crafting settings.

One objective per crafting model, averaged over the ensemble (seed 002 section 1.3.4), minimised
by signed Adam (or PGD, Adam) under the l-inf ball of radius ``eps`` intersected with the pixel box,
with the step schedule, restarts keeping the best, differentiable augmentation, poison mini-batches
and, for objectives with a batched form (gradient matching), restarts optimised together.

``precision: bf16`` runs the objective under bf16 autocast on CUDA (losses returned in float32).
``channels_last`` and ``cudnn_benchmark`` only matter on CUDA: the crafting models and poisons are
put in channels-last memory format while crafting (the models' format is restored after), and cuDNN
picks its convolution algorithms by timing them. Neither changes the objective; cuDNN's timed choice
can make runs not bit-identical. Both are off by default: on an H100 (2026-11-23, ResNet-18, 500
poisons, benchmarks/results/targeted_poison_speed_layouts.md) they made crafting no faster (15.6 s vs
12.9 s per 100-step restart, the tuned run first and without warm-up; the full R = 8 runs with them
on crafted at 128-140 ms per step, plain's rate).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from ....craft import CraftResult, LinfBall, craft
from ..contract import CraftingSettings, Needs, Poison, PoisonTask

TARGETED = Needs.CRAFTING_MODELS | Needs.TARGET
"""What the crafting methods of the targeted family need."""
TARGETED_CRAFTING = {"steps": 250, "lr": 0.1, "optimizer": "signed-adam", "schedule": "step", "restarts": 8,
                     "parallel_restarts": 1, "batch_size": None, "augment": True, "precision": "fp32",
                     "channels_last": False, "cudnn_benchmark": False}
"""The crafting defaults of the targeted methods (Witches' Brew: 250 signed-Adam steps, lr 0.1 eps,
step schedule, 8 restarts, the victims' augmentation)."""

Objective = Callable[[Tensor, Tensor], Tensor]


def craft_poison(objective: Objective, task: PoisonTask) -> Poison:
    """Minimise ``objective(x_adv [B, ...], idx [B])`` over perturbations of the task's poison rows;
    the poison's info holds the best restart's final ``objective``, every restart's final objective
    (``restarts``) and the best restart's per-step ``history``."""
    x, _ = task.poison_rows()
    res = craft_delta(objective, task, x)
    return task.perturbed(res.delta.cpu(), {"objective": res.objective, "restarts": res.restarts,
                                            "history": res.history})


def craft_delta(objective: Objective, task: PoisonTask, x: Tensor, *,
                init: Literal["zero", "random"] | Tensor = "zero") -> CraftResult:
    """The engine run behind :func:`craft_poison` on given images ``x`` [P, *shape] (on ``task.device``;
    ``objective``'s ``idx`` are positions in ``x``), under the task's crafting settings and l-inf ball,
    starting from ``init`` (e.g. the perturbation of an earlier run, continued): for methods that
    choose their own rows (the clean-label backdoors) or craft in several runs (Sleeper Agent's
    retraining rounds)."""
    s = task.crafting_settings
    obj = _Cast(objective, s)
    gen = task.generator(x.device)
    with _cuda_layout(task.models, s, x):
        return craft(obj, x, constraint=LinfBall(task.linf_eps()), steps=s.steps, optimizer=s.optimizer, lr=s.lr,
                     schedule=s.schedule, restarts=s.restarts, init=init, augment=task.crafting_augment,
                     batch_size=s.batch_size, generator=gen, on_step=task.on_step,
                     parallel_restarts=s.parallel_restarts if obj.can_batch else 1)


def mean_objective(objectives: Sequence[Objective]) -> Objective:
    """``(x_adv, idx) -> mean_k objectives[k](x_adv, idx)`` (the ensemble average; one objective as is)."""
    objs = list(objectives)
    if len(objs) == 1:
        return objs[0]
    return lambda xa, idx: torch.stack([o(xa, idx) for o in objs]).mean(0)


def _autocast(settings: CraftingSettings, x: Tensor) -> contextlib.AbstractContextManager:
    if settings.precision == "bf16" and x.is_cuda:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _Cast:
    """An objective (and its restart-batched form, when it has one) under the settings' autocast,
    returning float32 losses."""

    def __init__(self, objective: Objective, settings: CraftingSettings) -> None:
        self.objective, self.settings = objective, settings
        self.can_batch = callable(getattr(objective, "batched", None))

    def _layout(self, xa: Tensor) -> Tensor:
        if self.settings.channels_last and xa.is_cuda and xa.dim() == 4:  # images [B, C, H, W]
            return xa.contiguous(memory_format=torch.channels_last)
        return xa

    def __call__(self, xa: Tensor, idx: Tensor) -> Tensor:
        with _autocast(self.settings, xa):
            return self.objective(self._layout(xa), idx).float()

    def batched(self, xa: Tensor, idx: Tensor) -> Tensor:
        with _autocast(self.settings, xa):
            return self.objective.batched(xa, idx).float()  # type: ignore[attr-defined]


@contextlib.contextmanager
def _cuda_layout(models: Sequence[nn.Module], settings: CraftingSettings, x: Tensor) -> Iterator[None]:
    """Channels-last crafting models and timed cuDNN algorithms on CUDA (module docstring); the
    models' memory format and cuDNN's flags are restored on exit."""
    if not x.is_cuda:
        yield
        return
    with contextlib.ExitStack() as stack:
        if settings.cudnn_benchmark:
            stack.enter_context(torch.backends.cudnn.flags(enabled=True, benchmark=True,
                                                           deterministic=torch.backends.cudnn.deterministic))
        if settings.channels_last:
            before = [memory_format(m) for m in models]
            for m in models:
                m.to(memory_format=torch.channels_last)
            stack.callback(lambda: [m.to(memory_format=f) for m, f in zip(models, before, strict=True)])
        yield


def memory_format(model: nn.Module) -> torch.memory_format:
    """channels_last when the model's 4-d (conv) weights are stored that way, else contiguous."""
    convs = [p for p in model.parameters() if p.dim() == 4]
    if convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs):
        return torch.channels_last
    return torch.contiguous_format
