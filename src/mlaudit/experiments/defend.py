"""Experiment kind ``defend``: a poisoning study with a defence (issue 17, deliverables 4-6): does the
defence stop the attack, at what cost in clean accuracy, and does it beat chance?

The study is a ``backdoor`` or a ``targeted-poison`` attack block (``attack``, told apart by its method)
run exactly as those kinds run it (:meth:`.defend_config.DefendConfig.study`: their poisoners, poison
cache, scenarios, victims and checks): one poisoned training set for a backdoor, one per scenario for a
targeted attack. ``victims`` models are trained from scratch on each poisoned set without a defence
(their attack success is the "without" number). Then, by ``defence.method``:

* **a filtering defence** (``spectral``, ``outlier``, ``activation-clustering``, ``knn``;
  :mod:`mlaudit.defences`): the first victim of each poisoned set is the defender's model (trained on
  the poisoned data, as in Tran et al. and Chen et al.); the training rows are mapped to its
  penultimate features, the filter removes rows (``rate`` of each class), and the removal is compared
  with random filtering at the same per-class counts (expected poisons removed, and the chance of
  removing as many at random). ``victims`` fresh models (the same seeds) are retrained on the filtered
  set: attack success and clean accuracy "with" the defence. The removal is kept under
  ``artifacts/defences/`` so a resumed run filters exactly the same rows.
* **dpa** (Deep Partition Aggregation, :mod:`mlaudit.certify.partition`): ``k`` models, model i trained
  through the factory on the rows of the poisoned set whose content hash falls in partition i (one
  job of k masked trials per poisoned set); the plurality vote is the defended classifier: its attack
  success, its clean accuracy and certified accuracy against r poisoned samples on the test split, and
  the fraction of the attacked inputs whose certificate covers this poison (its size as insertions
  plus removals; a modified row counts 2).
* **ndt** (noise, denoise, train, classify; seed 004, :mod:`mlaudit.certify.ndt`): ``models`` M models,
  model i trained through the factory (one job of M trials per poisoned set) on the poisoned set with
  fresh N(0, sigma^2 I) noise (its own seed) added to every training input, then denoised (``denoiser``:
  none, a DnCNN trained on the poisoned set's inputs, or a local diffusers DDPM one-shot at t*, loaded
  once by the ``certify`` kind's loader) and clipped to [0, 1]; the plurality vote of the M
  models is the defended classifier (its attack success and clean accuracy); CERTIFY over the votes
  (``n0`` selection models, the rest estimate pA, ``alpha``) gives certified accuracy against l2
  perturbations of the training inputs of radius R = sigma * Phi^-1(pA_lower), and the fraction of the
  attacked inputs whose radius exceeds this poison's l2 norm (all perturbations together; a poison that
  relabels or inserts rows is outside the threat model and is reported as not certified).
* **dp-sgd** (seed 002 section 1.5.5): ``victims`` fresh models (the same seeds) trained on each poisoned set
  with DP-SGD, the victims' recipe plus ``defence.dp``: their attack success and clean accuracy, and the
  accountant's epsilon (a guarantee covering every training row, poisons included).
* **none**: the victims only.

Attack success: a backdoor's triggered test inputs of the source classes classified as the target (ASR,
mean ± SE over victims); a targeted attack's targets classified as the adversarial class (per scenario
averaged over victims and targets; mean ± SE over scenarios), as the two kinds report them. Each model's
success is kept in the run store (``ctx.derived``), so a resumed or grown run never recomputes it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..certify import (
    ABSTAIN,
    DnCNN,
    certified_mask,
    dpa_certify,
    max_radius,
    ndt_certify,
    ndt_trials,
    ndt_views,
    partition_trials,
    partitions_touched,
    symmetric_difference,
    train_denoiser,
    view_partitions,
    vote_counts,
)
from ..data.base import DataBundle
from ..data.view import DataView
from ..defences import FILTERS, removal_summary, training_features
from ..errors import TrainingError, TrialError
from ..query import load_model
from ..report.figures import accuracy_bars, robust_accuracy_figure
from ..report.html import ReportTable
from ..stats import MeanSE, mean_difference
from .backdoor import build_poison, triggered_test_inputs
from .backdoor_config import BackdoorConfig
from .base import ExperimentOutput, Stream, register_experiment
from .certify_config import DDPMDenoiser
from .context import RunContext, TrialRecord
from .defend_config import DP_SGD, DPA, NDT, DefendConfig, check_defend
from .poisoning import failed_victims_note, train_victims, victim_logits
from .robustness import rate
from .targeted_poison import build_scenarios, craft_scenarios
from .targeted_poison_config import TargetedPoisonConfig

Study = BackdoorConfig | TargetedPoisonConfig
FOLDER = "defences"
"""Where the filters' removals are kept (``artifacts/defences/<poisoned set>.pt``)."""


