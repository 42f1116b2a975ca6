"""The model factory: train many models at once (batched on one device) and across workers.

    job = FactoryJob(model=ModelSpec(name="mlp"), recipe=resolve_recipe("fast"), data=bundle,
                     trials=tuple(TrialSpec(f"m{i}", seed=i) for i in range(16)))
    models = train_many(job, executor="local")

Every experiment kind trains its models through :func:`train_many`.
"""

from __future__ import annotations

from collections.abc import Callable

from .batched import SimulatedOOM, check_masks, measure_chunk_size, plan_groups, run_trials
from .executors import (
    EXECUTORS,
    Executor,
    LocalExecutor,
    ProcessExecutor,
    RayExecutor,
    make_executor,
    plan_chunks,
)
from .spec import FactoryJob, QueryPlan, TrainedModel, TrialSpec, resolve_device


def train_many(job: FactoryJob, *, executor: str | Executor = "local",
               on_result: Callable[[TrainedModel], None] | None = None,
               **executor_options: object) -> list[TrainedModel]:
    """Train every trial of ``job`` with the named executor (or an executor instance).

    Returns the models in trial order; each also goes to ``on_result`` as soon as its chunk ends.
    ``executor_options`` are the named executor's options (e.g. ``workers=2`` for ``process``).
    """
    ex = make_executor(executor, **executor_options) if isinstance(executor, str) else executor
    return ex.execute(job, on_result=on_result)


__all__ = [
    "EXECUTORS", "Executor", "FactoryJob", "LocalExecutor", "ProcessExecutor", "QueryPlan", "RayExecutor", "SimulatedOOM",
    "TrainedModel", "TrialSpec", "check_masks", "make_executor", "measure_chunk_size", "plan_chunks", "plan_groups",
    "resolve_device", "run_trials", "train_many",
]
