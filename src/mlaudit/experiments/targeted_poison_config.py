"""The ``targeted-poison`` kind's config (see :mod:`.targeted_poison` for the protocol and
docs/targeted_poisoning.md for every field): the attack block (the shared crafting settings and the
targeted options), explicit or seed-series scenarios, victims, the clean baseline; and the scenarios
the config names on a dataset (:func:`build_scenarios`)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..attacks.poisoning import Family
from ..attacks.poisoning.targeted.scenario import Scenario, explicit_scenario, sample_scenario, scenario_seeds
from ..data.base import DataBundle
from ..errors import ConfigError
from .poison_task import PoisonAttack
from .poisoning import PoisoningConfig


class TargetedAttack(PoisonAttack):
    """The attack: ``method`` (gradient-matching, poison-frogs, bullseye, watermark, label-flip),
    ``eps`` in /255 pixel units, ``budget`` = fraction of the training set poisoned, ``targets`` per
    scenario; the crafting settings (default: 250 signed-Adam steps of lr 0.1 eps, step schedule, 8
    restarts, the victim recipe's augmentation; ``parallel_restarts``: restarts optimised together,
    gradient matching only; ``batch_size``: poison mini-batch; ``precision: bf16`` on CUDA) and the
    method's options (``dp_clip`` / ``dp_noise`` for gradient matching, ``opacity`` for watermark)."""

    family: ClassVar[Family] = "targeted"
    method: str = "gradient-matching"
    eps: float = Field(16.0, gt=0.0, le=255.0)
    budget: float = Field(0.01, gt=0.0, le=1.0)
    targets: int = Field(1, ge=1, le=10_000)


class ExplicitScenario(BaseModel):
    """A user-given scenario: ``target_ids`` (test-set ids, one class), ``poison_class`` (index or
    class name), and optionally ``poison_ids`` (training ids of that class; default: drawn with
    the config's seed at the attack's budget)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target_ids: tuple[int, ...] = Field(..., min_length=1)
    poison_class: int | str
    poison_ids: tuple[int, ...] | None = None


class TargetedPoisonConfig(PoisoningConfig):
    """See the module docstring and docs/targeted_poisoning.md."""

    kind: Literal["targeted-poison"] = "targeted-poison"
    attack: TargetedAttack = TargetedAttack()
    scenarios: int | tuple[ExplicitScenario, ...] = 1
    first_scenario: int = Field(0, ge=0, le=10_000)
    victims: int = Field(8, ge=1, le=10_000)
    baseline: bool = True
    export: bool = True
    save_models: bool = False
    alignment: bool = False

    @field_validator("scenarios")
    @classmethod
    def _scenarios(cls, v: Any) -> Any:
        if isinstance(v, int) and not 1 <= v <= 10_000:
            raise ValueError(f"scenarios must be a count in [1, 10000] or a list of explicit scenarios, got {v}")
        if isinstance(v, tuple) and not v:
            raise ValueError("scenarios is an empty list; give a count or at least one scenario")
        return v

    @model_validator(mode="after")
    def _first_scenario(self) -> TargetedPoisonConfig:
        if self.first_scenario and not isinstance(self.scenarios, int):
            raise ValueError(f"first_scenario = {self.first_scenario} picks a position in the seed series and needs "
                             "scenarios to be a count, not a list of explicit scenarios")
        return self


def build_scenarios(config: TargetedPoisonConfig, data: DataBundle) -> list[Scenario]:
    """The config's scenarios on ``data`` (drawn from the seed series, or explicit and checked)."""
    ytr, yte, c = data.train.y, data.test.y, data.num_classes
    if isinstance(config.scenarios, int):  # positions first .. first + n - 1 of the paper's seed series
        first = config.first_scenario
        seeds = scenario_seeds(config.seed, first + config.scenarios)[first:]
        return [sample_scenario(first + j, s, train_y=ytr, test_y=yte, num_classes=c, budget=config.attack.budget,
                                targets=config.attack.targets)
                for j, s in enumerate(seeds)]
    out = []
    classes = list(data.train.classes)
    for i, sc in enumerate(config.scenarios):
        pc = sc.poison_class
        if isinstance(pc, str):
            if pc not in classes:
                raise ConfigError(f"scenarios[{i}].poison_class = {pc!r} is not a class of {data.name}; valid: "
                                  f"{', '.join(classes)}")
            pc = classes.index(pc)
        out.append(explicit_scenario(i, target_ids=sc.target_ids, poison_class=pc, test_y=yte, train_y=ytr,
                                     budget=config.attack.budget, num_classes=c, poison_ids=sc.poison_ids,
                                     seed=config.seed + i))
    return out