@dataclass
class Case:
    """One poisoned training set to defend: the backdoor's (``poisoned``) or one targeted scenario's
    (``s000``, ...), the rows the attacker wrote (bool [N + I]), the inputs the attack wants classified as
    ``goal`` and how the poison came about."""

    name: str
    view: DataView
    poison: Tensor
    x_eval: Tensor
    goal: int | Tensor
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)


def poison_rows(view: DataView) -> Tensor:
    """bool [N + I]: the rows the attacker wrote: perturbed, relabelled to another class, or inserted."""
    rows = torch.zeros(view.num_total, dtype=torch.bool)
    rows[view.indices.cpu()] = True
    orig = torch.cat([view.base.y, view.inserted_y]).cpu()
    relabel, to = view.relabel_indices.cpu(), view.relabel_to.cpu()
    rows[relabel[to != orig[relabel]]] = True
    rows[view.num_base:] = True
    return rows


def _backdoor_cases(study: BackdoorConfig, ctx: RunContext, data: DataBundle) -> tuple[list[Case], list[dict[str, Any]]]:
    poison, seconds, crafters = build_poison(study, ctx, data)
    assert poison.view is not None
    info = {k: v for k, v in poison.info.items() if k not in ("history", "trigger")}
    return [Case("poisoned", poison.view, poison_rows(poison.view), triggered_test_inputs(study, data),
                 study.attack.backdoor.target_class, seconds, info)], crafters


def _targeted_cases(study: TargetedPoisonConfig, ctx: RunContext, data: DataBundle
                    ) -> tuple[list[Case], list[dict[str, Any]]]:
    scenarios = build_scenarios(study, data)
    brewed, crafters = craft_scenarios(study, ctx, data, scenarios)
    cases = []
    for sc in scenarios:
        poison, seconds = brewed[sc.index]
        assert poison.view is not None
        cases.append(Case(f"s{sc.index:03d}", poison.view, poison_rows(poison.view), data.test.x[list(sc.target_ids)],
                          sc.adv_class, seconds, sc.to_dict(data.train.classes)))
    return cases, crafters


THREATS: dict[str, Callable[[Any, RunContext, DataBundle], tuple[list[Case], list[dict[str, Any]]]]] = {
    "backdoor": _backdoor_cases, "targeted": _targeted_cases}
"""The poisoned training sets of each attack family, built as its own kind builds them."""


def _hits(study: Study, ctx: RunContext, data: DataBundle, case: Case, records: list[TrialRecord], *,
          keep_weights: bool) -> np.ndarray:
    """Attack success [V] of saved victims on the case's inputs, kept in the store (``defend``)."""
    def score(recs: list[TrialRecord]) -> list[dict[str, int]]:
        pred = victim_logits(study, ctx, data, recs, case.x_eval).argmax(-1)  # [V, n]
        return [{"hits": int((p == case.goal).sum()), "n": int(p.numel())} for p in pred]

    got = ctx.derived(records, key="defend", compute=score, keep_weights=keep_weights)
    return np.array([g["hits"] / g["n"] for g in got], dtype=float)


def _over_cases(per_case: list[np.ndarray]) -> dict[str, Any]:
    """Mean ± SE over victims (one poisoned set) or over scenarios of each one's mean (several), as the
    backdoor and targeted-poison kinds report."""
    return MeanSE.of(per_case[0] if len(per_case) == 1 else np.array([v.mean() for v in per_case])).to_dict()


def _paired(a: list[np.ndarray], b: list[np.ndarray]) -> dict[str, Any]:
    if len(a) == 1:
        return mean_difference(a[0], b[0])
    return mean_difference([v.mean() for v in a], [v.mean() for v in b])


