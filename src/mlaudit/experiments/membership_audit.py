"""Truth Serum poisoning and external-target audits of the ``membership-inference`` kind.

Truth Serum (Tramer et al. 2022; the poisoning and its threat model are in
:mod:`mlaudit.attacks.membership.truth_serum`): here ``targets`` pool examples (seeded) each get
``copies`` copies labelled with a fixed random other class; a second pool is trained with the same
seeds and inclusion matrix plus every poison (inserted virtual indices are in every model; the
targets themselves still follow ``keep``; the shadows are poisoned too, as the adversary trains them
with its own poisons). Every attack is run on both pools and compared on the target examples only.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ..attacks.membership import ATTACKS, Observations, rank_nonfinite, truth_serum_view
from ..data.base import DataBundle
from ..data.view import DataView
from ..errors import ConfigError, DataError
from ..query import describe, fit_weights, logits_from_checkpoints, model_template
from ..report.figures import roc_figures
from ..report.html import ReportTable
from ..stats import MeanSE, fpr_key, roc_metrics, separation
from ..train.checkpoint import load_checkpoint, load_weights_only, sha256_file
from .base import ExperimentOutput
from .context import RunContext
from .membership_report import extended, pct, score_pool, trial_rows

if TYPE_CHECKING:
    from .membership import MembershipConfig


def _slim(mt: dict[str, Any]) -> dict[str, Any]:
    return {"auc": mt["auc"], "tpr_at_fpr": mt["tpr_at_fpr"], "n_pos": mt["n_pos"], "n_neg": mt["n_neg"]}


def run_truth_serum(out: ExperimentOutput, config: MembershipConfig, ctx: RunContext, data: DataBundle, *,
                    keep: Tensor, models: list[int], rows: Tensor, before: dict[str, Tensor],
                    queries: tuple[str, ...]) -> ExperimentOutput:
    """Train the poisoned pool; ``out`` extended (a new value) with before/after metrics on the targets
    (``keep`` the planned inclusion [M, N]; ``before``: the clean pool's scores [len(models), N] per attack,
    row i from pool model ``models[i]``). A model that failed in either pool is left out of the comparison,
    so before and after score the same models."""
    from .membership import pool_accuracy, pool_observations, surviving_pool, train_pool

    ts = config.truth_serum
    assert ts is not None  # the caller checks
    view, pos, wrong = truth_serum_view(data.train.x, data.train.y, DataView.identity(data.train), rows,
                                        targets=ts.targets, copies=ts.copies, num_classes=data.num_classes,
                                        seed=config.seed)
    np.savez(ctx.artifacts / "truth_serum_targets.npz", train_index=rows[pos].numpy(), pool_position=pos.numpy(),
             wrong_label=wrong.numpy())
    records = train_pool(config, ctx, data, keep, rows, prefix="serum", role="truth-serum", view=view)
    poisoned, used = surviving_pool(config, ctx, keep, records, prefix="serum")
    obs = pool_observations(config, ctx, data, records, rows, used, queries)
    after, diag = score_pool(obs, config.attacks, options=config.resolved_attack_options, device=ctx.device)
    both = [i for i in poisoned if i in models]  # trained in both pools: the models compared
    before = {k: v[[models.index(i) for i in both]] for k, v in before.items()}
    after = {k: v[[poisoned.index(i) for i in both]] for k, v in after.items()}
    kt = keep[both][:, pos]
    res: dict[str, Any] = {"targets": ts.targets, "copies": ts.copies, "pairs": int(kt.numel()),
                           "members": int(kt.sum()), "poisoned_test_accuracy": MeanSE.of(
                               pool_accuracy(config, ctx, data, records)).to_dict(),
                           "nonfinite_clipped": diag, "models": len(both)}
    failed = ctx.failed_note(res, what=f"of the {keep.shape[0]} Truth Serum models",
                             only=lambda t: t.startswith("serum-"),
                             effect="are dropped from the poisoned pool (and from the before/after comparison)")
    cols = ["attack"] + [f"{w} {when}" for w in ["AUC (%)"] + [f"TPR @ {100 * t:g}% FPR (%)"
                                                                for t in config.fpr_targets]
                         for when in ("before", "after")]
    table = []
    for name in config.attacks:
        pair = {}
        for when, s in (("before", before[name]), ("after", after[name])):
            mt = roc_metrics(s[:, pos].flatten().numpy(), kt.flatten().numpy(), fpr_targets=config.fpr_targets,
                             n_boot=config.n_boot, seed=config.seed, device=ctx.device)
            pair[when] = {**_slim(mt), "separation": separation(s[:, pos].numpy(), kt.numpy())}
        res[name] = pair
        cells = [pct(pair[w]["auc"]) for w in ("before", "after")]
        for t in config.fpr_targets:
            cells += [pct(pair[w]["tpr_at_fpr"][fpr_key(t)]) for w in ("before", "after")]
        table.append([name, *cells])
    note = (f"{ts.targets} targets x {len(both)} models = {kt.numel()} (model, target) pairs ({int(kt.sum())} "
            f"members): TPR at FPR below {1 / max(kt.numel() - int(kt.sum()), 1):.2g} is read at zero false "
            "positives, so the low-FPR columns are coarse for few targets.")
    ref = next((n for n in ("lira-online", "lira-offline") if n in after), config.attacks[0])
    figs = roc_figures({f"{ref} before": before[ref][:, pos], f"{ref} after": after[ref][:, pos]}, kt,
                       {f"{ref} {w}": res[ref][w] for w in ("before", "after")}, what=" of the Truth Serum targets")
    return extended(
        out, metrics={"truth_serum": res}, figures=figs, trials=trial_rows(records, used),
        tables=[ReportTable("Truth Serum: the same attacks on the same targets, without and with poisoning",
                            cols, table, note=note)],
        notes=[*failed, f"Truth Serum (Tramer et al. 2022): {ts.copies} copies of each of {ts.targets} targets inserted "
               f"with a wrong label into every model of a second pool (same seeds and inclusion; targets in "
               f"artifacts/truth_serum_targets.npz). {note}"])


def load_target(config: MembershipConfig, data: DataBundle) -> tuple[dict[str, Tensor], Tensor | None]:
    """The external target's state_dict (checked to fit the config's model on this data) and its
    ``members`` mask bool [N_train] (None when not given). Raises :class:`DataError` naming the file
    when it is missing or unreadable, :class:`ConfigError` naming it when it does not fit the model."""
    tc = config.target
    assert tc is not None  # the caller checks
    sd = load_checkpoint(tc.checkpoint, sha256=tc.sha256)
    fit_weights(model_template(config.model, data), sd, source=f"target checkpoint {str(tc.checkpoint)!r}",
                what=describe(config.model, data), hint="set model to the target's architecture")
    if tc.members is None:
        return sd, None
    return sd, _load_members(tc.members, len(data.train))


def _load_members(path: Path, n_train: int) -> Tensor:
    if path.suffix not in (".npy", ".pt"):
        raise ConfigError(f"target.members {str(path)!r} must be a .npy or .pt file holding a bool mask [N_train]")
    if not path.is_file():
        raise DataError(f"target.members file {str(path)!r} does not exist")
    try:
        raw = (np.load(path, allow_pickle=False) if path.suffix == ".npy"
               else load_weights_only(path, what="target.members file", expect="a weights-only tensor"))
        t = torch.as_tensor(np.asarray(raw))
    except DataError:
        raise
    except Exception as e:  # numpy / torch raise several types for corrupt files
        raise DataError(f"target.members file {str(path)!r} could not be read: {e}") from None
    if t.dim() != 1 or t.numel() != n_train or not bool(((t == 0) | (t == 1)).all()):
        raise DataError(f"target.members {str(path)!r} must be a 1-D bool (or 0/1) mask with one entry per "
                        f"training example ({n_train}), got {t.dtype} {list(t.shape)}")
    return t.bool()


def audit_target(out: ExperimentOutput, config: MembershipConfig, ctx: RunContext, data: DataBundle,
                 obs: Observations, rows: Tensor) -> ExperimentOutput:
    """Score the external target with every attack, all M pool models being its shadows; saves
    artifacts/target_scores.npy float64 [len(attacks), N] (rows in ``attacks`` order). Returns ``out``
    extended (a new value) with its scores and, when its members are known, their metrics."""
    tc = config.target
    assert tc is not None  # the caller checks
    sd, members = load_target(config, data)
    bf16 = config.pool.query_precision == "bf16"  # queried as its shadows were

    logits = logits_from_checkpoints(functools.partial(model_template, config.model, data), [sd], data.train.x[rows],
                                     queries=obs.queries, device=ctx.device, bf16=bf16)
    member_row = members[rows] if members is not None else torch.zeros(obs.num_examples, dtype=torch.bool)
    pop_x = obs.meta.get("population_x")
    pop = None
    if pop_x is not None and obs.population_logits is not None:
        pop = torch.cat([obs.population_logits, logits_from_checkpoints(
            functools.partial(model_template, config.model, data), [sd], pop_x, queries=obs.queries, device=ctx.device,
            bf16=bf16)])
    full = Observations(torch.cat([obs.logits, logits]), obs.labels, torch.cat([obs.keep, member_row[None]]),
                        obs.queries, population_logits=pop, population_labels=obs.population_labels if pop is not None
                        else None)
    scored = [name for name in config.attacks if not ATTACKS.get(name).needs_oracle]
    scores = []
    for name in scored:
        s = ATTACKS.get(name)(full, obs.num_models, **config.options_for(name)).double().cpu()
        scores.append(rank_nonfinite(s)[0])
    np.save(ctx.artifacts / "target_scores.npy", torch.stack(scores).numpy())  # rows in ``scored`` order
    res: dict[str, Any] = {"checkpoint": tc.checkpoint.name, "sha256": sha256_file(tc.checkpoint), "attacks": scored,
                           "members_known": members is not None, "scores": "artifacts/target_scores.npy"}
    if members is not None and 0 < int(member_row.sum()) < member_row.numel():
        for name, s in zip(scored, scores):
            res[name] = roc_metrics(s.numpy(), member_row.numpy(), fpr_targets=config.fpr_targets,
                                    n_boot=config.n_boot, seed=config.seed, device=ctx.device)
    return extended(out, metrics={"target": res}, notes=[
        f"external target {tc.checkpoint.name}: scored with all {obs.num_models} pool models as shadows"
        + ("" if members is not None else "; its members are unknown, so only scores are saved")
        + (f"; label-only attacks ({', '.join(n for n in config.attacks if n not in scored)}) need an oracle over the "
           "target and were not run on it" if len(scored) < len(config.attacks) else "")])
