"""The ``contrastive`` kind's config (see :mod:`.contrastive` for the protocol and docs/contrastive.md):
the attack block (method, poison counts or rates, trials, target class, trigger), the dual encoder
(``encoder``; ``model`` is the image tower), the recipe; and the checks that need the data
(:func:`check_contrastive`), all before anything is written."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..attacks.poisoning.backdoor.trigger import TriggerSpec
from ..data.base import DataBundle
from ..errors import ConfigError
from ..imports import is_import_string
from ..models.registry import ModelSpec
from ..train.recipe import Recipe
from .base import ExperimentConfig

CONTRASTIVE_RECIPE = Recipe(name="contrastive", optimizer="adam", lr=0.002, weight_decay=0.0, epochs=20,
                            batch_size=128, schedule="cosine", augment="none")
"""The default recipe: Adam (lr 0.002, no weight decay), cosine schedule, 20 epochs of batches of 128."""


class ContrastiveAttack(BaseModel):
    """``method`` targeted or backdoor; ``poisons`` (counts p) or ``rates`` (fractions of the N clean training
    pairs, p = floor(rate x N)), one of the two; ``trials`` (targeted: (image, target) pairs; backdoor: poison
    draws and model seeds) per count; ``target_class`` (targeted: None draws one per trial; backdoor: default
    0); ``trigger`` (backdoor only; the patch of :mod:`mlaudit.attacks.poisoning.backdoor.trigger`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["targeted", "backdoor"] = "backdoor"
    poisons: tuple[int, ...] | None = None
    rates: tuple[float, ...] | None = None
    trials: int = Field(3, ge=1, le=1000)
    target_class: int | None = Field(None, ge=0)
    trigger: TriggerSpec = TriggerSpec(type="patch", size=2)

    @field_validator("poisons")
    @classmethod
    def _counts(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is not None and (not v or min(v) < 1):
            raise ValueError(f"attack.poisons = {list(v)}: give a non-empty list of counts >= 1")
        return v

    @field_validator("rates")
    @classmethod
    def _rates(cls, v: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if v is not None and (not v or not all(0 < r <= 1 for r in v)):
            raise ValueError(f"attack.rates = {list(v)}: give a non-empty list of fractions in (0, 1]")
        return v

    @model_validator(mode="after")
    def _one_budget(self) -> ContrastiveAttack:
        if self.poisons is not None and self.rates is not None:
            raise ValueError("give attack.poisons (counts) or attack.rates (fractions of the training pairs), not both")
        return self

    @property
    def target(self) -> int | None:
        """The target class, with the backdoor's default 0."""
        return 0 if self.target_class is None and self.method == "backdoor" else self.target_class


class ContrastiveEncoder(BaseModel):
    """The dual encoder: ``embed_dim``; the text tower (``text_width``, ``text_layers`` transformer layers, 0 =
    mean-pooled word embeddings, ``text_heads``); ``distractors`` noise words per caption; or the user's own
    ``dual`` encoder factory and optional ``tokenizer`` (import strings, docs/contrastive.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    embed_dim: int = Field(64, ge=2, le=4096)
    text_width: int = Field(64, ge=4, le=4096)
    text_layers: int = Field(1, ge=0, le=24)
    text_heads: int = Field(4, ge=1, le=64)
    distractors: int = Field(0, ge=0, le=16)
    dual: str | None = None
    tokenizer: str | None = None

    @field_validator("dual", "tokenizer")
    @classmethod
    def _import(cls, v: str | None) -> str | None:
        if v is not None and not is_import_string(v):
            raise ValueError(f"got {v!r}; write 'package.module:attribute'")
        return v

    @model_validator(mode="after")
    def _heads(self) -> ContrastiveEncoder:
        if self.text_layers and self.text_width % self.text_heads:
            raise ValueError(f"encoder.text_width = {self.text_width} must be a multiple of encoder.text_heads = "
                             f"{self.text_heads}")
        return self


class ContrastiveConfig(ExperimentConfig):
    """See :mod:`.contrastive` and docs/contrastive.md. ``model`` is the image tower (a zoo net or import
    string whose head gets ``encoder.embed_dim`` outputs)."""

    kind: Literal["contrastive"] = "contrastive"
    model: ModelSpec = ModelSpec(name="mlp")
    recipe: Recipe = CONTRASTIVE_RECIPE
    attack: ContrastiveAttack = ContrastiveAttack()
    encoder: ContrastiveEncoder = ContrastiveEncoder()
    baseline: bool = True

    @model_validator(mode="after")
    def _plain_recipe(self) -> ContrastiveConfig:
        r = self.recipe
        for name, on in (("dp", r.dp is not None), ("adversarial", r.adversarial is not None),
                         ("noise_sigma", r.noise_sigma > 0)):
            if on:
                raise ValueError(f"recipe.{name} is not used by contrastive training (optimizer, schedule, epochs and "
                                 f"batch size are); drop recipe.{name}")
        if self.trainer != "mlaudit":
            raise ValueError(f"trainer = {self.trainer!r}: the contrastive kind trains with its own InfoNCE loop; plug "
                             "your own model with encoder.dual instead")
        return self


def poison_counts(config: ContrastiveConfig, n: int) -> list[int]:
    """The poison counts p of the study on n clean training pairs (``poisons``, or floor(rate x n) per rate;
    default 1, 2, 4, 8, 16)."""
    a = config.attack
    if a.rates is not None:
        return [int(r * n + 1e-9) for r in a.rates]
    return list(a.poisons or (1, 2, 4, 8, 16))


def check_contrastive(config: ContrastiveConfig, data: DataBundle) -> None:
    """Runner hook, before anything is written: image data; every rate yields at least one poison (the
    smallest that does is 1 / N); a backdoor has no more poisons than training pairs; the target class
    exists; the trigger fits the images; the test set has images outside the target class."""
    a = config.attack
    if len(data.input_shape) != 3:
        raise ConfigError(f"dataset {data.name} has vector inputs {list(data.input_shape)}; the contrastive kind "
                          "captions images [C, H, W] (digits, cifar10)")
    n, k = len(data.train), data.num_classes
    for i, r in enumerate(a.rates or ()):
        if int(r * n + 1e-9) < 1:
            raise ConfigError(f"attack.rates[{i}] = {r:g} yields 0 poisons on the {n} training pairs of {data.name}; "
                              f"the smallest rate that yields one is 1/{n} = {1 / n:.3g}")
    if a.method == "backdoor":
        big = [p for p in poison_counts(config, n) if p > n]
        if big:
            raise ConfigError(f"attack.poisons = {big[0]} exceeds the {n} training pairs a backdoor can poison; allowed "
                              f"1 <= attack.poisons <= {n}")
        a.trigger.check(data.input_shape, where="attack.trigger")
    t = a.target
    if t is not None and t >= k:
        raise ConfigError(f"attack.target_class = {t} is not a class of {data.name}; allowed 0 <= attack.target_class "
                          f"<= {k - 1}")
    if t is not None and int((data.test.y != t).sum()) == 0:
        raise ConfigError(f"the test set of {data.name} has no image outside the target class {t}")
