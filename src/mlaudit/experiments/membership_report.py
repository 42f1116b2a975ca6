"""Scoring, tables and the memorization report of the ``membership-inference`` kind.

Memorization is estimated from the pool itself (:mod:`mlaudit.audit.memorization`, Feldman & Zhang
2020): ``correct`` [M, N] is whether model m classifies example n right on the identity query, and
each example is IN for k = int(keep * M) models. Figures are drawn by :mod:`mlaudit.report.figures`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import Tensor

from ..attacks.membership import Observations, rank_nonfinite, score_all_targets
from ..audit.memorization import influence, max_standard_error, mean_member_score, self_influence
from ..data.base import DataBundle
from ..report.figures import memorization_figure, roc_figures, thin_curve
from ..report.html import ReportTable
from ..stats import BOOT_MEMORY_BYTES, fpr_key, roc_analysis
from .base import ExperimentOutput

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .membership import MembershipConfig

INFLUENCE_MAX_BYTES = 200 * 2**20
"""The full infl(i, j) matrix over pool x test examples is computed and saved only below this size."""


def pct(entry: dict[str, Any]) -> dict[str, float]:
    """A {"value","lo","hi"} rate as percentages (for tables in the form of the papers')."""
    return {k: 100.0 * float(entry[k]) for k in ("value", "lo", "hi")}


def comparison_table(metrics: dict[str, Any], attacks: tuple[str, ...], fpr_targets: tuple[float, ...], *,
                     title: str, note: str) -> ReportTable:
    """Attack | AUC | balanced accuracy | TPR @ each FPR, all in % with 95% intervals (Carlini et al.
    2022, Table I)."""
    cols = ["attack", "AUC (%)", "balanced accuracy (%)"] + [f"TPR @ {100 * t:g}% FPR (%)" for t in fpr_targets]
    rows = []
    for name in attacks:
        mt = metrics[name]
        rows.append([name, pct(mt["auc"]), pct(mt["balanced_accuracy"]),
                     *[pct(mt["tpr_at_fpr"][fpr_key(t)]) for t in fpr_targets]])
    return ReportTable(title, cols, rows, note=note)


def extended(out: ExperimentOutput, *, metrics: Mapping[str, Any] | None = None,
             tables: Iterable[ReportTable] = (), figures: Mapping[str, Figure] | None = None,
             notes: Iterable[str] = (), trials: Iterable[dict[str, Any]] = ()) -> ExperimentOutput:
    """A new output: ``out``'s entries followed by the given ones (``out`` itself is not changed)."""
    return ExperimentOutput(metrics={**out.metrics, **(metrics or {})}, trials=[*out.trials, *trials],
                            tables=[*out.tables, *tables], figures={**out.figures, **(figures or {})},
                            notes=[*out.notes, *notes])


def in_counts(keep: Tensor) -> str:
    """How many models hold each example of ``keep`` bool [M, N]: "exactly k" (the planned design), or
    "k1 to k2" once failed models were dropped from the pool."""
    ins = keep.sum(0)
    lo, hi = int(ins.min()), int(ins.max())
    return f"exactly {lo}" if lo == hi else f"{lo} to {hi}"


def trial_rows(records: list[dict[str, Any]], keep: Tensor) -> list[dict[str, Any]]:
    return [{"trial_id": r["trial_id"], "role": r["tags"].get("role"), "model": r["tags"].get("model"),
             "seed": r["seed"], "pool_members": int(keep[i].sum()), **r["metrics"], "steps": r["steps"],
             "wall_s": r["wall_s"], "checkpoint": r.get("checkpoint")} for i, r in enumerate(records)]


def base_report(config: MembershipConfig, data: DataBundle, obs: Observations, scores: dict[str, Tensor],
                metrics: dict[str, Any], records: list[dict[str, Any]],
                curves: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> ExperimentOutput:
    """The pool's comparison table, ROC figures (from ``curves`` when given: attack -> (fpr, tpr), else sorted
    again from ``scores``), notes and per-model rows."""
    m, n = obs.num_models, obs.num_examples
    n_pos, n_neg = int(obs.keep.sum()), m * n - int(obs.keep.sum())
    note = (f"{m} models x {n} examples = {m * n} (model, example) pairs ({n_pos} members, {n_neg} non-members); "
            "each model is the target once, the others are its shadows. Intervals: 95% percentile bootstrap over "
            f"pairs ({config.n_boot} resamples; pairs sharing a model or an example are treated as independent, "
            "so they are somewhat narrow); results.json also gives Clopper-Pearson intervals on each TPR count.")
    table = comparison_table(metrics, config.attacks, config.fpr_targets,
                             title="Membership inference attacks (in the form of Carlini et al. 2022, Table I)",
                             note=note)
    diag = metrics["diagnostics"]["nonfinite_clipped"]
    notes = [
        f"dataset {data.name}: pool of {n} training examples, each IN for {in_counts(obs.keep)} of "
        f"{m} models (LiRA reference inclusion, artifacts/inclusion.npy, sha256 {metrics['pool']['inclusion_sha256']})",
        f"queries: {', '.join(obs.queries)}; attack options: {metrics['pool']['attack_options']} (LiRA fits one "
        f"variance per query ('fixed') for pools under 64 models, as Carlini et al. 2022 do, unless set)",
        note,
        f"TPR at FPR t uses the best ROC point with FPR <= t (no interpolation); with {n_neg} non-members the "
        f"smallest non-zero FPR is {1 / n_neg:.2g}, so targets below it are read at zero false positives.",
        f"non-finite logits: {diag['nonfinite_logit_rows']} of {diag['logit_rows']} query outputs had a NaN/inf logit "
        f"(clipped NaN -> 0, inf -> +-1e4 and scored, never dropped); non-finite scores replaced per attack: "
        f"{diag['nonfinite_scores']}",
    ]
    return ExperimentOutput(metrics=metrics, trials=trial_rows(records, obs.keep), tables=[table],
                            figures=roc_figures(scores, obs.keep, metrics, curves=curves), notes=notes)


def score_pool(obs: Observations, attacks: tuple[str, ...], *, options: dict[str, dict[str, Any]] | None = None,
               device: torch.device | str | None = None, on_attack: Callable[[str], None] | None = None
               ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Scores float64 [M, N] (on the CPU) of every attack (every model as target) and diagnostics;
    ``on_attack(name)`` is called as each attack finishes (progress bars).

    ``device`` (None: where ``obs.logits`` are) is where the attacks compute: the logits [M, N, A, C],
    labels and keep are moved there once, and each attack's scores come back to the CPU once.

    Non-finite logits are clipped by the attacks (NaN -> 0, inf -> +-1e4) and counted here as
    ``nonfinite_logit_rows`` (query outputs [M, N, A] with a non-finite logit); non-finite scores
    that remain are replaced (NaN -> lowest finite score, +-inf -> the finite extremes) and counted
    per attack in ``nonfinite_scores``. Nothing is dropped.
    """
    options = options or {}
    if device is not None and obs.logits.device != torch.device(device):
        pop = obs.population_logits
        obs = dataclasses.replace(obs, logits=obs.logits.to(device), labels=obs.labels.to(device),
                                  keep=obs.keep.to(device), population_logits=pop.to(device) if pop is not None else None)
    bad_rows = int((~torch.isfinite(obs.logits)).any(-1).sum())
    diag: dict[str, Any] = {"nonfinite_logit_rows": bad_rows, "logit_rows": int(np.prod(obs.logits.shape[:3])),
                            "nonfinite_scores": {}}
    scores: dict[str, Tensor] = {}
    if bad_rows:
        warnings.warn(f"{bad_rows} of {diag['logit_rows']} model outputs have NaN/inf logits; the attacks clip them "
                      "(NaN -> 0, inf -> +-1e4) and score them; counted in diagnostics", RuntimeWarning, stacklevel=2)
    for name in attacks:
        with warnings.catch_warnings():  # the same count, warned once above instead of once per attack
            warnings.filterwarnings("ignore", message=".*non-finite logits", category=RuntimeWarning)
            s = score_all_targets(name, obs, **options.get(name, {})).double().cpu()
        scores[name], diag["nonfinite_scores"][name] = rank_nonfinite(s)
        if on_attack is not None:
            on_attack(name)
    return scores, diag


ROC_THREADS = {"cpu": 4}
"""Attacks whose ROC analyses run at once (:func:`all_attack_metrics`), by device type (1 where not listed).
On the CPU (2 cores, 12.8M pairs each, no bootstrap) four analyses took 9.7 s in threads vs 14.3 s one after the
other. On an H100 (2026-12-07, the 256-model lean pool, 200 replicates) the four took 21.7 s in threads, each with a
quarter of the bootstrap memory, against 8.9 s one after the other on another H100
(benchmarks/results/membership_cifar10_membership_256_airbench_lean_auto_bg_h100.md and
..._lean_auto_checked_h100.md), so on a GPU they run one after the other."""


def attack_metrics(scores: Tensor, keep: Tensor, config: MembershipConfig, *, device: torch.device | str = "cpu",
                   boot_memory_bytes: int | None = None) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray]]:
    """:func:`mlaudit.stats.roc_analysis` over all (model, example) pairs of ``scores`` [M, N'] against
    ``keep`` bool [M, N'] (sort and bootstrap on ``device``): the metrics and the ROC curve, thinned for
    drawing (:func:`mlaudit.report.figures.thin_curve`)."""
    metrics, curve = roc_analysis(scores.flatten().numpy(), keep.flatten().numpy(), fpr_targets=config.fpr_targets,
                                  n_boot=config.n_boot, seed=config.seed, device=device,
                                  boot_memory_bytes=boot_memory_bytes)
    return metrics, thin_curve(*curve)


def all_attack_metrics(scores: dict[str, Tensor], keep: Tensor, config: MembershipConfig, *,
                       device: torch.device | str = "cpu", on_attack: Callable[[str], None] | None = None
                       ) -> tuple[dict[str, dict[str, Any]], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """:func:`attack_metrics` of every attack, up to :data:`ROC_THREADS` of ``device``'s type at once in threads,
    each with that share of the bootstrap's memory (:data:`mlaudit.stats.BOOT_MEMORY_BYTES`). Most of one analysis
    is numpy and torch work on 12.8M pairs (a 256-model pool) that runs without the GIL: on an H100 one took 2.5 s,
    of which ~1.3 s on the host (benchmarks/results/bootstrap_profile_h100.md). Threads paid on the CPU and not on
    the GPU (see :data:`ROC_THREADS`). Each analysis draws from its own seeded generator, so the results do not
    depend on the threads' order.
    ``on_attack(name)`` is called on this thread as each finishes."""
    if not scores:
        return {}, {}
    dev = torch.device(device)
    workers = min(ROC_THREADS.get(dev.type, 1), len(scores))
    share = BOOT_MEMORY_BYTES.get(dev.type, BOOT_MEMORY_BYTES["cpu"]) // workers
    with ThreadPoolExecutor(workers, thread_name_prefix="mlaudit-roc") as pool:
        futures = {name: pool.submit(attack_metrics, s, keep, config, device=dev, boot_memory_bytes=share)
                   for name, s in scores.items()}
        done: dict[str, tuple[dict[str, Any], tuple[np.ndarray, np.ndarray]]] = {}
        for name, f in futures.items():
            done[name] = f.result()
            if on_attack is not None:
                on_attack(name)
    return {n: m for n, (m, _) in done.items()}, {n: c for n, (_, c) in done.items()}


def add_memorization(out: ExperimentOutput, config: MembershipConfig, obs: Observations, *,
                     scores: dict[str, Tensor], test_logits: Tensor, data: DataBundle, rows: Tensor,
                     artifacts: Path) -> ExperimentOutput:
    """``out`` extended (a new value) with the self-influence of every pool example, its top 10, its
    Spearman correlation with the mean LiRA score of the example over the models that hold it, and
    infl(i, j) on the test split when small; saves them under ``artifacts``."""
    a = obs.queries.index("identity")
    correct = obs.logits[:, :, a].argmax(-1) == obs.labels
    mem = self_influence(correct, obs.keep)
    np.save(artifacts / "memorization.npy", mem.numpy())
    m, ins = obs.num_models, obs.keep.sum(0)
    k_lo, k_hi = int(ins.min()), int(ins.max())  # equal unless failed models were dropped from the pool
    se = max(max_standard_error(k_lo, m), max_standard_error(k_hi, m))  # convex in k: largest at an end
    top = torch.argsort(mem, descending=True, stable=True)[:10]
    top_rows = [{"index": int(rows[i]), "label": data.train.classes[int(obs.labels[i])], "mem": float(mem[i])}
                for i in top]
    res: dict[str, Any] = {"mean": float(mem.mean()), "median": float(mem.median()),
                           "fraction_above_0.5": float((mem > 0.5).double().mean()), "max_standard_error": se,
                           "top": top_rows}
    ref = next((name for name in ("lira-online", "lira-offline") if name in scores), None)
    s_in = mean_member_score(scores[ref], obs.keep) if ref is not None else None
    rho = 0.0
    if s_in is not None:
        rho, p = spearmanr(mem.numpy(), s_in.numpy())
        res["spearman_vs_lira"] = {"attack": ref, "rho": float(rho), "p_value": float(p),
                                   "score": "mean score of each example over the models holding it"}
    n_test = test_logits.shape[1]
    if obs.num_examples * n_test * 4 < INFLUENCE_MAX_BYTES:
        infl = influence(obs.keep, test_logits[:, :, 0].argmax(-1) == data.test.y)
        np.save(artifacts / "influence.npy", infl.numpy())
        flat = torch.topk(infl.flatten(), min(10, infl.numel())).indices
        res["influence_top_pairs"] = [
            {"train_index": int(rows[f // n_test]), "test_index": int(f % n_test), "infl": float(infl.flatten()[f]),
             "train_label": data.train.classes[int(obs.labels[f // n_test])],
             "test_label": data.test.classes[int(data.test.y[f % n_test])]} for f in flat.tolist()]
        infl_note = (f"infl(i, j) for all {obs.num_examples} x {n_test} (pool, test) pairs is in "
                     "artifacts/influence.npy; its top pairs are in metrics (each estimate has the same standard "
                     "error as mem, so the top of ~1e5 noisy values is mostly noise for small pools).")
    else:
        infl_note = (f"infl(i, j) on the test split was skipped: {obs.num_examples} x {n_test} float32 values exceed "
                     f"{INFLUENCE_MAX_BYTES // 2**20} MB.")
    table = ReportTable("Most memorized pool examples (Feldman & Zhang self-influence)",
                        ["training index", "label", "mem"], [[r["index"], r["label"], r["mem"]] for r in top_rows])
    sp = res.get("spearman_vs_lira")
    ins_note = f"{k_lo} IN and {m - k_lo} OUT" if k_lo == k_hi else f"{k_lo} to {k_hi} IN (of {m})"
    note = (f"memorization mem(i) = P[correct | i in S] - P[correct | i not in S] from {ins_note} models "
            f"per example (standard error up to {se:.2f}); artifacts/memorization.npy. "
            + (f"Spearman correlation with the mean {sp['attack']} score over the models holding the example: "
               f"rho = {sp['rho']:.3f} (p = {sp['p_value']:.2g}). " if sp else "") + infl_note)
    fig = memorization_figure(mem, s_in, attack=ref or "", rho=float(rho))
    return extended(out, metrics={"memorization": res}, tables=[table], notes=[note],
                    figures={"Memorization (self-influence) of the pool examples": fig})
