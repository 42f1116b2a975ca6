"""Train a job's trials on one device, K models at a time, backing off when memory runs out.

Trials are grouped by steps-per-epoch (models trained together must take the same number of
steps, see :mod:`mlaudit.train.loop`), then each group is cut into chunks of K models. K is
``max_chunk`` when given (1 when ``batched=False``), else on CUDA measured: one training step of a
single model is profiled and K is chosen so that K such footprints fit in 80% of the free device
memory (on CPU, :data:`CPU_DEFAULT_CHUNK`). When a chunk still runs out of memory it is halved and
retried; finished chunks are never lost (each model is handed to ``on_result`` as soon as its
chunk ends, e.g. to be committed to the run store).

Chunk composition depends only on the job (trial order, group, K), so with ``max_chunk`` set the
same job gives the same chunks, and hence the same models, locally, in a process pool or on Ray.
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
from ..data.view import DataView
from ..errors import BudgetError, ConfigError
from ..models.registry import build_model
from ..train.evaluate import evaluate
from ..train.loop import (
    StackedModels,
    TrainOutput,
    init_models,
    on_device,
    resolve_augment,
    train_stack,
    use_bf16,
)
from .layout import PROBE_MAX_MODELS, CompileProbe, dp_fast_loop, pick_layout
from .spec import FactoryJob, TrainedModel, TrialSpec, resolve_device

log = logging.getLogger(__name__)
ResultFn = Callable[[TrainedModel], None]
CPU_DEFAULT_CHUNK = 16
"""Models per chunk on CPU when ``max_chunk`` is not set (no memory to measure)."""


class SimulatedOOM(RuntimeError):
    """Raised instead of a CUDA OOM when ``FactoryJob.fake_memory_models`` is exceeded (tests)."""


class _Setup:
    """What every chunk of a job shares: data and views on the device, lr, augmentation, builder."""

    def __init__(self, job: FactoryJob, data: DataBundle, device: torch.device) -> None:
        self.device = device
        self.data = data if on_device(data.train.device, device) else data.to(device)
        self.views: dict[str, DataView] = {k: v if on_device(v.device, device) else v.to(device)
                                           for k, v in job.views.items()}
        self.lr = job.recipe.resolved_lr(residual=job.model.residual)
        self.augment = resolve_augment(job.recipe, data.name, data.input_shape)
        self.model_fn = functools.partial(build_model, job.model, input_shape=data.input_shape,
                                          num_classes=data.num_classes)
        self.recipe = job.recipe
        self.strategy = job.strategy
        self._layouts: dict[int, tuple[str, str]] = {}
        self._compile: CompileProbe | None = None
        # what a background compile runs on its trained stack: a chunk's evaluation and queries (their graphs)
        self.warm: Callable[[StackedModels], object] | None = (
            functools.partial(_evaluate_and_query, job, setup=self) if job.evaluate or job.queries else None)
        self.trials = job.trials
        self.measured_chunk: int | None = None

    def layout(self, k: int) -> str:
        """Stack layout for a chunk of ``k`` models (see factory/layout.py). Measured once per probe size: the
        probe trains min(k, PROBE_MAX_MODELS) models, so every k from that size up shares one measurement
        (a DP audit that backs off from 150 to 75, 38 and 19 models per chunk re-probed 16 models each time,
        ~16 s a probe on the H200, 2026-12-03)."""
        key = min(k, PROBE_MAX_MODELS)
        if key not in self._layouts:
            self._layouts[key] = pick_layout(self.strategy, k=k, model_fn=self.model_fn, data=self.data.train,
                                             recipe=self.recipe, lr=self.lr, device=self.device, augment=self.augment)
        return self._layouts[key][0]

    def compile_for(self, k: int, layout: str) -> tuple[bool, str]:
        """``recipe.compile`` for the next chunk and why; ``auto`` is probed once, on the first chunk, and compiles
        in the background while the first chunks train eagerly (:class:`~mlaudit.factory.layout.CompileProbe`)."""
        if self._compile is None:
            sizes = ([int(t.mask.sum()) if t.mask is not None else self.total(t) for t in self.trials]
                     if self.recipe.compile == "auto" else [])  # training examples per model: auto's estimate only
            self._compile = CompileProbe(self.recipe, layout=layout, k=k, model_fn=self.model_fn,
                                         data=self.data.train, lr=self.lr, device=self.device, augment=self.augment,
                                         job_sizes=sizes, background=True, warm=self.warm)
        return self._compile.decision()

    def close(self) -> None:
        """The end of the job: wait for a background compile still running."""
        if self._compile is not None:
            self._compile.close()

    def total(self, t: TrialSpec) -> int:
        """Rows of trial ``t``'s training set (its view's, or the base data's): what its mask indexes."""
        return self.views[t.view].num_total if t.view is not None else len(self.data.train)

    def layout_reason(self, k: int) -> str:
        """Why :meth:`layout` chose what it did for ``k`` models (recorded in each model's metrics)."""
        return self._layouts[min(k, PROBE_MAX_MODELS)][1]


