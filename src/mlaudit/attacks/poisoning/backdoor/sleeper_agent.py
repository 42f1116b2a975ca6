"""Sleeper Agent (Souri, Fowl, Chellappa, Goldblum & Goldstein, NeurIPS 2022, "Sleeper Agent: Scalable
Hidden Trigger Backdoors for Neural Networks Trained from Scratch"): a clean-label, hidden-trigger
backdoor built for victims trained from scratch.

Threat model: the attacker perturbs P = floor(budget x N) training images of the *target* class within
an l-inf ball of radius eps and keeps their labels; the trigger appears only on test inputs of the
source classes. It knows crafting model(s) F(.; theta) trained on the clean data, not the victims'
initialisation, data order or augmentation draws.

Objective (the paper's Section 3: the bilevel backdoor problem, min_delta sum_j L_adv(theta(delta)) with
theta(delta) trained on the poisoned set, replaced by its gradient-alignment surrogate A; Witches'
Brew's gradient matching, Geiping et al. 2021, with the backdoor's adversarial loss): with S triggered
source images s~_j = apply_trigger(s_j) [S, C, H, W] (training rows of the source classes) and
poisons x_i + delta_i [P, C, H, W] with their true labels y_i [P],

    L_adv(theta)   = sum_j CE(F(s~_j; theta), y_target)               (what the victim should learn)
    g_adv          = grad_theta L_adv,   g_p(delta) = grad_theta sum_i CE(F(x_i + delta_i; theta), y_i)
    A(delta)       = 1 - <g_adv, g_p> / (||g_adv|| ||g_p||)            (minimised, ||delta_i||_inf <= eps)

over every trainable parameter theta. This is :class:`~mlaudit.attacks.poisoning.targeted.GradientMatching`
served with the triggered sources and the target class as its adversarial images and label (g_adv
summed over chunks of ``source_batch_size`` images), averaged over an ensemble, and minimised by the
one crafting engine (defaults as the authors' code: 250 signed-Adam steps of lr 0.1 eps, step
schedule, one restart, the victims' augmentation applied differentiably).

The paper's two additions:

* **data selection** (``selection: max-gradient``, default): the poisons are the P target-class rows
  with the largest ||grad_theta CE(F(x_i), y_i)|| under the crafting model(s) (eval mode, averaged
  over the ensemble), the images that move the parameters most; ``random`` draws them uniformly.
* **retraining during crafting** (``retrain_rounds`` R, default 4 as in the paper: every 50 of 250
  steps): the steps are split into R + 1 equal segments; between segments every crafting model is
  re-initialised (``reset_parameters``, seeded) and trained from scratch on the poisoned set as it
  stands (``retrain_recipe``; None: the crafting models' own recipe when the ``backdoor`` kind runs
  the attack, else the ``fast`` preset; through :func:`mlaudit.train.train`), and g_adv is recomputed
  on it, so the poisons are fitted to models that have already seen them. Each segment is one engine
  run continuing from the previous perturbation, so the optimiser state and the step schedule restart
  per segment (the authors keep one Adam state and one schedule across rounds), and restarts apply to
  the first segment only. It costs R x ensemble extra trainings from scratch inside the attack
  (``retrain_rounds: 0`` skips them); on digits it lifts the ASR from 28-59% to 86-97%
  (docs/backdoor.md).

S: every training row of the source classes (``source_images`` caps it at a seeded random subset; the
authors use all 5000 training images of the source class on CIFAR-10). The trigger sits where the
``trigger`` block puts it (the authors paste it at random locations while crafting). The poison is the
crafted image: no trigger on it, |delta|_inf <= eps.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from ....data.view import DataView
from ....errors import ConfigError
from ....query import evaluating
from ..contract import CraftingSettings, Needs, Poison, PoisonTask
from ..registry import register_poisoner
from ..targeted.crafting import TARGETED_CRAFTING, craft_delta
from ..targeted.gradient_matching import GradientMatching
from .base import BackdoorOptions, as_poison, check_budget, check_classes, source_rows, trigger_of
from .trigger import apply_trigger

SLEEPER_AGENT_CRAFTING = {**TARGETED_CRAFTING, "restarts": 1}
"""The crafting defaults (the authors' code): 250 signed-Adam steps of lr 0.1 eps, step schedule, one
restart, the victims' augmentation applied differentiably while crafting."""
DEFAULT_RETRAIN_RECIPE = "fast"
"""The retraining recipe when ``retrain_recipe`` is None outside the ``backdoor`` kind (which passes the
crafting models' own)."""
SELECTION_BATCH = 32
"""Images per vmap call of the per-example gradient norms (data selection)."""


class SleeperAgentOptions(BackdoorOptions):
    """:class:`~.base.BackdoorOptions` and: ``selection`` (``max-gradient``: the paper's; ``random``);
    ``source_images`` (triggered source training images in g_adv; None: all); ``source_batch_size``
    (images per chunk of g_adv); ``retrain_rounds`` (retrainings of the crafting models during crafting,
    0 = none; default 4, the paper's) and ``retrain_recipe`` (their recipe: a preset name or a mapping
    ``{name: preset, epochs: ...}``; None: the crafting models' recipe in the ``backdoor`` kind, else
    ``fast``). See the module docstring."""

    selection: Literal["max-gradient", "random"] = "max-gradient"
    source_images: int | None = Field(None, ge=1, le=100_000_000)
    source_batch_size: int = Field(512, ge=1, le=1_000_000)
    retrain_rounds: int = Field(4, ge=0, le=1000)
    retrain_recipe: str | dict[str, Any] | None = None

    @field_validator("retrain_recipe")
    @classmethod
    def _recipe(cls, v: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        from ....train.recipe import resolve_recipe

        if v is None:
            return v
        try:
            resolve_recipe(v)
        except ConfigError as e:
            text = " ".join(str(e).split()).removeprefix("invalid config: ")
            raise ValueError(f"retrain_recipe = {v!r} is not a training recipe ({text}); allowed: a preset name "
                             "(fast, witches-brew, airbench, airbench-muon) or a mapping {name: preset, epochs: ...}"
                             ) from None
        return v


def segments(steps: int, rounds: int) -> list[int]:
    """The steps of each of the ``rounds`` + 1 crafting segments (nearly equal; empty ones dropped, so
    fewer retrainings happen when ``steps`` <= ``rounds``)."""
    edges = [round(steps * k / (rounds + 1)) for k in range(rounds + 2)]
    return [b - a for a, b in zip(edges, edges[1:], strict=False) if b > a]


def _progress(settings: CraftingSettings, options: Any) -> int:
    seg = segments(settings.steps or 1, int(getattr(options, "retrain_rounds", 0)))
    return seg[0] * (settings.restarts or 1) + sum(seg[1:])


def gradient_norms(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = SELECTION_BATCH) -> Tensor:
    """float32 [N]: ||grad_theta CE(F(x_i), y_i)|| per example over the model's trainable parameters, in
    eval mode (``x`` [N, ...], ``y`` [N]; per-example gradients by ``vmap`` in chunks of ``batch_size``)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ConfigError("sleeper-agent needs crafting models with trainable parameters (requires_grad=True)")
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in names}
    buffers = dict(model.named_buffers())

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, ({**p, **frozen}, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(out.float(), yi.unsqueeze(0))

    per = vmap(grad(loss), in_dims=(None, 0, 0))
    out = []
    with evaluating(model), torch.enable_grad():
        for i in range(0, len(x), batch_size):
            g = per(params, x[i:i + batch_size], y[i:i + batch_size])
            out.append(torch.stack([g[n].flatten(1).float().pow(2).sum(1) for n in names]).sum(0).sqrt())
    return torch.cat(out).cpu() if out else torch.zeros(0)


def select_poisons(task: PoisonTask, options: SleeperAgentOptions, models: list[nn.Module]) -> tuple[Tensor, dict[str, Any]]:
    """int64 [P] ascending: the rows to poison (target class, among ``task.ids()``), by the largest
    gradient norm (mean over ``models``) or uniformly; and the selection's diagnostics."""
    ids = task.ids().cpu()
    y = task.train.y.cpu()
    pool = ids[y[ids] == options.target_class]
    p = check_budget(options.budget, len(task.train), len(pool), rows="target-class")
    if options.selection == "random":
        pick = torch.randperm(len(pool), generator=task.generator())[:p]
        return pool[pick].sort().values, {"selection": "random"}
    x, yy = task.train.x[pool].to(task.device), task.train.y[pool].to(task.device)
    norms = torch.stack([gradient_norms(m, x, yy) for m in models]).mean(0)
    order = torch.argsort(norms, descending=True, stable=True)[:p]
    return pool[order].sort().values, {"selection": "max-gradient",
                                        "grad_norm_selected_mean": float(norms[order].mean()),
                                        "grad_norm_target_class_mean": float(norms.mean())}


def retrained(models: list[nn.Module], task: PoisonTask, options: SleeperAgentOptions, ids: Tensor, delta: Tensor,
              round_: int) -> list[nn.Module]:
    """Copies of ``models`` re-initialised (``reset_parameters`` of every module that has one, seeded by
    ``task.seed``, the round and the model's position) and trained from scratch with
    ``options.retrain_recipe`` on the training set with the poisons ``delta`` [P, ...] on rows ``ids`` [P];
    the originals are not touched."""
    from ....train.api import train
    from ....train.recipe import resolve_recipe

    recipe = resolve_recipe(options.retrain_recipe or DEFAULT_RETRAIN_RECIPE)
    base = task.train
    view = DataView.identity(base).with_delta(ids.to(base.x.device), delta.detach().to(base.x.device),
                                              eps=task.linf_eps())
    out = []
    for k, m in enumerate(models):
        fresh = copy.deepcopy(m).cpu()
        seed = (task.seed * 1_000_003 + 1009 * round_ + k) % 2**63
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for mod in fresh.modules():
                reset = getattr(mod, "reset_parameters", None)
                if callable(reset):
                    reset()
        train(fresh, base, recipe, seed=seed, device=task.device, view=view)
        out.append(fresh.to(task.device).eval())
    return out


@register_poisoner("sleeper-agent", family="backdoor", needs=Needs.CRAFTING_MODELS, options=SleeperAgentOptions,
                   defaults=SLEEPER_AGENT_CRAFTING, check_data=check_classes, progress=_progress)
def sleeper_agent(task: PoisonTask) -> Poison:
    """Sleeper Agent (Souri et al. 2022): target-class rows whose gradient aligns with triggered source -> target; no trigger on them."""
    opts: SleeperAgentOptions = task.options  # type: ignore[assignment]  (validated by the entry's call)
    s, eps, dev = task.crafting_settings, task.linf_eps(), task.device
    trigger = trigger_of(task, opts)
    models = list(task.models)
    ids, chosen = select_poisons(task, opts, models)
    src = source_rows(task, opts, opts.source_images, salt=2)
    x, y = task.train.x[ids].to(dev), task.train.y[ids].to(dev)
    x_src = apply_trigger(task.train.x[src].to(dev), trigger)
    delta: Tensor | None = None
    history: list[float] = []
    starts: list[float] = []
    ends: list[float] = []
    parts = segments(s.steps or 1, opts.retrain_rounds)
    for r, steps in enumerate(parts):
        if r > 0:
            assert delta is not None
            models = retrained(models, task, opts, ids, delta, r)
        objs = [GradientMatching(m, x_src, opts.target_class, poison_labels=y, seed=task.seed + k,
                                 target_batch_size=opts.source_batch_size) for k, m in enumerate(models)]
        objective = GradientMatching.ensemble(objs)
        if r == 0:  # A at the clean poisons (no augmentation), the start every segment improves on
            starts.append(float(objective(x, torch.arange(len(x), device=dev)).detach()))
        seg = s.model_copy(update={"steps": steps, "restarts": s.restarts if r == 0 else 1})
        part = replace(task, settings=seg, models=models)
        res = craft_delta(objective, part, x, init="zero" if delta is None else delta)
        delta = res.delta.detach()
        history += res.history
        ends.append(res.objective)
    assert delta is not None
    info = {"eps": eps, **chosen, "source_rows": int(len(src)), "retrain_rounds": len(parts) - 1,
            "retrain_recipe": (opts.retrain_recipe or DEFAULT_RETRAIN_RECIPE) if len(parts) > 1 else None,
            "alignment_start": 1 - starts[0], "alignment_end": 1 - ends[-1], "objective_start": starts[0],
            "objective": ends[-1], "segment_objectives": ends, "history": history,
            "max_abs_perturbation": float(delta.abs().max()) if delta.numel() else 0.0}
    return as_poison(task, ids, (x + delta).to(task.train.device), opts, relabel=False, eps=eps, info=info)
