"""Config of the ``robustness`` kind and the checks that need the loaded data (runner hook).

    kind: robustness
    dataset: digits
    model: mlp                      # zoo name or package.module:factory
    recipe: fast                    # trains `trials` models when no target is given
    threat: {norm: linf, eps: [0.05, 0.1, 0.2], box: [0, 1]}
    attacks: [fgsm, pgd, cw]
    attack_options: {pgd: {steps: 20, restarts: 2}}
    examples: 200
    target: {checkpoint: model.pt, sha256: ...}   # optional: audit this model instead of training
    defence: {transform: bit-depth, bits: 2}      # optional: non-adaptive vs adaptive, behind a transform
    detector: {method: mahalanobis, fpr: 0.05}    # optional: PGD vs detector-aware attack on a detector
"""

from __future__ import annotations

import inspect
import math
import typing
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..attacks.evasion import EVASION_ATTACKS
from ..attacks.evasion.base import L1_ATTACKS, check_loss
from ..craft.constraints import box_width
from ..data.base import DataBundle
from ..errors import ConfigError
from ..models.registry import ModelSpec
from .base import ExperimentConfig

SHARED_OPTIONS = frozenset({"eps", "norm", "box", "target", "generator", "members"})
"""Attack parameters the kind sets itself (from ``threat`` and ``seed``) or that take tensors/callables."""
ZERO_OK = frozenset({"kappa"})
"""Numeric attack options that may be 0 (CW's confidence); every other one must be > 0."""
L1_THREAT_ATTACKS = (*L1_ATTACKS, "cw")
"""The attacks a ``threat.norm: l1`` run takes: FAB and FAB-T in l1, and CW (minimal l2, its point measured
in l1); every other attack runs in the engine's l-inf / l2 balls only."""


class ThreatModel(BaseModel):
    """The perturbation set: ``norm`` ball of each radius in ``eps`` (ascending, distinct) around x, in
    the pixel ``box`` [lo, hi] the inputs live in."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    norm: Literal["linf", "l2", "l1"] = "linf"
    eps: tuple[float, ...] = (8 / 255,)
    box: tuple[float, float] = (0.0, 1.0)

    @model_validator(mode="after")
    def _ranges(self) -> ThreatModel:
        width = box_width(self.box, where="threat.box")
        if not self.eps:
            raise ValueError("threat.eps must list at least one radius")
        bad = [e for e in self.eps if not (math.isfinite(e) and e >= 0)]
        if bad:
            raise ValueError(f"threat.eps must be >= 0, got {bad}")
        if self.norm == "linf" and max(self.eps) > width:
            raise ValueError(f"threat.eps {max(self.eps)} is above the pixel range; allowed 0 <= eps <= {width:g} "
                             f"(hi - lo of threat.box {list(self.box)}) for norm linf")
        if list(self.eps) != sorted(set(self.eps)):
            raise ValueError(f"threat.eps must be ascending without repeats, got {list(self.eps)}")
        return self

    def eps_max(self, dim: int) -> float:
        """The largest meaningful radius for inputs of ``dim`` values (the whole box)."""
        lo, hi = self.box
        return (hi - lo) * {"linf": 1.0, "l2": math.sqrt(dim), "l1": float(dim)}[self.norm]


class DefenceSpec(BaseModel):
    """An input-transformation defence put in front of the model and evaluated non-adaptively and
    adaptively side by side (:func:`mlaudit.attacks.evasion.adaptive.evaluate_defence`): ``transform``
    with its option (``bits``, ``quality``, ``max_size``, ``sigma``), PGD with ``steps`` steps, EOT over
    ``eot`` draws for randomised transforms, accuracies of randomised defences averaged over ``draws``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    transform: Literal["bit-depth", "jpeg", "resize-pad", "noise"]
    bits: int = Field(4, ge=1, le=8)
    quality: int = Field(75, ge=1, le=95)
    max_size: int | None = Field(None, ge=2, le=4096)
    sigma: float = Field(0.25, gt=0, le=10)
    steps: int = Field(50, ge=1, le=10_000)
    eot: int = Field(8, ge=1, le=1024)
    draws: int = Field(8, ge=1, le=1024)

    def options(self) -> dict[str, Any]:
        """The transform's own option, as :class:`~mlaudit.attacks.evasion.defended.Defended` takes it."""
        return {"bit-depth": {"bits": self.bits}, "jpeg": {"quality": self.quality},
                "resize-pad": {"max_size": self.max_size}, "noise": {"sigma": self.sigma}}[self.transform]


