"""Executors: where a factory job's chunks run. One interface, a registry of three.

``local``    in this process (batched or sequential).
``process``  a local pool of spawned worker processes, one per GPU when there are several, else
             ``workers`` CPU processes; each task trains whole chunks; the sub-jobs of a worker that
             died run again in a fresh pool (``max_retries``).
``ray``      Ray tasks of whole chunks, with fractional GPUs; connects to ``address`` or starts a
             local instance listening on 127.0.0.1 only. A task whose worker dies is retried up to
             ``max_retries`` times.

Every executor cuts the job into the same chunks (:func:`plan_chunks`; identical to the local
executor's when ``max_chunk`` is set) and streams each finished model to ``on_result`` as soon as
its chunk returns, so an interruption loses no finished model. Each model reaches ``on_result``
exactly once.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import pickle
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..errors import ConfigError, TrainingError
from ..registry import Registry
from .batched import CPU_DEFAULT_CHUNK, cached_dataset, plan_groups, run_trials
from .spec import FactoryJob, TrainedModel, TrialSpec

log = logging.getLogger(__name__)
ResultFn = Callable[[TrainedModel], None]


class Executor(Protocol):
    """Trains every trial of a job somewhere; returns the models in trial order."""

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

    Trials are grouped by steps per epoch first (as :func:`run_trials` does), then each group is cut
    into sub-jobs of ``job.max_chunk`` trials (1 when not batched; without ``max_chunk``, the CPU
    default or an even split over ``parts_hint`` workers). Sub-jobs keep ``max_chunk``, so with it
    set each worker trains exactly the chunks the local executor would.
    """
    data = job.data if job.data is not None else cached_dataset(job.data_spec)
    if not job.batched:
        size = 1
    elif job.max_chunk is not None:
        size = job.max_chunk
    else:
        size = CPU_DEFAULT_CHUNK if parts_hint <= 1 else max(1, math.ceil(len(job.trials) / parts_hint))
    return [job.with_trials(g[i:i + size]).slim_views() for g in plan_groups(job, data) for i in range(0, len(g), size)]


def _stream(results: dict[str, TrainedModel], models: list[TrainedModel], on_result: ResultFn | None) -> None:
    for m in models:
        results[m.trial_id] = m
        if on_result is not None:
            on_result(m)


@EXECUTORS.register("local")
@dataclass
class LocalExecutor:
    """In this process: :func:`run_trials` on the job's device."""

    name: str = "local"

    def execute(self, job: FactoryJob, *, on_result: ResultFn | None = None,
                on_epoch: Callable[[int, int], None] | None = None) -> list[TrainedModel]:
        """``on_epoch(epoch, models_in_chunk)`` after every epoch (in-process progress bars)."""
        return run_trials(job, on_result=on_result, on_epoch=on_epoch)


def _worker_init(counter: Any, threads: int) -> None:
    """Process-pool initializer: one GPU per worker (round robin) and a fair share of CPU threads."""
    with counter.get_lock():
        idx = counter.value
        counter.value += 1
    torch.set_num_threads(threads)
    if torch.cuda.is_available():
        torch.cuda.set_device(idx % torch.cuda.device_count())


