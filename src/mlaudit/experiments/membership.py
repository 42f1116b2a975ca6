"""Experiment kind ``membership-inference``: a pool of M models, each trained on a random part of a
data pool of N examples, attacked by every membership-inference attack in leave-one-out fashion
(Carlini et al. 2022, "Membership Inference Attacks From First Principles": each model is the
target once and the other M - 1 models are its shadows), with Truth Serum poisoning (Tramer et al.
2022) and Feldman & Zhang (2020) memorization estimates from the same pool.

Threat model: black-box access to the target's logits on the pool examples (and augmented copies),
knowledge of the recipe and architecture, and shadow models whose memberships the attacker knows.

Inclusion follows the LiRA reference construction
(:func:`mlaudit.attacks.membership.design.inclusion_matrix`): each example is IN for exactly
``int(keep_rate * M)`` models (a random subset per example) and each model holds about
``keep_rate * N`` examples. Saved as ``artifacts/inclusion.npy`` (bool [M, N]) with its sha256.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor

from ..attacks.membership import (
    ATTACKS,
    Observations,
    inclusion_matrix,
    lira_requirements,
    models_needed_exact,
    shadow_coverage,
)
from ..data.base import DataBundle
from ..errors import ConfigError
from ..factory import TrialSpec
from ..query import logits_from_checkpoints, model_template, parse_query
from ..stats import MeanSE
from ..train.loop import resolve_augment
from .base import ExperimentConfig, ExperimentOutput, register_experiment
from .context import RunContext

FIXED_VARIANCE_BELOW = 64
"""Pools with fewer models fit LiRA with one variance per query (Carlini et al. 2022 do so below 64 shadows)."""
LOGITS_MAX_BYTES = 200 * 2**20
"""artifacts/logits.pt is written only when the pool's logits (M * N * A * C * 4 bytes) are smaller."""


class PoolConfig(BaseModel):
    """``models`` M trained on ``data`` (the training split; ``size`` subsamples N examples from it
    with the seed), each example IN for exactly ``int(keep * models)`` of them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: int = Field(16, ge=2, le=4096)
    keep: float = Field(0.5, gt=0.0, lt=1.0)
    data: Literal["train"] = "train"
    size: int | None = Field(None, ge=2)

    @model_validator(mode="after")
    def _counts(self) -> PoolConfig:
        k = int(self.keep * self.models)
        if not 1 <= k <= self.models - 1:
            raise ValueError(f"int(keep * models) = int({self.keep} * {self.models}) = {k} models would hold each "
                             f"example; it must lie in [1, {self.models - 1}] so that every example has IN and OUT "
                             "models: raise models or move keep towards 0.5")
        return self

    @property
    def in_per_example(self) -> int:
        return int(self.keep * self.models)


class TruthSerumConfig(BaseModel):
    """``targets`` pool examples, each poisoned with ``copies`` inserted copies carrying a wrong label."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    targets: int = Field(..., ge=1, le=1_000_000)
    copies: int = Field(8, ge=1, le=10_000)