def run_trials(job: FactoryJob, *, on_result: ResultFn | None = None,
               on_epoch: Callable[[int, int], None] | None = None) -> list[TrainedModel]:
    """Train every trial of ``job`` on ``job.device``; returns models in trial order.

    ``on_result(model)`` is called once per model as soon as its chunk finishes; ``on_epoch(epoch,
    models_in_chunk)`` after every epoch of every chunk (progress bars).

    Raises: :class:`ConfigError` for masks that do not fit the data, :class:`BudgetError` when a
    single model does not fit on the device, :class:`TrainingError` when a loss diverges.
    """
    data = job.data if job.data is not None else cached_dataset(job.data_spec)
    for plan in job.queries.values():
        plan.check(data)
    if job.trainer is not None:  # the user's own training function, one trial at a time
        from .user import run_user_trials

        check_masks(job, data)
        return run_user_trials(job, data, resolve_device(job.device), on_result)
    device = resolve_device(job.device)
    if job.data is None and device.type == "cuda":
        # a worker's job reloaded from its spec: keep one device copy per worker across its tasks
        # instead of copying the dataset host-to-device for every chunk (hundreds with max_chunk=1)
        data = _on_device_by_json(job.data_spec.model_dump_json(), str(device))
    setup = _Setup(job, data, device)
    try:
        return _run_groups(job, data, setup, on_result, on_epoch)
    finally:
        setup.close()


def _run_groups(job: FactoryJob, data: DataBundle, setup: _Setup, on_result: ResultFn | None,
                on_epoch: Callable[[int, int], None] | None) -> list[TrainedModel]:
    """run_trials' loop: each group of trials in chunks, halving a chunk that runs out of memory."""
    done: dict[str, TrainedModel] = {}
    ceiling: int | None = None  # the chunk size an out-of-memory back-off settled on: later groups start there
    for group in plan_groups(job, data):
        k = _initial_chunk(job, setup, len(group))
        k = k if ceiling is None else min(k, ceiling)
        pending = list(group)
        while pending:
            chunk = pending[:k]
            models: list[TrainedModel] | None = None
            try:
                if job.fake_memory_models is not None and len(chunk) > job.fake_memory_models:
                    raise SimulatedOOM(f"simulated: {len(chunk)} models > {job.fake_memory_models}")
                models = _train_chunk(job, chunk, setup, on_epoch)
            except (torch.cuda.OutOfMemoryError, SimulatedOOM) as e:
                if len(chunk) == 1:
                    raise BudgetError(f"a single model does not fit on {setup.device}: {e}; use a smaller "
                                      "model, batch size or a device with more memory") from e
                k = ceiling = (len(chunk) + 1) // 2
                log.warning("out of memory with %d models per chunk; retrying with %d", len(chunk), k)
            if models is None:  # outside the except block, so the failed chunk's tensors are freed
                if setup.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            for m in models:
                done[m.trial_id] = m
                if on_result is not None:
                    on_result(m)
            pending = pending[len(chunk):]
            # one line per chunk: a long run cut short (a time limit) still shows how far it got and at what rate
            log.info("chunk of %d models done in %.1f s (%d of %d trials)", len(chunk),
                     models[0].wall_s * len(chunk), len(done), len(job.trials))
    return [done[t.trial_id] for t in job.trials]


