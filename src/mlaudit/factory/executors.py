"""Executors: where a factory job's chunks run. One interface, a registry of three.

``local``    in this process (batched or sequential).
``process``  a local pool of worker processes (spawned), one per GPU when there are several, else
             ``workers`` CPU processes; each worker trains whole chunks.
``ray``      Ray tasks, one per chunk, with fractional GPUs; connects to ``address`` or starts a
             local instance bound to 127.0.0.1. Failed tasks (a dead worker, an exception) are
             retried up to ``max_retries`` times.

Every executor cuts the job into the same chunks (:func:`plan_chunks`) and streams each finished
model to ``on_result`` as soon as its chunk returns, so an interruption loses no finished model.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Protocol

import torch

from ..errors import ConfigError
from ..registry import Registry
from .batched import CPU_DEFAULT_CHUNK, run_trials
from .spec import FactoryJob, TrainedModel

log = logging.getLogger(__name__)
ResultFn = Callable[[TrainedModel], None]


class Executor(Protocol):
    name: str

    def execute(self, job: FactoryJob, *, on_result: ResultFn | None = None) -> list[TrainedModel]: ...


EXECUTORS: Registry[Callable[..., Executor]] = Registry("executor")


def make_executor(name: str, **options: object) -> Executor:
    """Build an executor by name with its keyword options (unknown options are a ConfigError)."""
    factory = EXECUTORS.get(name)
    try:
        return factory(**options)
    except TypeError as e:
        raise ConfigError(f"executor {name!r}: {e}") from None


def plan_chunks(job: FactoryJob, parts_hint: int) -> list[FactoryJob]:
    """Split a job into sub-jobs of whole chunks for remote workers.

    The chunk size is ``job.max_chunk`` (or 1 when not batched, or the CPU default); sub-jobs keep
    ``max_chunk`` so each worker trains exactly the chunks the local executor would.
    """
    size = 1 if not job.batched else (job.max_chunk or (CPU_DEFAULT_CHUNK if parts_hint <= 1 else
                                                         max(1, -(-len(job.trials) // parts_hint))))
    trials = list(job.trials)
    return [job.with_trials(trials[i:i + size]).slim_views() for i in range(0, len(trials), size)]


@EXECUTORS.register("local")
@dataclass
class LocalExecutor:
    name: str = "local"

    def execute(self, job: FactoryJob, *, on_result: ResultFn | None = None) -> list[TrainedModel]:
        return run_trials(job, on_result=on_result)


def _worker_run(job: FactoryJob, gpu_queue: object | None = None) -> list[TrainedModel]:
    return run_trials(job)


def _pin_gpu(counter: object) -> None:  # process-pool initializer: one GPU per worker
    with counter.get_lock():  # type: ignore[attr-defined]
        idx = counter.value  # type: ignore[attr-defined]
        counter.value += 1  # type: ignore[attr-defined]
    if torch.cuda.is_available():
        torch.cuda.set_device(idx % torch.cuda.device_count())


@EXECUTORS.register("process")
@dataclass
class ProcessExecutor:
    workers: int | None = None
    name: str = "process"

    def execute(self, job: FactoryJob, *, on_result: ResultFn | None = None) -> list[TrainedModel]:
        ngpu = torch.cuda.device_count() if job.device != "cpu" else 0
        n = self.workers or max(1, ngpu or min(2, os.cpu_count() or 1))
        parts = plan_chunks(job, n)
        ctx = mp.get_context("spawn")
        counter = ctx.Value("i", 0)
        results: dict[str, TrainedModel] = {}
        with ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_pin_gpu, initargs=(counter,)) as pool:
            futures = {pool.submit(_worker_run, p.for_remote()) for p in parts}
            while futures:
                finished, futures = wait(futures, return_when=FIRST_COMPLETED)
                for f in finished:
                    for m in f.result():
                        results[m.trial_id] = m
                        if on_result is not None:
                            on_result(m)
        return [results[t.trial_id] for t in job.trials]


@EXECUTORS.register("ray")
@dataclass
class RayExecutor:
    """Ray tasks, one per chunk. ``address=None`` starts a local Ray bound to 127.0.0.1 with
    ``num_cpus`` CPUs; ``gpus_per_task`` may be fractional (e.g. 0.25 packs 4 chunks per GPU)."""

    address: str | None = None
    num_cpus: int | None = None
    gpus_per_task: float | None = None
    max_retries: int = 2
    name: str = "ray"

    def execute(self, job: FactoryJob, *, on_result: ResultFn | None = None) -> list[TrainedModel]:
        try:
            import ray
        except ImportError:
            raise ConfigError("executor 'ray' needs the optional extra: pip install 'mlaudit[ray]'") from None
        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, log_to_driver=False)
            else:
                ray.init(num_cpus=self.num_cpus or min(2, os.cpu_count() or 1), include_dashboard=False,
                         _node_ip_address="127.0.0.1", log_to_driver=False)
        gpus = self.gpus_per_task if self.gpus_per_task is not None else (1.0 if job.device.startswith("cuda") or
                                                                          (job.device == "auto" and torch.cuda.is_available()) else 0.0)
        n_workers = int(ray.cluster_resources().get("GPU" if gpus else "CPU", 1) / (gpus or 1))
        task = ray.remote(num_gpus=gpus, num_cpus=1, max_retries=self.max_retries, retry_exceptions=True)(_ray_task)
        parts = plan_chunks(job, max(1, n_workers))
        refs = [task.remote(p.for_remote()) for p in parts]
        results: dict[str, TrainedModel] = {}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for m in ray.get(ready[0]):
                results[m.trial_id] = m
                if on_result is not None:
                    on_result(m)
        return [results[t.trial_id] for t in job.trials]


def _ray_task(job: FactoryJob) -> list[TrainedModel]:
    # Test hook: MLAUDIT_TEST_KILL_ONCE=<dir> makes the first task that sees no marker file in <dir>
    # kill its own worker process, to exercise Ray's retry of a lost worker.
    marker_dir = os.environ.get("MLAUDIT_TEST_KILL_ONCE")
    if marker_dir:
        marker = os.path.join(marker_dir, "killed")
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.close(fd)
            os._exit(1)
        except FileExistsError:
            pass
    return run_trials(job)
