"""From a poisoning kind's config to a poisoner's task and back (the kinds ``targeted-poison``,
``availability-poison`` and ``indiscriminate-poison`` share all of it):

* :class:`PoisonAttack` — the ``attack`` block: ``method`` (a poisoner of the kind's family), the
  crafting settings (:class:`~mlaudit.attacks.poisoning.CraftingSettings`; None = the method's
  default, filled in at parse time so the resolved config shows what ran), and ``options`` (the
  method's own pydantic model, validated once here). Flat option keys (``attack.dp_clip``,
  ``attack.permutation``, ``attack.eps_w``, ...) are accepted beside ``attack.options``; an option of
  another method of the family, or a crafting setting no method of the family uses, is refused.
* :func:`check_attack` — the runner-hook piece: crafting checkpoint, model count and model
  requirements of the method, and its data checks, all before anything is written.
* :func:`attacker_models` — the models the method needs (crafting models, a fresh surrogate, none).
* :func:`poison_task` and :func:`run_poisoner` — the task and its run with a progress bar and timing.
* :func:`save_poison` / :func:`load_poison` — a crafted poison kept under ``artifacts/poisons/`` so a
  resumed run trains its victims on exactly this poison instead of crafting again.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, SerializeAsAny, model_validator
from torch import Tensor, nn

from ..attacks.poisoning import POISONERS, CraftingSettings, Family, Needs, NoOptions, Poison, PoisonTask
from ..attacks.poisoning.contract import SETTINGS, VictimObjective, fill_defaults
from ..attacks.poisoning.registry import PoisonerEntry
from ..data.base import DataBundle, TensorDataset
from ..data.view import DataView
from ..errors import ConfigError
from ..query import model_template
from ..train.loop import init_models, resolve_augment
from .base import Stream
from .context import RunContext
from .poisoning import PoisoningConfig, check_crafting, crafting_models


class PoisonAttack(CraftingSettings):
    """The ``attack`` block of a poisoning kind (module docstring); kinds add their budget fields."""

    family: ClassVar[Family]
    method: str
    options: SerializeAsAny[BaseModel] = NoOptions()

    @model_validator(mode="before")
    @classmethod
    def _route_options_and_defaults(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        method = data.get("method", cls.model_fields["method"].default)
        if not isinstance(method, str):  # missing or not a name: pydantic reports it
            return data
        entry = POISONERS.get(method, family=cls.family)  # ConfigError listing the valid names
        data["options"] = _method_options(entry, data, set(cls.model_fields))
        unused = [k for k in SETTINGS if data.get(k) is not None
                  and not any(k in e.defaults for e in POISONERS.entries(cls.family))]
        if unused:
            raise ValueError(f"no {cls.family} method uses the crafting setting{'s' * (len(unused) > 1)} "
                             f"{', '.join(unused)}; leave {'them' if len(unused) > 1 else 'it'} out")
        data.update(fill_defaults(data, entry.defaults, strict=False))
        return data

    @model_validator(mode="after")
    def _late_defaults(self) -> Any:
        """Defaults computed from other settings (``lr = 2.5 / steps``) that could not be computed before
        validation (``steps: '1'`` is a string until then): filled now, so the resolved config round-trips."""
        given = {k: getattr(self, k) for k in SETTINGS}
        late = {k: v for k, v in fill_defaults(given, self.entry.defaults).items() if callable(self.entry.defaults[k])}
        return self.model_copy(update=late) if late else self

    @property
    def entry(self) -> PoisonerEntry:
        return POISONERS.get(self.method, family=self.family)


def _method_options(entry: PoisonerEntry, data: dict[str, Any], own: set[str]) -> Any:
    """The method's options from ``attack.options`` and flat keys (removed from ``data``), validated."""
    nested = data.get("options") or {}
    if isinstance(nested, BaseModel):
        nested = nested.model_dump()
    if not isinstance(nested, Mapping):
        return nested  # pydantic reports the type
    fields = entry.options.model_fields
    flat = {k: data.pop(k) for k in list(data) if k not in own and (k in fields or _users(entry.family, k))}
    for k in [*flat, *nested]:
        users = _users(entry.family, k)
        if k not in fields and users:
            where = f"attack.{k}" if k in flat else f"attack.options.{k}"
            raise ValueError(f"method {entry.name} does not use {where}: it applies to method "
                             f"{', '.join(users)} only")
    twice = sorted(set(flat) & set(nested))
    if twice:
        raise ValueError(f"{', '.join(twice)} given both as attack.<name> and in attack.options; give it once")
    try:
        return entry.make_options({**nested, **flat}, where="attack.options")
    except ConfigError as e:
        text = str(e)
        for k in flat:
            text = text.replace(f"attack.options.{k}", f"attack.{k}")
        raise ConfigError(text) from None