def _train_chunk(job: FactoryJob, chunk: list[TrialSpec], setup: _Setup,
                 on_epoch: Callable[[int, int], None] | None) -> list[TrainedModel]:
    t0 = time.perf_counter()
    device = setup.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seeds = [t.seed for t in chunk]
    layout = setup.layout(len(chunk))
    compiled, compile_why = setup.compile_for(len(chunk), layout)
    recipe = job.recipe if compiled is job.recipe.compile else job.recipe.model_copy(update={"compile": compiled})
    models = init_models(setup.model_fn, seeds)
    views = [setup.views[t.view] if t.view is not None else None for t in chunk]
    trained: dict[int, StackedModels] = {}
    outs = train_stack(models, setup.data.train, recipe, seeds=seeds, lr=setup.lr, device=device, views=views,
                       masks=_masks(chunk, setup), augment=setup.augment,
                       hooks=[t.hooks for t in chunk] if any(t.hooks is not None for t in chunk) else None,
                       on_epoch=(lambda e, _loss: on_epoch(e, len(chunk))) if on_epoch else None,
                       strategy=layout, on_epoch_models=lambda e, st: trained.__setitem__(0, st))
    reason = setup.layout_reason(len(chunk)) + ("; " + compile_why if job.recipe.compile == "auto" else
                                                 ", torch.compile" if compiled else "")
    metrics: list[dict[str, float | str]] = [{"train_loss": o.train_loss, "stack_layout": layout,
                                              "stack_layout_reason": reason, "step_path": o.step_path, **o.privacy}
                                             for o in outs]
    stack = None
    if job.evaluate or job.queries:
        # the trained stack itself, still on the device (its weights are exactly the returned state_dicts)
        stack = trained[0] if 0 in trained else StackedModels.from_modules(_loaded(models, outs), device, strategy=layout)
    ev, outputs = _evaluate_and_query(job, stack, setup) if stack is not None else (None, None)
    if ev is not None:
        for i, m in enumerate(metrics):
            m["test_accuracy"] = float(ev["accuracy"][i])
            m["test_loss"] = float(ev["loss"][i])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        for m in metrics:
            m["peak_gpu_mem_mb"] = peak  # the chunk's peak, shared by its models
    wall = (time.perf_counter() - t0) / len(chunk)
    return [TrainedModel(t.trial_id, t.seed, o.state_dict, m, o.steps, wall, dict(t.tags),
                         outputs=outputs[i] if outputs else {})
            for i, (t, o, m) in enumerate(zip(chunk, outs, metrics))]


def _evaluate_and_query(job: FactoryJob, stack: StackedModels, setup: _Setup
                        ) -> tuple[dict[str, torch.Tensor] | None, list[dict[str, torch.Tensor]]]:
    """A trained chunk's test evaluation (if the job evaluates) and query outputs (:func:`query_outputs`); also what
    a background compile runs on its stack (``_Setup.warm``), so the compiled chunks find these graphs ready."""
    ev = (evaluate(stack, setup.data.test, batch_size=job.recipe.eval_batch_size,
                   bf16=use_bf16(job.recipe, setup.device), tta=job.recipe.tta) if job.evaluate else None)
    return ev, query_outputs(job, stack, setup.data, batch_size=job.recipe.eval_batch_size)


def query_outputs(job: FactoryJob, stack: StackedModels, data: DataBundle, *,
                  batch_size: int = 1024) -> list[dict[str, torch.Tensor]]:
    """Each model's logits under the job's :attr:`~FactoryJob.queries`: one ``{name: float32 [N, A, C]}``
    (CPU) per model of ``stack`` [K], computed on the stack's device from ``data`` as it is there (the
    one logits path, :func:`mlaudit.query.logits.collect_logits`). Empty dicts when the job asks none."""
    from ..query.logits import collect_logits

    per_model: list[dict[str, torch.Tensor]] = [{} for _ in range(stack.k)]
    for name, plan in job.queries.items():
        logits = collect_logits(stack, plan.inputs(data), queries=plan.queries, batch_size=batch_size,
                                bf16=plan.bf16)  # [K, N, A, C]
        for i in range(stack.k):
            per_model[i][name] = logits[i].clone()  # its own storage: a model's record is saved alone
    return per_model


def _loaded(models: list[torch.nn.Module], outs: list[TrainOutput]) -> list[torch.nn.Module]:
    for m, o in zip(models, outs):
        m.load_state_dict(o.state_dict)
    return models


def _total(t: TrialSpec, job: FactoryJob, data: DataBundle) -> int:
    """Number of virtual training indices of trial ``t`` (base rows plus its view's inserted ones)."""
    return job.views[t.view].num_total if t.view is not None else len(data.train)


def check_masks(job: FactoryJob, data: DataBundle) -> None:
    """Raise :class:`ConfigError` unless every trial's mask has one entry per virtual index."""
    for t in job.trials:
        if t.mask is not None and t.mask.numel() != _total(t, job, data):
            raise ConfigError(
                f"trial {t.trial_id!r}: mask has {t.mask.numel()} entries but its training data has "
                f"{_total(t, job, data)} (virtual) indices ({len(data.train)} base rows"
                f"{'' if t.view is None else f' + view {t.view!r} inserted ones'}); give one bool per index")


