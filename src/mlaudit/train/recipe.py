"""Training recipes: validated, frozen descriptions of *how* a model is trained.

A recipe is data, not code: optimizer, learning-rate schedule, epochs, batch size, augmentation,
weight decay, label smoothing, precision. Named presets live in :data:`RECIPES`; a config may name
one (``recipe: fast``) or override fields of one (``recipe: {name: witches-brew, epochs: 20}``).

Presets
-------
``witches-brew``
    The victim recipe of Geiping et al., "Witches' Brew" (ICLR 2021), seed 002 section 1.7.3:
    SGD with Nesterov momentum 0.9, lr 0.1 for residual nets and 0.01 otherwise (``lr: auto``),
    batch 128, weight decay 5e-4, 40 epochs, lr divided by 10 at epochs 14, 24 and 35, random crop
    with 4-pixel padding and horizontal flips.
``fast``
    A few epochs of SGD-Nesterov with a triangular (warm-up then linear decay) schedule; for shadow
    models, tests and the demo. Augmentation follows the dataset (``augment: auto``).
``airbench``
    The many-model CIFAR-10 recipe for the ``fastcnn`` architecture, in the spirit of Jordan's
    airbench (2024): large batch, label smoothing 0.2, triangular schedule, flip + 2-pixel translate.
``airbench-muon``
    The recipe of airbench94 with Muon (Jordan 2024, arXiv:2404.00498 and its Muon variant) for the
    ``airbench`` architecture: 8 epochs of batch 2000; Muon (lr 0.24, Nesterov momentum 0.6) for the
    convolution filters; Nesterov SGD (momentum 0.85) for the BatchNorm shifts and the whitening bias
    (lr 0.053; the whitening bias only for the first 3 epochs) and for the head (lr 0.67), on the loss
    summed over the batch (``loss_reduction: sum``, so these rates are per example and survive a change
    of batch size); weight decay 0.004 per step at full lr (coefficients ``0.004 / lr``); linear
    decay to zero; label smoothing 0.2; alternating flip and
    2-pixel reflect-padded translation; test-time augmentation with flips and 1-pixel translations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..config import format_validation_error
from ..craft.constraints import box_width
from ..data.augment import AugmentSpec
from ..errors import ConfigError
from ..registry import Registry

AugmentConfig = AugmentSpec
"""The recipe's augmentation field: the data package's :class:`~mlaudit.data.augment.AugmentSpec`."""


class DPNormConfig(BaseModel):
    """Privately estimated normalisation statistics (``recipe.dp.normalisation``; Tramèr & Boneh 2021's
    data-dependent option, :mod:`mlaudit.privacy.normstats`), for models built with ``norm: dp-stats``.

    Before DP-SGD, each training example's per-channel mean feature vector (clipped to l2 norm
    ``clip_mean``) and per-channel second-moment vector (clipped to ``clip_second``) are summed over the
    training set and released with Gaussian noise of std ``sigma_norm * clip``: two releases, composed with
    DP-SGD's steps by the accountant. ``sigma_norm`` is ``noise_multiplier`` when given; otherwise it is set
    by ``share`` (default 0.1, in (0, 1)): the smallest sigma_norm at which the two releases alone would cost
    ``share * dp.epsilon`` at dp.delta. DP-SGD's sigma is then calibrated so that the composition of both
    meets dp.epsilon. ``share`` needs ``dp.epsilon``; with ``dp.noise_multiplier`` give ``noise_multiplier``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    share: float | None = None
    noise_multiplier: float | None = None
    clip_mean: float = 1.0
    clip_second: float = 1.0

    @model_validator(mode="after")
    def _ranges(self) -> DPNormConfig:
        where = "dp.normalisation"
        if self.share is not None and not (0.0 < self.share < 1.0):
            raise ValueError(f"{where}.share = {self.share} is outside the allowed range 0 < share < 1 (the part of "
                             "dp.epsilon spent on the statistics)")
        if self.noise_multiplier is not None and not (0.0 <= self.noise_multiplier <= MAX_NORM_NOISE):
            raise ValueError(f"{where}.noise_multiplier = {self.noise_multiplier} is outside the allowed range "
                             f"0 <= noise_multiplier <= {MAX_NORM_NOISE:g} (0: exact clipped statistics, no privacy)")
        if self.share is not None and self.noise_multiplier is not None:
            raise ValueError(f"give one of {where}.share and {where}.noise_multiplier, got share={self.share} and "
                             f"noise_multiplier={self.noise_multiplier}")
        for name in ("clip_mean", "clip_second"):
            v = getattr(self, name)
            if not (0.0 < v < math.inf):
                raise ValueError(f"{where}.{name} = {v} is outside the allowed range 0 < {name} < inf (an l2 bound "
                                 "on one example's per-channel statistics)")
        return self

    @property
    def resolved_share(self) -> float | None:
        """The budget share (default :data:`DEFAULT_NORM_SHARE`), or None when sigma_norm is given."""
        return None if self.noise_multiplier is not None else (self.share if self.share is not None
                                                               else DEFAULT_NORM_SHARE)


