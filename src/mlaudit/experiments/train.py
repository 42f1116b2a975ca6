"""Experiment kind ``train``: train N models with one recipe and report clean test accuracy."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from ..errors import TrainingError, TrialError
from ..factory import TrialSpec
from ..report.figures import accuracy_histogram
from ..stats import MeanSE
from .base import ExperimentConfig, ExperimentOutput, register_experiment
from .context import RunContext


class TrainConfig(ExperimentConfig):
    """``trials`` models, each from its own seed (derived from ``seed``); ``save_models`` keeps
    their weights under artifacts/models. A trial whose training fails (a diverged loss) is recorded
    and left out; the others go on and the report says which failed."""

    kind: Literal["train"] = "train"
    trials: int = Field(1, ge=1, le=100_000)
    save_models: bool = True


@register_experiment("train", config=TrainConfig, growable=("trials",))
def run_train(config: TrainConfig, ctx: RunContext) -> ExperimentOutput:
    """Train N models with a recipe; report test accuracy mean ± standard error."""
    data = ctx.load_dataset(config.dataset)
    trials = tuple(TrialSpec(f"model-{i:04d}", seed=config.trial_seed(i)) for i in range(config.trials))
    job = config.factory_job(data, trials, device=ctx.device)
    records = ctx.train(job, save_weights=config.save_models, on_failure="skip")
    if not records:  # every trial failed: nothing to report
        first = next(iter(ctx.failed))
        raise TrialError(first, TrainingError(f"all {config.trials} trials failed; the first: {ctx.failed[first]}"))
    acc = np.array([r["metrics"]["test_accuracy"] for r in records])
    loss = np.array([r["metrics"]["test_loss"] for r in records])
    acc_ms, loss_ms = MeanSE.of(acc), MeanSE.of(loss)
    metrics = {
        "test_accuracy": acc_ms.to_dict(),
        "test_loss": loss_ms.to_dict(),
    }
    rows = [{"trial_id": r["trial_id"], "seed": r["seed"], **r["metrics"], "steps": r["steps"],
             "wall_s": r["wall_s"], "checkpoint": r.get("checkpoint")} for r in records]
    notes = [f"dataset {data.name}: {len(data.train)} train / {len(data.test)} test examples, id {data.id}"]
    if ctx.failed:  # the others went on; the summary is over the trials that finished
        metrics["failed_trials"] = [{"trial_id": t, "error": err} for t, err in ctx.failed.items()]
        notes.insert(0, f"{len(ctx.failed)} of {config.trials} trials failed and are left out of every number "
                        f"here: " + "; ".join(f"{t}: {err}" for t, err in ctx.failed.items())
                     + " (a --resume retries them)")
    return ExperimentOutput(metrics=metrics, trials=rows, figures=_figures(acc), notes=notes)


def _figures(acc: np.ndarray) -> dict:
    return {"Test accuracy across trials": accuracy_histogram(acc)} if len(acc) >= 2 else {}