def _masks(chunk: list[TrialSpec], setup: _Setup) -> torch.Tensor | None:
    """bool [K, max N_total] (rows of views with fewer indices padded with False), or None."""
    if all(t.mask is None for t in chunk):
        return None
    rows = []
    for t in chunk:
        rows.append(t.mask.cpu() if t.mask is not None else torch.ones(setup.total(t), dtype=torch.bool))
    n = max(len(r) for r in rows)
    return torch.stack([torch.cat([r, torch.zeros(n - len(r), dtype=torch.bool)]) for r in rows])


def plan_groups(job: FactoryJob, data: DataBundle) -> list[list[TrialSpec]]:
    """Trials grouped by steps per epoch, in first-appearance order; trial order kept inside.

    Raises :class:`ConfigError` (via :func:`check_masks`) when a mask does not fit its data."""
    check_masks(job, data)
    bsz = job.recipe.batch_size
    groups: dict[int, list[TrialSpec]] = {}
    for t in job.trials:
        pool = job.views[t.view].kept_indices().cpu() if t.view is not None else None
        if t.mask is None:
            n = len(pool) if pool is not None else len(data.train)
        else:
            n = int(t.mask.cpu()[pool].sum()) if pool is not None else int(t.mask.sum())
        groups.setdefault(math.ceil(n / bsz), []).append(t)
    return list(groups.values())


def _initial_chunk(job: FactoryJob, setup: _Setup, n: int) -> int:
    if not job.batched:
        return 1
    if job.max_chunk is not None:
        return max(1, min(job.max_chunk, n))
    if setup.device.type != "cuda":
        return min(CPU_DEFAULT_CHUNK, n)
    if setup.measured_chunk is None:  # once per job: every group trains the same model under the same recipe
        setup.measured_chunk = measure_chunk_size(job, setup.device, setup.model_fn, setup.data, setup.lr)
    return min(n, setup.measured_chunk)


def measure_chunk_size(job: FactoryJob, device: torch.device, model_fn: Callable[[], torch.nn.Module],
                       data: DataBundle, lr: float) -> int:
    """How many models fit: peak memory per model of a training step vs free device memory.

    Measured for one model and, when the chunk may take the vmap layout (``strategy`` auto or vmap), for two
    models in that layout; the larger per-model figure counts. vmap needs more per model, most with DP-SGD,
    whose per-example path keeps [K, B, *params] gradients: on the H200 (2026-12-03, a fast-CNN DP audit)
    one model measured 495.5 MiB, so chunks of 228 were planned and ran out of memory at 150, 75 and 38."""
    probe_recipe = job.recipe.model_copy(update={"epochs": 1})
    n_probe = min(len(data.train), job.recipe.batch_size)
    probe = data.train.subset(torch.arange(n_probe))

    def peak_per_model(k: int, strategy: str) -> float:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        train_stack(init_models(model_fn, range(k)), probe, probe_recipe, seeds=list(range(k)), lr=lr, device=device,
                    strategy=strategy)
        return max(torch.cuda.max_memory_allocated(device) - base, 1) / k

    per_model = peak_per_model(1, "auto")
    loop_only = job.strategy == "loop" or (job.strategy == "auto" and dp_fast_loop(job.recipe, model_fn, device))
    if not loop_only:
        try:
            per_model = max(per_model, peak_per_model(2, "vmap"))
        except Exception as e:  # noqa: BLE001 - advisory: out of memory, or a model vmap cannot stack (the
            # layout probe then keeps the loop); the OOM retry of run_trials still halves chunks as needed
            log.debug("vmap memory probe failed (%s: %s); sizing chunks by one model", type(e).__name__, e)
        torch.cuda.empty_cache()
    free, _total = torch.cuda.mem_get_info(device)
    k = int(0.8 * free // per_model)
    log.info("measured %.1f MiB per model, %.1f GiB free -> %d models per chunk", per_model / 2**20, free / 2**30, k)
    return max(1, k)


def cached_dataset(spec: DatasetSpec | None) -> DataBundle:
    """Load (once per worker process) the dataset a remote job names."""
    if spec is None:
        raise ConfigError("factory job has neither data nor data_spec; pass the loaded bundle or its DatasetSpec")
    return _load_by_json(spec.model_dump_json())


@functools.lru_cache(maxsize=2)
def _load_by_json(spec_json: str) -> DataBundle:
    return load_dataset(DatasetSpec.model_validate_json(spec_json))


@functools.lru_cache(maxsize=1)
def _on_device_by_json(spec_json: str, device: str) -> DataBundle:
    return _load_by_json(spec_json).to(device)