DEFAULT_NORM_SHARE = 0.1
"""Default part of dp.epsilon for the normalisation statistics (``dp.normalisation.share``)."""
MAX_NORM_NOISE = 1e4
"""Largest ``dp.normalisation.noise_multiplier`` accepted."""


class DPConfig(BaseModel):
    """DP-SGD options of a recipe (Abadi et al. 2016; see :mod:`mlaudit.privacy.dpsgd`).

    Give exactly one of ``epsilon`` (sigma is then calibrated at train start for the run's q, steps
    and delta) and ``noise_multiplier`` (sigma itself). ``sample_rate`` q defaults to
    batch_size / n_examples; ``allow_large_delta`` accepts delta >= 1/n (otherwise refused).
    ``clipping`` picks how per-example gradients are clipped (the same clipped sum either way):
    ``per-example`` materialises every example's gradient with torch.func; ``fast`` uses book-keeping
    with ghost norms (:mod:`mlaudit.privacy.fastclip`: one forward and one backward of the batch) or
    raises an error naming the first layer without a rule; ``auto`` is ``fast`` when every layer has a
    rule, else ``per-example``. The fast path applies to the ``loop`` stack layout (dp-audit's
    gradient canary and broken fixtures included); the ``vmap`` layout always uses the per-example
    path. DP steps run in float32 unless the recipe's ``precision`` is ``bf16`` (``auto`` keeps
    float32 under DP): then the fast path's forward runs under bf16 autocast.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    clip: float = Field(1.0, gt=0.0)
    epsilon: float | None = Field(None, gt=0.0)
    noise_multiplier: float | None = Field(None, ge=0.0)
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    accountant: Literal["rdp", "prv"] = "rdp"
    sample_rate: float | None = Field(None, gt=0.0, le=1.0)
    allow_large_delta: bool = False
    clipping: Literal["auto", "per-example", "fast"] = "auto"
    normalisation: DPNormConfig | None = None

    @model_validator(mode="after")
    def _one_of(self) -> DPConfig:
        if (self.epsilon is None) == (self.noise_multiplier is None):
            raise ValueError("give exactly one of dp.epsilon (target budget; sigma is calibrated) and "
                             f"dp.noise_multiplier (sigma), got epsilon={self.epsilon}, "
                             f"noise_multiplier={self.noise_multiplier}")
        norm = self.normalisation
        if norm is not None and norm.resolved_share is not None and self.epsilon is None:
            raise ValueError(f"dp.normalisation.share = {norm.resolved_share} splits dp.epsilon, but the recipe gives "
                             f"dp.noise_multiplier = {self.noise_multiplier}; give dp.normalisation.noise_multiplier "
                             "instead (>= 0)")
        if norm is not None and norm.noise_multiplier == 0 and self.epsilon is not None:
            raise ValueError(f"dp.normalisation.noise_multiplier = 0 releases the statistics without noise, so no "
                             f"dp.epsilon = {self.epsilon} can hold; allowed: noise_multiplier > 0, or a share in (0, 1)")
        return self


class AdversarialConfig(BaseModel):
    """Adversarial training (``recipe.adversarial``; :mod:`mlaudit.train.adversarial`): ``steps`` PGD
    steps of size ``step_size`` (default 2.5 eps / steps) in the ``norm`` ball of radius ``eps`` (pixel
    units) inside the pixel ``box``.

    ``method: pgd`` is PGD-AT (Madry et al. 2018): train on PGD examples of the cross-entropy, from a
    random start in the ball. ``method: trades`` is TRADES (Zhang et al. 2019, eq. 5): train on
    CE(clean) + ``beta`` * KL(clean || adversarial), the adversarial point a PGD maximiser of the KL from
    x + 0.001 N(0, I). ``beta`` (> 0, default 6.0, the paper's CIFAR-10 value) is TRADES' only; it stays
    unset (None) for pgd, and giving it there is an error naming the field.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["pgd", "trades"] = "pgd"
    eps: float = Field(..., gt=0.0)
    norm: Literal["linf", "l2"] = "linf"
    steps: int = Field(7, ge=1, le=1000)
    step_size: float | None = Field(None, gt=0.0)
    box: tuple[float, float] = (0.0, 1.0)
    beta: float | None = Field(None, gt=0.0, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _default_beta(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("method") == "trades" and data.get("beta") is None:
            return {**data, "beta": TRADES_BETA}
        return data

    @model_validator(mode="after")
    def _ranges(self) -> AdversarialConfig:
        width = box_width(self.box, where="adversarial.box")
        if not math.isfinite(self.eps) or (self.norm == "linf" and self.eps > width):
            raise ValueError(f"adversarial.eps {self.eps} is outside the pixel range; allowed 0 < eps <= {width:g} "
                             "for norm linf")
        if self.method != "trades" and self.beta is not None:
            raise ValueError(f"adversarial.beta = {self.beta:g} is the TRADES weight of the KL term and applies to "
                             f"method trades only, got method {self.method}; drop beta or use method: trades")
        return self


TRADES_BETA = 6.0
"""Default TRADES weight beta (Zhang et al. 2019: 6.0 for CIFAR-10, where 1/lambda in eq. 5 = beta)."""


class ParamGroup(BaseModel):
    """Options for the parameters whose names match ``match`` (``fnmatch`` pattern, e.g. ``head.*``,
    ``*.norm?.bias``). The first matching group wins; unset options fall back to the recipe's. With
    ``epochs`` the group's learning rate follows the recipe's schedule stretched to that many epochs
    and is zero (the parameters stay fixed) afterwards."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    match: str = Field(min_length=1)
    optimizer: Literal["sgd", "muon"] | None = None
    lr: float | None = Field(None, gt=0.0)
    momentum: float | None = Field(None, ge=0.0, lt=1.0)
    weight_decay: float | None = Field(None, ge=0.0, le=1.0)
    epochs: float | None = Field(None, gt=0.0)


class Recipe(BaseModel):
    """How to train one model. All fields are validated; see the module docstring for presets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "custom"
    optimizer: Literal["sgd", "adam", "muon"] = "sgd"
    lr: float | Literal["auto"] = Field(0.1)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0.0, le=1.0)
    epochs: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(128, ge=1, le=65_536)
    schedule: Literal["constant", "step", "triangular", "cosine"] = "step"
    milestones: tuple[int, ...] = ()
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    warmup_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    final_lr_fraction: float = Field(0.0, ge=0.0, le=1.0)
    augment: AugmentConfig | Literal["auto", "none"] = "auto"
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    channels_last: bool = True
    eval_batch_size: int = Field(1024, ge=1)
    loss_reduction: Literal["mean", "sum"] = "mean"
    param_groups: tuple[ParamGroup, ...] = ()
    tta: Literal["none", "flip", "flip-translate"] = "none"
    compile: bool | Literal["auto"] = False
    """On CUDA, the loop layout's forward runs through one shared ``torch.compile``d call (inductor fuses the
    normalisation and pointwise kernels); with ``cuda_graph`` the graph captures the compiled step. ``auto``: the
    factory decides per job by a timed probe (:class:`mlaudit.factory.layout.CompileProbe`, which compiles in a
    background thread while the first chunks train eagerly: faster by 3% and the same probe losses within 10%);
    outside the factory (``train_stack`` called directly) ``auto`` does not compile. With ``dp`` (book-keeping
    clipping), ``true`` compiles the norms, clip factors and clipped sums instead (the forward stays eager;
    :mod:`mlaudit.privacy.dpsgd`), and ``auto`` probes them the same way (per-example clipping: not compiled)."""
    cuda_graph: bool | Literal["auto"] = "auto"
    """On CUDA, replay each training step as a CUDA graph (:mod:`mlaudit.train.graphed`): the batch is gathered
    and augmented eagerly, the forward, backward and optimizer update launch as one graph. With ``dp`` only the
    book-keeping step in the loop layout is graphed (the Poisson draw, augmentation and noise stay eager; one
    graph per slot bucket; :mod:`mlaudit.privacy.dpsgd`), and steps with audit hooks stay eager. ``auto``:
    wherever it applies (CUDA, an optimizer without host state: not Adam; not DP-SGD, whose graphed
    step is opt-in with ``true`` until it has run on a GPU), falling back to the eager step with a warning if a model cannot be captured; ``true`` refuses
    Adam and per-example DP-SGD; ``false``: eager."""
    dp: DPConfig | None = None
    adversarial: AdversarialConfig | None = None
    noise_sigma: float = Field(0.0, ge=0.0, allow_inf_nan=False)
    """Gaussian data augmentation (Cohen et al. 2019, randomized smoothing): each training input, after
    augmentation, gets noise N(0, noise_sigma^2 I) added (in input units); 0 = none."""

    @field_validator("lr")
    @classmethod
    def _lr_positive(cls, v: float | str) -> float | str:
        if isinstance(v, float) and not (v > 0 and math.isfinite(v)):
            raise ValueError(f"lr must be a positive finite number or 'auto', got {v}")
        return v

    @model_validator(mode="after")
    def _milestones_in_range(self) -> Recipe:
        bad = [m for m in self.milestones if not 0 < m <= self.epochs]
        if bad:
            raise ValueError(f"milestones must lie in [1, epochs={self.epochs}], got {list(self.milestones)}")
        if list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must be increasing, got {list(self.milestones)}")
        return self

    @model_validator(mode="after")
    def _groups_need_sgd_or_muon(self) -> Recipe:
        if self.param_groups and self.optimizer == "adam":
            raise ValueError("param_groups work with optimizer sgd or muon, got adam")
        if self.dp is not None and (self.optimizer == "muon" or self.param_groups or self.loss_reduction != "mean"):
            raise ValueError("DP-SGD (recipe.dp) uses one optimizer for every parameter and the mean loss: use "
                             "optimizer sgd or adam without param_groups, loss_reduction mean")
        if self.dp is not None and self.adversarial is not None:
            raise ValueError("recipe.dp and recipe.adversarial cannot be combined (DP-SGD draws its own Poisson "
                             "batches); drop one")
        if self.noise_sigma > 0 and (self.dp is not None or self.adversarial is not None):
            raise ValueError(f"recipe.noise_sigma = {self.noise_sigma} (Gaussian noise training) cannot be combined with "
                             f"recipe.{'dp' if self.dp is not None else 'adversarial'}; allowed: noise_sigma 0 there")
        return self

    def resolved_lr(self, *, residual: bool) -> float:
        """The learning rate, resolving ``auto`` as seed 002 does: 0.1 for residual nets, else 0.01."""
        if self.lr == "auto":
            return 0.1 if residual else 0.01
        return float(self.lr)


PresetFn = Callable[[], dict[str, Any]]
RECIPES: Registry[PresetFn] = Registry("recipe")


@RECIPES.register("witches-brew")
def _witches_brew() -> dict[str, Any]:
    return dict(optimizer="sgd", lr="auto", momentum=0.9, nesterov=True, weight_decay=5e-4, epochs=40,
                batch_size=128, schedule="step", milestones=(14, 24, 35), gamma=0.1,
                augment=AugmentConfig(crop_pad=4, flip=True))


@RECIPES.register("fast")
def _fast() -> dict[str, Any]:
    return dict(optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, epochs=12,
                batch_size=64, schedule="triangular", warmup_fraction=0.2, augment="auto")


@RECIPES.register("airbench")
def _airbench() -> dict[str, Any]:
    return dict(optimizer="sgd", lr=0.2, momentum=0.85, nesterov=True, weight_decay=5e-4, epochs=10,
                batch_size=512, schedule="triangular", warmup_fraction=0.2, label_smoothing=0.2,
                augment=AugmentConfig(crop_pad=2, flip=True))


@RECIPES.register("airbench-muon")
def _airbench_muon() -> dict[str, Any]:
    decay = 0.004  # the weight-decay shrink per step at full learning rate
    bias_lr, head_lr = 0.053, 0.67  # per example: the loss is summed over the batch
    return dict(optimizer="muon", lr=0.24, momentum=0.6, nesterov=True, weight_decay=0.0, epochs=8,
                batch_size=2000, loss_reduction="sum", schedule="triangular", warmup_fraction=0.0, final_lr_fraction=0.0,
                label_smoothing=0.2, augment=AugmentConfig(crop_pad=2, flip="alternating", pad_mode="reflect"),
                tta="flip-translate", eval_batch_size=2000,
                param_groups=(ParamGroup(match="whiten.bias", optimizer="sgd", lr=bias_lr, momentum=0.85,
                                         weight_decay=decay / bias_lr, epochs=3),
                              ParamGroup(match="*.bias", optimizer="sgd", lr=bias_lr, momentum=0.85,
                                         weight_decay=decay / bias_lr),
                              ParamGroup(match="head.weight", optimizer="sgd", lr=head_lr, momentum=0.85,
                                         weight_decay=decay / head_lr)))


def resolve_recipe(value: str | dict[str, Any] | Recipe) -> Recipe:
    """A recipe from a preset name, a mapping ``{name: preset, **overrides}`` or a :class:`Recipe`.

    When ``epochs`` is overridden but ``milestones`` is not, the preset's milestones are scaled
    to the new length (40 epochs at 14/24/35 becomes 20 epochs at 7/12/18).
    """
    if isinstance(value, Recipe):
        return value
    overrides: dict[str, Any] = {"name": value} if isinstance(value, str) else dict(value)
    name = overrides.get("name", "custom")
    base: dict[str, Any] = RECIPES.get(name)() if name != "custom" else {}
    if "epochs" in overrides and "milestones" not in overrides and base.get("milestones"):
        scale = overrides["epochs"] / base["epochs"]
        ms = sorted({max(1, min(overrides["epochs"], round(m * scale))) for m in base["milestones"]})
        base["milestones"] = tuple(ms) if isinstance(overrides["epochs"], int) else base["milestones"]
    try:
        return Recipe(**{**base, **overrides, "name": name})
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, prefix="recipe")) from None


def lr_at(recipe: Recipe, base_lr: float, progress: float) -> float:
    """Learning rate at ``progress`` = epochs done (a float, e.g. 3.5 = halfway through epoch 4)."""
    return base_lr * _SCHEDULES[recipe.schedule](recipe, progress)


def _constant(r: Recipe, t: float) -> float:
    return 1.0


def _step(r: Recipe, t: float) -> float:
    return r.gamma ** sum(1 for m in r.milestones if t >= m)


def _triangular(r: Recipe, t: float) -> float:
    frac = t / r.epochs
    if r.warmup_fraction > 0 and frac < r.warmup_fraction:
        return frac / r.warmup_fraction
    span = 1.0 - r.warmup_fraction
    return 1.0 - (1.0 - r.final_lr_fraction) * (frac - r.warmup_fraction) / span


def _cosine(r: Recipe, t: float) -> float:
    frac = min(t / r.epochs, 1.0)
    return r.final_lr_fraction + (1 - r.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * frac))


_SCHEDULES: dict[str, Callable[[Recipe, float], float]] = {
    "constant": _constant, "step": _step, "triangular": _triangular, "cosine": _cosine,
}
