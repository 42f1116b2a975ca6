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

import dataclasses
import functools
import hashlib
import inspect
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..attacks.membership import (
    ATTACKS,
    LabelOracle,
    Observations,
    inclusion_matrix,
    models_needed_exact,
    shadow_coverage,
)
from ..data.base import DataBundle
from ..data.registry import load_dataset
from ..errors import ConfigError, DataError, TrainingError, TrialError
from ..factory import QueryPlan, TrialSpec
from ..query import logits_from_checkpoints, model_template
from ..stats import MeanSE
from ..train.checkpoint import load_checkpoint
from ..train.evaluate import stack_from_state_dicts
from .base import ExperimentOutput, register_experiment
from .context import RunContext, TrialRecord
from .membership_config import (  # noqa: F401  (MembershipConfig and friends are imported from here too)
    FIXED_VARIANCE_BELOW,
    MembershipConfig,
    PoolConfig,
    PopulationConfig,
    TargetConfig,
    TruthSerumConfig,
    attack_requirements,
    pool_indices,
    population_index,
    population_rows,
    resolve_queries,
    uses_population,
)

LOGITS_MAX_BYTES = 200 * 2**20
"""artifacts/logits.pt is written only when the pool's logits (M * N * A * C * 4 bytes) are smaller."""


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
    problem = coverage_problem(config, keep)
    if problem:
        raise ConfigError(problem)
    if uses_population(config):
        population_rows(config, data, pool_indices(config, n_train))
    if config.truth_serum is not None and config.truth_serum.targets > n:
        raise ConfigError(f"truth_serum.targets = {config.truth_serum.targets} exceeds the pool's {n} examples")
    if config.target is not None:
        from .membership_audit import load_target

        load_target(config, data)


def coverage_problem(config: MembershipConfig, keep: Tensor, *, planned: bool = True) -> str | None:
    """Why the pool ``keep`` bool [M, N] cannot serve every attack of the config (an attack lacks its IN or
    OUT leave-one-out shadows for some example), or None. Checked before training on the planned pool
    (``planned``: the message says which setting to change) and again on the models left after failed ones
    were dropped."""
    n = keep.shape[1]
    for name in config.attacks:
        r_in, r_out = attack_requirements(name, config.options_for(name))
        cov = shadow_coverage(keep, min_in=r_in, min_out=r_out)
        if cov["examples_without_in"] or cov["examples_without_out"]:
            lack = (f"{cov['examples_without_in']} of {n} examples lack IN shadows and {cov['examples_without_out']} "
                    f"lack OUT shadows (fewest: {cov['min_in']} IN, {cov['min_out']} OUT)")
            needs = f"attack {name} needs >= {r_in} IN and >= {r_out} OUT shadow models for every example of every target"
            if not planned:
                return f"{needs}, but with the {keep.shape[0]} models left {lack}"
            need = models_needed_exact(config.pool.keep, r_in, r_out)
            return (
                f"{needs}, but with pool.models = {keep.shape[0]} and pool.keep = {config.pool.keep}, {lack}; set "
                f"pool.models >= {need}"
                + (" or lower attack_options." + name + ".references" if config.options_for(name).get("references")
                   else " or attack_options: {" + name + ": {variance: fixed}}" if (r_in > 1 or r_out > 1)
                   and "variance" in inspect.signature(ATTACKS.get(name)).parameters else ""))
    ins = keep.sum(0)
    if config.memorization and (int(ins.min()) == 0 or int(ins.max()) == keep.shape[0]):
        return "memorization needs >= 1 IN and >= 1 OUT model for every example"
    return None


def surviving_pool(config: MembershipConfig, ctx: RunContext, keep: Tensor, records: list[TrialRecord], *,
                   prefix: str) -> tuple[list[int], Tensor]:
    """The pool models that trained (their indices, in order) and their rows of ``keep``: a model whose
    training failed is dropped from the pool, i.e. its row of the inclusion matrix (``ctx.failed``). Raises
    :class:`TrialError` when the models left no longer give every attack its shadows."""
    models = [int(r["tags"]["model"]) for r in records]
    used = keep[models]
    if len(models) < keep.shape[0]:
        problem = coverage_problem(config, used, planned=False) if len(models) >= 2 else "fewer than 2 models are left"
        if problem:
            lost = [t for t in ctx.failed if t.startswith(f"{prefix}-")]
            raise TrialError(lost[0], TrainingError(
                f"{len(lost)} of the {keep.shape[0]} {prefix} models failed to train and the rest cannot serve the "
                f"attacks: {problem}; the first failure: {ctx.failed[lost[0]]} (a --resume retries the failed models)"))
    return models, used


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def needs_weights(config: MembershipConfig) -> bool:
    """Whether the pool models' weights must be saved: asked for (``pool.save_models``), or a label-only
    attack runs (its oracle queries the models themselves)."""
    return config.pool.save_models or any(ATTACKS.get(name).needs_oracle for name in config.attacks)


