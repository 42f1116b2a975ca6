"""Config of the ``certify`` kind (randomized smoothing, Cohen et al. 2019) and its checks on the loaded data.

    kind: certify
    dataset: digits
    model: mlp                      # zoo name or package.module:factory
    recipe: fast                    # noise-trained at sigma unless recipe.noise_sigma is given
    sigma: 0.25
    n0: 100                         # selection samples per input
    n: 10000                        # estimation samples per input
    alpha: 0.001
    radii: [0, 0.25, 0.5, 0.75, 1.0]
    examples: 500
    target: {checkpoint: model.pt, sha256: ...}   # optional: certify this model instead of training
    denoiser: {kind: dncnn, epochs: 20}           # optional: denoised smoothing, certify f(D(.)) beside f
    denoiser: {kind: ddpm, path: ddpm-folder, steps: 1}           # or a local diffusers DDPM (one-shot: 1)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
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

from ..certify import max_radius, min_certify_n, min_predict_n
from ..certify.denoise import DiffusionDenoiser, check_denoiser, load_diffusers_pipeline, require_diffusers
from ..config import format_validation_error
from ..data.base import DataBundle
from ..errors import ConfigError
from ..train.recipe import Recipe
from .base import ExperimentConfig
from .robustness_config import TargetModel, load_target

DEFAULT_SIGMA = 0.25


def _noise_at_sigma(recipe: Any, sigma: float) -> Any:
    """The raw recipe with ``noise_sigma: sigma`` unless it sets noise_sigma itself (None: leave it)."""
    if isinstance(recipe, str):
        return {"name": recipe, "noise_sigma": sigma}
    if isinstance(recipe, dict) and "noise_sigma" not in recipe:
        return {**recipe, "noise_sigma": sigma}
    if isinstance(recipe, Recipe) and "noise_sigma" not in recipe.model_fields_set:
        return recipe.model_copy(update={"noise_sigma": sigma})
    return None


class DnCNNDenoiser(BaseModel):
    """``denoiser: {kind: dncnn}``: a DnCNN (Zhang et al. 2017) of ``depth`` 3x3 convolutions of ``width``
    channels (BatchNorm between unless ``batch_norm: false``), trained on the training split at the run's
    sigma for ``epochs`` (Adam, ``lr``, ``batch_size``) with ``objective`` (Salman et al. 2020): ``mse``,
    ``stability`` (CE through the frozen classifier) or ``mse+stability`` (``epochs`` of MSE, then
    ``epochs`` of stability from there, as Salman et al. fine-tune)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["dncnn"] = "dncnn"
    depth: int = Field(5, ge=2, le=64)
    width: int = Field(32, ge=1, le=1024)
    batch_norm: bool = True
    epochs: int = Field(20, ge=1, le=10_000)
    batch_size: int = Field(128, ge=1, le=1_000_000)
    lr: float = Field(1e-3, gt=0.0, le=10.0, allow_inf_nan=False)
    objective: Literal["mse", "stability", "mse+stability"] = "mse"

    @property
    def label(self) -> str:
        return f"DnCNN ({self.objective})"


