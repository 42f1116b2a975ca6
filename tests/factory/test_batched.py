"""The factory on one device (mlaudit.factory.batched): batched == sequential, subset masks and views
are honoured, out-of-memory back-off, grouping by steps per epoch, job validation.

CPU only, one torch thread, tiny models (fastcnn width 4, MLP width 8) on synthetic 3x8x8 data.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import pytest
import torch

from mlaudit.data.base import DataBundle, TensorDataset
from mlaudit.data.registry import DatasetSpec, load_dataset
from mlaudit.data.view import DataView
from mlaudit.errors import BudgetError, ConfigError
from mlaudit.factory import FactoryJob, TrainedModel, TrialSpec, run_trials, train_many
from mlaudit.models.registry import ModelSpec
from mlaudit.train import Recipe

TOL = dict(rtol=1e-4, atol=1e-4)
"""Batched (one chunk of K) vs sequential (K = 1) training of the same trial. Observed on CPU
(torch 2.13, 2 epochs, 8-16 steps): NOT bitwise equal - vmap runs batched kernels whose float32
summation order differs - but max |diff| <= 5e-7 over every state_dict tensor (BatchNorm running
stats included) for fastcnn and MLP, i.e. ~200x inside this tolerance."""


@functools.lru_cache(maxsize=2)
def bundle(n: int = 128) -> DataBundle:
    return load_dataset(DatasetSpec(name="synthetic", options={"n_train": n, "n_test": 32}))


def recipe(**kw: object) -> Recipe:
    base: dict[str, object] = dict(lr=0.05, epochs=2, batch_size=32, schedule="triangular", warmup_fraction=0.2,
                                   augment={"crop_pad": 1, "flip": True})
    return Recipe(**{**base, **kw})


def job(trials: list[TrialSpec], name: str = "mlp", data: DataBundle | None = None, **kw: object) -> FactoryJob:
    width = 4 if name == "fastcnn" else 8
    return FactoryJob(model=ModelSpec(name=name, width=width), recipe=kw.pop("recipe", recipe()),  # type: ignore[arg-type]
                      data=data or bundle(), trials=tuple(trials), evaluate=kw.pop("evaluate", False), **kw)  # type: ignore[arg-type]


def seeds(n: int, **kw: object) -> list[TrialSpec]:
    return [TrialSpec(f"m{i}", seed=100 + i, **kw) for i in range(n)]  # type: ignore[arg-type]


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_models_close(xs: list[TrainedModel], ys: list[TrainedModel]) -> None:
    assert [m.trial_id for m in xs] == [m.trial_id for m in ys]
    for x, y in zip(xs, ys):
        assert x.state_dict.keys() == y.state_dict.keys()
        for k in x.state_dict:
            torch.testing.assert_close(x.state_dict[k], y.state_dict[k], **TOL, msg=f"{x.trial_id} {k}")


# ------------------------------------------------------------------ batched == sequential

@pytest.mark.parametrize("name", ["fastcnn", "mlp"])
def test_batched_equals_sequential(name: str) -> None:
    j = job(seeds(4), name)
    batched = run_trials(j)
    sequential = run_trials(dataclasses.replace(j, batched=False))
    assert_models_close(batched, sequential)
    assert any("running_mean" in k for k in batched[0].state_dict)  # BatchNorm stats were compared too
    assert not same(batched[0].state_dict, batched[1].state_dict)  # seeds give different models
    assert all(m.steps == 2 * 4 for m in batched)


# ------------------------------------------------------------------ masks and views are honoured

def test_mask_excluded_example_is_never_seen() -> None:
    """Trials A exclude example J (and an inserted poison) by mask, trials B include them. Changing
    J's value and label, or adding the poison, cannot change A at all (bitwise), but changes B."""
    d = bundle()
    j_idx, n = 5, len(d.train)
    clean = DataView.identity(d.train)
    poison = clean.with_delta([j_idx], 1.0 - 2 * d.train.x[j_idx:j_idx + 1], eps=None) \
        .with_labels([j_idx], (int(d.train.y[j_idx]) + 1) % 4).with_inserted(torch.ones(1, 3, 8, 8), [0])
    excl = torch.ones(n + 1, dtype=torch.bool)
    excl[[j_idx, n]] = False
    trials = [TrialSpec("A-clean", 1, mask=excl[:n], view="clean"), TrialSpec("A-poison", 1, mask=excl, view="poison"),
              TrialSpec("B-clean", 1, view="clean"), TrialSpec("B-poison", 1, view="poison",
                                                              mask=torch.arange(n + 1) != 0)]
    for max_chunk in (1, 4):  # alone, and together in one chunk
        out = {m.trial_id: m.state_dict for m in
               run_trials(job(trials, "fastcnn", views={"clean": clean, "poison": poison}, max_chunk=max_chunk))}
        assert same(out["A-clean"], out["A-poison"])
        assert not same(out["B-clean"], out["B-poison"])