@register_experiment("defend", config=DefendConfig, check=check_defend, growable=("victims", "scenarios"))
def run_defend(config: DefendConfig, ctx: RunContext) -> ExperimentOutput:
    """A poisoning defence (filtering or Deep Partition Aggregation) against a backdoor or targeted attack: attack success with and without it, clean accuracy, poisons removed vs random, certified fraction."""
    data = ctx.load_dataset(config.dataset)
    study = config.study()
    cases, crafters = THREATS[config.family](study, ctx, data)
    plain = train_victims(study, ctx, data, {c.name: c.view for c in cases}, victims=config.victims,
                          save_weights=True, label="training victims on the poisoned sets (no defence)",
                          on_failure="skip")
    protocol = "filter" if config.defence.is_filter else config.defence.method
    res = PROTOCOLS[protocol](config, study, ctx, data, cases, plain)
    return _output(config, ctx, data, cases, crafters, plain, res)


@dataclass
class Defended:
    """What a defence protocol measured: per case the attack success and clean accuracy "with" it (one
    value per victim, or the ensemble's), metrics, trial rows, tables, figures and notes of its own."""

    success: list[np.ndarray] | None = None
    accuracy: list[np.ndarray] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    trials: list[dict[str, Any]] = field(default_factory=list)
    tables: list[ReportTable] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    verdict: str = ""


def _no_defence(config: DefendConfig, study: Study, ctx: RunContext, data: DataBundle, cases: list[Case],
                plain: dict[str, list[TrialRecord]]) -> Defended:
    return Defended(verdict="no defence")


def _removal(config: DefendConfig, study: Study, ctx: RunContext, data: DataBundle, case: Case,
             defender: TrialRecord) -> tuple[Tensor, dict[str, Any]]:
    """The rows the filter removes from the case's training set (bool [N + I]) and the removal summary;
    computed from the defender's model once and kept (a resumed run filters exactly these rows)."""
    kept = ctx.load_cached(case.name, folder=FOLDER)
    if kept is not None:
        return kept[0]["removed"].bool(), kept[1]
    d = config.defence
    model = load_model(study.victim_model, ctx.out_dir / defender["checkpoint"], sha256=defender.get("sha256"),
                       data=data).to(ctx.device)
    with ctx.cost.timed("features"):
        rows, feats, labels = training_features(model, case.view, device=ctx.device)
    with ctx.cost.timed("filtering"):
        cut = FILTERS.get(d.method)(feats.to(ctx.device), labels, rate=d.rate, **d.filter_options())
    removed = torch.zeros(case.view.num_total, dtype=torch.bool)
    removed[rows[cut]] = True
    summary = {**removal_summary(cut, case.poison[rows], labels), "rate": d.rate,
               "rate_times_poisons": None if d.rate is None else d.rate * int(case.poison.sum()),
               "feature_model": defender["trial_id"], "feature_dim": int(feats.shape[1])}
    ctx.save_cached(case.name, {"removed": removed}, summary, folder=FOLDER)
    return removed, summary


def _filter(config: DefendConfig, study: Study, ctx: RunContext, data: DataBundle, cases: list[Case],
            plain: dict[str, list[TrialRecord]]) -> Defended:
    d = config.defence
    summaries, views = {}, {}
    for c in cases:
        first = plain[c.name][0]
        if first.tags["victim"] != 0:  # the filter must see victim 0's features, whatever else failed
            tid = f"{c.name}-v000"
            raise TrialError(tid, TrainingError(f"the defender's feature model {tid} failed to train "
                                                f"({ctx.failed.get(tid)}); a --resume retries it"))
        removed, summaries[c.name] = _removal(config, study, ctx, data, c, first)
        views[f"{c.name}-filtered"] = c.view.with_keep(~removed.to(c.view.device))
    recs = train_victims(study, ctx, data, views, victims=config.victims, save_weights=True,
                         label=f"training victims on the sets filtered by {d.method}", on_failure="skip")
    success, accuracy, trials = _retrained(config, study, ctx, data, cases, recs, suffix="filtered")
    total = {k: sum(s[k] for s in summaries.values()) for k in ("poisons", "removed", "poisons_removed", "clean_removed",
                                                                   "random_poisons_removed", "random_clean_removed")}
    removal = {**total, "rate": d.rate, "rate_times_poisons": None if d.rate is None else d.rate * total["poisons"],
               "per_set": summaries}
    if len(cases) == 1:
        removal["p_value"] = summaries[cases[0].name]["p_value"]
    rows = [[name, s["poisons"], s["removed"], s["poisons_removed"], s["clean_removed"],
             round(s["random_poisons_removed"], 2), round(s["random_clean_removed"], 2), f"{s['p_value']:.3g}"]
            for name, s in summaries.items()]
    if len(cases) > 1:
        rows.append(["all", *(round(total[k], 2) for k in ("poisons", "removed", "poisons_removed", "clean_removed",
                                                          "random_poisons_removed", "random_clean_removed")), ""])
    what = f"{d.rate:g} of each class" if d.rate is not None else "the paper's own rule"
    table = ReportTable(f"Poisons removed by {d.method} ({what}) vs random filtering of as many rows per class",
                        ["poisoned set", "poisons", "removed", "poisons removed", "clean removed",
                         "random: poisons removed (expected)", "random: clean removed (expected)",
                         "P(random removes >= as many poisons)"], rows,
                        note="features: the penultimate layer of the first victim trained on the poisoned set; "
                             "random filtering removes the same number of rows from each class uniformly at random")
    verdict = (f"{d.method} removed {total['poisons_removed']}/{total['poisons']} poisons (random filtering: "
               f"{total['random_poisons_removed']:.1f}) and {total['clean_removed']} clean rows")
    return Defended(success, accuracy, {"removal": removal}, trials, [table], {}, verdict)