class DetectorSpec(BaseModel):
    """A statistical detector of adversarial examples in the model's penultimate feature space
    (:class:`mlaudit.attacks.evasion.detector.FeatureDetector`), evaluated by
    :func:`~mlaudit.attacks.evasion.detector.evaluate_detector`: non-adaptive PGD vs the adaptive
    feature-collision and detector-aware attacks, ``steps`` steps each. ``method`` ``mahalanobis`` or
    ``knn`` (``k`` nearest clean features); fitted on ``fit`` training inputs (also the guide pool of
    feature collision) and thresholded at the (1 - ``fpr``) quantile of ``calibrate`` other training
    inputs (a seeded draw); ``eps`` one radius, or None for every radius of ``threat.eps``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["mahalanobis", "knn"] = "mahalanobis"
    k: int = Field(10, ge=1, le=100_000)
    fpr: float = Field(0.05, gt=0, lt=1)
    steps: int = Field(50, ge=1, le=10_000)
    eps: float | None = Field(None, ge=0, allow_inf_nan=False)
    fit: int = Field(1000, ge=2, le=1_000_000)
    calibrate: int = Field(400, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _k(self) -> DetectorSpec:
        if self.k > self.fit:
            raise ValueError(f"detector.k = {self.k}; allowed 1 <= k <= detector.fit = {self.fit} (the clean "
                             "inputs the detector is fitted on)")
        return self


class TargetModel(BaseModel):
    """An external model to evaluate: a state_dict ``checkpoint`` of the config's model (verified against
    ``sha256`` when given)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    checkpoint: Path
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")


