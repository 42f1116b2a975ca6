"""The ``protect`` kind's config (see :mod:`.protect` for the protocol and docs/protect.md): the public
attack the users run (``attack``), the trainers it is measured against (``trainers``), how many users
protect themselves (``users``, one per trial), what is public (``split``: a ``public_fraction`` of the
identities, as in the paper, or of each identity's photos)
and the recipe of the face-recognition classifier on the extractors' features (``probe``); and the
checks that need the data (:func:`check_protect`), all before anything is written."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..attacks.protect import METHODS
from ..data.base import DataBundle
from ..errors import ConfigError
from ..models.registry import ModelSpec
from ..train.recipe import Recipe
from .base import ExperimentConfig, model_value, recipe_value

PROBE_RECIPE = Recipe(name="custom", optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4,
                      epochs=30, batch_size=64, schedule="triangular", warmup_fraction=0.2, augment="none")
"""The face-recognition classifier's default recipe: multinomial logistic regression on standardised features."""


class ProtectAttack(BaseModel):
    """The public attack every protected user runs (:mod:`mlaudit.attacks.protect`): ``method`` fawkes or
    lowkey, ``eps`` the l-inf budget in pixel levels of 255, ``steps`` and ``lr`` (units of eps) of signed
    Adam, ``extractors`` the size of the attacked ensemble (classifiers trained on the public photos with
    different seeds; the ``attacked`` trainer uses the first)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["fawkes", "lowkey"] = "lowkey"
    eps: float = Field(16.0, gt=0, le=255)
    steps: int = Field(100, ge=1, le=10_000)
    lr: float = Field(0.1, gt=0, le=10)
    extractors: int = Field(1, ge=1, le=16)

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, v: Any) -> Any:
        if isinstance(v, str) and v not in METHODS:
            raise ValueError(f"attack.method = {v!r}; allowed: {', '.join(METHODS)}")
        return v


class ProtectTrainer(BaseModel):
    """One model trainer the protection is measured against. ``strategy``: ``attacked`` (the very
    extractor the users attacked: the protection's best case), ``oblivious`` (an extractor trained
    independently, e.g. later or better: "just wait"; ``model``/``recipe`` default to the config's) or
    ``adaptive`` (an extractor trained on the public photos plus their copies under the public attack,
    labelled correctly: robust training against the known tool)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,40}$")
    strategy: Literal["attacked", "oblivious", "adaptive"]
    model: ModelSpec | None = None
    recipe: Recipe | None = None

    @field_validator("model", mode="before")
    @classmethod
    def _model(cls, v: Any) -> Any:
        return None if v is None else model_value(v)

    @field_validator("recipe", mode="before")
    @classmethod
    def _recipe(cls, v: Any) -> Any:
        return None if v is None else recipe_value(v, where="trainers[].recipe")

    @model_validator(mode="after")
    def _attacked_is_given(self) -> ProtectTrainer:
        if self.strategy == "attacked" and (self.model is not None or self.recipe is not None):
            raise ValueError(f"trainer {self.name!r}: strategy attacked reuses the attacked extractor; drop its "
                             "model and recipe (or use strategy oblivious)")
        return self


DEFAULT_TRAINERS = (ProtectTrainer(name="attacked", strategy="attacked"),
                    ProtectTrainer(name="oblivious", strategy="oblivious"),
                    ProtectTrainer(name="adaptive", strategy="adaptive"))


class ProtectConfig(ExperimentConfig):
    """See :mod:`.protect` and docs/protect.md. ``model`` and ``recipe``: the attacked extractors (and the
    default of every other trainer's)."""

    kind: Literal["protect"] = "protect"
    attack: ProtectAttack = ProtectAttack()
    trainers: tuple[ProtectTrainer, ...] = DEFAULT_TRAINERS
    users: int = Field(3, ge=1, le=10_000)
    split: Literal["identities", "photos"] = "identities"
    public_fraction: float = Field(0.5, gt=0, lt=1)
    probe: Recipe = PROBE_RECIPE

    @field_validator("probe", mode="before")
    @classmethod
    def _probe(cls, v: Any) -> Any:
        return recipe_value(v, where="probe")

    @model_validator(mode="after")
    def _trainers(self) -> ProtectConfig:
        names = [t.name for t in self.trainers]
        if not names:
            raise ValueError("trainers is empty; give at least one (strategies attacked, oblivious, adaptive)")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"trainers: the name {dup[0]!r} is used twice; give every trainer its own name")
        for where, r in (("recipe", self.recipe), ("probe", self.probe)):
            if r.dp is not None or r.adversarial is not None or r.noise_sigma > 0:
                raise ValueError(f"{where}: dp, adversarial and noise_sigma are not used by the protect kind (the "
                                 "adaptive trainer trains on the public attack's photos); drop them")
        return self

    def trainer_model(self, t: ProtectTrainer) -> ModelSpec:
        return t.model or self.model

    def trainer_recipe(self, t: ProtectTrainer) -> Recipe:
        return t.recipe or self.recipe


def check_protect(config: ProtectConfig, data: DataBundle) -> None:
    """Runner hook, before anything is written: image data; the split leaves public photos for the
    extractors, at least two recognised identities and enough users; every user has test photos."""
    if len(data.input_shape) != 3:
        raise ConfigError(f"dataset {data.name} has vector inputs {list(data.input_shape)}; the protect kind "
                          "perturbs images [C, H, W] (digits, cifar10, your own)")
    k, f = data.num_classes, config.public_fraction
    if config.split == "identities":
        n_pub = int(k * f)
        if n_pub < 1 or k - n_pub < 2:
            raise ConfigError(f"public_fraction = {f} with split identities makes {n_pub} of the {k} identities of "
                              f"{data.name} public; allowed: at least 1 public and 2 recognised identities")
        if config.users > k - n_pub:
            raise ConfigError(f"users = {config.users} exceeds the {k - n_pub} recognised (non-public) identities of "
                              f"{data.name}; allowed 1 <= users <= {k - n_pub}")
    else:
        if config.users > k:
            raise ConfigError(f"users = {config.users} exceeds the {k} identities (classes) of {data.name}; allowed "
                              f"1 <= users <= {k}")
        counts = data.train.y.bincount(minlength=k)
        small = [c for c in range(k) if int(counts[c] * f) < 1 or int(counts[c]) - int(counts[c] * f) < 1]
        if small:
            raise ConfigError(f"public_fraction = {f} leaves identity {small[0]} of {data.name} "
                              f"({int(counts[small[0]])} training photos) without public or without scraped photos; "
                              "allowed: a fraction that gives each identity at least one of both")
    if int(data.test.y.bincount(minlength=k).min()) < 1:
        raise ConfigError(f"some identity of {data.name} has no test photo; each needs one to measure its protection")