def _retrained(config: DefendConfig, study: Study, ctx: RunContext, data: DataBundle, cases: list[Case],
               recs: dict[str, list[TrialRecord]], *, suffix: str,
               extra: Callable[[TrialRecord], dict[str, Any]] | None = None
               ) -> tuple[list[np.ndarray], list[np.ndarray], list[dict[str, Any]]]:
    """Victims retrained under a defence (``recs[f"{case}-{suffix}"]``, the filters' and DP-SGD's): per case their
    attack success [V] and clean accuracy [V], and their trial rows (``extra(record)`` adds fields to a row)."""
    mine = [recs[f"{c.name}-{suffix}"] for c in cases]
    success = [_hits(study, ctx, data, c, rs, keep_weights=config.save_models)
               for c, rs in zip(cases, mine, strict=True)]
    accuracy = [np.array([r.metrics["test_accuracy"] for r in rs]) for rs in mine]
    trials = [{"trial_id": r.trial_id, "view": c.name, "defence": config.defence.method, "victim": r.tags["victim"],
               "seed": r.seed, "attack_success": float(success[i][j]), "test_accuracy": r.metrics["test_accuracy"],
               **(extra(r) if extra is not None else {})}
              for i, (c, rs) in enumerate(zip(cases, mine, strict=True)) for j, r in enumerate(rs)]
    return success, accuracy, trials


def _case_votes(study: Study, ctx: RunContext, data: DataBundle, mine: list[TrialRecord], case: Case, *,
                key: str, keep_weights: bool) -> Tensor:
    """int64 [M, N_test + N_eval]: the class each ensemble model ``mine`` (trained on ``case``'s poisoned
    set) gives the clean test inputs, then the attacked ones; kept in the run store under ``key`` (DPA's
    partition models, NDT's noised models)."""
    x = torch.cat([data.test.x, case.x_eval])

    def predict(rs: list[TrialRecord]) -> list[list[int]]:
        return victim_logits(study, ctx, data, rs, x).argmax(-1).tolist()

    return torch.tensor(ctx.derived(mine, key=key, compute=predict, keep_weights=keep_weights))