def _users(family: Family, key: str) -> list[str]:
    return [e.name for e in POISONERS.entries(family) if key in e.options.model_fields]


def check_attack(config: PoisoningConfig, data: DataBundle, *, single_architecture: bool = False) -> None:
    """Runner-hook piece, before anything is written: the crafting checkpoint (when the method uses
    crafting models), how many crafting models the method takes, whether it can use their
    architecture, and its data checks (e.g. a label map's length)."""
    attack: PoisonAttack = config.attack  # type: ignore[attr-defined]
    entry = attack.entry
    crafting = config.crafting
    if Needs.CRAFTING_MODELS in entry.needs:
        check_crafting(config, data, single_architecture=single_architecture)
        count = 1 if config.crafting_checkpoint is not None else len(crafting.specs(config.model))
        if entry.model_count is not None and count != entry.model_count:
            raise ConfigError(f"crafting.ensemble = {crafting.ensemble}: {entry.name} takes exactly {entry.model_count} "
                              f"crafting model(s), the config gives {count}; set crafting.ensemble: 1")
    if entry.check_model is not None and entry.needs & (Needs.CRAFTING_MODELS | Needs.FRESH_MODEL):
        where = ("crafting.architectures" if crafting.architectures else
                 "crafting.model" if crafting.model is not None else "model")
        found = config.crafting_checkpoint if Needs.CRAFTING_MODELS in entry.needs else None
        for spec in [found[2]] if found is not None else dict.fromkeys(crafting.specs(config.model)):
            try:
                entry.check_model(model_template(spec, data))
            except ConfigError as e:
                raise type(e)(f"{where} ({spec.name!r}, norm {spec.norm!r}): {e}") from None
    if entry.check_data is not None:
        try:
            entry.check_data(attack.options, data.num_classes)
        except ConfigError as e:
            raise ConfigError(f"attack: {e}") from None


def attacker_models(config: PoisoningConfig, ctx: RunContext, data: DataBundle, entry: PoisonerEntry
                    ) -> tuple[list[nn.Module], list[dict[str, Any]]]:
    """The models ``entry`` needs and their records: the crafting models (eval mode), one fresh
    surrogate of the crafting architecture (seed stream :attr:`Stream.SURROGATE`), or none."""
    if Needs.CRAFTING_MODELS in entry.needs:
        return crafting_models(config, ctx, data)
    if Needs.FRESH_MODEL in entry.needs:
        spec = config.crafting_model
        seed = config.trial_seed(0, stream=Stream.SURROGATE)
        return [m.to(ctx.device) for m in init_models(lambda: model_template(spec, data), [seed])], []
    return [], []


def poison_task(config: PoisoningConfig, ctx: RunContext, data: DataBundle, models: list[nn.Module], *,
                seed: int, **fields: Any) -> PoisonTask:
    """The task of the config's attack on ``data`` (``fields``: eps, poison_ids, target, eps_d)."""
    attack: PoisonAttack = config.attack  # type: ignore[attr-defined]
    recipe = config.victim_recipe
    return PoisonTask(train=data.train, num_classes=data.num_classes, models=models, settings=attack,
                      options=attack.options, augment=resolve_augment(recipe, data.name, data.input_shape),
                      victim=VictimObjective(recipe.weight_decay, recipe.label_smoothing), seed=seed,
                      device=torch.device(ctx.device), **fields)


