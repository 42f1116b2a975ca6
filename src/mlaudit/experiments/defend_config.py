"""The ``defend`` kind's config (see :mod:`.defend` for the protocol and docs/defend.md for every field):
the poisoning study it defends against (``attack``: a ``backdoor`` or a ``targeted-poison`` attack
block, told apart by its method; their crafting, victim, victims and scenario fields) and the
``defence`` block; and the checks that need the data (:func:`check_defend`), all before anything is
written.

    kind: defend
    dataset: digits
    model: mlp
    recipe: fast
    attack: {method: badnets, budget: 0.03, target_class: 0}    # or a targeted-poison attack block
    defence: {method: spectral, rate: 0.25}                     # | outlier | activation-clustering | knn | dpa | ndt | none
    victims: 2
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ..attacks.poisoning import POISONERS
from ..attacks.poisoning.backdoor import poison_count
from ..certify.partition import partition_of
from ..certify.smoothing import min_certify_n
from ..config import format_validation_error
from ..data.base import DataBundle
from ..defences import FILTERS
from ..errors import ConfigError, MlauditError
from ..query import model_template, penultimate_features
from ..train.recipe import DPConfig, Recipe
from .backdoor_config import BackdoorAttack, BackdoorConfig, check_backdoor, eligible_rows
from .base import recipe_value
from .certify_config import DDPMDenoiser, parse_denoiser
from .poisoning import PoisoningConfig
from .targeted_poison import check_targeted
from .targeted_poison_config import ExplicitScenario, TargetedAttack, TargetedPoisonConfig, build_scenarios

DPA = "dpa"
NDT = "ndt"
DP_SGD = "dp-sgd"
NDT_MODELS = 20
"""Models of the NDT ensemble when ``defence.models`` is not given (>= 11 lets CERTIFY certify at alpha 0.001 with n0 = 1)."""
NONE = "none"
DPA_K = 50
"""Partitions of DPA when ``defence.k`` is not given (the smallest ensemble of Levine & Feizi's CIFAR-10 table)."""
KNN_K = 10
"""Neighbours of the kNN filter when ``defence.k`` is not given."""


def defence_methods() -> list[str]:
    """Every ``defence.method``: the filters of :data:`mlaudit.defences.FILTERS`, ``dpa``, ``ndt``, ``dp-sgd`` and
    ``none``."""
    return [*FILTERS.names(), DPA, NDT, DP_SGD, NONE]


_APPLIES = {"rate": "the filtering defences", "k": "knn (neighbours) and dpa (partitions)",
            "components": "activation-clustering", "size_threshold": "activation-clustering",
            "recipe": "dpa and ndt (the ensemble models' recipe)", "sigma": "ndt", "models": "ndt", "n0": "ndt",
            "alpha": "ndt", "denoiser": "ndt", "denoiser_epochs": "ndt (with denoiser dncnn)",
            "dp": "dp-sgd (the victims' DP-SGD)"}
NDT_DENOISERS = ("none", "dncnn")
"""The named ``defence.denoiser`` values; a DDPM is the mapping ``{kind: ddpm, path: ...}``."""


def _ndt_denoiser_value(v: Any) -> Any:
    """``defence.denoiser``: ``none``, ``dncnn``, or a DDPM block ``{kind: ddpm, path, steps, data_range, clip}``
    validated by the ``certify`` kind's own :class:`~.certify_config.DDPMDenoiser` (errors name
    ``defence.denoiser.<field>``)."""
    if v is None or isinstance(v, DDPMDenoiser) or (isinstance(v, str) and v in NDT_DENOISERS):
        return v
    if v == "ddpm" or (isinstance(v, Mapping) and v.get("kind") == "ddpm"):
        return parse_denoiser(v, where="defence.denoiser", kinds={"ddpm": DDPMDenoiser})
    raise ValueError(f"{v!r} is not a denoiser of ndt; valid: none, dncnn (a name; its epochs in "
                     "defence.denoiser_epochs), or a local diffusers DDPM {kind: ddpm, path: <folder>, steps: 1} (as "
                     "the certify kind's denoiser block)")


class DefenceOptions(BaseModel):
    """``method`` (:func:`defence_methods`); ``rate``: the fraction of each class a filter removes (0 <
    rate < 1; activation-clustering and knn apply their paper's own rule without one); ``k``: knn's
    neighbours or dpa's partitions (>= 2; default 10 and 50); ``components`` and ``size_threshold``:
    activation clustering's PCA dimensions and small-cluster share; ``recipe``: the partition models'
    recipe (default: the victims'; a partition is 1/k of the data, so it may need more epochs). ndt (noise,
    denoise, train, classify; seed 004): ``sigma`` (required, > 0) the training noise, ``models`` M (default
    20), ``n0`` selection models of CERTIFY (default 1, < models), ``alpha`` (default 0.001), ``denoiser``
    ``none`` (noise only), ``dncnn`` (trained on the poisoned training inputs, ``denoiser_epochs``, default 10)
    or ``{kind: ddpm, path: <folder>, steps, data_range, clip}`` (a local diffusers DDPM, one-shot at t* for
    ``sigma``, Carlini et al. 2023; the ``certify`` kind's block and loader).
    dp-sgd (seed 002 section 1.5.5): ``dp`` (required) the DP-SGD options the defended victims train with (the
    victims' recipe plus ``dp``; :class:`~mlaudit.train.recipe.DPConfig`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str
    rate: float | None = Field(None, gt=0.0, lt=1.0)
    k: int | None = Field(None, ge=2, le=1_000_000)
    components: int | None = Field(None, ge=1, le=4096)
    size_threshold: float | None = Field(None, gt=0.0, le=0.5)
    recipe: Annotated[Recipe | None, BeforeValidator(lambda v: recipe_value(v, where="defence.recipe"))] = None
    sigma: float | None = Field(None, gt=0.0, le=10.0)
    models: int | None = Field(None, ge=2, le=10_000)
    n0: int | None = Field(None, ge=1, le=10_000)
    alpha: float | None = Field(None, gt=0.0, lt=1.0)
    denoiser: Annotated[Literal["none", "dncnn"] | DDPMDenoiser | None, BeforeValidator(_ndt_denoiser_value)] = None
    denoiser_epochs: int | None = Field(None, ge=1, le=10_000)
    dp: DPConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        """Fill the method's defaults in (k of knn and dpa, activation clustering's options) so the resolved
        config shows what ran."""
        if not isinstance(data, Mapping) or not isinstance(data.get("method"), str):
            return data
        data, method = dict(data), data["method"]
        if method == NDT:
            for name, default in (("models", NDT_MODELS), ("n0", 1), ("alpha", 0.001), ("denoiser", "none")):
                if data.get(name) is None:
                    data[name] = default
            if data.get("denoiser") == "dncnn" and data.get("denoiser_epochs") is None:
                data["denoiser_epochs"] = 10
        if method in (DPA, "knn") and data.get("k") is None:
            data["k"] = DPA_K if method == DPA else KNN_K
        if method == "activation-clustering":
            defaults = FILTERS.get(method).options.model_fields
            for name in ("components", "size_threshold"):
                if data.get(name) is None:
                    data[name] = defaults[name].default
        return data

    @model_validator(mode="after")
    def _applies(self) -> DefenceOptions:
        methods = defence_methods()
        if self.method not in methods:
            raise ValueError(f"defence.method = {self.method!r} is not a defence; valid: {', '.join(methods)}")
        used = {"rate": self.method in FILTERS, "k": self.method in ("knn", DPA),
                "components": self.method == "activation-clustering",
                "size_threshold": self.method == "activation-clustering", "recipe": self.method in (DPA, NDT),
                **{k: self.method == NDT for k in ("sigma", "models", "n0", "alpha", "denoiser")},
                "denoiser_epochs": self.method == NDT and self.denoiser == "dncnn", "dp": self.method == DP_SGD}
        for name, ok in used.items():
            if getattr(self, name) is not None and not ok:
                raise ValueError(f"defence.{name} applies to {_APPLIES[name]}, not to defence.method "
                                 f"{self.method!r} (leave it out)")
        if self.method in FILTERS and self.rate is None and not FILTERS.get(self.method).rate_optional:
            raise ValueError(f"defence.rate is required for {self.method}: the fraction of each class it removes, "
                             "0 < rate < 1 (Tran et al. remove 1.5 x the poisoned fraction)")
        if self.method == DP_SGD and self.dp is None:
            raise ValueError("defence.dp is required for dp-sgd: the victims' DP-SGD, e.g. {epsilon: 8, clip: 1} "
                             "(or noise_multiplier instead of epsilon; delta defaults to 1e-5)")
        if self.method == NDT:
            assert self.models is not None and self.n0 is not None
            if self.sigma is None:
                raise ValueError("defence.sigma is required for ndt: the std of the Gaussian noise added to every "
                                 "training input (seed 004 uses 0.1 to 1.0 on [0, 1] pixels); allowed 0 < sigma <= 10")
            if self.n0 >= self.models:
                raise ValueError(f"defence.n0 = {self.n0} must be smaller than defence.models = {self.models}: n0 "
                                 f"models only pick the class, the other models - n0 estimate pA; allowed 1 <= "
                                 f"defence.n0 <= {self.models - 1}")
        return self

    @property
    def is_filter(self) -> bool:
        return self.method in FILTERS

    @property
    def denoiser_label(self) -> str:
        """``none``, ``dncnn`` or the DDPM's label (``DDPM (one-shot)``)."""
        return self.denoiser.label if isinstance(self.denoiser, DDPMDenoiser) else str(self.denoiser)

    def filter_options(self) -> dict[str, Any]:
        """The filter's own options (``k`` of knn, activation clustering's), validated."""
        entry = FILTERS.get(self.method)
        given = {k: getattr(self, k) for k in ("k", "components", "size_threshold")
                 if k in entry.options.model_fields and getattr(self, k) is not None}
        return entry.make_options(given, where="defence").model_dump()