class RobustnessConfig(ExperimentConfig):
    """See the module docstring and docs/evasion.md for every field."""

    kind: Literal["robustness"] = "robustness"
    trials: int = Field(1, ge=1, le=64)
    threat: ThreatModel = ThreatModel()
    attacks: tuple[str, ...] = ("fgsm", "pgd", "apgd", "cw")
    attack_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    examples: int = Field(500, ge=1, le=1_000_000)
    target: TargetModel | None = None
    sanity: bool = True
    sanity_queries: int = Field(1000, ge=0, le=100_000)
    """Square Attack queries per example for the sanity section's black-box check (0: no check; image inputs
    only; a run whose ``attacks`` include ``square`` uses that run instead)."""
    grid: int = Field(8, ge=0, le=32)
    """Adversarial examples shown in the report's grid (0: none)."""
    defence: DefenceSpec | None = None
    """Also evaluate the model behind this input transformation, non-adaptively and adaptively."""
    detector: DetectorSpec | None = None
    """Also evaluate a feature-space detector of adversarial examples against PGD and adaptive attacks."""

    @field_validator("attacks")
    @classmethod
    def _attacks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [n for n in v if n not in EVASION_ATTACKS]
        if not v or len(set(v)) != len(v) or unknown:
            raise ValueError(f"attacks must name one or more evasion attacks without repeats, got {list(v)}"
                             f"{f' (unknown: {unknown})' if unknown else ''}; valid attacks: "
                             f"{', '.join(EVASION_ATTACKS.names())}")
        return v

    @field_validator("attack_options")
    @classmethod
    def _options(cls, v: dict[str, dict[str, Any]], info: ValidationInfo) -> dict[str, dict[str, Any]]:
        attacks = info.data.get("attacks")  # absent when attacks itself failed
        for name, opts in v.items():
            if attacks is not None and name not in attacks:
                raise ValueError(f"attack_options.{name}: {name!r} is not in attacks {list(attacks)}")
            if name in EVASION_ATTACKS:
                check_options(name, opts)
        return v

    @model_validator(mode="after")
    def _target(self) -> RobustnessConfig:
        if self.target is not None and self.trials != 1:
            raise ValueError(f"trials = {self.trials} trains models, but target gives the model to evaluate; "
                             "drop trials or target")
        return self

    @model_validator(mode="after")
    def _l1(self) -> RobustnessConfig:
        """threat.norm l1: only the attacks with an l1 version, and no part that runs PGD / FGSM / Square."""
        if self.threat.norm != "l1":
            return self
        other = [n for n in self.attacks if n not in L1_THREAT_ATTACKS]
        if other:
            raise ValueError(f"attacks {other} have no l1 version; allowed with threat.norm l1: "
                             f"{', '.join(L1_THREAT_ATTACKS)} (or threat.norm linf / l2)")
        parts = [f"{k}: {v}" for k, v in (("sanity", self.sanity), ("defence", self.defence),
                                          ("detector", self.detector)) if v not in (False, None)]
        if parts:
            raise ValueError(f"{'; '.join(parts)} is not supported with threat.norm l1 (these checks run PGD, FGSM "
                             "or Square, which have no l1 version); allowed: sanity: false, no defence, no detector")
        return self

    @model_validator(mode="after")
    def _detector_eps(self) -> RobustnessConfig:
        d = self.detector
        if d is not None and d.eps is not None and self.threat.norm == "linf":
            width = self.threat.box[1] - self.threat.box[0]
            if d.eps > width:
                raise ValueError(f"detector.eps = {d.eps} is above the pixel range; allowed 0 <= eps <= {width:g} "
                                 f"(hi - lo of threat.box {list(self.threat.box)}) for norm linf")
        return self

    def detector_eps(self) -> tuple[float, ...]:
        """The radii the detector is evaluated at: ``detector.eps``, else every radius of ``threat.eps``."""
        d = self.detector
        return self.threat.eps if d is None or d.eps is None else (d.eps,)

    def options_for(self, name: str) -> dict[str, Any]:
        return dict(self.attack_options.get(name, {}))


def check_options(name: str, opts: dict[str, Any]) -> None:
    """ValueError naming ``attack_options.<name>.<key>`` for an option the attack does not take (or the
    kind sets itself) or a value of the wrong type; the attack checks ranges when it runs."""
    fn = EVASION_ATTACKS.get(name)
    params = inspect.signature(fn).parameters
    hints = typing.get_type_hints(fn)
    allowed = sorted(p for p, par in params.items() if par.kind is par.KEYWORD_ONLY and p not in SHARED_OPTIONS)
    for key, value in opts.items():
        if key not in allowed:
            raise ValueError(f"attack_options.{name}.{key}: not an option of {name} here; allowed: "
                             f"{', '.join(allowed)} (eps, norm and box come from threat)")
        try:
            TypeAdapter(hints[key]).validate_python(value, strict=True)
        except ValidationError:
            want = getattr(hints[key], "__name__", str(hints[key]))
            raise ValueError(f"attack_options.{name}.{key}: {value!r} is not of type {want}") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not (
                math.isfinite(value) and (value > 0 or (key in ZERO_OK and value == 0))):
            raise ValueError(f"attack_options.{name}.{key}: {value!r}; allowed: {key} {'>=' if key in ZERO_OK else '>'} 0")


