"""Experiment kind ``dp-audit``: an empirical lower bound on the epsilon of a training pipeline that
claims (epsilon, delta)-differential privacy (Jagielski et al. 2020, "Auditing Differentially Private
Machine Learning"; Nasr et al. 2021, "Adversary Instantiation"; the distinguishing game of seed 000).

The game: D = the training split, D' = D + {canary}. ``models_per_side`` models are trained on D'
(side "in") and as many on D (side "out"), each with its own seed. Every model is scored on the
canary (black box: its cross-entropy loss on the canary's input and label; a low loss says "in").
Each side is split at random into two halves; the threshold is chosen on the first halves and the
false positives (out-models called in) and false negatives on the second halves give, through
Clopper-Pearson upper bounds on FPR and FNR at level ``1 - confidence``,

    eps_LB = max(ln((1 - delta - FNR_hi) / FPR_hi), ln((1 - delta - FPR_hi) / FNR_hi), 0),

which holds with probability >= ``confidence``. An eps_LB above the claimed epsilon refutes the claim.

Threat model: the auditor chooses the datasets (inserts the canary), runs the trainer many times
and sees the final models' losses on the canary (black box); nothing about the intermediate steps.

Trainers: ``mlaudit`` (the factory, with the recipe's DP-SGD; ``dp.sample_rate`` is fixed to
batch_size / len(D) when not given, so D and D' run the very same mechanism), or a user's
``"package.module:function"`` ``train(dataset: TensorDataset, seed: int) -> nn.Module``, called
sequentially on D and D' (the claim is then ``claimed_epsilon``, which must be given).
"""

from __future__ import annotations

import time
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator

from ..attacks.membership.query import logits_from_checkpoints
from ..data.base import DataBundle
from ..data.view import DataView
from ..errors import ConfigError
from ..factory import TrialSpec
from ..models.registry import build_model
from ..privacy.dpsgd import check_dp_model
from ..stats import MeanSE
from ..train.recipe import Recipe
from .base import ExperimentConfig, ExperimentOutput, register_experiment
from .context import RunContext
from .dp_audit_canary import (
    CANARIES,
    MIN_USEFUL_EPS,
    TRAINER_PATTERN,
    Canary,
    Distinguisher,
    best_possible_bound,
    canary_loss,
    distinguish,
    load_trainer,
    models_needed,
    with_canary,
)


class DPAuditConfig(ExperimentConfig):
    """See the module docstring and docs/dp_audit.md for every field."""

    kind: Literal["dp-audit"] = "dp-audit"
    canary: str = "mislabeled"
    models_per_side: int = Field(100, ge=2, le=100_000)
    trainer: str = "mlaudit"
    confidence: float = Field(0.95, gt=0.0, lt=1.0)
    claimed_epsilon: float | None = Field(None, gt=0.0)
    claimed_delta: float | None = Field(None, gt=0.0, lt=1.0)
    save_models: bool = False

    @field_validator("canary")
    @classmethod
    def _canary(cls, v: str) -> str:
        CANARIES.get(v)  # ConfigError listing the valid canaries
        return v

    @field_validator("trainer")
    @classmethod
    def _trainer(cls, v: str) -> str:
        if v != "mlaudit" and not TRAINER_PATTERN.match(v):
            raise ValueError(f"trainer must be 'mlaudit' or 'package.module:function', got {v!r}")
        return v

    @model_validator(mode="after")
    def _claim(self) -> DPAuditConfig:
        if self.trainer == "mlaudit" and self.recipe.dp is None:
            raise ValueError("trainer mlaudit audits the recipe's DP-SGD, but the recipe has no dp; add e.g. "
                             "recipe: {name: fast, dp: {epsilon: 1.0, delta: 1.0e-5, clip: 1.0}}")
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


def check_dp_audit(config: DPAuditConfig, data: DataBundle) -> None:
    """Runner hook (before anything is written): the user's trainer imports; the canary can be
    made; a DP-SGD model has no BatchNorm."""
    if config.trainer != "mlaudit":
        load_trainer(config.trainer)
    CANARIES.get(config.canary)(data.train, seed=config.seed)
    if config.trainer == "mlaudit":
        with torch.random.fork_rng(devices=[]):
            check_dp_model([build_model(config.model, input_shape=data.input_shape, num_classes=data.num_classes)])


