"""``dp-audit`` with ``design: one-run``: the audit of Steinke, Nasr & Jagielski, "Privacy Auditing with One
(1) Training Run" (NeurIPS 2023), the statistics in :mod:`mlaudit.audit.one_run`.

Protocol. ``canaries`` = m canaries (:data:`mlaudit.audit.canaries.CANARY_SETS`, e.g. m distinct training
examples each with its own wrong label) are drawn once from ``seed``. Each of ``runs`` = R training runs
inserts every canary independently with probability 1/2 (run j's bits from (seed, j) alone) into the
training split and trains one model through the factory (the recipe's DP-SGD with ``dp.sample_rate``
fixed, as in the game, or the user's trainer). Every canary is scored on its run's model (``score: loss``,
black box: its cross-entropy; ``score: gradient``, white box: the update along its gradient at the
initialisation; low = "in"). Each run guesses "in" for the k_pos canaries of lowest score and "out" for
the k_neg of highest, abstaining on the rest (``guesses: {k_pos, k_neg}``), or for each of a few (k, k)
(``guesses: sweep``, Bonferroni-corrected); the correct guesses of all runs are pooled into one bound on
R m canaries, which holds with probability >= ``confidence``.

Threat model: as the game's, but the auditor sees one model per run, and the (eps, delta) claim is
applied to each canary's inclusion (adding or removing one example). Runs are resumable and growable
(``--grow --set runs=R'``: run j's seed, canaries and inclusion bits do not depend on R).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from ..audit.canaries import CANARY_SETS, CanarySet
from ..audit.one_run import OneRunAudit, audit, draw_inclusion
from ..audit.scores import canary_losses, dirac_update_scores, input_update_scores
from ..data.base import DataBundle
from ..data.view import DataView
from ..errors import TrainingError, TrialError
from ..factory import TrialSpec
from ..query import logits_from_checkpoints, model_template
from ..report.html import ReportTable
from ..stats import describe
from ..train.checkpoint import load_checkpoint
from ..train.hooks import BROKEN, DPStepHooks
from .base import ExperimentOutput, Stream
from .context import RunContext, TrialRecord
from .dp_audit_config import DPAuditConfig

log = logging.getLogger(__name__)


def make_canary_set(config: DPAuditConfig, data: DataBundle) -> CanarySet:
    """The configured canaries (a ConfigError when the training split cannot provide that many)."""
    assert config.canaries is not None
    if config.canary == "dirac":
        return CANARY_SETS.get("dirac")(data.train, m=config.canaries, seed=config.seed,
                                        model_fn=lambda: model_template(config.model, data))
    return CANARY_SETS.get(config.canary)(data.train, m=config.canaries, seed=config.seed)


def check_one_run(config: DPAuditConfig, data: DataBundle) -> None:
    """Runner hook, before anything is written: the canaries can be drawn, and a warning when even
    all-correct guesses could not show the claim."""
    make_canary_set(config, data)
    claim = config.claimed_epsilon or (config.recipe.dp.epsilon if config.recipe.dp is not None else None)
    best = config.one_run_best_reachable()
    if claim is not None and best <= claim:
        log.warning("dp-audit one-run: with canaries = %s, guesses %s and runs = %s no outcome can refute the claim "
                    "eps = %g: even all guesses correct give a lower bound of %.3g at confidence %s; raise canaries "
                    "or runs", config.canaries, config.guesses_label, config.runs, claim, best, config.confidence)


def _train(config: DPAuditConfig, ctx: RunContext, data: DataBundle, cset: CanarySet, included: np.ndarray
           ) -> list[TrialRecord]:
    """One model per run on the training split plus that run's included canaries; failed runs are dropped."""
    cfg = config.model_copy(update={"recipe": config.audited_recipe(len(data.train))})
    base = DataView.identity(data.train)
    views = {f"run-{j:05d}": base.with_inserted(cset.x[torch.as_tensor(inc)], cset.y[torch.as_tensor(inc)])
             for j, inc in enumerate(included)}
    hooks = DPStepHooks(broken=config.broken) if config.user_trainer is None and config.broken is not None else None

    def run_hooks(inc: np.ndarray) -> DPStepHooks | None:
        """Dirac canaries: the k-th included canary is the k-th inserted placeholder (virtual index n + k)."""
        if not cset.gradients:
            return hooks
        n = len(data.train)
        mine = tuple(replace(cset.gradients[i], index=n + k) for k, i in enumerate(np.flatnonzero(inc).tolist()))
        return DPStepHooks(broken=config.broken, gradient_canaries=mine)

    trials = [TrialSpec(f"run-{j:05d}", seed=config.trial_seed(j, stream=Stream.DP_IN), view=f"run-{j:05d}",
                        tags={"side": "one-run", "run": j}, hooks=run_hooks(inc)) for j, inc in enumerate(included)]
    records = ctx.train(cfg.factory_job(data, trials, device=ctx.device, views=views), save_weights=True,
                        label="training the one-run audit models", on_failure="skip")
    if not records:
        first = next(iter(ctx.failed))
        raise TrialError(first, TrainingError(f"all {len(trials)} one-run audit models failed to train; the "
                                              f"first: {ctx.failed[first]}"))
    return records