def _attack_value(v: Any) -> Any:
    """A raw attack block becomes the attack of the family its method belongs to (backdoor or targeted)."""
    if isinstance(v, (BackdoorAttack, TargetedAttack)):
        return v
    if not isinstance(v, Mapping):
        raise ValueError(f"attack must be a mapping: a backdoor or targeted-poison attack block with its method, got "
                         f"{v!r}")
    method = v.get("method")
    families = {"backdoor": BackdoorAttack, "targeted": TargetedAttack}
    valid = {f: POISONERS.names(f) for f in families}
    for family, cls in families.items():
        if method in valid[family]:
            try:
                return cls.model_validate(v)
            except ValidationError as e:
                raise ConfigError(format_validation_error(e, prefix="attack", model=cls)) from None
    raise ValueError(f"attack.method = {method!r} is not a poisoning attack the defend kind runs; valid: backdoor "
                     f"{', '.join(valid['backdoor'])}; targeted {', '.join(valid['targeted'])}")


class DefendConfig(PoisoningConfig):
    """See :mod:`.defend` and docs/defend.md."""

    kind: Literal["defend"] = "defend"
    attack: Annotated[BackdoorAttack | TargetedAttack, BeforeValidator(_attack_value)]
    defence: DefenceOptions
    victims: int = Field(2, ge=1, le=10_000)
    scenarios: int | tuple[ExplicitScenario, ...] = 1
    first_scenario: int = Field(0, ge=0, le=10_000)
    save_models: bool = False

    @field_validator("defence", mode="before")
    @classmethod
    def _defence(cls, v: Any) -> Any:
        return {"method": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _study(self) -> DefendConfig:
        if isinstance(self.attack, BackdoorAttack):
            fields = type(self).model_fields
            given = [k for k in ("scenarios", "first_scenario") if getattr(self, k) != fields[k].default]
            if given:
                raise ValueError(f"{', '.join(given)} apply to targeted attacks; attack.method {self.attack.method} is "
                                 "a backdoor (leave them out)")
        try:
            self.study()
        except ValidationError as e:
            raise ConfigError(format_validation_error(e)) from None
        if self.defence.method == DP_SGD:
            if self.trainer != "mlaudit":
                raise ValueError(f"defence.method dp-sgd trains the victims with mlaudit's DP-SGD, but trainer is "
                                 f"{self.trainer!r} (your training function does its own training); use trainer: "
                                 "mlaudit, or give your function DP-SGD and compare with defence: none")
            try:
                _ = self.dp_recipe  # validates the victims' recipe with defence.dp
            except ValidationError as e:
                raise ValueError(f"defence.dp cannot run with the victims' recipe: {format_validation_error(e)}") from None
        return self

    @property
    def family(self) -> str:
        """``backdoor`` or ``targeted``: the poisoning kind whose attack this defends against."""
        return self.attack.family

    def study(self) -> BackdoorConfig | TargetedPoisonConfig:
        """The poisoning kind's own config of this attack (its crafting, victims, scenarios; no clean
        baseline, no export): the kinds' poisons, victims and checks run on it unchanged."""
        common = {k: getattr(self, k) for k in PoisoningConfig.model_fields if k != "kind"}
        if isinstance(self.attack, BackdoorAttack):
            return BackdoorConfig(**common, attack=self.attack, victims=self.victims, baseline=False,
                                  save_models=self.save_models)
        return TargetedPoisonConfig(**common, attack=self.attack, victims=self.victims, baseline=False, export=False,
                                    alignment=False, save_models=self.save_models, scenarios=self.scenarios,
                                    first_scenario=self.first_scenario)

    @property
    def dp_recipe(self) -> Recipe:
        """The defended victims' recipe under ``defence.method: dp-sgd``: the victims' recipe plus ``defence.dp``
        (validated as a recipe, so what DP-SGD cannot run with is refused before any work)."""
        assert self.defence.dp is not None
        return Recipe.model_validate({**self.victim_recipe.model_dump(), "dp": self.defence.dp.model_dump()})

    @property
    def partition_recipe(self) -> Recipe:
        """The recipe of DPA's partition models and NDT's ensemble (``defence.recipe``, else the victims')."""
        return self.defence.recipe or self.victim_recipe


def _poison_classes(study: BackdoorConfig | TargetedPoisonConfig, data: DataBundle) -> dict[int, int]:
    """The class(es) whose training label the poisons carry, with the class's size once poisoned: a
    backdoor's target class (dirty-label poisons relabelled into it), each targeted scenario's poison class."""
    counts = data.train.y.bincount(minlength=data.num_classes)
    if isinstance(study, BackdoorConfig):
        opts = study.attack.backdoor
        extra = 0 if eligible_rows(study, data)[1] == "target-class" else poison_count(opts.budget, len(data.train))
        return {opts.target_class: int(counts[opts.target_class]) + extra}
    return {sc.poison_class: int(counts[sc.poison_class]) for sc in build_scenarios(study, data)}


def check_defend(config: DefendConfig, data: DataBundle) -> None:
    """Runner hook, before anything is written: the attack's own checks (the poisoning kind's), then the
    defence's: a filter needs a linear head on the victim model (its penultimate features) and a rate that
    removes rows of the poisons' class (else it cannot work); knn needs more rows than neighbours; dpa needs k <= the training set and no empty
    partition of the clean training set; ndt's denoiser needs image data, and a DDPM must load from its folder
    and return its input's shape."""
    study = config.study()
    (check_backdoor if isinstance(study, BackdoorConfig) else check_targeted)(study, data)
    d, n = config.defence, len(data.train)
    if d.is_filter:
        try:
            penultimate_features(model_template(config.victim_model, data))
        except ConfigError as e:
            raise ConfigError(f"defence.method {d.method} filters in the victims' penultimate feature space: {e}") from None
        for c, size in _poison_classes(study, data).items():
            if d.rate is not None and int(d.rate * size + 0.5) == 0:
                raise ConfigError(f"defence.rate = {d.rate:g} removes no row of class {data.train.classes[c]} ({size} "
                                  f"rows once poisoned), the class {config.attack.method}'s poisons are in: "
                                  f"{d.method} could not remove a single poison; allowed {0.5 / size:.3g} <= "
                                  "defence.rate < 1")
        if d.k is not None and d.k >= n:
            raise ConfigError(f"defence.k = {d.k} neighbours needs more training rows than k; {data.name} has {n} "
                              f"(allowed 2 <= defence.k <= {n - 1})")
    if d.method == NDT:
        assert d.models is not None and d.n0 is not None and d.alpha is not None
        need = min_certify_n(d.alpha)
        if d.models - d.n0 < need:
            raise ConfigError(f"defence.models = {d.models} with defence.n0 = {d.n0} leaves {d.models - d.n0} "
                              f"estimation models; CERTIFY at defence.alpha = {d.alpha:g} certifies nothing with fewer "
                              f"than {need}: allowed defence.models >= {d.n0 + need}")
        if d.denoiser not in (None, "none") and data.train.x.dim() != 4:
            kind = d.denoiser.kind if isinstance(d.denoiser, DDPMDenoiser) else d.denoiser
            raise ConfigError(f"defence.denoiser = {kind} needs image inputs [C, H, W]; {data.name} has shape "
                              f"{list(data.train.x.shape[1:])} (allowed for it: defence.denoiser none)")
        if isinstance(d.denoiser, DDPMDenoiser):
            assert d.sigma is not None
            d.denoiser.check(sigma=d.sigma, input_shape=tuple(data.train.x.shape[1:]), where="defence.denoiser")
    if d.method == DP_SGD:
        from ..privacy.dpsgd import check_dp_model  # lazy: privacy imports train

        try:
            check_dp_model([model_template(config.victim_model, data)])
        except MlauditError as e:
            raise ConfigError(f"defence.method dp-sgd trains the victims with DP-SGD: {e}") from None
    if d.method == DPA:
        assert d.k is not None
        if d.k > n:
            raise ConfigError(f"defence.k = {d.k} partitions exceeds the {n} training rows of {data.name}; allowed "
                              f"2 <= defence.k <= {n}")
        sizes = partition_of(data.train.x, d.k).bincount(minlength=d.k)
        empty = int((sizes == 0).sum())
        if empty:
            raise ConfigError(f"defence.k = {d.k} leaves {empty} of the {d.k} partitions of the {n} training rows of "
                              f"{data.name} empty (a base model with nothing to train on); use fewer partitions "
                              f"(about n / 5 = {max(2, n // 5)} or less)")