def _dpa(config: DefendConfig, study: Study, ctx: RunContext, data: DataBundle, cases: list[Case],
         plain: dict[str, list[TrialRecord]]) -> Defended:
    k = config.defence.k
    assert k is not None
    seeds = [config.trial_seed(i, stream=Stream.MODELS) for i in range(k)]
    with ctx.cost.timed("partitioning"):
        trials = [t for c in cases for t in partition_trials(view_partitions(c.view, k), k, seeds=seeds, view=c.name,
                                                             prefix=f"{c.name}-dpa", tags={"view": c.name})]
    cfg = study.model_copy(update={"model": study.victim_model, "recipe": config.partition_recipe})
    job = cfg.factory_job(data, trials, device=ctx.device, views={c.name: c.view for c in cases})
    recs = ctx.train(job, save_weights=True, label=f"training the {k} partition models of each poisoned set (DPA)")
    y = data.test.y
    radii = list(range(k // 2 + 1))
    success, accuracy, per_set, rows_out, curves = [], [], {}, [], {}
    for c in cases:
        mine = [r for r in recs if r.tags["view"] == c.name]
        pred = _case_votes(study, ctx, data, mine, c, key="dpa", keep_weights=config.save_models)
        test = dpa_certify(vote_counts(pred[:, : len(y)], data.num_classes))
        attacked = dpa_certify(vote_counts(pred[:, len(y):], data.num_classes))
        hit = attacked.prediction == torch.as_tensor(c.goal)
        size, touched = symmetric_difference(c.view), partitions_touched(c.view, k)
        correct = test.prediction == y
        cert = {str(r): v for r, v in zip(radii, [rate(m[None]) for m in
                                                  certified_mask(test.prediction, test.radius.double(), y, radii)],
                                          strict=True)}
        curves[c.name] = list(cert.values())
        per_set[c.name] = {
            "ensemble_accuracy": rate(correct[None]),
            "ensemble_attack_success": rate(hit[None]),
            "certified_accuracy": cert,
            "median_certified_radius_correct": float(test.radius[correct].double().median()) if bool(correct.any())
            else None,
            "attack_size": size, "partitions_touched": touched,
            "certified_against_attack": rate((attacked.radius >= size)[None]),
            "unchanged_by_this_poison": rate((attacked.radius >= touched)[None]),
            "partition_sizes": {"min": min(r.tags["size"] for r in mine), "max": max(r.tags["size"] for r in mine)},
            "partition_model_accuracy": MeanSE.of([r.metrics["test_accuracy"] for r in mine]).to_dict(),
        }
        success.append(np.array([float(hit.double().mean())]))
        accuracy.append(np.array([float(correct.double().mean())]))
        shown = [r for r in radii if r in (0, 1, 2) or r in (k // 8, k // 4, k // 2)]
        rows_out.append([c.name, per_set[c.name]["ensemble_accuracy"], *(cert[str(r)] for r in shown),
                         per_set[c.name]["ensemble_attack_success"], size, touched,
                         per_set[c.name]["certified_against_attack"], per_set[c.name]["unchanged_by_this_poison"]])
    trials_out = [{"trial_id": r.trial_id, "view": r.tags["view"], "partition": r.tags["partition"],
                   "size": r.tags["size"], "seed": r.seed, "test_accuracy": r.metrics["test_accuracy"]} for r in recs]
    table = ReportTable(f"Deep Partition Aggregation, k = {k}: the ensemble on the test split and on the attacked inputs "
                        "[95% Clopper-Pearson]",
                        ["poisoned set", "ensemble accuracy", *(f"certified acc, r {r}" for r in shown),
                         "attack success (ensemble)", "poison size (insert + remove)", "partitions touched",
                         "certified against this poison", "certificate >= partitions touched"], rows_out,
                        note="certified at r: correct, and provably unchanged by any r inserted or removed training "
                             "samples (a modified sample counts 2); 'partitions touched': base models this poison can "
                             "have changed")
    fig = robust_accuracy_figure(radii, {f"certified ({n})": v for n, v in curves.items()}, norm="poisons",
                                 clean=float(np.mean([a[0] for a in accuracy])), xlabel="poisoned samples r "
                                 "(insertions + removals)", ylabel="certified accuracy", clean_label="ensemble accuracy")
    total_size = sum(per_set[c.name]["attack_size"] for c in cases)
    frac = float(np.mean([per_set[c.name]["certified_against_attack"]["value"] for c in cases]))
    verdict = (f"DPA with k = {k}: {100 * frac:.1f}% of the attacked inputs certified against this poison "
               f"({total_size} insertions + removals; the largest certificate k = {k} models can give is {k // 2})")
    return Defended(success, accuracy, {"dpa": {"k": k, "radii": radii, "per_set": per_set,
                                                "certified_against_attack": frac}},
                    trials_out, [table], {"Certified accuracy of the DPA ensemble vs poisoned training samples "
                                          "(95% Clopper-Pearson shaded)": fig}, verdict)


def _ndt_denoiser(config: DefendConfig, ctx: RunContext, case: Case) -> torch.nn.Module | None:
    """The defender's DnCNN for ``case``: trained (MSE, Salman et al.) on the inputs of the poisoned set it
    defends at ``defence.sigma`` - the only data the defender has - and kept under ``artifacts/defences/``."""
    d = config.defence
    if d.denoiser != "dncnn":
        return None
    assert d.sigma is not None and d.denoiser_epochs is not None
    den = DnCNN(int(case.view.base.x.shape[1]))
    kept = ctx.load_cached(f"{case.name}-ndt-dncnn", folder=FOLDER)
    if kept is not None:
        den.load_state_dict(kept[0])
    else:
        x, _ = case.view.gather(case.view.kept_indices(), validate=False)
        with ctx.cost.timed("denoiser"):
            losses = train_denoiser(den, x.cpu(), sigma=d.sigma, epochs=d.denoiser_epochs,
                                    seed=config.trial_seed(0, stream=Stream.MODELS), device=ctx.device)
        ctx.save_cached(f"{case.name}-ndt-dncnn", den.state_dict(), {"train_loss_mse": losses[-1]}, folder=FOLDER)
    return den.eval()


def _poison_l2(view: DataView) -> float | None:
    """The l2 norm of the whole poison (every perturbed training input together), the quantity NDT's
    certificate bounds; None when the poison also relabels, inserts or drops rows (outside its threat model)."""
    orig = view.base.y.cpu()
    relabel, to = view.relabel_indices.cpu(), view.relabel_to.cpu()
    relabel_changes = bool((to != orig[relabel]).any()) if relabel.numel() else False
    if view.num_inserted or relabel_changes or (view.keep is not None and not bool(view.keep.all())):
        return None
    return float(view.delta.double().norm())


def _ndt(config: DefendConfig, study: Study, ctx: RunContext, data: DataBundle, cases: list[Case],
         plain: dict[str, list[TrialRecord]]) -> Defended:
    d = config.defence
    assert d.sigma is not None and d.models is not None and d.n0 is not None and d.alpha is not None
    sigma, m = d.sigma, d.models
    seeds = [config.trial_seed(i, stream=Stream.MODELS) for i in range(m)]
    views: dict[str, DataView] = {}
    trials = []
    denoiser_info: dict[str, Any] = {"label": d.denoiser_label}
    ddpm = None
    if isinstance(d.denoiser, DDPMDenoiser):  # one pretrained DDPM for every poisoned set (the certify kind's loader)
        with ctx.cost.timed("denoiser loading"):
            ddpm = d.denoiser.build(sigma, device=ctx.device)
        denoiser_info.update(d.denoiser.info(ddpm))
    with ctx.cost.timed("noising"):
        for c in cases:
            den = ddpm if ddpm is not None else _ndt_denoiser(config, ctx, c)
            vs = ndt_views(c.view, sigma=sigma, seeds=seeds, denoiser=den, prefix=f"{c.name}-ndt")
            views |= vs
            trials += ndt_trials(vs, seeds=seeds, tags={"view": c.name})
    cfg = study.model_copy(update={"model": study.victim_model, "recipe": config.partition_recipe})
    job = cfg.factory_job(data, trials, device=ctx.device, views=views)
    recs = ctx.train(job, save_weights=True, label=f"training the {m} noised models of each poisoned set (NDT)")
    y = data.test.y
    cap = max_radius(sigma=sigma, n=m - d.n0, alpha=d.alpha)
    radii = [math.floor(cap * f * 1e4) / 1e4 for f in (0.0, 0.25, 0.5, 0.75, 1.0)]  # down: R = cap is reachable
    success, accuracy, per_set, rows_out, curves = [], [], {}, [], {}
    for c in cases:
        mine = [r for r in recs if r.tags["view"] == c.name]
        votes = _case_votes(study, ctx, data, mine, c, key="ndt", keep_weights=config.save_models)
        test = ndt_certify(votes[:, : len(y)], data.num_classes, sigma=sigma, alpha=d.alpha, n0=d.n0)
        attacked = ndt_certify(votes[:, len(y):], data.num_classes, sigma=sigma, alpha=d.alpha, n0=d.n0)
        vote = vote_counts(votes, data.num_classes).argmax(1)  # plurality of all M, ties to the smaller class
        hit, correct = vote[len(y):] == torch.as_tensor(c.goal), vote[: len(y)] == y
        cp = test.certificate
        cert = {str(r): v for r, v in zip(radii, [rate(k[None]) for k in certified_mask(cp.prediction, cp.radius, y,
                                                                                          radii)], strict=True)}
        curves[c.name] = list(cert.values())
        size = _poison_l2(c.view)
        covered = (attacked.certificate.radius > size) if size is not None else torch.zeros(len(hit), dtype=torch.bool)
        per_set[c.name] = {
            "ensemble_accuracy": rate(correct[None]), "ensemble_attack_success": rate(hit[None]),
            "predict_abstained": rate((test.prediction == ABSTAIN)[None]),
            "certified_accuracy": cert, "poison_l2": size, "certified_against_attack": rate(covered[None]),
            "model_accuracy": MeanSE.of([r.metrics["test_accuracy"] for r in mine]).to_dict(),
        }
        success.append(np.array([float(hit.double().mean())]))
        accuracy.append(np.array([float(correct.double().mean())]))
        rows_out.append([c.name, per_set[c.name]["ensemble_accuracy"], *(cert[str(r)] for r in radii),
                         per_set[c.name]["ensemble_attack_success"], "-" if size is None else round(size, 3),
                         per_set[c.name]["certified_against_attack"]])
    trials_out = [{"trial_id": r.trial_id, "view": r.tags["view"], "model": r.tags["model"], "seed": r.seed,
                   "test_accuracy": r.metrics["test_accuracy"]} for r in recs]
    table = ReportTable(f"Noise, denoise, train, classify (seed 004), sigma = {sigma:g}, M = {m} "
                        f"(n0 = {d.n0}, alpha = {d.alpha:g}, denoiser {d.denoiser_label}) [95% Clopper-Pearson]",
                        ["poisoned set", "ensemble accuracy", *(f"certified acc, R {r:g}" for r in radii),
                         "attack success (ensemble)", "poison l2 (all rows)", "certified against this poison"],
                        rows_out, note="R: l2 norm of the perturbation of all training inputs together (labels "
                                       f"unchanged, nothing inserted); the largest R {m - d.n0} estimation models can "
                                       f"certify is {cap:.4g}")
    fig = robust_accuracy_figure(radii, {f"certified ({n})": v for n, v in curves.items()}, norm="l2",
                                 clean=float(np.mean([a[0] for a in accuracy])), xlabel="l2 radius of the training-set "
                                 "perturbation", ylabel="certified accuracy", clean_label="ensemble accuracy")
    frac = float(np.mean([per_set[c.name]["certified_against_attack"]["value"] for c in cases]))
    verdict = (f"NDT with sigma = {sigma:g}, M = {m}: {100 * frac:.1f}% of the attacked inputs certified against this "
               f"poison (largest certifiable radius {cap:.3g})")
    return Defended(success, accuracy, {"ndt": {"sigma": sigma, "models": m, "radii": radii, "max_radius": cap,
                                                "denoiser": denoiser_info, "per_set": per_set,
                                                "certified_against_attack": frac}},
                    trials_out, [table], {"Certified accuracy of the NDT ensemble vs l2 training-set perturbation "
                                          "(95% Clopper-Pearson shaded)": fig}, verdict)


def _dp_sgd(config: DefendConfig, study: Study, ctx: RunContext, data: DataBundle, cases: list[Case],
            plain: dict[str, list[TrialRecord]]) -> Defended:
    """``victims`` fresh models per poisoned set (the same seeds as the undefended ones) trained with DP-SGD
    (the victims' recipe plus ``defence.dp``; seed 002 section 1.5.5: clipping and noise bound what any one
    poison can do, at a cost in clean accuracy)."""
    dp_study = study.model_copy(update={"victim": study.victim.model_copy(update={"recipe": config.dp_recipe})})
    recs = train_victims(dp_study, ctx, data, {f"{c.name}-dp": c.view for c in cases}, victims=config.victims,
                         save_weights=True, label="training DP-SGD victims on the poisoned sets", on_failure="skip")
    success, accuracy, trials = _retrained(config, dp_study, ctx, data, cases, recs, suffix="dp",
                                           extra=lambda r: {"dp_epsilon": r.metrics.get("dp_epsilon")})
    mine = [r for c in cases for r in recs[f"{c.name}-dp"]]
    eps = [r.metrics["dp_epsilon"] for r in mine if "dp_epsilon" in r.metrics]
    dp = config.defence.dp
    assert dp is not None
    privacy = {"epsilon": max(eps) if eps else None, "delta": dp.delta, "clip": dp.clip,
               "noise_multiplier": mine[0].metrics.get("dp_noise_multiplier") if mine else None,
               "sample_rate": mine[0].metrics.get("dp_sample_rate") if mine else None}
    table = ReportTable("DP-SGD victims", ["epsilon (accountant)", "delta", "clip C", "noise multiplier", "sample rate q"],
                        [[privacy["epsilon"], dp.delta, dp.clip, privacy["noise_multiplier"], privacy["sample_rate"]]],
                        note="the victims' recipe with recipe.dp; epsilon is the accountant's for the steps taken "
                             "(the largest over the victims), a guarantee for every training row, poisons included")
    eps_text = "?" if privacy["epsilon"] is None else f"{privacy['epsilon']:.3g}"
    return Defended(success, accuracy, {"dp_sgd": privacy}, trials, [table], {},
                    f"DP-SGD victims (epsilon {eps_text}, C {dp.clip:g})")


PROTOCOLS: dict[str, Callable[..., Defended]] = {"filter": _filter, DPA: _dpa, NDT: _ndt, DP_SGD: _dp_sgd,
                                                 "none": _no_defence}
"""What follows the victims for each kind of defence."""


def _output(config: DefendConfig, ctx: RunContext, data: DataBundle, cases: list[Case], crafters: list[dict[str, Any]],
            plain: dict[str, list[TrialRecord]], res: Defended) -> ExperimentOutput:
    study = config.study()
    d = config.defence
    success = [_hits(study, ctx, data, c, plain[c.name], keep_weights=config.save_models) for c in cases]
    accuracy = [np.array([r.metrics["test_accuracy"] for r in plain[c.name]]) for c in cases]
    metrics: dict[str, Any] = {
        "attack_success": {"no_defence": _over_cases(success)},
        "clean_accuracy": {"no_defence": _over_cases(accuracy)},
    }
    if res.success is not None and res.accuracy is not None:
        metrics["attack_success"]["defence"] = _over_cases(res.success)
        metrics["clean_accuracy"]["defence"] = _over_cases(res.accuracy)
        metrics["attack_success_drop"] = _paired(success, res.success)
        metrics["clean_accuracy_drop"] = _paired(accuracy, res.accuracy)
    n = len(data.train)
    poisons = [int(c.poison.sum()) for c in cases]
    metrics |= res.metrics | {
        "defence": d.model_dump(mode="json", exclude_none=True),
        "poisons": poisons[0] if len(cases) == 1 else poisons, "train_size": n,
        "attack": {"family": config.family, "method": config.attack.method, "poisoned_sets": len(cases),
                   "poison_seconds": [round(c.seconds, 3) for c in cases],
                   **({"scenarios": [c.info for c in cases]} if config.family == "targeted" else cases[0].info)},
    }
    if crafters:
        metrics["crafting_models"] = {"count": len(crafters), "test_accuracy": MeanSE.of(
            [r["metrics"]["test_accuracy"] for r in crafters if "metrics" in r] or [float("nan")]).to_dict()}
    trials = [{"trial_id": r.trial_id, "view": c.name, "defence": "none", "victim": r.tags["victim"], "seed": r.seed,
               "attack_success": float(success[i][j]), "test_accuracy": r.metrics["test_accuracy"]}
              for i, c in enumerate(cases) for j, r in enumerate(plain[c.name])] + res.trials
    over = "victims" if len(cases) == 1 else "scenarios"
    what = ("ASR: triggered test inputs of the source classes classified as the target" if config.family == "backdoor"
            else "success: each scenario's targets classified as its adversarial class")
    a, w = metrics["attack_success"], metrics["clean_accuracy"]
    head = f"{res.verdict}; attack success {_pct(a['no_defence'])}"
    if "defence" in a:
        head += f" -> {_pct(a['defence'])}; clean accuracy {_pct(w['no_defence'])} -> {_pct(w['defence'])}"
    notes = failed_victims_note(ctx, metrics) + [
        head + ".",
        f"{config.attack.method} ({config.family}): {len(cases)} poisoned training set(s) of {data.name}, "
        f"{', '.join(map(str, poisons))} poisons of {n} rows; {what}; mean ± SE over {over}; {config.victims} victims "
        f"per set trained from scratch without the defence" + ("" if d.method == "none" else
                                                              " (the same seeds with it)" if d.is_filter else "") + "."]
    rows = [["no defence", _pct_se(a["no_defence"]), _pct_se(w["no_defence"])]]
    if "defence" in a:
        rows.append([d.method, _pct_se(a["defence"]), _pct_se(w["defence"])])
    tables = [ReportTable("Attack success and clean accuracy without and with the defence",
                          ["training set", "attack success (%)", "clean accuracy (%)"], rows,
                          note=f"mean ± SE over {over}" + (" (DPA: the ensemble's, one per poisoned set)"
                                                            if d.method == DPA else "")), *res.tables]
    figures = dict(res.figures)
    if "defence" in a:
        figures["Attack success without and with the defence (mean ± SE)"] = accuracy_bars(
            {"no defence": a["no_defence"], d.method: a["defence"]}, title="attack success")
    return ExperimentOutput(metrics=metrics, trials=trials, tables=tables, figures=figures, notes=notes)


def _pct(m: dict[str, Any]) -> str:
    return f"{100 * m['mean']:.1f}%"


def _pct_se(m: dict[str, Any]) -> dict[str, Any]:
    return {**m, "mean": 100 * m["mean"], "se": 100 * m["se"]}