def test_mask_excluded_value_cannot_matter_even_when_extreme() -> None:
    """Same, with the raw split itself changed: x[J] = 1e3 (far outside [0, 1]) and a new label."""
    d = bundle()
    x, y = d.train.x.clone(), d.train.y.clone()
    x[9], y[9] = 1e3, (y[9] + 1) % 4
    extreme = DataBundle("synthetic", TensorDataset(x, y, d.train.classes), d.test)
    mask = torch.arange(len(d.train)) != 9
    a = [run_trials(job([TrialSpec("a", 3, mask=mask)], data=data))[0] for data in (d, extreme)]
    b = [run_trials(job([TrialSpec("b", 3)], data=data))[0] for data in (d, extreme)]
    assert same(a[0].state_dict, a[1].state_dict)
    assert not same(b[0].state_dict, b[1].state_dict)


def test_trials_with_different_steps_per_epoch_are_grouped() -> None:
    """Masks of 128, 64 and 100 examples (4, 2, 4 steps at batch 32) -> two groups; results come
    back in trial order and equal the sequential run."""
    n = len(bundle().train)
    masks = [None, torch.arange(n) < 64, torch.arange(n) < 100, torch.arange(n) >= 64]
    trials = [TrialSpec(f"t{i}", seed=i, mask=m) for i, m in enumerate(masks)]
    got = run_trials(job(trials))
    assert [m.trial_id for m in got] == ["t0", "t1", "t2", "t3"]
    assert [m.steps for m in got] == [8, 4, 8, 4]
    assert_models_close(got, run_trials(job(trials, batched=False)))


# ------------------------------------------------------------------ out-of-memory back-off

@pytest.mark.parametrize("max_chunk", [None, 8])
def test_oom_backoff_finishes_every_model_once(max_chunk: int | None, caplog: pytest.LogCaptureFixture) -> None:
    """A device that fits 2 models: chunks of 6 -> 3 -> 2 fail/halve, then 3 chunks of 2 finish.
    Results equal the same chunks without the fake limit (bitwise) and the sequential run (TOL)."""
    trials = seeds(6)
    got: list[str] = []
    with caplog.at_level(logging.WARNING, logger="mlaudit.factory.batched"):
        limited = train_many(job(trials, fake_memory_models=2, max_chunk=max_chunk),
                             on_result=lambda m: got.append(m.trial_id))
    assert sorted(got) == sorted(t.trial_id for t in trials) and len(got) == 6
    assert "out of memory" in caplog.text
    in_pairs = run_trials(job(trials, max_chunk=2))
    assert all(same(a.state_dict, b.state_dict) for a, b in zip(limited, in_pairs))
    assert_models_close(limited, run_trials(job(trials, batched=False)))


def test_oom_backoff_carries_to_the_next_group(caplog: pytest.LogCaptureFixture) -> None:
    """Two groups (8 and 4 steps per epoch) on a device that fits 2 models: the first group backs off 4 -> 2,
    the second starts at 2 instead of failing at 4 again (one warning in all, not two)."""
    n = len(bundle().train)
    trials = [TrialSpec(f"t{i}", seed=i, mask=None if i < 4 else torch.arange(n) < 64) for i in range(8)]
    with caplog.at_level(logging.WARNING, logger="mlaudit.factory.batched"):
        got = run_trials(job(trials, fake_memory_models=2, max_chunk=4))
    assert [m.trial_id for m in got] == [t.trial_id for t in trials]
    assert caplog.text.count("out of memory") == 1