def _kill_once_for_test() -> None:
    """Test hook: with MLAUDIT_TEST_KILL_ONCE=<dir>, the first task that finds no marker file in <dir>
    creates it and kills its own worker process, to exercise the executors' retry of a lost worker."""
    marker_dir = os.environ.get("MLAUDIT_TEST_KILL_ONCE")
    if marker_dir:
        try:
            fd = os.open(os.path.join(marker_dir, "killed"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.close(fd)
            os._exit(1)
        except FileExistsError:
            pass


def _worker_run(job: FactoryJob) -> bytes:
    _kill_once_for_test()
    # Plain pickle, not multiprocessing's: it would send every result tensor as a shared-memory file
    # descriptor, and a job of many models runs out of descriptors. Only our own child reads it back.
    return pickle.dumps(run_trials(job), protocol=pickle.HIGHEST_PROTOCOL)


@EXECUTORS.register("process")
@dataclass
class ProcessExecutor:
    """A pool of ``workers`` spawned processes (default: one per GPU, else min(2, CPUs)), one
    sub-job of whole chunks per task; each worker gets ``CPUs // workers`` torch threads and worker i
    the GPU i mod (visible GPUs).

    A worker that dies (killed, out of host memory, a crash in native code) breaks the pool: the
    sub-jobs that had not returned are run again in a fresh pool, up to ``max_retries`` times, and
    finished models are never trained twice (each reaches ``on_result`` once). Exceptions raised by
    training itself (e.g. :class:`TrainingError`) are deterministic and are not retried.
    """

    workers: int | None = None
    max_retries: int = 2
    name: str = "process"

    def execute(self, job: FactoryJob, *, on_result: ResultFn | None = None) -> list[TrainedModel]:
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"executor 'process': workers must be >= 1, got {self.workers}")
        if self.max_retries < 0:
            raise ConfigError(f"executor 'process': max_retries must be >= 0, got {self.max_retries}")
        ngpu = torch.cuda.device_count() if job.device != "cpu" else 0
        n = self.workers or max(1, ngpu or min(2, os.cpu_count() or 1))
        pending = plan_chunks(job, n)
        results: dict[str, TrainedModel] = {}
        for attempt in range(self.max_retries + 1):
            lost = self._pool(pending, n, results, on_result)
            if not lost:
                break
            pending = lost
            if attempt == self.max_retries:
                raise TrainingError(f"executor 'process': a worker process died and {len(lost)} sub-job(s) were "
                                    f"lost {self.max_retries + 1} times (trials "
                                    f"{', '.join(t.trial_id for p in lost for t in p.trials)}); finished models "
                                    "were kept. Check the host's memory (dmesg) or run with --executor local")
            log.warning("a process worker died; retrying %d unfinished sub-job(s) in a fresh pool (%d of %d)",
                        len(lost), attempt + 1, self.max_retries)
        return [results[t.trial_id] for t in job.trials]

    @staticmethod
    def _pool(parts: list[FactoryJob], n: int, results: dict[str, TrainedModel],
              on_result: ResultFn | None) -> list[FactoryJob]:
        """Run ``parts`` in one pool of ``n`` workers; returns the parts lost to a dead worker."""
        ctx = mp.get_context("spawn")
        init = (ctx.Value("i", 0), max(1, (os.cpu_count() or 1) // n))
        lost: list[FactoryJob] = []
        with ProcessPoolExecutor(max_workers=min(n, len(parts)), mp_context=ctx, initializer=_worker_init,
                                 initargs=init) as pool:
            futures = {pool.submit(_worker_run, p.for_remote()): p for p in parts}
            waiting = set(futures)
            try:
                while waiting:
                    finished, waiting = wait(waiting, return_when=FIRST_COMPLETED)
                    for f in finished:
                        try:
                            models = pickle.loads(f.result())
                        except BrokenProcessPool:
                            lost.append(futures[f])
                            continue
                        _stream(results, models, on_result)
            finally:
                for f in waiting:
                    f.cancel()
        return lost


@EXECUTORS.register("ray")
@dataclass
class RayExecutor:
    """Ray tasks, one per sub-job of whole chunks.

    ``address=None`` uses the running Ray instance of this process, or starts a local one whose every
    component listens on 127.0.0.1 only (:func:`start_local_ray`) with ``num_cpus`` CPUs (default
    min(2, CPUs)); it is left running for later jobs and stopped by Ray at interpreter exit.
    ``gpus_per_task`` may be fractional (0.25 packs 4 tasks per GPU). A task whose worker dies is retried up to ``max_retries`` times; exceptions raised by
    training (e.g. :class:`TrainingError`) are deterministic and are not retried. ``env_vars`` are
    set in the task's worker processes (a Ray runtime env), e.g. thread counts or test hooks.
    The job (data unless workers can reload it from ``data_spec``, and views) goes to the object
    store once; each task receives it plus its trials.
    """

    address: str | None = None
    num_cpus: int | None = None
    gpus_per_task: float | None = None
    max_retries: int = 2
    env_vars: dict[str, str] | None = None
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
                start_local_ray(num_cpus=self.num_cpus or min(2, os.cpu_count() or 1))
        cuda = job.device.startswith("cuda") or (job.device == "auto" and torch.cuda.is_available())
        gpus = self.gpus_per_task if self.gpus_per_task is not None else (1.0 if cuda else 0.0)
        n_workers = int(ray.cluster_resources().get("GPU" if gpus else "CPU", 1) / (gpus or 1))
        options: dict[str, Any] = dict(num_gpus=gpus, num_cpus=1, max_retries=self.max_retries, retry_exceptions=False)
        if self.env_vars:
            options["runtime_env"] = {"env_vars": dict(self.env_vars)}
        task = ray.remote(_ray_task).options(**options)
        parts = plan_chunks(job, max(1, n_workers))
        base = ray.put(job.for_remote().with_trials(()))  # data and views go to the object store once
        pending = [task.remote(base, p.trials) for p in parts]
        results: dict[str, TrainedModel] = {}
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                _stream(results, ray.get(ready[0]), on_result)
        finally:
            for ref in pending:
                ray.cancel(ref)
        return [results[t.trial_id] for t in job.trials]


LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def start_local_ray(*, num_cpus: int, **options: Any) -> None:
    """Start a local Ray instance in this process whose every component listens on 127.0.0.1 only.

    ``ray.init(_node_ip_address="127.0.0.1")`` alone is not enough: Ray replaces a loopback node
    address by the host's routable address (``resolve_ip_for_localhost``), and then its GCS server,
    raylet and workers listen on every interface (``*``) and its agents on that address and
    ``0.0.0.0``. Ray keeps the node address on loopback only where multi-node clusters are off
    (its switch ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``, off by default on macOS and Windows, read
    once into ``ray._private.ray_constants.ENABLE_RAY_CLUSTER`` when Ray is imported). That switch is
    turned off here for the duration of ``ray.init`` only, so a later ``ray.init(address=...)`` to a
    real cluster is unaffected; a node address that still is not loopback afterwards is a logged
    warning (a Ray release that changed this). ``tests/factory/test_ray_binding.py`` lists the
    listening sockets of every Ray process during a run. ``options`` go to ``ray.init``.
    """
    import ray
    from ray._private import ray_constants

    saved = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 **options)
    finally:
        if saved is None:
            del ray_constants.ENABLE_RAY_CLUSTER
        else:
            ray_constants.ENABLE_RAY_CLUSTER = saved
    ip = ray.util.get_node_ip_address()
    if ip not in LOOPBACK:
        log.warning("the local Ray instance took the node address %s, not 127.0.0.1: its components may listen "
                    "on other interfaces than loopback (this Ray version, %s, ignores mlaudit's setting)",
                    ip, ray.__version__)


def _ray_task(base: FactoryJob, trials: tuple[TrialSpec, ...]) -> list[TrainedModel]:
    _kill_once_for_test()
    return run_trials(base.with_trials(trials).slim_views())
