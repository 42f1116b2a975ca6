"""The ``dp-audit`` kind's config (see :mod:`.dp_audit` for the protocol and docs/dp_audit.md for
every field): the design (the two-sided distinguishing game, or one run with many canaries), the
canary, models per side or canaries, guesses and runs, the claim, the confidence, the score, the broken
fixtures; validated before any work, including whether the audit can reach a useful bound."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from ..audit.canaries import CANARIES, CANARY_SETS
from ..audit.game import MIN_USEFUL_EPS, best_possible_bound, models_needed
from ..audit.one_run import best_reachable_bound, default_choices
from ..train.hooks import BROKEN
from ..train.recipe import Recipe
from .base import ExperimentConfig, recipe_value

ONE_RUN_FIELDS = ("canaries", "guesses", "runs")
"""The fields of ``design: one-run`` (null under the game)."""


class WorstCaseInit(BaseModel):
    """Crafted initial weights for a last-iterate audit (Annamalai & De Cristofaro 2024, "Nearly Tight
    Black-Box Auditing of Differentially Private Machine Learning", NeurIPS): one model of the audited
    architecture is first trained *without* privacy for ``epochs`` epochs on the training data (the canary
    left out), and every audited model of both sides starts from its weights. DP-SGD's guarantee holds for
    any initialisation, so this is a legal auditor's choice; near convergence the other examples' gradients
    are small and the canary's clipped gradient stands out in the final model.

    ``recipe`` (optional, a preset name or mapping, without ``dp``): how that model is trained; default the
    audited recipe without ``dp``. ``epochs`` overrides the recipe's. A separate recipe matters when the
    audited one is full-batch gradient descent (the paper's DP-SGD: batch = the whole dataset, a small
    learning rate), which would barely move a model in E epochs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(10, ge=1, le=1000)
    recipe: Annotated[Recipe | None, BeforeValidator(lambda v: recipe_value(v, where="worst_case_init.recipe"))] = None

    @field_validator("recipe")
    @classmethod
    def _no_dp(cls, v: Recipe | None) -> Recipe | None:
        if v is not None and v.dp is not None:
            raise ValueError("worst_case_init.recipe trains the initialisation without privacy; drop its dp "
                             "(the audited models use the config's recipe.dp)")
        return v


class OneRunGuesses(BaseModel):
    """A one-run auditor's guesses per run: "in" for the ``k_pos`` highest membership scores, "out" for
    the ``k_neg`` lowest, abstain on the rest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    k_pos: int = Field(ge=0, le=1_000_000)
    k_neg: int = Field(ge=0, le=1_000_000)


class DPAuditConfig(ExperimentConfig):
    """See the module docstring and docs/dp_audit.md for every field."""

    kind: Literal["dp-audit"] = "dp-audit"
    design: Literal["game", "one-run"] = "game"
    canaries: int | None = Field(None, ge=1, le=1_000_000)
    guesses: Literal["sweep"] | OneRunGuesses | None = None
    runs: int | None = Field(None, ge=1, le=10_000)
    canary: str = "mislabeled"
    models_per_side: int = Field(100, ge=2, le=100_000)
    confidence: float = Field(0.95, gt=0.0, lt=1.0)
    claimed_epsilon: float | None = Field(None, gt=0.0)
    claimed_delta: float | None = Field(None, gt=0.0, lt=1.0)
    save_models: bool = False
    score: Literal["auto", "loss", "gradient"] = "auto"
    broken: str | None = None
    worst_case_init: WorstCaseInit | None = None

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
        if v not in CANARY_SETS and v not in CANARIES:
            raise ValueError(f"canary = {v!r} is unknown; valid: {', '.join(CANARIES.names())} (design: game) and "
                             f"{', '.join(CANARY_SETS.names())} (design: one-run)")
        return v

    @model_validator(mode="before")
    @classmethod
    def _one_run_defaults(cls, data: Any) -> Any:
        """``design: one-run`` fills in ``runs: 1`` and ``guesses: sweep`` (so the resolved config says them)."""
        if isinstance(data, dict) and data.get("design") == "one-run":
            data = {**data, "runs": 1 if data.get("runs") is None else data["runs"],
                    "guesses": "sweep" if data.get("guesses") is None else data["guesses"]}
        return data

    @model_validator(mode="after")
    def _claim(self) -> DPAuditConfig:
        if self.trainer == "mlaudit" and self.recipe.dp is None:
            raise ValueError("trainer mlaudit audits the recipe's DP-SGD, but the recipe has no dp; add e.g. "
                             "recipe: {name: fast, dp: {epsilon: 1.0, delta: 1.0e-5, clip: 1.0}}")
        if self.canary in ("gradient", "dirac") and self.score == "loss":
            raise ValueError(f"canary {self.canary} has no input whose loss could be measured; use score: gradient "
                             "(or auto), or an input canary (mislabeled, crafted, blank) with score: loss")
        if self.canary == "dirac" and self.design != "one-run":
            raise ValueError("canary dirac is the one-run audit's m Dirac canaries (design: one-run); the game's "
                             "single Dirac canary is canary gradient")
        if self.trainer != "mlaudit" and (self.resolved_score == "gradient" or self.broken is not None):
            what = (f"broken: {self.broken}" if self.broken is not None and self.resolved_score != "gradient"
                    else f"canary {self.canary} with score {self.resolved_score}")
            raise ValueError(f"{what} needs trainer: mlaudit (the white-box score needs the models' seeded "
                             "initialisation, the gradient canary and the broken fixtures live in mlaudit's "
                             f"DP-SGD step); trainer {self.trainer!r} supports canary mislabeled, crafted or blank "
                             "with score: loss")
        if self.worst_case_init is not None and (self.trainer != "mlaudit" or self.design != "game"
                                                 or self.model.init is not None):
            why = ("trainer mlaudit (a user's trainer builds its own model; give it the weights through model.init)"
                   if self.trainer != "mlaudit" else "design: game" if self.design != "game"
                   else "no model.init (the pre-trained weights replace it)")
            raise ValueError(f"worst_case_init = {self.worst_case_init.model_dump()} needs {why}")
        if self.trainer != "mlaudit" and self.claimed_epsilon is None:
            raise ValueError(f"trainer {self.trainer!r} is the user's own: give the epsilon it claims as "
                             "claimed_epsilon (and claimed_delta, default the recipe's dp.delta or 1e-5)")
        if self.design == "one-run":
            return self._check_one_run()
        given = [f"{k} = {getattr(self, k)!r}" for k in ONE_RUN_FIELDS if getattr(self, k) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: canaries, guesses and runs belong to design: one-run; the "
                             "distinguishing game (design: game, the default) counts models_per_side")
        best = best_possible_bound(self.models_per_side, delta=self.delta, confidence=self.confidence)
        if best < MIN_USEFUL_EPS:
            need = models_needed(delta=self.delta, confidence=self.confidence)
            raise ValueError(f"models_per_side = {self.models_per_side} is too few: even an attack without errors "
                             f"gives an epsilon lower bound of {best:.3g} at confidence {self.confidence}; set "
                             f"models_per_side >= {need} (>= {models_needed(delta=self.delta, confidence=self.confidence, at_least=1.0)} "
                             "for a bound of 1)")
        return self

    def _check_one_run(self) -> DPAuditConfig:
        """design one-run: canaries given, a canary set, guesses that fit, 2 m delta <= 1, and a reachable bound."""
        if self.canaries is None:
            raise ValueError("design: one-run needs canaries: m, the number of canaries inserted with probability 1/2 "
                             "each (e.g. canaries: 1000); allowed 1 <= canaries <= the training examples")
        if self.canary not in CANARY_SETS:
            raise ValueError(f"canary = {self.canary!r} has no one-run version; design: one-run supports canary "
                             f"{', '.join(CANARY_SETS.names())} (canary gradient is the game's single Dirac canary; "
                             "the one-run Dirac canaries are canary dirac)")
        m, runs = self.canaries, self.runs or 1
        if isinstance(self.guesses, OneRunGuesses):
            k = self.guesses.k_pos + self.guesses.k_neg
            if not 1 <= k <= m:
                raise ValueError(f"guesses k_pos + k_neg = {self.guesses.k_pos} + {self.guesses.k_neg} = {k}; allowed "
                                 f"1 <= k_pos + k_neg <= canaries = {m} (guesses are made on each run's canaries)")
        if 2 * m * runs * self.delta > 1.0:
            raise ValueError(f"canaries x runs = {m} x {runs} with delta {self.delta:g}: the one-run bound needs "
                             f"2 x canaries x runs x delta <= 1; allowed canaries x runs <= {int(1 / (2 * self.delta) + 1e-9)}")
        best = self.one_run_best_reachable()
        if best < MIN_USEFUL_EPS:
            need = next((r for r in range(1, 100_000) if best_reachable_bound(
                m=runs * max(m, r), r=runs * r, delta=self.delta, confidence=self.confidence) >= MIN_USEFUL_EPS), None)
            raise ValueError(f"canaries = {m} with guesses {self.guesses_label} and runs = {runs} is too few: even "
                             f"all guesses correct give an epsilon lower bound of {best:.3g} at confidence "
                             f"{self.confidence}; a bound needs k_pos + k_neg >= {need} guesses per run (so "
                             f"canaries >= {need}; the sweep divides the confidence over its choices and needs more)")
        return self

    @property
    def guess_choices(self) -> tuple[tuple[int, int], ...]:
        """design one-run: the (k_pos, k_neg) choices tried (one, or the sweep's; see audit.one_run)."""
        if isinstance(self.guesses, OneRunGuesses):
            return ((self.guesses.k_pos, self.guesses.k_neg),)
        return default_choices(self.canaries or 1)

    @property
    def guesses_label(self) -> str:
        if isinstance(self.guesses, OneRunGuesses):
            return f"k_pos {self.guesses.k_pos}, k_neg {self.guesses.k_neg}"
        pairs = self.guess_choices
        if all(kp == kn for kp, kn in pairs):
            return "sweep (k_pos = k_neg in " + ", ".join(str(k) for k, _ in pairs) + ")"
        return "sweep ((k_pos, k_neg) in " + ", ".join(f"({kp}, {kn})" for kp, kn in pairs) + ")"

    def one_run_best_reachable(self) -> float:
        """design one-run: the largest bound any auditor could show with these canaries, guesses and runs
        (all guesses correct; Bonferroni-corrected over the sweep)."""
        choices, runs, m = self.guess_choices, self.runs or 1, self.canaries or 1
        level = 1.0 - (1.0 - self.confidence) / len(choices)
        return max(best_reachable_bound(m=m * runs, r=runs * (kp + kn), delta=self.delta, confidence=level)
                   for kp, kn in choices)

    @property
    def resolved_score(self) -> str:
        """``auto`` -> ``gradient`` for the Dirac canaries (gradient, dirac), else ``loss``."""
        if self.score != "auto":
            return self.score
        return "gradient" if self.canary in ("gradient", "dirac") else "loss"

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