def _train_mlaudit(config: DPAuditConfig, ctx: RunContext, data: DataBundle, canary: Canary
                   ) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Factory-trained models of both sides; returns canary losses (in, out) and their records."""
    cfg = config.model_copy(update={"recipe": config.audited_recipe(len(data.train))})
    view = DataView.identity(data.train).with_inserted(canary.x, [canary.y])
    m = config.models_per_side
    trials = [TrialSpec(f"in-{i:05d}", seed=config.trial_seed(i, stream=1), view="canary", tags={"side": "in"})
              for i in range(m)]
    trials += [TrialSpec(f"out-{i:05d}", seed=config.trial_seed(i, stream=2), tags={"side": "out"}) for i in range(m)]
    job = cfg.factory_job(data, trials, device=ctx.device, views={"canary": view})
    records = ctx.train(job, save_weights=True, label="training the audited models")
    def template() -> torch.nn.Module:
        with torch.random.fork_rng(devices=[]):
            return build_model(config.model, input_shape=data.input_shape, num_classes=data.num_classes)

    # the shared query path: checkpoints loaded (weights only, hash-checked) and evaluated in stacks
    logits = logits_from_checkpoints(template, [ctx.out_dir / r["checkpoint"] for r in records], canary.x,
                                     device=ctx.device, sha256=[r.get("sha256") for r in records])[:, 0, 0]
    losses = F.cross_entropy(logits, torch.full((len(records),), canary.y), reduction="none").tolist()
    if not config.save_models:
        for r in records:
            (ctx.out_dir / r["checkpoint"]).unlink(missing_ok=True)
    return np.array(losses[:m]), np.array(losses[m:]), records


def _train_user(config: DPAuditConfig, ctx: RunContext, data: DataBundle, canary: Canary
                ) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Models of the user's trainer, called sequentially (no resume); losses (in, out) and rows."""
    fn = load_trainer(config.trainer)
    d_out, d_in = data.train, with_canary(data.train, canary)
    task = ctx.progress.task("training the audited models (user trainer)", total=2 * config.models_per_side)
    out: dict[str, list[float]] = {"in": [], "out": []}
    rows = []
    try:
        for side, ds, stream in (("in", d_in, 1), ("out", d_out, 2)):
            for i in range(config.models_per_side):
                seed = config.trial_seed(i, stream=stream)
                t0 = time.perf_counter()
                model = fn(ds, seed)
                if not isinstance(model, torch.nn.Module):
                    raise ConfigError(f"trainer {config.trainer!r} returned {type(model).__name__}, not a "
                                      "torch.nn.Module")
                wall = time.perf_counter() - t0
                ctx.cost.models_trained += 1
                ctx.cost.train_wall_s += wall
                loss = canary_loss(model, canary, device="cpu" if not _on_cuda(model) else ctx.device)
                out[side].append(loss)
                rows.append({"trial_id": f"{side}-{i:05d}", "seed": seed, "tags": {"side": side}, "metrics": {},
                             "wall_s": wall})
                ctx.progress.advance(task)
    finally:
        ctx.progress.done(task)
    return np.array(out["in"]), np.array(out["out"]), rows


def _on_cuda(model: torch.nn.Module) -> bool:
    p = next(iter(model.parameters()), None)
    return p is not None and p.is_cuda


def _summary(v: np.ndarray) -> dict[str, float]:
    return {**MeanSE.of(v).to_dict(), "min": float(v.min()), "median": float(np.median(v)), "max": float(v.max())}


