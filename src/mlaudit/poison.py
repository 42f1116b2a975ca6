"""Poisoning attacks on your own model, data and training function, each judged by retraining
victims from scratch with that training function.

>>> import mlaudit.poison
>>> r = mlaudit.poison.targeted(model=MyNet, data=(train_set, test_set), trainer=my_train, out="runs/brew",
...                             attack={"method": "gradient-matching", "eps": 16, "budget": 0.01},
...                             scenarios=4, victims=2)
>>> r.metrics["poison_success"]          # mean +- SE over scenarios

* :func:`targeted`: clean-label targeted poisoning (Witches' Brew, Geiping et al. 2021; Poison Frogs;
  Bullseye Polytope; the kind ``targeted-poison``, docs/targeted_poisoning.md);
* :func:`availability`: availability poisons (adversarial poisoning, error-minimizing noise; the kind
  ``availability-poison``, docs/availability.md);
* :func:`indiscriminate`: indiscriminate poisoning (gradient canceling, label flips, parameter
  corruption; the kind ``indiscriminate-poison``, docs/indiscriminate.md);
* :func:`backdoor`: backdoors (BadNets, blended injection, label-consistent, Hidden Trigger Backdoor,
  Sleeper Agent; the kind ``backdoor``, docs/backdoor.md);
* :func:`defend`: a backdoor or targeted attack against a defence (filtering, Deep Partition Aggregation;
  the kind ``defend``, docs/defend.md).

Each returns an :class:`~mlaudit.api.AuditResult`; ``attack`` is the kind's ``attack`` mapping and
further config fields (``crafting``, ``victim``, ``factory``, ...) go in ``config``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .api import AuditResult, DataLike, ModelLike, TrainerLike, run_kind

__all__ = ["availability", "backdoor", "defend", "indiscriminate", "targeted"]


def _poison(kind: str, *, model: ModelLike, data: DataLike, out: str | Path, trainer: TrainerLike,
            attack: dict[str, Any] | None, victims: int, recipe: Any, device: str, seed: int, executor: str,
            store: str | Path | None, resume: bool, quiet: bool, **config: Any) -> AuditResult:
    return run_kind(kind, model=model, data=data, trainer=trainer, recipe=recipe, out=out, device=device, seed=seed,
                    executor=executor, store=store, resume=resume, quiet=quiet, attack=attack, victims=victims,
                    **config)


def targeted(*, model: ModelLike, data: DataLike, out: str | Path, trainer: TrainerLike = None,
             attack: dict[str, Any] | None = None, scenarios: int = 2, victims: int = 2, recipe: Any = "fast",
             device: str = "auto", seed: int = 0, executor: str = "local", store: str | Path | None = None,
             resume: bool = False, quiet: bool = True, **config: Any) -> AuditResult:
    """Targeted clean-label poisoning: ``scenarios`` (target, intended class) pairs, poisons crafted
    against a crafting model, ``victims`` retrained from scratch per scenario by ``trainer``;
    ``metrics["poison_success"]`` is the fraction of victims that misclassify their target, mean +- SE."""
    return _poison("targeted-poison", model=model, data=data, out=out, trainer=trainer, attack=attack,
                   victims=victims, recipe=recipe, device=device, seed=seed, executor=executor, store=store,
                   resume=resume, quiet=quiet, scenarios=scenarios, **config)


def availability(*, model: ModelLike, data: DataLike, out: str | Path, trainer: TrainerLike = None,
                 attack: dict[str, Any] | None = None, victims: int = 2, recipe: Any = "fast", device: str = "auto",
                 seed: int = 0, executor: str = "local", store: str | Path | None = None, resume: bool = False,
                 quiet: bool = True, **config: Any) -> AuditResult:
    """Availability poisoning: the whole training set perturbed within ``attack.eps``; clean and
    poisoned victims (paired seeds) retrained by ``trainer``; accuracy drop mean +- SE."""
    return _poison("availability-poison", model=model, data=data, out=out, trainer=trainer, attack=attack,
                   victims=victims, recipe=recipe, device=device, seed=seed, executor=executor, store=store,
                   resume=resume, quiet=quiet, **config)


def indiscriminate(*, model: ModelLike, data: DataLike, out: str | Path, trainer: TrainerLike = None,
                   attack: dict[str, Any] | None = None, victims: int = 2, recipe: Any = "fast", device: str = "auto",
                   seed: int = 0, executor: str = "local", store: str | Path | None = None, resume: bool = False,
                   quiet: bool = True, **config: Any) -> AuditResult:
    """Indiscriminate poisoning: ``attack.eps_d * N`` inserted or flipped points (or a parameter
    target); clean and poisoned victims retrained by ``trainer``; accuracy drop mean +- SE."""
    return _poison("indiscriminate-poison", model=model, data=data, out=out, trainer=trainer, attack=attack,
                   victims=victims, recipe=recipe, device=device, seed=seed, executor=executor, store=store,
                   resume=resume, quiet=quiet, **config)


def backdoor(*, model: ModelLike, data: DataLike, out: str | Path, trainer: TrainerLike = None,
             attack: dict[str, Any] | None = None, victims: int = 2, recipe: Any = "fast", device: str = "auto",
             seed: int = 0, executor: str = "local", store: str | Path | None = None, resume: bool = False,
             quiet: bool = True, **config: Any) -> AuditResult:
    """Backdoor poisoning: ``attack.budget * N`` rows stamped with ``attack.trigger`` (relabelled to
    ``attack.target_class``, or label-consistent), or target-class rows crafted within eps with no
    trigger on them (hidden-trigger, sleeper-agent); poisoned and clean victims (paired seeds) retrained by
    ``trainer``; ``metrics["attack_success_rate"]`` and ``metrics["clean_accuracy"]``, mean +- SE."""
    return _poison("backdoor", model=model, data=data, out=out, trainer=trainer, attack=attack, victims=victims,
                   recipe=recipe, device=device, seed=seed, executor=executor, store=store, resume=resume,
                   quiet=quiet, **config)


def defend(*, model: ModelLike, data: DataLike, out: str | Path, attack: dict[str, Any], defence: dict[str, Any] | str,
           trainer: TrainerLike = None, victims: int = 2, recipe: Any = "fast", device: str = "auto", seed: int = 0,
           executor: str = "local", store: str | Path | None = None, resume: bool = False, quiet: bool = True,
           **config: Any) -> AuditResult:
    """A poisoning defence against ``attack`` (a backdoor or targeted-poison attack mapping): ``defence`` is
    ``{method: spectral|outlier|activation-clustering|knn|dpa|none, rate, k, ...}``; victims retrained by
    ``trainer`` without and with it; ``metrics["attack_success"]`` (``no_defence``, ``defence``), the
    removal vs random filtering (``metrics["removal"]``) or DPA's certificates (``metrics["dpa"]``)."""
    return _poison("defend", model=model, data=data, out=out, trainer=trainer, attack=attack, victims=victims,
                   recipe=recipe, device=device, seed=seed, executor=executor, store=store, resume=resume,
                   quiet=quiet, defence=defence, **config)
