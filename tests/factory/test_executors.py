"""Executors (mlaudit.factory.executors): chunk planning, and `process` / `ray` give the same models
as `local`, streaming each to on_result exactly once; a Ray worker killed mid-task is retried.

Same chunks (``max_chunk`` set) and one torch thread everywhere (the local test process pins 1;
process workers get CPUs // workers = 1 on the 2-core CI box; Ray sets OMP_NUM_THREADS=1 for
1-CPU tasks), so on CPU the remote models are observed to be bitwise equal to the local ones;
the assertions allow the batched-vs-sequential tolerance in case a host uses other thread counts.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mlaudit.data.registry import DatasetSpec, load_dataset
from mlaudit.errors import ConfigError, TrainingError
from mlaudit.factory import (
    FactoryJob,
    QueryPlan,
    RayExecutor,
    TrainedModel,
    TrialSpec,
    make_executor,
    plan_chunks,
    train_many,
)
from mlaudit.factory.executors import ProcessExecutor, start_local_ray
from mlaudit.models.registry import ModelSpec
from mlaudit.train import Recipe

SPEC = DatasetSpec(name="synthetic", options={"n_train": 64, "n_test": 16})
TOL = dict(rtol=1e-4, atol=1e-4)  # see tests/factory/test_batched.py for what batched vs sequential achieves


@functools.lru_cache(maxsize=1)
def data():  # noqa: ANN201
    return load_dataset(SPEC)


def job(n: int = 4, *, max_chunk: int | None = 2, with_spec: bool = False, masks: list | None = None) -> FactoryJob:
    r = Recipe(lr=0.05, epochs=1, batch_size=16, schedule="triangular", warmup_fraction=0.2, augment="none")
    masks = masks or [None] * n
    trials = tuple(TrialSpec(f"m{i}", seed=i, mask=masks[i]) for i in range(n))
    # each model also reports its test logits (FactoryJob.queries): they travel back from workers with it
    return FactoryJob(model=ModelSpec(name="mlp", width=8), recipe=r, data=data(), trials=trials,
                      data_spec=SPEC if with_spec else None, max_chunk=max_chunk, evaluate=False,
                      queries={"test": QueryPlan("test")})


def run(j: FactoryJob, executor: str | object, **opts: object) -> tuple[list[TrainedModel], list[str]]:
    seen: list[str] = []
    out = train_many(j, executor=executor, on_result=lambda m: seen.append(m.trial_id), **opts)  # type: ignore[arg-type]
    return out, seen


def assert_same_models(xs: list[TrainedModel], ys: list[TrainedModel]) -> None:
    assert [m.trial_id for m in xs] == [m.trial_id for m in ys]
    for x, y in zip(xs, ys):
        for k in x.state_dict:
            torch.testing.assert_close(x.state_dict[k], y.state_dict[k], **TOL)
        assert x.steps == y.steps
        assert x.outputs["test"].shape == (16, 1, data().num_classes)
        torch.testing.assert_close(x.outputs["test"], y.outputs["test"], **TOL)


@functools.lru_cache(maxsize=2)
def local_models(with_spec: bool) -> list[TrainedModel]:
    return run(job(with_spec=with_spec), "local")[0]


# ------------------------------------------------------------------ planning

@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.sampled_from([64, 48, 20, 16, 5]), min_size=1, max_size=9),
       max_chunk=st.one_of(st.none(), st.integers(1, 5)), parts=st.integers(1, 4), batched=st.booleans())
def test_plan_chunks_partitions_trials_into_single_group_chunks(sizes: list[int], max_chunk: int | None, parts: int,
                                                                batched: bool) -> None:
    masks = [torch.arange(64) < s for s in sizes]
    j = job(len(sizes), max_chunk=max_chunk, masks=masks)
    j = FactoryJob(**{**j.__dict__, "batched": batched})
    subs = plan_chunks(j, parts)
    ids = [t.trial_id for s in subs for t in s.trials]
    assert sorted(ids) == sorted(t.trial_id for t in j.trials)  # every trial exactly once
    limit = (max_chunk or math.inf) if batched else 1
    for s in subs:
        assert 1 <= len(s.trials) <= limit
        assert len({math.ceil(int(t.mask.sum()) / 16) for t in s.trials}) == 1  # one steps-per-epoch group
        order = [int(t.trial_id[1:]) for t in s.trials]
        assert order == sorted(order) and s.max_chunk == max_chunk


def test_unknown_executor_and_bad_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="executor"):
        make_executor("nope")
    with pytest.raises(ConfigError, match="process"):
        make_executor("process", bogus=1)


# ------------------------------------------------------------------ process pool

def test_process_executor_matches_local() -> None:
    out, seen = run(job(), "process", workers=2)
    assert sorted(seen) == ["m0", "m1", "m2", "m3"]
    assert_same_models(out, local_models(False))


def test_process_executor_retries_a_dead_worker(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """The first sub-job kills its worker process (test hook MLAUDIT_TEST_KILL_ONCE, inherited by the
    spawned workers): the lost sub-jobs run again in a fresh pool, and every model arrives exactly
    once, equal to the local executor's."""
    monkeypatch.setenv("MLAUDIT_TEST_KILL_ONCE", str(tmp_path))
    out, seen = run(job(), "process", workers=2)
    assert (tmp_path / "killed").exists()  # a worker really died
    assert sorted(seen) == ["m0", "m1", "m2", "m3"]
    assert_same_models(out, local_models(False))


def test_process_executor_gives_up_after_max_retries(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """With no retries allowed, a dead worker fails the job with a message naming the lost trials."""
    monkeypatch.setenv("MLAUDIT_TEST_KILL_ONCE", str(tmp_path))
    with pytest.raises(TrainingError, match="worker process died"):
        run(job(), ProcessExecutor(workers=2, max_retries=0))


# ------------------------------------------------------------------ ray (one local cluster for the module)

@pytest.fixture(scope="module")
def ray_cluster():  # noqa: ANN201
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        start_local_ray(num_cpus=2, configure_logging=False)  # as RayExecutor does: loopback only
    yield ray
    if started:
        ray.shutdown()


@pytest.mark.ray
def test_ray_executor_matches_local(ray_cluster) -> None:  # noqa: ANN001
    """Workers reload the data from the job's DatasetSpec (the job travels without tensors)."""
    out, seen = run(job(with_spec=True), "ray")
    assert sorted(seen) == ["m0", "m1", "m2", "m3"]
    assert_same_models(out, local_models(True))


@pytest.mark.ray
def test_ray_retries_a_killed_worker(ray_cluster, tmp_path) -> None:  # noqa: ANN001
    """The first task kills its worker (test hook MLAUDIT_TEST_KILL_ONCE, passed as a task env var);
    Ray reruns it and every model still arrives exactly once, equal to the local ones."""
    ex = RayExecutor(env_vars={"MLAUDIT_TEST_KILL_ONCE": str(tmp_path)}, max_retries=2)
    out, seen = run(job(), ex)
    assert (tmp_path / "killed").exists()  # a worker really died
    assert sorted(seen) == ["m0", "m1", "m2", "m3"]
    assert_same_models(out, local_models(False))