@register_experiment("dp-audit", config=DPAuditConfig, check=check_dp_audit)
def run_dp_audit(config: DPAuditConfig, ctx: RunContext) -> ExperimentOutput:
    """Audit a DP training pipeline: an empirical epsilon lower bound beside the claimed epsilon."""
    data = ctx.load_dataset(config.dataset)
    canary = CANARIES.get(config.canary)(data.train, seed=config.seed)
    mlaudit = config.trainer == "mlaudit"
    loss_in, loss_out, records = (_train_mlaudit if mlaudit else _train_user)(config, ctx, data, canary)
    res = distinguish(loss_in, loss_out, delta=config.delta, confidence=config.confidence, seed=config.seed)
    ctx.artifacts.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(ctx.artifacts / "canary_losses.npz", loss_in=loss_in, loss_out=loss_out)
    dp_eps = [r["metrics"]["dp_epsilon"] for r in records if "dp_epsilon" in r["metrics"]]
    accountant_eps = max(dp_eps) if dp_eps else None
    recipe_dp = config.audited_recipe(len(data.train)).dp
    claimed = config.claimed_epsilon or (recipe_dp.epsilon if recipe_dp is not None else None) or accountant_eps
    metrics: dict[str, Any] = {
        "claimed_epsilon": claimed,
        "epsilon_lower_bound": res.epsilon_lower_bound,
        "confidence": config.confidence,
        "models": 2 * config.models_per_side,
        "models_per_side": config.models_per_side,
        "delta": config.delta,
        "claim_refuted": bool(claimed is not None and res.epsilon_lower_bound > claimed),
        "best_possible_lower_bound": best_possible_bound(config.models_per_side, delta=config.delta,
                                                         confidence=config.confidence),
        "fp": res.fp, "fn": res.fn, "n_neg": res.n_neg, "n_pos": res.n_pos,
        "test_accuracy_of_attack": res.accuracy,
        "threshold": res.threshold,
        "selection_lower_bound": res.selection_bound,
        "canary_loss_in": _summary(loss_in),
        "canary_loss_out": _summary(loss_out),
        "canary": {"type": config.canary, "source_index": canary.source_index, "source_label": canary.source_label,
                   "label": canary.y},
        "trainer": config.trainer,
    }
    if accountant_eps is not None:
        metrics["accountant_epsilon"] = accountant_eps
        metrics["noise_multiplier"] = records[0]["metrics"].get("dp_noise_multiplier")
    if mlaudit and recipe_dp is not None:
        metrics["sample_rate"] = recipe_dp.sample_rate
    rows = [{"trial_id": r["trial_id"], "seed": r["seed"], "side": r["tags"]["side"], "canary_loss": float(v),
             **{k: v2 for k, v2 in r["metrics"].items() if k in ("test_accuracy", "dp_epsilon")},
             "checkpoint": r.get("checkpoint") if config.save_models else None}
            for r, v in zip(records, np.concatenate([loss_in, loss_out]))]  # both trainers: all "in", then "out"
    notes = [f"D = {data.name} training split ({len(data.train)} examples); D' adds the canary: training example "
             f"{canary.source_index} (label {canary.source_label}) relabelled {canary.y}",
             f"eps_LB {res.epsilon_lower_bound:.3f} vs claimed {claimed}: FP {res.fp}/{res.n_neg}, FN "
             f"{res.fn}/{res.n_pos} on the held-out halves, confidence {config.confidence}"]
    return ExperimentOutput(metrics=metrics, trials=rows, figures=_figures(loss_in, loss_out, res), notes=notes)


def _figures(loss_in: np.ndarray, loss_out: np.ndarray, res: Distinguisher) -> dict:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.2))
    ax = fig.add_subplot()
    lo = np.log10(np.clip(np.concatenate([loss_in, loss_out]), 1e-12, None))
    bins = np.linspace(lo.min(), lo.max() + 1e-9, 30)
    ax.hist(np.log10(np.clip(loss_out, 1e-12, None)), bins=bins, alpha=0.6, label="out (trained on D)")
    ax.hist(np.log10(np.clip(loss_in, 1e-12, None)), bins=bins, alpha=0.6, label="in (trained on D')")
    if np.isfinite(res.threshold) and res.threshold > 0:
        ax.axvline(np.log10(res.threshold), color="k", ls="--", lw=1, label="threshold")
    ax.set_xlabel("log10 canary loss")
    ax.set_ylabel("models")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return {"Canary loss of the models trained with and without it": fig}