class DDPMDenoiser(BaseModel):
    """``denoiser: {kind: ddpm, path: folder}``: a diffusers pipeline saved in a local folder (Carlini et al.
    2023): ``steps`` 1 is the one-shot denoiser, k > 1 deterministic DDIM from t* to 0 in k model calls;
    ``data_range`` [lo, hi] is mapped onto the model's [-1, 1] (null: the model takes the data's units);
    ``clip`` clamps each x_0 estimate to [-1, 1]."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["ddpm"] = "ddpm"
    path: Path
    steps: int = Field(1, ge=1, le=10_000)
    data_range: tuple[float, float] | None = (0.0, 1.0)
    clip: bool = True

    @field_validator("data_range")
    @classmethod
    def _range(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not (math.isfinite(v[0]) and math.isfinite(v[1]) and v[0] < v[1]):
            raise ValueError(f"denoiser.data_range must be [lo, hi] with lo < hi (the data's range, mapped onto the "
                             f"model's [-1, 1]; null for none), got {list(v)}")
        return v

    @property
    def label(self) -> str:
        return f"DDPM ({'one-shot' if self.steps == 1 else f'{self.steps} DDIM steps'})"

    def build(self, sigma: float, *, device: Any = None) -> DiffusionDenoiser:
        """The one-shot (or DDIM) denoiser of this block at noise level ``sigma`` (data units): the pipeline in
        ``path`` loaded by :func:`~mlaudit.certify.load_diffusers_pipeline` onto ``device`` (the ``certify``
        kind's denoiser and the ``defend`` kind's ndt use this one loader and module)."""
        unet, abar = load_diffusers_pipeline(self.path, device=device)
        den = DiffusionDenoiser(unet, abar, sigma=sigma, steps=self.steps, data_range=self.data_range, clip=self.clip)
        return den.to(device) if device is not None else den

    def info(self, den: DiffusionDenoiser) -> dict[str, Any]:
        """What the built denoiser is: t*, the schedule's length, sigma in model units and at t*, model calls."""
        return {"t_star": den.t_star, "timesteps": len(den.alphas_cumprod), "model_sigma": den.model_sigma,
                "sigma_at_t_star": den.ratio_at_t_star, "model_calls": len(den.schedule)}

    def check(self, *, sigma: float, input_shape: tuple[int, ...], where: str = "denoiser") -> None:
        """Before any work: ``path`` is a folder, diffusers is installed, the pipeline loads (on the CPU) and the
        denoiser maps one input of ``input_shape`` to that shape (:func:`~mlaudit.certify.check_denoiser`).
        Errors name ``where`` (``denoiser``, ``defence.denoiser``)."""
        if not self.path.expanduser().is_dir():
            raise ConfigError(f"{where}.path = {str(self.path)!r} is not a folder: give the local folder of a diffusers "
                              "pipeline saved with pipeline.save_pretrained(path)")
        try:
            require_diffusers()
            den = self.build(sigma)
        except ConfigError as e:
            raise ConfigError(f"{where}.kind ddpm ({where}.path = {str(self.path)!r}): {e}") from None
        check_denoiser(den, input_shape, where=f"{where} (the DDPM in {str(self.path)!r})")


DENOISERS: dict[str, type[DnCNNDenoiser] | type[DDPMDenoiser]] = {"dncnn": DnCNNDenoiser, "ddpm": DDPMDenoiser}


def parse_denoiser(v: Any, *, where: str = "denoiser",
                   kinds: Mapping[str, type[DnCNNDenoiser] | type[DDPMDenoiser]] = DENOISERS) -> Any:
    """A raw denoiser block (a mapping with a ``kind``, or a bare kind name) becomes the model of its ``kind``
    among ``kinds``; errors name ``<where>.<field>``."""
    if v is None or isinstance(v, tuple(kinds.values())):
        return v
    if isinstance(v, str) and v in kinds:
        v = {"kind": v}
    if not isinstance(v, Mapping):
        raise ValueError(f"{where} must be a mapping with a kind ({', '.join(kinds)}), got {v!r}")
    kind = v.get("kind")
    if kind not in kinds:
        raise ValueError(f"{where}.kind = {kind!r} is not a denoiser; valid: {', '.join(kinds)}")
    cls = kinds[kind]
    try:
        return cls.model_validate(v)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, prefix=where, model=cls)) from None