class TargetConfig(BaseModel):
    """An external model to audit: a state_dict ``checkpoint`` of the config's model (verified against
    ``sha256`` when given) and optionally ``members``, a bool mask over the training split (.npy or .pt)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    checkpoint: Path
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    members: Path | None = None


class MembershipConfig(ExperimentConfig):
    """See the module docstring and docs/membership.md for every field."""

    kind: Literal["membership-inference"] = "membership-inference"
    pool: PoolConfig = PoolConfig()
    attacks: tuple[str, ...] = ("loss", "shokri", "lira-online", "lira-offline")
    attack_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    queries: tuple[str, ...] | Literal["auto"] = "auto"
    fpr_targets: tuple[float, ...] = (1e-5, 1e-3, 1e-2)
    n_boot: int = Field(200, ge=0, le=100_000)
    truth_serum: TruthSerumConfig | None = None
    memorization: bool = True
    target: TargetConfig | None = None

    @field_validator("attacks")
    @classmethod
    def _attacks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError(f"give at least one attack; valid attacks: {', '.join(ATTACKS.names())}")
        if len(set(v)) != len(v):
            raise ValueError(f"attacks must not repeat a name, got {list(v)}")
        for name in v:
            ATTACKS.get(name)  # ConfigError listing the valid names
        return v

    @field_validator("queries")
    @classmethod
    def _queries(cls, v: tuple[str, ...] | str) -> tuple[str, ...] | str:
        if v == "auto":
            return v
        if "identity" not in v or len(set(v)) != len(v):
            raise ValueError(f"queries must include 'identity' and not repeat a name, got {list(v)}")
        for q in v:
            parse_query(q)
        return v

    @field_validator("fpr_targets")
    @classmethod
    def _fprs(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(not 0.0 < t <= 1.0 for t in v):
            raise ValueError(f"fpr_targets must be a non-empty list of rates in (0, 1], got {list(v)}")
        return tuple(sorted(set(v)))

    @model_validator(mode="after")
    def _options(self) -> MembershipConfig:
        extra = sorted(set(self.attack_options) - set(self.attacks))
        if extra:
            raise ValueError(f"attack_options names {extra}, which are not in attacks {list(self.attacks)}")
        for name, opts in self.attack_options.items():
            fn = ATTACKS.get(name)
            try:
                inspect.signature(fn).bind(None, 0, **opts)
            except TypeError:
                allowed = list(inspect.signature(fn).parameters)[2:]
                raise ValueError(f"attack_options.{name} = {opts} has options {name} does not take; it takes "
                                 f"{', '.join(allowed) or 'none'}") from None
        return self

    def options_for(self, name: str) -> dict[str, Any]:
        """``attack_options[name]``; an attack's ``seed`` defaults to the config's, LiRA's ``variance`` to
        ``fixed`` for pools of fewer than :data:`FIXED_VARIANCE_BELOW` models (Carlini et al. 2022,
        Sec. VI-A), else ``per-example``."""
        opts = dict(self.attack_options.get(name, {}))
        if "seed" in inspect.signature(ATTACKS.get(name)).parameters:
            opts.setdefault("seed", self.seed)
        if name in ("lira-online", "lira-offline"):
            opts.setdefault("variance", "fixed" if self.pool.models < FIXED_VARIANCE_BELOW else "per-example")
        return opts

    @property
    def resolved_attack_options(self) -> dict[str, dict[str, Any]]:
        return {name: self.options_for(name) for name in self.attacks}


def pool_indices(config: MembershipConfig, n_train: int) -> Tensor:
    """int64 [N] ascending: the training-split rows that form the data pool."""
    size = config.pool.size
    if size is None or size == n_train:
        return torch.arange(n_train)
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([config.seed, 1]).generate_state(1)[0]))
    return torch.randperm(n_train, generator=g)[:size].sort().values


def resolve_queries(config: MembershipConfig, data: DataBundle) -> tuple[str, ...]:
    """The queries used: as configured, or for ``auto`` ``identity`` plus ``flip`` when training
    mirrors the images (the LiRA queries mirror the training augmentation; digits are not flipped
    in training, so they get ``identity`` only). Non-identity queries need image data."""
    if config.queries != "auto":
        if not data.is_image and config.queries != ("identity",):
            raise ConfigError(f"queries {list(config.queries)} augment images, but {data.name} holds vectors of "
                              f"shape {list(data.input_shape)}; use queries: [identity] (or auto)")
        return tuple(config.queries)
    aug = resolve_augment(config.recipe, data.name, data.input_shape)
    return ("identity", "flip") if aug is not None and aug.flip else ("identity",)


def attack_requirements(name: str, options: dict[str, Any]) -> tuple[int, int]:
    """Fewest (IN, OUT) leave-one-out shadows per example an attack needs (LiRA only; others use
    the shadows in aggregate)."""
    if name in ("lira-online", "lira-offline"):
        return lira_requirements(online=name == "lira-online", variance=options.get("variance", "per-example"))
    return 0, 0


def check_membership(config: MembershipConfig, data: DataBundle) -> None:
    """Runner hook (before anything is written): pool size, queries for this data, shadow coverage
    of every attack, Truth Serum target count, and the external target's files."""
    n_train = len(data.train)
    if config.pool.size is not None and config.pool.size > n_train:
        raise ConfigError(f"pool.size = {config.pool.size} exceeds the {n_train} examples of {data.name}'s training "
                          "split; lower it or drop it to use the whole split")
    resolve_queries(config, data)
    n = config.pool.size or n_train
    keep = inclusion_matrix(config.pool.models, n, keep=config.pool.keep, seed=config.seed)
    for name in config.attacks:
        r_in, r_out = attack_requirements(name, config.options_for(name))
        cov = shadow_coverage(keep, min_in=r_in, min_out=r_out)
        if cov["examples_without_in"] or cov["examples_without_out"]:
            need = models_needed_exact(config.pool.keep, r_in, r_out)
            raise ConfigError(
                f"attack {name} needs >= {r_in} IN and >= {r_out} OUT shadow models for every example of every "
                f"target, but with pool.models = {config.pool.models} and pool.keep = {config.pool.keep}, "
                f"{cov['examples_without_in']} of {n} examples lack IN shadows and {cov['examples_without_out']} "
                f"lack OUT shadows (fewest: {cov['min_in']} IN, {cov['min_out']} OUT); set pool.models >= {need}"
                + (" or attack_options: {" + name + ": {variance: fixed}}" if r_in > 1 or r_out > 1 else ""))
    if config.truth_serum is not None and config.truth_serum.targets > n:
        raise ConfigError(f"truth_serum.targets = {config.truth_serum.targets} exceeds the pool's {n} examples")
    if config.target is not None:
        from .membership_audit import load_target

        load_target(config, data)


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def train_pool(config: MembershipConfig, ctx: RunContext, data: DataBundle, keep: Tensor, rows: Tensor, *,
                prefix: str, role: str, view: Any = None) -> list[dict[str, Any]]:
    """Train the M pool models (model m on the pool rows where keep[m]); a view's inserted
    examples are in every model. Returns the runner's records."""
    n_train, extra = len(data.train), (view.num_inserted if view is not None else 0)
    trials = []
    for m in range(config.pool.models):
        mask = torch.zeros(n_train + extra, dtype=torch.bool)
        mask[rows[keep[m]]] = True
        mask[n_train:] = True
        trials.append(TrialSpec(f"{prefix}-{m:04d}", seed=config.trial_seed(m), mask=mask,
                                view=role if view is not None else None, tags={"role": role, "model": m}))
    views = {role: view} if view is not None else None
    job = config.factory_job(data, trials, device=ctx.device, views=views)
    return ctx.train(job, save_weights=True, label=f"training the {role} models")


