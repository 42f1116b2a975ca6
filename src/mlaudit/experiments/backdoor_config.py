"""The ``backdoor`` kind's config (see :mod:`.backdoor` for the protocol and docs/backdoor.md for every
field): the attack block (method, budget, target and source classes, trigger; eps and the crafting
settings of the clean-label method), victims and the clean baseline; and the checks that need the data
(:func:`check_backdoor`), all before anything is written."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from ..attacks.poisoning import POISONERS, Family, Needs
from ..attacks.poisoning.backdoor import BackdoorOptions, check_budget
from ..data.base import DataBundle
from ..errors import ConfigError
from .poison_task import PoisonAttack, check_attack
from .poisoning import PoisoningConfig

DEFAULT_EPS = 16.0
"""eps (/255) of the methods that perturb within an l-inf ball when none is given (Turner et al. 2019 use 8 and 16)."""


class BackdoorAttack(PoisonAttack):
    """``method`` (badnets, blended, label-consistent, hidden-trigger, sleeper-agent); the method's options,
    also as flat keys: ``target_class``, ``source_classes`` (None: every other class), ``budget`` (poisoned
    fraction of the training set, P = floor(budget x N)) and ``trigger`` (type, size, location, margin,
    pattern, alpha, seed), plus hidden-trigger's ``pairing`` and sleeper-agent's ``selection``,
    ``source_images``, ``source_batch_size``, ``retrain_rounds``, ``retrain_recipe``; ``eps`` (/255) and the
    crafting settings of the methods that craft against a model (default eps 16; label-consistent: 250
    PGD steps; hidden-trigger and sleeper-agent: 250 signed-Adam steps)."""

    family: ClassVar[Family] = "backdoor"
    method: str = "badnets"
    eps: float | None = Field(None, gt=0.0, le=255.0)

    @model_validator(mode="before")
    @classmethod
    def _default_eps(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("eps") is None and _crafts(data.get("method", "badnets")):
            data = {**data, "eps": DEFAULT_EPS}
        return data

    @model_validator(mode="after")
    def _eps_only_when_crafting(self) -> BackdoorAttack:
        if self.eps is not None and not _crafts(self.method):
            raise ValueError(f"attack.eps = {self.eps:g} bounds the crafted perturbation of label-consistent, "
                             f"hidden-trigger and sleeper-agent; method {self.method} stamps its trigger without one "
                             "(leave attack.eps out)")
        return self

    @property
    def backdoor(self) -> BackdoorOptions:
        """The method's options (target, sources, budget, trigger)."""
        assert isinstance(self.options, BackdoorOptions)
        return self.options


def _crafts(method: Any) -> bool:
    """Whether backdoor ``method`` crafts a perturbation against pretrained models (and so takes eps)."""
    if not isinstance(method, str) or method not in POISONERS.names("backdoor"):
        return False
    return Needs.CRAFTING_MODELS in POISONERS.get(method, family="backdoor").needs


class BackdoorConfig(PoisoningConfig):
    """See :mod:`.backdoor` and docs/backdoor.md."""

    kind: Literal["backdoor"] = "backdoor"
    attack: BackdoorAttack = BackdoorAttack()
    victims: int = Field(2, ge=1, le=10_000)
    baseline: bool = True
    save_models: bool = False

    @model_validator(mode="after")
    def _crafting_only_when_used(self) -> BackdoorConfig:
        c = self.crafting
        if not _crafts(self.attack.method) and (c.checkpoint is not None or c.ensemble != 1
                                                or c.architectures is not None):
            raise ValueError(f"crafting.checkpoint / ensemble / architectures give the crafting models of "
                             f"label-consistent, hidden-trigger and sleeper-agent; method {self.attack.method!r} uses "
                             "no model (leave crafting out)")
        return self


def source_test_rows(config: BackdoorConfig, data: DataBundle) -> torch.Tensor:
    """bool [N_test]: the test inputs the attack success rate is measured on (of a source class, not of
    the target class)."""
    opts = config.attack.backdoor
    y = data.test.y
    sources = torch.tensor(opts.sources(data.num_classes), dtype=y.dtype, device=y.device)
    return torch.isin(y, sources) & (y != opts.target_class)


def eligible_rows(config: BackdoorConfig, data: DataBundle) -> tuple[int, str]:
    """How many training rows the method may poison, and what they are: source-class rows for the
    dirty-label methods, target-class rows for the methods that craft against a model (clean label:
    label-consistent, hidden-trigger, sleeper-agent)."""
    opts = config.attack.backdoor
    crafts = _crafts(config.attack.method)
    classes = [opts.target_class] if crafts else opts.sources(data.num_classes)
    y = data.train.y
    return int(sum(int((y == c).sum()) for c in classes)), "target-class" if crafts else "source-class"


def check_backdoor(config: BackdoorConfig, data: DataBundle) -> None:
    """Runner hook, before anything is written: image data, the trigger fits the images, the classes
    exist, the budget gives at least one poison and no more than the eligible rows, the test set has
    inputs to trigger, and the crafting models of the clean-label methods (checkpoint, architecture; a
    linear head for hidden-trigger's features)."""
    opts = config.attack.backdoor
    opts.trigger.check(data.input_shape, where="attack.trigger")
    check_attack(config, data)
    eligible, what = eligible_rows(config, data)
    check_budget(opts.budget, len(data.train), eligible, where="attack.budget", rows=what)
    if int(source_test_rows(config, data).sum()) == 0:
        raise ConfigError(f"the test set of {data.name} has no input of the source classes "
                          f"{opts.sources(data.num_classes)}: the attack success rate is undefined")