def pool_plans(config: MembershipConfig, data: DataBundle, rows: Tensor) -> dict[str, QueryPlan]:
    """The logits each pool model reports before it leaves the device: ``pool`` (the pool rows under the
    queries), ``population`` (RMIA's population, identity query) and ``test`` (the test split, for
    memorization), as the config needs them."""
    bf16 = config.pool.query_precision == "bf16"
    plans = {"pool": QueryPlan("train", rows=rows.long(), queries=resolve_queries(config, data), bf16=bf16)}
    if uses_population(config):
        split, pop = population_index(config, data, rows)
        plans["population"] = QueryPlan(split, rows=pop.long(), queries=resolve_queries(config, data), bf16=bf16)
    if config.uses_test_logits:
        plans["test"] = QueryPlan("test", bf16=bf16)
    return plans


def train_pool(config: MembershipConfig, ctx: RunContext, data: DataBundle, keep: Tensor, rows: Tensor, *,
                prefix: str, role: str, view: Any = None) -> list[TrialRecord]:
    """Train the M pool models (model m on the pool rows where keep[m]); a view's inserted
    examples are in every model. Each model reports its logits (:func:`pool_plans`) as it finishes; its
    weights are saved only when :func:`needs_weights`. Returns the records of the models that trained (a
    failed one is left out and named in ``ctx.failed``; see :func:`surviving_pool`)."""
    n_train, extra = len(data.train), (view.num_inserted if view is not None else 0)
    trials = []
    for m in range(config.pool.models):
        mask = torch.zeros(n_train + extra, dtype=torch.bool)
        mask[rows[keep[m]]] = True
        mask[n_train:] = True
        trials.append(TrialSpec(f"{prefix}-{m:04d}", seed=config.trial_seed(m), mask=mask,
                                view=role if view is not None else None, tags={"role": role, "model": m}))
    views = {role: view} if view is not None else None
    job = dataclasses.replace(config.factory_job(data, trials, device=ctx.device, views=views),
                              queries=pool_plans(config, data, rows), evaluate=config.pool.accuracy == "recipe")
    return ctx.train(job, save_weights=needs_weights(config), label=f"training the {role} models", on_failure="skip")


def pool_observations(config: MembershipConfig, ctx: RunContext, data: DataBundle, records: list[dict[str, Any]],
                      rows: Tensor, keep: Tensor, queries: tuple[str, ...]) -> Observations:
    """The pool's :class:`Observations`: logits on the pool rows, the population's logits when an attack
    scores against one (RMIA), and a label oracle over the models when a label-only attack is run."""
    x, y = data.train.x[rows], data.train.y[rows]
    later = ("test",) if config.uses_test_logits else ()  # read from the same files now (ctx.query_logits)
    pop_x = pop_y = pop = None
    if uses_population(config):
        pop_x, pop_y = population_rows(config, data, rows)
        pop = pool_logits(config, ctx, data, records, pop_x, queries, name="population", prefetch=("pool", *later))
    oracle = None
    if any(ATTACKS.get(name).needs_oracle for name in config.attacks):
        template = model_template(config.model, data)
        stacks = [stack_from_state_dicts(template, [load_checkpoint(ctx.out_dir / r["checkpoint"], sha256=r.get("sha256"))
                                                    for r in records[i:i + 16]], ctx.device)
                  for i in range(0, len(records), 16)]
        oracle = LabelOracle.from_stacks(stacks, x)
    logits = pool_logits(config, ctx, data, records, x, queries, name="pool", prefetch=later)
    return Observations(logits, y, keep, queries,
                        meta={"population_x": pop_x} if pop_x is not None else {},
                        population_logits=pop, population_labels=pop_y, oracle=oracle)


