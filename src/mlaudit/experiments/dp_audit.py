"""Experiment kind ``dp-audit``: an empirical lower bound on the epsilon of a training pipeline that
claims (epsilon, delta)-differential privacy (Jagielski et al. 2020, "Auditing Differentially Private
Machine Learning"; Nasr et al. 2021, "Adversary Instantiation"; the distinguishing game of seed 000).

The game: D = the training split, D' = D + {canary}. ``models_per_side`` models are trained on D'
(side "in") and as many on D (side "out"), each with its own seed. Every model is scored on the
canary (``score: loss``, black box: its cross-entropy loss on the canary's input and label;
``score: gradient``, white box: its parameter update along the canary's gradient direction, see
:mod:`mlaudit.audit.scores`); a low score says "in". Each side is split at random into two halves; the
threshold is chosen on the first halves and the false positives (out-models called in) and false
negatives on the second halves give, through Clopper-Pearson upper bounds on FPR and FNR at level
``1 - confidence``,

    eps_LB = max(ln((1 - delta - FNR_hi) / FPR_hi), ln((1 - delta - FPR_hi) / FNR_hi), 0),

which holds with probability >= ``confidence``. An eps_LB above the claimed epsilon refutes the claim.

Threat model: the auditor chooses the datasets (inserts the canary), runs the trainer many times
and sees the final models: their losses on the canary (black box), or their weights and
initialisations (white box, ``score: gradient``); nothing about the intermediate steps. The
gradient canary (Nasr et al. 2023's Dirac canary) also lets the auditor add an arbitrary clipped
gradient to the steps in which the canary is sampled.

Canaries: ``mislabeled``, ``crafted`` (input space, ClipBKD-style) and ``gradient`` (Dirac, white
box); see :mod:`mlaudit.audit.canaries`. ``broken`` selects a deliberately broken DP-SGD
(:data:`mlaudit.privacy.dpsgd.BROKEN`), a fixture that shows the audit catches a real bug.

``design: one-run`` replaces the game with the one-run audit of Steinke, Nasr & Jagielski (NeurIPS 2023):
many canaries, each inserted with probability 1/2, in one (or a few) training runs
(:mod:`.dp_audit_one_run`, :mod:`mlaudit.audit.one_run`).

Trainers: ``mlaudit`` (the factory, with the recipe's DP-SGD; ``dp.sample_rate`` is fixed to
batch_size / len(D) when not given, so D and D' run the very same mechanism), or the user's own
``"package.module:function"`` (:mod:`mlaudit.train.trainer`), run through the same run store (resume,
cost, process and Ray executors); the claim is then ``claimed_epsilon``, which must be given.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..audit.canaries import CANARIES, Canary
from ..audit.game import best_possible_bound, distinguish
from ..audit.gdp import dpsgd_mu_clt, eps_from_mu, gdp_best_threshold, gdp_estimate
from ..audit.scores import update_scores
from ..data.base import DataBundle
from ..data.view import DataView
from ..errors import ConfigError, TrainingError, TrialError
from ..factory import TrialSpec
from ..query import logits_from_checkpoints, model_template
from ..report.figures import canary_score_histogram
from ..stats import describe
from ..train.checkpoint import load_checkpoint
from ..train.hooks import BROKEN, DPStepHooks, GradientCanary
from .base import ExperimentOutput, Stream, register_experiment
from .context import RunContext, TrialRecord
from .dp_audit_config import DPAuditConfig
from .dp_audit_one_run import check_one_run, run_one_run_audit


def check_dp_audit(config: DPAuditConfig, data: DataBundle) -> None:
    """Runner hook (before anything is written; the runner's preflight has already imported and checked a
    user's trainer and the DP recipe: no BatchNorm, a reachable epsilon): an input canary can be made."""
    if len(data.train.classes) < 2:
        raise ConfigError(f"dp-audit needs >= 2 classes, dataset {data.name} has {len(data.train.classes)}")
    if config.design == "one-run":
        check_one_run(config, data)
    elif config.canary == "mislabeled":  # cheap; crafted and gradient canaries are optimised / measured at run
        CANARIES.get(config.canary)(data.train, seed=config.seed)


def _model_fn(config: DPAuditConfig, data: DataBundle) -> Callable[[], torch.nn.Module]:
    """Builds the audited architecture exactly as the factory does (so seeded inits agree), without
    touching the global RNG (:func:`mlaudit.query.model_template`)."""
    return functools.partial(model_template, config.model, data)


def make_canary(config: DPAuditConfig, data: DataBundle, device: str | torch.device = "cpu") -> Canary:
    """The configured canary (the gradient canary for the audited model, with the mlaudit trainer)."""
    model_fn = _model_fn(config, data) if config.trainer == "mlaudit" else None
    return CANARIES.get(config.canary)(data.train, seed=config.seed, model_fn=model_fn, device=device)


def _cached_canary(config: DPAuditConfig, ctx: RunContext, data: DataBundle) -> Canary:
    """The canary, made once per run: a resumed run reloads it (a crafted canary is optimised)."""
    kept = ctx.load_cached("canary")
    if kept is not None:
        tensors, meta = kept
        g = meta.pop("gradient")
        return Canary(tensors["x"], gradient=GradientCanary(**g) if g else None, **meta)
    c = make_canary(config, data, device=ctx.device if config.user_trainer is None else "cpu")
    g = c.gradient
    ctx.save_cached("canary", {"x": c.x}, {"y": c.y, "source_index": c.source_index, "source_label": c.source_label,
                                           "details": c.details, "gradient": None if g is None else {
                                               "index": g.index, "parameter": g.parameter, "coordinate": g.coordinate}})
    return c


def _train(config: DPAuditConfig, ctx: RunContext, data: DataBundle, canary: Canary
           ) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Models of both sides (the factory's DP-SGD or the user's trainer, through the run store);
    returns the canary score of each record and the records (every "in" model, then every "out" one). A
    model whose training fails is dropped from its side (``ctx.failed``); a side left with fewer than
    2 models (one per half of the game) fails the run."""
    cfg = config.model_copy(update={"recipe": config.audited_recipe(len(data.train))})
    views = {"canary": DataView.identity(data.train).with_inserted(canary.x, [canary.y])}
    hooks = None  # the audit hooks live in mlaudit's DP-SGD step: explicit per trial
    # white-box score of a Dirac canary: training reports theta_T[j] - theta_0[j] itself (hooks.watch), so no model
    # is saved, reloaded or re-initialised to score it (on the H200 those took ~60 ms a model; 2000 in an audit)
    g = canary.gradient
    watch = (g.parameter, g.coordinate) if g is not None and config.resolved_score == "gradient" else None
    if config.user_trainer is None and (g is not None or config.broken is not None):
        hooks = (DPStepHooks(gradient_canary=g, broken=config.broken, watch=watch),
                 DPStepHooks(broken=config.broken, watch=watch))
    m = config.models_per_side
    trials = [TrialSpec(f"in-{i:05d}", seed=config.trial_seed(i, stream=Stream.DP_IN), view="canary",
                        tags={"side": "in"}, hooks=hooks[0] if hooks else None) for i in range(m)]
    trials += [TrialSpec(f"out-{i:05d}", seed=config.trial_seed(i, stream=Stream.DP_OUT), tags={"side": "out"},
                         hooks=hooks[1] if hooks else None) for i in range(m)]
    job = cfg.factory_job(data, trials, device=ctx.device, views=views)
    watched = watch is not None and hooks is not None
    records = ctx.train(job, save_weights=config.save_models or not watched, label="training the audited models",
                        on_failure="skip")
    for side in ("in", "out"):
        if sum(r["tags"]["side"] == side for r in records) < 2:
            lost = [t for t in ctx.failed if t.startswith(f"{side}-")]
            raise TrialError(lost[0], TrainingError(
                f"{len(lost)} of the {m} {side!r} models failed to train, and the distinguishing game needs >= 2 "
                f"per side (a selection and a test half); the first: {ctx.failed[lost[0]]}"))

    def scores(recs: list[TrialRecord]) -> list[float]:  # from the checkpoints, weights-only and hash-checked
        paths = [ctx.out_dir / r["checkpoint"] for r in recs]
        sha = [r.get("sha256") for r in recs]
        if config.resolved_score == "gradient":
            new = update_scores(_model_fn(config, data), [r["seed"] for r in recs],
                                lambda i: load_checkpoint(paths[i], sha256=sha[i]), canary, device=ctx.device)
        else:
            logits = logits_from_checkpoints(_model_fn(config, data), paths, canary.x, device=ctx.device, sha256=sha)
            new = F.cross_entropy(logits[:, 0, 0], torch.full((len(recs),), canary.y), reduction="none").numpy()
        return [float(v) for v in np.asarray(new, dtype=float)]

    # each model's score is kept in the store, so a resumed or grown run never retrains or rescores it; a watched
    # update recorded by training is the score itself (records of an older run without it are scored from weights)
    direct = [r["metrics"].get("dp_watch_update") if watched else None for r in records]
    rest = [r for r, d in zip(records, direct, strict=True) if d is None]
    kept = iter(ctx.derived(rest, key=f"score:{config.canary}:{config.resolved_score}", compute=scores,
                            keep_weights=config.save_models) if rest else [])
    return np.asarray([d if d is not None else next(kept) for d in direct], dtype=float), records


# model i of each side has seed trial_seed(i, stream) whatever models_per_side is, and one-run run j its seed,
# canaries and inclusion bits whatever runs is, so an audit can grow
@register_experiment("dp-audit", config=DPAuditConfig, check=check_dp_audit, growable=("models_per_side", "runs"))
def run_dp_audit(config: DPAuditConfig, ctx: RunContext) -> ExperimentOutput:
    """Audit a DP training pipeline: an empirical epsilon lower bound beside the claimed epsilon."""
    if config.design == "one-run":
        return run_one_run_audit(config, ctx)
    data = ctx.load_dataset(config.dataset)
    mlaudit = config.trainer == "mlaudit"
    init_note = ""
    if config.worst_case_init is not None:
        config, init_note = _with_worst_case_init(config, ctx, data)
    canary = _cached_canary(config, ctx, data)
    score = config.resolved_score
    scores, records = _train(config, ctx, data, canary)
    side = np.array([r["tags"]["side"] for r in records])
    s_in, s_out = scores[side == "in"], scores[side == "out"]
    res = distinguish(s_in, s_out, delta=config.delta, confidence=config.confidence, seed=config.seed)
    ctx.write_artifact("canary_scores.npz",
                       lambda f: np.savez_compressed(f, score_in=s_in, score_out=s_out, score=np.array(score)))
    if score == "loss":
        ctx.write_artifact("canary_losses.npz", lambda f: np.savez_compressed(f, loss_in=s_in, loss_out=s_out))
    dp_eps = [r["metrics"]["dp_epsilon"] for r in records if "dp_epsilon" in r["metrics"]]
    accountant_eps = max(dp_eps) if dp_eps else None
    recipe_dp = config.audited_recipe(len(data.train)).dp
    claimed = config.claimed_epsilon or (recipe_dp.epsilon if recipe_dp is not None else None) or accountant_eps
    metrics: dict[str, Any] = {
        "claimed_epsilon": claimed,
        "epsilon_lower_bound": res.epsilon_lower_bound,
        "confidence": config.confidence,
        "models": len(records),
        "models_per_side": config.models_per_side,
        "models_in": int(s_in.size), "models_out": int(s_out.size),
        "delta": config.delta,
        "claim_refuted": bool(claimed is not None and res.epsilon_lower_bound > claimed),
        "best_possible_lower_bound": best_possible_bound(s_in.size, delta=config.delta, confidence=config.confidence,
                                                         models_out=s_out.size),
        "fp": res.fp, "fn": res.fn, "n_neg": res.n_neg, "n_pos": res.n_pos,
        "test_accuracy_of_attack": res.accuracy,
        "threshold": res.threshold,
        "selection_lower_bound": res.selection_bound,
        "score": score,
        "canary_score_in": describe(s_in),
        "canary_score_out": describe(s_out),
        "canary": {"type": config.canary, "source_index": canary.source_index, "source_label": canary.source_label,
                   "label": canary.y, **{k: v for k, v in canary.details.items() if k != "type"}},
        "trainer": config.trainer,
        "broken": config.broken,
    }
    if score == "loss":
        metrics["canary_loss_in"], metrics["canary_loss_out"] = metrics["canary_score_in"], metrics["canary_score_out"]
    if accountant_eps is not None:
        metrics["accountant_epsilon"] = accountant_eps
        metrics["noise_multiplier"] = records[0]["metrics"].get("dp_noise_multiplier")
    metrics["gdp"] = _gdp_metrics(res, records, config)
    # Annamalai & De Cristofaro's estimator (threshold on all models, no held-out half): only to compare with
    # their published numbers, never the audit's bound
    metrics["gdp_best_threshold_all_models"] = gdp_best_threshold(s_in, s_out, delta=config.delta,
                                                                   alpha=1.0 - config.confidence)
    sampled = [r["metrics"]["dp_canary_sampled"] for r in records if "dp_canary_sampled" in r["metrics"]]
    if sampled:
        metrics["canary_sampled_steps"] = describe(np.array(sampled))
    if mlaudit and recipe_dp is not None:
        metrics["sample_rate"] = recipe_dp.sample_rate
    key = "canary_loss" if score == "loss" else "canary_score"
    rows = [{"trial_id": r["trial_id"], "seed": r["seed"], "side": r["tags"]["side"], key: float(v),
             **{k: v2 for k, v2 in r["metrics"].items() if k in ("test_accuracy", "dp_epsilon", "dp_canary_sampled", "stack_layout")},
             "checkpoint": r.get("checkpoint") if config.save_models else None}
            for r, v in zip(records, scores)]
    notes = ctx.failed_note(metrics, what="audit model(s)", effect=(
        f"are dropped from their side, leaving {s_in.size} 'in' and {s_out.size} 'out' models of "
        f"{config.models_per_side} each"))
    notes += [f"D = {data.name} training split ({len(data.train)} examples); D' adds the canary: {_describe(canary)}",
             f"score: {score} ({'black box' if score == 'loss' else 'white box'}); low score = 'in'",
             f"eps_LB {res.epsilon_lower_bound:.3f} vs claimed {claimed}: FP {res.fp}/{res.n_neg}, FN "
             f"{res.fn}/{res.n_pos} on the held-out halves, confidence {config.confidence}"]
    notes.append(_gdp_note(metrics["gdp"]))
    b = metrics["gdp_best_threshold_all_models"]
    notes.append(f"for comparison with Annamalai & De Cristofaro 2024 only (their estimator: the best of every "
                 f"threshold on all {s_in.size} + {s_out.size} models, no held-out half, so not a bound at "
                 f"{config.confidence:.0%}): mu >= {b['mu_lower']:.3f}, eps {b['eps_lower_from_mu']:.3f} at delta "
                 f"{config.delta:g} (FP {b['fp']}/{b['n_neg']}, FN {b['fn']}/{b['n_pos']})")
    if config.worst_case_init is not None:
        notes.append(init_note)
        metrics["worst_case_init"] = {"epochs": config.worst_case_init.epochs, "checkpoint": str(config.model.init),
                                      "recipe": (config.worst_case_init.recipe or config.recipe).name,
                                      "sha256": config.model.init_sha256}
    if config.broken is not None:
        notes.append(f"DELIBERATELY BROKEN DP-SGD (audit fixture {config.broken!r}): {BROKEN[config.broken]}")
    figures = canary_score_histogram(s_in, s_out, res.threshold, score)
    return ExperimentOutput(metrics=metrics, trials=rows, figures=figures, notes=notes)


def _with_worst_case_init(config: DPAuditConfig, ctx: RunContext, data: DataBundle) -> tuple[DPAuditConfig, str]:
    """Train the non-private initialisation of ``worst_case_init`` (one model, through the run store, so a
    resumed run reuses it) on the training split, which holds no canary (the canary enters "in" models through
    a view); returns the config with ``model.init`` set to its checkpoint (sha256-pinned) and a report line."""
    assert config.worst_case_init is not None
    epochs = config.worst_case_init.epochs
    base = config.worst_case_init.recipe or config.recipe
    recipe = base.model_copy(update={"dp": None, "epochs": epochs})
    job = config.model_copy(update={"recipe": recipe}).factory_job(
        data, [TrialSpec("worst-case-init", seed=config.trial_seed(0, stream=Stream.MODELS), tags={"role": "init"})],
        device=ctx.device)
    rec = ctx.train(job, save_weights=True, label="pre-training the worst-case initialisation (no DP)")[0]
    path = (ctx.out_dir / rec["checkpoint"]).resolve()
    model = config.model.model_copy(update={"init": str(path), "init_sha256": rec.get("sha256")})
    acc = rec["metrics"].get("test_accuracy")
    note = (f"worst-case initialisation (Annamalai & De Cristofaro 2024): every audited model starts from one model "
            f"trained without DP for {epochs} epochs on the training split (no canary), recipe "
            f"{'worst_case_init.recipe' if config.worst_case_init.recipe is not None else 'the audited one without dp'}"
            + (f", test accuracy {acc:.3f}" if acc is not None else "") + f"; weights {rec['checkpoint']}")
    return config.model_copy(update={"model": model}), note


def _gdp_metrics(res: Any, records: list[dict[str, Any]], config: DPAuditConfig) -> dict[str, Any]:
    """Gaussian-DP reading (:mod:`mlaudit.audit.gdp`, Nasr et al. 2023) of the game's held-out errors: the same
    threshold and FP / FN counts as ``epsilon_lower_bound``; with mlaudit's DP-SGD also the accountant's
    parameters through the CLT approximation of mu (``accountant_mu_clt``) and the eps it gives at delta."""
    out: dict[str, Any] = gdp_estimate(res.fp, res.fn, res.n_neg, res.n_pos, delta=config.delta,
                                       confidence=config.confidence, threshold=res.threshold).to_dict()
    m = records[0]["metrics"] if records else {}
    q, steps, sigma = m.get("dp_sample_rate"), m.get("dp_steps"), m.get("dp_noise_multiplier")
    if q and steps is not None and sigma:
        mu = dpsgd_mu_clt(sample_rate=q, steps=int(steps), noise_multiplier=sigma)
        out |= {"accountant_mu_clt": mu, "eps_from_accountant_mu_clt": eps_from_mu(mu, config.delta),
                "steps": int(steps)}
    return out


def _gdp_note(g: dict[str, Any]) -> str:
    """The report line of the Gaussian-DP estimate."""
    line = (f"Gaussian-DP: mu >= {g['mu_lower']:.3f} ({g['confidence']:.0%}; point estimate {g['mu_point']:.3f}), "
            f"i.e. eps >= {g['eps_lower_from_mu']:.3f} at delta {g['delta']:g} if the mechanism's trade-off is "
            f"Gaussian; same threshold and held-out FP {g['fp']}/{g['n_neg']}, FN {g['fn']}/{g['n_pos']}")
    if "accountant_mu_clt" in g:
        line += (f"; the accountant's mu ~ {g['accountant_mu_clt']:.3f} (CLT approximation, eps "
                 f"{g['eps_from_accountant_mu_clt']:.3f} at that delta)")
    return line


def _describe(c: Canary) -> str:
    d = c.details
    if c.gradient is not None:
        return (f"a Dirac gradient canary on {c.gradient.parameter}[{c.gradient.coordinate}] (flat index; gradient "
                f"energy {d.get('gradient_energy', 0.0):.3g} vs mean {d.get('mean_gradient_energy', 0.0):.3g})")
    if d.get("type") == "blank":
        return f"the all-zero input labelled {c.y} ({d.get('label_rule', '')})"
    if d.get("type") == "crafted":
        return (f"a crafted input (ClipBKD-style, {d['pixels_on']} of its values > 0.5) labelled {c.y}; "
                f"second-moment quotient {d['quotient']:.3g} (training images: {d['quotient_mean_example']:.3g})")
    return f"training example {c.source_index} (label {c.source_label}) relabelled {c.y}"