def check_robustness(config: RobustnessConfig, data: DataBundle) -> None:
    """Runner hook (before anything is written): examples within the test split, eps within the pixel
    range for these inputs, test inputs inside threat.box, the target checkpoint fits the model."""
    n_test = len(data.test)
    if config.examples > n_test:
        raise ConfigError(f"examples = {config.examples} exceeds the {n_test} examples of {data.name}'s test split; "
                          f"allowed 1 <= examples <= {n_test}")
    dim = math.prod(data.input_shape)
    top = config.threat.eps_max(dim)
    if max(config.threat.eps) > top:
        raise ConfigError(f"threat.eps {max(config.threat.eps)} is above the pixel range; allowed 0 <= eps <= "
                          f"{top:.4g} for norm {config.threat.norm} on inputs of {dim} values in {list(config.threat.box)}")
    lo, hi = config.threat.box
    x_min, x_max = float(data.test.x.min()), float(data.test.x.max())
    if x_min < lo - 1e-6 or x_max > hi + 1e-6:
        raise ConfigError(f"threat.box {list(config.threat.box)}: {data.name}'s test inputs lie in [{x_min:.4g}, "
                          f"{x_max:.4g}], outside it; set threat.box to the inputs' pixel range")
    for name in config.attacks:  # losses the number of classes cannot support (DLR needs 3, targeted DLR 4)
        loss = "dlr" if name == "apgd-t" else config.options_for(name).get("loss")
        if loss is not None:
            try:
                check_loss(loss, data.num_classes, targeted=name == "apgd-t")
            except ConfigError as e:
                raise ConfigError(f"attack {name} on {data.name}: {e}") from None
    d = config.defence
    if d is not None:
        shape = data.input_shape
        if len(shape) != 3 and d.transform in ("jpeg", "resize-pad"):
            raise ConfigError(f"defence.transform = {d.transform!r} needs images [C, H, W]; {data.name} has inputs of "
                              f"shape {list(shape)}; allowed for vectors: bit-depth, noise")
        if d.transform == "jpeg" and shape[0] not in (1, 3):
            raise ConfigError(f"defence.transform = 'jpeg' needs 1 or 3 channels, {data.name} has {shape[0]}")
        if d.transform == "resize-pad" and d.max_size is not None and d.max_size <= max(shape[1:]):
            raise ConfigError(f"defence.max_size = {d.max_size}; allowed > the image side {max(shape[1:])}")
        if d.transform in ("bit-depth", "jpeg") and tuple(config.threat.box) != (0.0, 1.0):
            raise ConfigError(f"defence.transform = {d.transform!r} works on pixels in [0, 1]; threat.box is "
                              f"{list(config.threat.box)}")
    model = load_target(config, data) if config.target is not None else None
    det = config.detector
    if det is not None:
        n_train = len(data.train)
        if det.fit + det.calibrate > n_train:
            raise ConfigError(f"detector.fit + detector.calibrate = {det.fit} + {det.calibrate} = "
                              f"{det.fit + det.calibrate} exceeds the {n_train} examples of {data.name}'s train split; "
                              f"allowed fit + calibrate <= {n_train}")
        if det.eps is not None and det.eps > top:
            raise ConfigError(f"detector.eps = {det.eps} is above the pixel range; allowed 0 <= eps <= {top:.4g} for "
                              f"norm {config.threat.norm} on inputs of {dim} values in {list(config.threat.box)}")
        from ..models.registry import build_model
        from ..query.features import classification_head

        try:
            if model is None:
                with torch.random.fork_rng(devices=[]):  # leave the global RNG as the run will find it
                    model = build_model(config.model, input_shape=data.input_shape, num_classes=data.num_classes)
            classification_head(model)
        except ConfigError as e:
            raise ConfigError(f"detector: {e}") from None


class HasTarget(Protocol):
    """A config with a ``model`` and an optional external ``target`` of it (robustness, certify)."""

    @property
    def model(self) -> ModelSpec: ...

    @property
    def target(self) -> TargetModel | None: ...


def load_target(config: HasTarget, data: DataBundle) -> Any:
    """The external target as a module (CPU), its weights hash- and fit-checked (DataError / ConfigError)."""
    from ..query import load_model

    tc = config.target
    if tc is None:
        raise ConfigError("load_target needs config.target")
    return load_model(config.model, tc.checkpoint, sha256=tc.sha256, data=data,
                      source=f"target checkpoint {str(tc.checkpoint)!r}", hint="set model to the target's architecture")