def _scores(config: DPAuditConfig, ctx: RunContext, data: DataBundle, cset: CanarySet,
            records: list[TrialRecord]) -> np.ndarray:
    """Every canary's score on its run's model [runs, m] (low = "in"), kept in the run store."""
    def model_fn() -> torch.nn.Module:
        return model_template(config.model, data)

    def compute(recs: list[TrialRecord]) -> list[list[float]]:  # from the checkpoints, weights-only and hash-checked
        paths = [ctx.out_dir / r["checkpoint"] for r in recs]
        sha = [r.get("sha256") for r in recs]
        if cset.gradients:  # Dirac canaries: the final update along each canary's coordinate (low = in)
            rows = [dirac_update_scores(model_fn, r["seed"], load_checkpoint(p, sha256=h), cset.gradients,
                                        device=ctx.device) for r, p, h in zip(recs, paths, sha)]
        elif config.resolved_score == "gradient":
            rows = [input_update_scores(model_fn, r["seed"], load_checkpoint(p, sha256=h), cset.x, cset.y,
                                        device=ctx.device) for r, p, h in zip(recs, paths, sha)]
        else:
            logits = logits_from_checkpoints(model_fn, paths, cset.x, device=ctx.device, sha256=sha)
            rows = list(canary_losses(logits[:, :, 0], cset.y))
        return [[float(v) for v in row] for row in rows]

    kept = ctx.derived(records, key=f"one-run:{config.canary}:{config.resolved_score}", compute=compute,
                       keep_weights=config.save_models)
    return np.asarray(kept, dtype=float)