def run_poisoner(entry: PoisonerEntry, task: PoisonTask, ctx: RunContext, label: str) -> tuple[Poison, float]:
    """Run ``entry`` on ``task`` with a progress bar; returns the poison and the wall seconds."""
    steps = entry.steps(entry.settings(task.settings), entry.make_options(task.options))
    bar = ctx.progress.task(label, total=max(steps, 1))
    t0 = time.perf_counter()
    try:
        poison = entry(replace(task, on_step=lambda s, v: ctx.progress.advance(bar)))
        if torch.device(task.device).type == "cuda":
            torch.cuda.synchronize()
    finally:
        ctx.progress.done(bar)
    return poison, time.perf_counter() - t0


POISONS = "poisons"
"""The folder of :func:`save_poison` under ``artifacts/`` (through :meth:`RunContext.save_cached`)."""


def has_poison(ctx: RunContext, name: str) -> bool:
    """Whether an earlier (interrupted) run of this experiment saved poison ``name``."""
    return all((ctx.artifacts / POISONS / f"{name}{ext}").is_file() for ext in (".pt", ".json"))


_VIEW_TENSORS = ("indices", "delta", "relabel_indices", "relabel_to", "inserted_x", "inserted_y")


def save_poison(ctx: RunContext, name: str, poison: Poison, *, seconds: float,
                extra: Mapping[str, Tensor] | None = None) -> None:
    """Keep ``poison`` (its view's tensors with its info, and ``extra`` tensors) as
    ``artifacts/poisons/<name>.pt`` / ``.json`` (:meth:`RunContext.save_cached`). Models a poison
    carries are not kept (the kinds that keep poisons have none)."""
    if poison.view is None:
        raise ConfigError(f"poison {name!r} has no view to keep")
    v = poison.view
    blob = {k: getattr(v, k) for k in _VIEW_TENSORS if getattr(v, k).numel()} | dict(extra or {})
    ctx.save_cached(name, blob, {"format": 2, "info": poison.info, "eps": v.eps, "view_meta": v.meta,
                                 "seconds": seconds}, folder=POISONS)


def load_poison(ctx: RunContext, name: str, base: TensorDataset, *, ids: Tensor, eps: float | None
                ) -> tuple[Poison, float, dict[str, Tensor]] | None:
    """The poison :func:`save_poison` kept under ``name`` (weights-only load) as a view over ``base``,
    its crafting seconds and its extra tensors; None when there is none. ``ids`` and ``eps`` rebuild
    poisons kept before the poisoner contract (a ``delta`` of rows ``ids``, or relabelled rows)."""
    kept = ctx.load_cached(name, folder=POISONS)
    if kept is None:
        return None
    blob, meta = dict(kept[0]), kept[1]
    if meta.get("format") != 2:  # targeted: delta or relabel_ids/relabel_to; availability: delta (+ relabel)
        if "delta" in blob:
            blob["indices"] = ids
        if "relabel_ids" in blob:
            blob["relabel_indices"] = blob.pop("relabel_ids")
        info = meta.get("info", {k: meta.get(k) for k in ("objective", "restarts", "history")})
        meta = {"info": info, "eps": eps, "view_meta": {}, "seconds": meta.get("crafting_s", meta.get("craft_wall_s"))}
    view = DataView.identity(base)
    if "indices" in blob:
        view = view.with_delta(blob.pop("indices"), blob.pop("delta"), eps=meta["eps"])
    if "relabel_indices" in blob:
        view = view.with_labels(blob.pop("relabel_indices"), blob.pop("relabel_to"))
    if "inserted_x" in blob:
        view = view.with_inserted(blob.pop("inserted_x"), blob.pop("inserted_y"))
    return Poison(view.with_meta(**meta["view_meta"]), info=meta["info"]), float(meta["seconds"]), blob
