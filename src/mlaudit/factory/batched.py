"""Train a job's trials on one device, K models at a time, backing off when memory runs out.

Trials are grouped by steps-per-epoch (models trained together must take the same number of
steps, see :mod:`mlaudit.train.loop`), then each group is cut into chunks of K models. K is
``max_chunk`` when given, else measured: one training step of a single model is profiled and K is
chosen so that K such footprints fit in 80% of the free device memory. When a chunk still runs
out of memory, K is halved and the chunk retried; finished chunks are never lost (each model is
handed to ``on_result`` as soon as its chunk ends, e.g. to be committed to the run store).

Chunk composition depends only on the job (trial order, group, K), never on the executor, so the
same job gives the same models locally, in a process pool or on Ray.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable

import torch

from ..data.base import DataBundle
from ..data.registry import DatasetSpec, load_dataset
from ..errors import BudgetError
from ..models.registry import build_model, model_entry
from ..train.evaluate import evaluate
from ..train.loop import StackedModels, init_models, resolve_augment, train_stack, use_bf16
from .spec import FactoryJob, TrainedModel, TrialSpec, resolve_device

log = logging.getLogger(__name__)
ResultFn = Callable[[TrainedModel], None]
CPU_DEFAULT_CHUNK = 16


class SimulatedOOM(RuntimeError):
    """Raised instead of a CUDA OOM when ``FactoryJob.fake_memory_models`` is exceeded (tests)."""


def run_trials(job: FactoryJob, *, on_result: ResultFn | None = None,
               on_epoch: Callable[[int, int], None] | None = None) -> list[TrainedModel]:
    """Train every trial of ``job`` on ``job.device``; returns models in trial order."""
    data = job.data if job.data is not None else cached_dataset(job.data_spec)
    device = resolve_device(job.device)
    entry = model_entry(job.model.name)
    recipe = job.recipe
    lr = recipe.resolved_lr(residual=entry.residual)
    augment = resolve_augment(recipe, data.name, data.input_shape)
    model_fn = functools.partial(build_model, job.model, input_shape=data.input_shape, num_classes=data.num_classes)
    done: dict[str, TrainedModel] = {}
    for group in _groups(job, data):
        k = _initial_chunk(job, device, len(group), model_fn, data, lr)
        pending = list(group)
        while pending:
            chunk = pending[:k]
            try:
                if job.fake_memory_models is not None and len(chunk) > job.fake_memory_models:
                    raise SimulatedOOM(f"simulated: {len(chunk)} models > {job.fake_memory_models}")
                models = _train_chunk(job, chunk, data, device, model_fn, lr, augment, on_epoch)
            except (torch.cuda.OutOfMemoryError, SimulatedOOM) as e:
                if k == 1:
                    raise BudgetError(f"a single model does not fit on {device}: {e}") from e
                k = max(1, k // 2)
                log.warning("out of memory with %d models per chunk; retrying with %d", len(chunk), k)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            for m in models:
                done[m.trial_id] = m
                if on_result is not None:
                    on_result(m)
            pending = pending[len(chunk):]
    return [done[t.trial_id] for t in job.trials]


def _train_chunk(job: FactoryJob, chunk: list[TrialSpec], data: DataBundle, device: torch.device,
                 model_fn: Callable[[], torch.nn.Module], lr: float, augment, on_epoch) -> list[TrainedModel]:  # noqa: ANN001
    t0 = time.perf_counter()
    seeds = [t.seed for t in chunk]
    models = init_models(model_fn, seeds)
    views = [job.views[t.view] if t.view is not None else None for t in chunk]
    masks = _masks(chunk, data, job)
    outs = train_stack(models, data.train, job.recipe, seeds=seeds, lr=lr, device=device, views=views,
                       masks=masks, augment=augment,
                       on_epoch=(lambda e, _loss: on_epoch(e, len(chunk))) if on_epoch else None)
    metrics: list[dict[str, float]] = [{"train_loss": o.train_loss} for o in outs]
    if job.evaluate:
        stack = StackedModels.from_modules(_loaded(models, outs), device)
        ev = evaluate(stack, data.test.to(device), batch_size=job.recipe.eval_batch_size,
                      bf16=use_bf16(job.recipe, device))
        for i, m in enumerate(metrics):
            m["test_accuracy"] = float(ev["accuracy"][i])
            m["test_loss"] = float(ev["loss"][i])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = (time.perf_counter() - t0) / len(chunk)
    return [TrainedModel(t.trial_id, t.seed, o.state_dict, m, o.steps, wall, dict(t.tags))
            for t, o, m in zip(chunk, outs, metrics)]


def _loaded(models: list[torch.nn.Module], outs) -> list[torch.nn.Module]:  # noqa: ANN001
    for m, o in zip(models, outs):
        m.load_state_dict(o.state_dict)
    return models


def _masks(chunk: list[TrialSpec], data: DataBundle, job: FactoryJob) -> torch.Tensor | None:
    if all(t.mask is None for t in chunk):
        return None
    rows = []
    for t in chunk:
        total = job.views[t.view].num_total if t.view is not None else len(data.train)
        rows.append(t.mask.bool().cpu() if t.mask is not None else torch.ones(total, dtype=torch.bool))
    if len({len(r) for r in rows}) != 1:  # views of different lengths: pad with False
        n = max(len(r) for r in rows)
        rows = [torch.cat([r, torch.zeros(n - len(r), dtype=torch.bool)]) for r in rows]
    return torch.stack(rows)


def _groups(job: FactoryJob, data: DataBundle) -> list[list[TrialSpec]]:
    """Trials grouped by steps per epoch, in first-appearance order; trial order kept inside."""
    bsz = job.recipe.batch_size
    groups: dict[int, list[TrialSpec]] = {}
    for t in job.trials:
        if t.view is not None:
            view = job.views[t.view]
            pool = view.kept_indices()
            n = int(t.mask.bool()[pool].sum()) if t.mask is not None else len(pool)
        else:
            n = int(t.mask.bool().sum()) if t.mask is not None else len(data.train)
        groups.setdefault(math.ceil(n / bsz), []).append(t)
    return list(groups.values())


def _initial_chunk(job: FactoryJob, device: torch.device, n: int, model_fn, data: DataBundle, lr: float) -> int:  # noqa: ANN001
    if not job.batched:
        return 1
    if job.max_chunk is not None:
        return max(1, min(job.max_chunk, n))
    if device.type != "cuda":
        return min(CPU_DEFAULT_CHUNK, n)
    return min(n, measure_chunk_size(job, device, model_fn, data, lr))


def measure_chunk_size(job: FactoryJob, device: torch.device, model_fn, data: DataBundle, lr: float) -> int:  # noqa: ANN001
    """How many models fit: peak memory of one model's training step vs free device memory."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    probe_recipe = job.recipe.model_copy(update={"epochs": 1})
    n_probe = min(len(data.train), job.recipe.batch_size)
    probe = data.train.subset(torch.arange(n_probe))
    train_stack(init_models(model_fn, [0]), probe, probe_recipe, seeds=[0], lr=lr, device=device)
    per_model = max(torch.cuda.max_memory_allocated(device) - base, 1)
    free, _total = torch.cuda.mem_get_info(device)
    k = int(0.8 * free // per_model)
    log.info("measured %.1f MiB per model, %.1f GiB free -> %d models per chunk", per_model / 2**20, free / 2**30, k)
    return max(1, k)


def cached_dataset(spec: DatasetSpec | None) -> DataBundle:
    """Load (once per worker process) the dataset a remote job names."""
    if spec is None:
        raise ValueError("job has neither data nor data_spec")
    return _load_by_json(spec.model_dump_json())


@functools.lru_cache(maxsize=2)
def _load_by_json(spec_json: str) -> DataBundle:
    return load_dataset(DatasetSpec.model_validate_json(spec_json))