def pool_logits(config: MembershipConfig, ctx: RunContext, data: DataBundle, records: list[dict[str, Any]],
                x: Tensor, queries: tuple[str, ...], *, name: str, prefetch: tuple[str, ...] = ()) -> Tensor:
    """Logits float32 [M, N, A, C] of the recorded models on ``x`` [N, *shape]: those the models reported
    under the query plan ``name`` while training (:func:`pool_plans`), else from their checkpoints (a run
    trained before the plans existed); files verified against their sha256. ``prefetch``: the plans read next
    (:meth:`RunContext.query_logits`)."""
    reported = ctx.query_logits(records, name, prefetch=prefetch)
    if reported is not None:
        if reported.shape[1:3] != (x.shape[0], len(queries)):
            raise DataError(f"the {name!r} logits kept in the run have shape {list(reported.shape)}, not [M, "
                            f"{x.shape[0]}, {len(queries)}, C]: the run's models were trained for other queries; "
                            "start a new --out")
        return reported
    if any(not r.get("checkpoint") for r in records):
        raise DataError(f"the pool models kept neither their {name!r} logits nor their weights; start a new --out")
    paths = [ctx.out_dir / r["checkpoint"] for r in records]
    return logits_from_checkpoints(functools.partial(model_template, config.model, data), paths, x, queries=queries,
                                   device=ctx.device, sha256=[r.get("sha256") for r in records],
                                   bf16=config.pool.query_precision == "bf16")


def pool_test_logits(config: MembershipConfig, ctx: RunContext, data: DataBundle,
                     records: list[dict[str, Any]]) -> Tensor:
    """Logits float32 [M, N_test, 1, C] of the recorded pool models on the test split (identity view): the ``test``
    query plan's (:func:`pool_plans`), else from their checkpoints."""
    return pool_logits(config, ctx, data, records, data.test.x, ("identity",), name="test")


def pool_accuracy(config: MembershipConfig, ctx: RunContext, data: DataBundle, records: list[dict[str, Any]], *,
                  test_logits: Tensor | None = None) -> np.ndarray:
    """Test accuracy float64 [M] of the recorded pool models as ``pool.accuracy`` says: the recipe's evaluation
    (``recipe``, in each record's metrics) or the argmax of the identity-view test logits (``test-logits``;
    ``test_logits`` [M, N_test, 1, C] when already read)."""
    if config.pool.accuracy == "recipe":
        return np.array([r["metrics"]["test_accuracy"] for r in records], dtype=float)
    logits = test_logits if test_logits is not None else pool_test_logits(config, ctx, data, records)
    return (logits[:, :, 0].argmax(-1) == data.test.y).double().mean(1).numpy()


def load_pool(out_dir: str | Path, *, data: DataBundle | None = None) -> Observations:
    """The pool of a finished ``membership-inference`` run, read back from its folder, to score it with
    other attacks or options without training again (``score_all_targets(name, load_pool(out), ...)``).

    Reads ``config.yaml``, ``artifacts/inclusion.npy`` and the logits each model reported while training
    (``artifacts/queries/pool-*.pt``, weights-only loads; their sha256 are in the run store's trial records).
    A model whose training failed has no file and is left out with its row of the inclusion matrix, as in the
    run. ``data``: the run's dataset when already loaded (else loaded from the config). Returns
    :class:`Observations` with logits [M, N, A, C] and, when the run scored RMIA/BASE against a
    population, ``population_logits`` [M, Z, A, C].
    """
    from ..config import load_yaml
    from .base import parse_config

    out = Path(out_dir).expanduser()
    config = parse_config(load_yaml(out / "config.yaml"))
    if not isinstance(config, MembershipConfig):
        raise ConfigError(f"{str(out)!r} holds a {config.kind} run, not membership-inference")
    data = data if data is not None else load_dataset(config.dataset)
    rows = pool_indices(config, len(data.train))
    keep = torch.from_numpy(np.load(out / "artifacts" / "inclusion.npy"))
    files = {int(p.stem.rsplit("-", 1)[1]): p for p in (out / "artifacts" / "queries").glob("pool-*.pt")}
    if not files:
        raise DataError(f"{str(out)!r} holds no pool logits (artifacts/queries/pool-*.pt): the run trained none, or "
                        "before models reported their logits (query its checkpoints with logits_from_checkpoints)")
    models = sorted(files)
    parts = [load_checkpoint(files[m]) for m in models]
    pop = torch.stack([p["population"] for p in parts]) if all("population" in p for p in parts) else None
    pop_y = None
    if pop is not None:
        split, pop_rows = population_index(config, data, rows)
        pop_y = (data.test if split == "test" else data.train).y[pop_rows]
    return Observations(torch.stack([p["pool"] for p in parts]), data.train.y[rows], keep[models],
                        resolve_queries(config, data), meta={"models": models},
                        population_logits=pop, population_labels=pop_y)