def test_model_that_never_fits_is_a_budget_error() -> None:
    with pytest.raises(BudgetError, match="single model"):
        run_trials(job(seeds(2), fake_memory_models=0))


# ------------------------------------------------------------------ metrics and validation

def test_evaluation_metrics_are_reported() -> None:
    m = run_trials(job(seeds(2), evaluate=True))[0]
    assert 0.0 <= m.metrics["test_accuracy"] <= 1.0
    assert m.metrics["test_loss"] > 0 and m.metrics["train_loss"] > 0
    assert m.wall_s > 0 and m.seed == 100


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_query_plans_report_the_logits_of_the_returned_weights(strategy: str) -> None:
    """Logits reported while the stack is on the device (FactoryJob.queries) equal those of the returned
    state_dicts queried afterwards through the checkpoint path (the same collect_logits; vmap vs a fresh
    stack differ only in summation order). BatchNorm (fastcnn) checks eval mode is used."""
    from mlaudit.factory import QueryPlan
    from mlaudit.models import build_model
    from mlaudit.query import logits_from_checkpoints

    data = bundle()
    rows = torch.tensor([5, 0, 17, 3, 99], dtype=torch.int64)
    plans = {"pool": QueryPlan("train", rows=rows, queries=("identity", "flip", "shift:1,-1")), "test": QueryPlan("test")}
    models = run_trials(job(seeds(3), "fastcnn", queries=plans, strategy=strategy, max_chunk=3))
    template = functools.partial(build_model, ModelSpec(name="fastcnn", width=4), input_shape=data.input_shape,
                                 num_classes=data.num_classes)
    sds = [m.state_dict for m in models]
    want_pool = logits_from_checkpoints(template, sds, data.train.x[rows], queries=plans["pool"].queries)
    want_test = logits_from_checkpoints(template, sds, data.test.x)
    got_pool = torch.stack([m.outputs["pool"] for m in models])
    got_test = torch.stack([m.outputs["test"] for m in models])
    assert got_pool.shape == (3, 5, 3, data.num_classes) and got_test.shape == (3, len(data.test), 1, data.num_classes)
    torch.testing.assert_close(got_pool, want_pool, **TOL)
    torch.testing.assert_close(got_test, want_test, **TOL)
    assert not torch.equal(got_pool[0], got_pool[1])  # each model its own logits


def test_bad_query_plans_are_config_errors() -> None:
    from mlaudit.factory import QueryPlan

    with pytest.raises(ConfigError, match="QueryPlan.split"):
        QueryPlan("valid")
    with pytest.raises(ConfigError, match="1-D int64"):
        QueryPlan(rows=torch.tensor([0.5]))
    with pytest.raises(ConfigError, match="invalid query 'spin'"):
        QueryPlan(queries=("identity", "spin"))
    with pytest.raises(ConfigError, match="must be a QueryPlan"):
        job(seeds(1), queries={"pool": ("identity",)})
    with pytest.raises(ConfigError, match=r"outside \[0, 32\) of the test split"):
        run_trials(job(seeds(1), queries={"t": QueryPlan("test", rows=torch.tensor([32]))}))


def test_invalid_jobs_are_config_errors() -> None:
    n = len(bundle().train)
    with pytest.raises(ConfigError, match="unique"):
        job([TrialSpec("x", 0), TrialSpec("x", 1)])
    with pytest.raises(ConfigError, match="names view 'nope'"):
        job([TrialSpec("x", 0, view="nope")])
    with pytest.raises(ConfigError, match="1-D bool"):
        job([TrialSpec("x", 0, mask=torch.arange(10))])
    with pytest.raises(ConfigError, match="max_chunk"):
        job(seeds(1), max_chunk=0)
    with pytest.raises(ConfigError, match="data_spec"):
        FactoryJob(model=ModelSpec(name="mlp"), recipe=recipe(), data=None, trials=())
    with pytest.raises(ConfigError, match=f"{n} \\(virtual\\) indices"):
        run_trials(job([TrialSpec("x", 0, mask=torch.ones(n - 1, dtype=torch.bool))]))