def pool_logits(config: MembershipConfig, ctx: RunContext, data: DataBundle, records: list[dict[str, Any]],
                x: Tensor, queries: tuple[str, ...]) -> Tensor:
    """Logits float32 [M, N, A, C] of the recorded models on ``x`` [N, *shape] (checkpoints verified
    against their sha256)."""
    paths = [ctx.out_dir / r["checkpoint"] for r in records]
    return logits_from_checkpoints(functools.partial(model_template, config.model, data), paths, x, queries=queries,
                                   device=ctx.device, sha256=[r.get("sha256") for r in records])


@register_experiment("membership-inference", config=MembershipConfig, check=check_membership)
def run_membership(config: MembershipConfig, ctx: RunContext) -> ExperimentOutput:
    """Membership inference on a model pool: LOSS, Shokri, LiRA; Truth Serum; memorization."""
    from . import membership_report as rep

    data = ctx.load_dataset(config.dataset)
    rows = pool_indices(config, len(data.train))
    n, m = rows.numel(), config.pool.models
    keep = inclusion_matrix(m, n, keep=config.pool.keep, seed=config.seed)
    ctx.artifacts.mkdir(parents=True, exist_ok=True)
    np.save(ctx.artifacts / "inclusion.npy", keep.numpy())
    if n < len(data.train):
        np.save(ctx.artifacts / "pool_indices.npy", rows.numpy())
    queries = resolve_queries(config, data)
    records = train_pool(config, ctx, data, keep, rows, prefix="pool", role="pool")
    x, y = data.train.x[rows], data.train.y[rows]
    obs = Observations(pool_logits(config, ctx, data, records, x, queries), y, keep, queries)
    if obs.logits.numel() * 4 < LOGITS_MAX_BYTES:
        torch.save({"logits": obs.logits, "labels": y, "keep": keep, "queries": list(queries)},
                   ctx.artifacts / "logits.pt")
    scores, diag = rep.score_pool(obs, config.attacks, options=config.resolved_attack_options)
    np.savez_compressed(ctx.artifacts / "scores.npz", **{k: v.numpy() for k, v in scores.items()})
    metrics: dict[str, Any] = {name: rep.attack_metrics(s, keep, config) for name, s in scores.items()}
    acc = np.array([r["metrics"]["test_accuracy"] for r in records])
    metrics["pool"] = {"models": m, "examples": n, "in_per_example": config.pool.in_per_example,
                       "queries": list(queries), "attack_options": config.resolved_attack_options,
                       "inclusion_sha256": _sha256(keep.numpy()),
                       "test_accuracy": MeanSE.of(acc).to_dict()}
    metrics["diagnostics"] = {"nonfinite_clipped": diag}
    out = rep.base_report(config, data, obs, scores, metrics, records)
    if config.memorization:
        test_logits = pool_logits(config, ctx, data, records, data.test.x, ("identity",))
        out = rep.add_memorization(out, config, obs, scores=scores, test_logits=test_logits, data=data, rows=rows,
                                   artifacts=ctx.artifacts)
    if config.truth_serum is not None:
        from .membership_audit import run_truth_serum

        out = run_truth_serum(out, config, ctx, data, keep=keep, rows=rows, before=scores, queries=queries)
    if config.target is not None:
        from .membership_audit import audit_target

        out = audit_target(out, config, ctx, data, obs, rows)
    return out