@register_experiment("membership-inference", config=MembershipConfig, check=check_membership)
def run_membership(config: MembershipConfig, ctx: RunContext) -> ExperimentOutput:
    """Membership inference on a model pool: LOSS, Shokri, LiRA; Truth Serum; memorization."""
    from . import membership_report as rep

    data = ctx.load_dataset(config.dataset)
    rows = pool_indices(config, len(data.train))
    n, m = rows.numel(), config.pool.models
    keep = inclusion_matrix(m, n, keep=config.pool.keep, seed=config.seed)
    ctx.write_artifact("inclusion.npy", lambda f: np.save(f, keep.numpy()))
    if n < len(data.train):
        ctx.write_artifact("pool_indices.npy", lambda f: np.save(f, rows.numpy()))
    queries = resolve_queries(config, data)
    records = train_pool(config, ctx, data, keep, rows, prefix="pool", role="pool")
    models, used = surviving_pool(config, ctx, keep, records, prefix="pool")
    with ctx.cost.timed("query"):
        obs = pool_observations(config, ctx, data, records, rows, used, queries)
    if obs.logits.numel() * 4 < LOGITS_MAX_BYTES:
        ctx.write_artifact("logits.pt", lambda f: torch.save(
            {"logits": obs.logits, "labels": obs.labels, "keep": used, "models": models, "queries": list(queries),
             "population_logits": obs.population_logits, "population_labels": obs.population_labels}, f))
    task = ctx.progress.task("scoring the attacks", total=len(config.attacks))
    with ctx.cost.timed("score"):
        scores, diag = rep.score_pool(obs, config.attacks, options=config.resolved_attack_options, device=ctx.device,
                                      on_attack=lambda _name: ctx.progress.advance(task))
    ctx.progress.done(task)
    # uncompressed: float scores shrink by ~8% under zlib, which took ~11 s for a 256-model pool's 205 MB
    with ctx.cost.timed("artifacts"):
        ctx.write_artifact("scores.npz", lambda f: np.savez(f, **{k: v.numpy() for k, v in scores.items()}))
    task = ctx.progress.task(f"ROC metrics and {config.n_boot} bootstrap intervals", total=len(scores))
    with ctx.cost.timed("roc_bootstrap"):  # curves: the ROC curves of the metrics' own sort, for the figures
        roc, curves = rep.all_attack_metrics(scores, used, config, device=ctx.device,
                                             on_attack=lambda _name: ctx.progress.advance(task))
    metrics: dict[str, Any] = dict(roc)
    ctx.progress.done(task)
    test_logits = None
    if config.uses_test_logits:
        with ctx.cost.timed("query"):
            test_logits = pool_test_logits(config, ctx, data, records)
    acc = pool_accuracy(config, ctx, data, records, test_logits=test_logits)
    metrics["pool"] = {"models": len(models), "examples": n, "in_per_example": config.pool.in_per_example,
                       "queries": list(queries), "attack_options": config.resolved_attack_options,
                       "inclusion_sha256": _sha256(keep.numpy()),
                       "test_accuracy": MeanSE.of(acc).to_dict(), "test_accuracy_from": config.pool.accuracy}
    metrics["diagnostics"] = {"nonfinite_clipped": diag}
    failed = ctx.failed_note(metrics, what=f"of the {m} pool models", only=lambda t: t.startswith("pool-"),
                             effect="are dropped from the pool (their rows of the inclusion matrix): every "
                                    "number here comes from the models that trained")
    if failed:
        metrics["pool"]["models_planned"] = m
    with ctx.cost.timed("figures"):
        out = rep.base_report(config, data, obs, scores, metrics, records, curves)
    out = dataclasses.replace(out, notes=[*failed, *out.notes])  # what failed leads the notes
    if config.memorization:
        assert test_logits is not None  # read above
        with ctx.cost.timed("memorization"):
            out = rep.add_memorization(out, config, obs, scores=scores, test_logits=test_logits, data=data, rows=rows,
                                       artifacts=ctx.artifacts)
    if config.truth_serum is not None:
        from .membership_audit import run_truth_serum

        out = run_truth_serum(out, config, ctx, data, keep=keep, models=models, rows=rows, before=scores,
                              queries=queries)
    if config.target is not None:
        from .membership_audit import audit_target

        out = audit_target(out, config, ctx, data, obs, rows)
    return out