class CertifyConfig(ExperimentConfig):
    """See the module docstring and docs/certify.md for every field."""

    kind: Literal["certify"] = "certify"
    sigma: float = Field(DEFAULT_SIGMA, gt=0.0, allow_inf_nan=False)
    n0: int = Field(100, ge=1, le=10_000_000)
    n: int = Field(10_000, ge=1, le=100_000_000)
    alpha: float = Field(0.001, gt=0.0, lt=1.0)
    predict_n: int | None = Field(None, ge=1, le=100_000_000)
    """Noise samples of PREDICT per input (None: n)."""
    radii: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    examples: int = Field(500, ge=1, le=1_000_000)
    batch_size: int = Field(1000, ge=1, le=1_000_000)
    """Noisy copies per forward pass."""
    target: TargetModel | None = None
    denoiser: Annotated[DnCNNDenoiser | DDPMDenoiser | None, BeforeValidator(parse_denoiser)] = None
    """Denoised smoothing (Salman et al. 2020): certify f(D(.)) beside f alone."""

    @model_validator(mode="before")
    @classmethod
    def _train_at_sigma(cls, raw: Any) -> Any:
        """Cohen et al. train the base classifier with the noise it is certified at: when mlaudit trains the
        model, ``recipe.noise_sigma`` defaults to ``sigma`` (the resolved config shows it). With a ``denoiser``
        the classifier is an off-the-shelf one (Salman et al.): trained without noise unless the recipe says."""
        if (not isinstance(raw, dict) or raw.get("trainer", "mlaudit") != "mlaudit" or raw.get("target") is not None
                or raw.get("denoiser") is not None):
            return raw
        sigma = raw.get("sigma", DEFAULT_SIGMA)
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (math.isfinite(sigma) and sigma > 0):
            return raw  # the field's own error names it
        recipe = _noise_at_sigma(raw.get("recipe"), float(sigma))
        return raw if recipe is None else {**raw, "recipe": recipe}

    @field_validator("radii")
    @classmethod
    def _radii(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v:
            raise ValueError("radii must list at least one l2 radius, e.g. [0, 0.25, 0.5]")
        bad = [r for r in v if not (math.isfinite(r) and r >= 0)]
        if bad:
            raise ValueError(f"radii must be finite and >= 0, got {bad}")
        if list(v) != sorted(set(v)):
            raise ValueError(f"radii must be ascending without repeats, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _samples(self) -> CertifyConfig:
        if self.n0 >= self.n:
            raise ValueError(f"n0 = {self.n0} must be smaller than n = {self.n} (n0 samples only pick the class, "
                             "n estimate its probability); allowed 1 <= n0 < n")
        least = min_certify_n(self.alpha)
        if self.n < least:
            raise ValueError(f"n = {self.n} is too small for any certificate at alpha = {self.alpha:g}: even with all "
                             f"n votes for one class pA_lower = alpha**(1/n) = {self.alpha ** (1 / self.n):.4g} <= 0.5; "
                             f"the smallest n that can certify is {least} (allowed n >= {least})")
        least_p = min_predict_n(self.alpha)
        if self.predict_n is not None and self.predict_n < least_p:
            raise ValueError(f"predict_n = {self.predict_n} is too small for PREDICT to return a class at alpha = "
                             f"{self.alpha:g}: even with all votes for one class the binomial p-value is 2/2**predict_n "
                             f"= {2 * 0.5 ** self.predict_n:.4g} > alpha; allowed predict_n >= {least_p}")
        if self.predict_n is None and self.n < least_p:
            raise ValueError(f"n = {self.n} is too small for PREDICT (predict_n defaults to n) at alpha = "
                             f"{self.alpha:g}; allowed n >= {least_p}, or set predict_n >= {least_p}")
        return self

    @property
    def predict_samples(self) -> int:
        return self.n if self.predict_n is None else self.predict_n

    @property
    def max_radius(self) -> float:
        """The largest radius any input can be certified at with these n, alpha and sigma."""
        return max_radius(sigma=self.sigma, n=self.n, alpha=self.alpha)


def check_certify(config: CertifyConfig, data: DataBundle) -> None:
    """Runner hook (before anything is written): examples within the test split, the target fits the model."""
    n_test = len(data.test)
    if config.examples > n_test:
        raise ConfigError(f"examples = {config.examples} exceeds the {n_test} examples of {data.name}'s test split; "
                          f"allowed 1 <= examples <= {n_test}")
    if config.target is not None:
        load_target(config, data)
    if config.denoiser is not None:
        shape = tuple(data.input_shape)
        if len(shape) != 3:
            raise ConfigError(f"denoiser.kind {config.denoiser.kind} needs image data [C, H, W]; {data.name} has "
                              f"inputs of shape {list(shape)}")
        if isinstance(config.denoiser, DDPMDenoiser):
            config.denoiser.check(sigma=config.sigma, input_shape=shape)

