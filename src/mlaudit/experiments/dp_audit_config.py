"""The ``dp-audit`` kind's config (see :mod:`.dp_audit` for the protocol and docs/dp_audit.md for
every field): the canary, models per side, the claim, the confidence, the score, the broken
fixtures; validated before any work, including whether the audit can reach a useful bound."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..audit.canaries import CANARIES
from ..audit.game import MIN_USEFUL_EPS, best_possible_bound, models_needed
from ..train.hooks import BROKEN
from ..train.recipe import Recipe
from .base import ExperimentConfig


class DPAuditConfig(ExperimentConfig):
    """See the module docstring and docs/dp_audit.md for every field."""

    kind: Literal["dp-audit"] = "dp-audit"
    canary: str = "mislabeled"
    models_per_side: int = Field(100, ge=2, le=100_000)
    confidence: float = Field(0.95, gt=0.0, lt=1.0)
    claimed_epsilon: float | None = Field(None, gt=0.0)
    claimed_delta: float | None = Field(None, gt=0.0, lt=1.0)
    save_models: bool = False
    score: Literal["auto", "loss", "gradient"] = "auto"
    broken: str | None = None

    @field_validator("broken")
    @classmethod
    def _broken(cls, v: str | None) -> str | None:
        if v is not None and v not in BROKEN:
            raise ValueError(f"broken must be null (the correct DP-SGD) or one of the deliberately broken audit "
                             f"fixtures {', '.join(BROKEN)}; got {v!r}")
        return v

    @field_validator("canary")
    @classmethod
    def _canary(cls, v: str) -> str:
        CANARIES.get(v)  # ConfigError listing the valid canaries
        return v

    @model_validator(mode="after")
    def _claim(self) -> DPAuditConfig:
        if self.trainer == "mlaudit" and self.recipe.dp is None:
            raise ValueError("trainer mlaudit audits the recipe's DP-SGD, but the recipe has no dp; add e.g. "
                             "recipe: {name: fast, dp: {epsilon: 1.0, delta: 1.0e-5, clip: 1.0}}")
        if self.canary == "gradient" and self.score == "loss":
            raise ValueError("canary gradient has no input whose loss could be measured; use score: gradient "
                             "(or auto), or an input canary (mislabeled, crafted) with score: loss")
        if self.trainer != "mlaudit" and (self.resolved_score == "gradient" or self.broken is not None):
            what = (f"broken: {self.broken}" if self.broken is not None and self.resolved_score != "gradient"
                    else f"canary {self.canary} with score {self.resolved_score}")
            raise ValueError(f"{what} needs trainer: mlaudit (the white-box score needs the models' seeded "
                             "initialisation, the gradient canary and the broken fixtures live in mlaudit's "
                             f"DP-SGD step); trainer {self.trainer!r} supports canary mislabeled or crafted "
                             "with score: loss")
        if self.trainer != "mlaudit" and self.claimed_epsilon is None:
            raise ValueError(f"trainer {self.trainer!r} is the user's own: give the epsilon it claims as "
                             "claimed_epsilon (and claimed_delta, default the recipe's dp.delta or 1e-5)")
        best = best_possible_bound(self.models_per_side, delta=self.delta, confidence=self.confidence)
        if best < MIN_USEFUL_EPS:
            need = models_needed(delta=self.delta, confidence=self.confidence)
            raise ValueError(f"models_per_side = {self.models_per_side} is too few: even an attack without errors "
                             f"gives an epsilon lower bound of {best:.3g} at confidence {self.confidence}; set "
                             f"models_per_side >= {need} (>= {models_needed(delta=self.delta, confidence=self.confidence, at_least=1.0)} "
                             "for a bound of 1)")
        return self

    @property
    def resolved_score(self) -> str:
        """``auto`` -> ``gradient`` for the gradient canary, else ``loss``."""
        if self.score != "auto":
            return self.score
        return "gradient" if self.canary == "gradient" else "loss"

    @property
    def delta(self) -> float:
        """The delta of the claim: claimed_delta, else the recipe's dp.delta, else 1e-5."""
        if self.claimed_delta is not None:
            return self.claimed_delta
        return self.recipe.dp.delta if self.recipe.dp is not None else 1e-5

    def audited_recipe(self, n_train: int) -> Recipe:
        """The recipe with ``dp.sample_rate`` fixed (batch_size / n_train when not given)."""
        dp = self.recipe.dp
        if dp is None or dp.sample_rate is not None:
            return self.recipe
        q = min(1.0, self.recipe.batch_size / n_train)
        return self.recipe.model_copy(update={"dp": dp.model_copy(update={"sample_rate": q})})