def run_one_run_audit(config: DPAuditConfig, ctx: RunContext) -> ExperimentOutput:
    """The one-run audit (module docstring): an epsilon lower bound from one (or a few) training runs."""
    data = ctx.load_dataset(config.dataset)
    cset = make_canary_set(config, data)
    m, planned = len(cset), int(config.runs or 1)
    included = np.stack([draw_inclusion(m, seed=config.seed, run=j) for j in range(planned)])
    records = _train(config, ctx, data, cset, included)
    stat = _scores(config, ctx, data, cset, records)
    inc = included[[int(r["tags"]["run"]) for r in records]]
    res = audit(-stat, inc, choices=config.guess_choices, delta=config.delta, confidence=config.confidence)
    ctx.write_artifact("canary_scores.npz", lambda f: np.savez_compressed(
        f, score=stat, included=inc, source_index=cset.source_index, label=cset.y.numpy(),
        runs=np.array([int(r["tags"]["run"]) for r in records]), score_kind=np.array(config.resolved_score)))

    dp_eps = [r["metrics"]["dp_epsilon"] for r in records if "dp_epsilon" in r["metrics"]]
    accountant_eps = max(dp_eps) if dp_eps else None
    recipe_dp = config.audited_recipe(len(data.train)).dp
    claimed = config.claimed_epsilon or (recipe_dp.epsilon if recipe_dp is not None else None) or accountant_eps
    refuted = bool(claimed is not None and res.epsilon_lower_bound > claimed)
    metrics: dict[str, Any] = {
        "design": "one-run",
        "claimed_epsilon": claimed,
        "epsilon_lower_bound": res.epsilon_lower_bound,
        "confidence": config.confidence,
        "claim_refuted": refuted,
        "delta": config.delta,
        "best_possible_lower_bound": res.best_reachable,
        "canaries": m, "runs": planned, "models": len(records),
        "m": res.m, "r": res.r, "v": res.v, "k_pos": res.k_pos, "k_neg": res.k_neg,
        "accuracy_of_guesses": res.v / res.r if res.r else None,
        "included": int(inc.sum()),
        "guesses": config.guesses_label, "choices": len(res.rows), "level": res.level,
        "sweep": [{"k_pos": g.k_pos, "k_neg": g.k_neg, "r": g.r, "v": g.v, "bound": g.bound,
                   "best_possible": g.best_reachable, "fdp_bound": g.fdp_bound} for g in res.rows],
        # Mahloujifar et al. 2025: the claim read as the Gaussian mechanism calibrated to (eps, delta); it does not
        # decide claim_refuted (a DP but non-Gaussian mechanism is not refuted by it)
        "fdp_epsilon_lower_bound": res.fdp_epsilon_lower_bound,
        "score": config.resolved_score,
        "canary_score_in": describe(stat[inc]), "canary_score_out": describe(stat[~inc]),
        "canary": {"type": config.canary, **{k: v for k, v in cset.details.items() if k != "type"}},
        "trainer": config.trainer,
        "broken": config.broken,
    }
    if accountant_eps is not None:
        metrics["accountant_epsilon"] = accountant_eps
        metrics["noise_multiplier"] = records[0]["metrics"].get("dp_noise_multiplier")
    if config.trainer == "mlaudit" and recipe_dp is not None:
        metrics["sample_rate"] = recipe_dp.sample_rate
    rows = [{"trial_id": r["trial_id"], "seed": r["seed"], "run": r["tags"]["run"], "included": int(i.sum()),
             **{k: v for k, v in r["metrics"].items() if k in ("test_accuracy", "dp_epsilon")},
             "checkpoint": r.get("checkpoint") if config.save_models else None} for r, i in zip(records, inc)]
    notes = [_verdict(res, claimed, refuted)]
    notes += ctx.failed_note(metrics, what="one-run audit model(s)", effect=(
        f"are left out: the bound pools the {len(records)} runs that trained ({res.m} canaries)"))
    notes += [f"D = {data.name} training split ({len(data.train)} examples); {m} canaries ({_describe(cset)}), each "
              f"inserted with probability 1/2 in each of {len(records)} run(s): {int(inc.sum())} inserted in all",
              f"score: {config.resolved_score} ({'black box' if config.resolved_score == 'loss' else 'white box'}); "
              f"each run guesses 'in' for the k_pos lowest scores and 'out' for the k_neg highest; guesses "
              f"{config.guesses_label}" + (f", each at confidence {res.level:.4g} (Bonferroni over {len(res.rows)})"
                                           if len(res.rows) > 1 else "")]
    if claimed is not None and res.best_reachable <= claimed:
        notes.append(f"even all {res.r} guesses correct could show at most {res.best_reachable:.3f} <= the claim "
                     f"{claimed:g}: this audit cannot refute it; raise canaries or runs")
    if config.broken is not None:
        notes.append(f"DELIBERATELY BROKEN DP-SGD (audit fixture {config.broken!r}): {BROKEN[config.broken]}")
    table = ReportTable("One-run guesses per (k_pos, k_neg), pooled over runs",
                        ["k_pos", "k_neg", "guesses r", "correct v", "eps lower bound", "best possible"],
                        [[g.k_pos, g.k_neg, g.r, g.v, g.bound, g.best_reachable] for g in res.rows],
                        note=f"each bound at confidence {res.level:.4g}; the audit reports the largest")
    return ExperimentOutput(metrics=metrics, trials=rows, tables=[table], notes=notes)


def _verdict(res: OneRunAudit, claimed: float | None, refuted: bool) -> str:
    head = f"one-run eps lower bound {res.epsilon_lower_bound:.3f} at {res.confidence:.0%}"
    counts = f"{res.v} of {res.r} guesses correct on {res.m} canaries in {res.runs} run(s)"
    if claimed is None:
        return f"{head} ({counts})"
    return f"{head} vs claimed {claimed:g}: {'REFUTED' if refuted else 'not refuted'} ({counts})"


def _describe(c: CanarySet) -> str:
    if c.details.get("type") == "mislabeled":
        return "distinct training examples, each inserted once more with its own wrong label"
    return str(c.details.get("type", "canaries"))
