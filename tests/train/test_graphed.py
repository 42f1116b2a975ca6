"""CUDA-graph training steps (``recipe.cuda_graph``): the optimizers give the same update with the learning
rate as a 0-dim tensor as with a float (what a captured step reads on replay); :class:`GraphedStep` warms
each active pattern up eagerly, captures it once and replays it with the new batch and rates (checked on
CPU with a recorder that, like a CUDA capture, runs nothing while capturing); the loop refuses Adam and
ignores the option on the CPU. The real capture runs in tests/gpu/test_cuda_factory.py."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence

import pytest
import torch
from torch import Tensor

from mlaudit.data.registry import DatasetSpec, load_dataset
from mlaudit.errors import ConfigError
from mlaudit.models.registry import ModelSpec, build_model
from mlaudit.train import init_models, train_stack
from mlaudit.train.graphed import GraphedStep
from mlaudit.train.loop import StackedModels, use_cuda_graph
from mlaudit.train.optim import (
    StackedAdam,
    StackedMuon,
    StackedSGD,
    apply_rates,
    graph_safe,
    make_optimizer,
    slot_active,
    slot_rates,
)
from mlaudit.train.recipe import Recipe, resolve_recipe

CPU = torch.device("cpu")
SHAPE = (3, 16, 16)


@functools.lru_cache(maxsize=1)
def data():  # noqa: ANN201
    return load_dataset(DatasetSpec(name="synthetic", seed=0,
                                    options={"n_train": 96, "n_test": 48, "shape": list(SHAPE), "num_classes": 4}))


def model_fn() -> Callable[[], torch.nn.Module]:
    return functools.partial(build_model, ModelSpec(name="airbench", width=4), input_shape=SHAPE, num_classes=4)


def muon_recipe(**kw: object) -> Recipe:
    return resolve_recipe({"name": "airbench-muon", "batch_size": 32, "epochs": 2, "eval_batch_size": 64, **kw})


def _params(seed: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 6, 3, 3, 3, generator=g), torch.randn(2, 6, generator=g), torch.randn(2, 4, 6, generator=g)]


@pytest.mark.parametrize("make", [
    lambda p: StackedSGD(p, momentum=0.9, nesterov=True, weight_decay=5e-4),
    lambda p: StackedSGD(p, momentum=0.0, nesterov=False, weight_decay=0.0),
    lambda p: StackedMuon(p[:1], momentum=0.6, nesterov=True, leading_k=True),
])
def test_a_tensor_rate_gives_the_float_rates_update(make: Callable[[list[Tensor]], object]) -> None:
    a, b = _params(0), _params(0)
    opt_a, opt_b = make(a), make(b)
    for step, lr in enumerate((0.1, 0.05, 0.02)):
        grads = _params(10 + step)
        n = len(opt_a.params)
        opt_a.step([g.clone() for g in grads[:n]], lr)
        opt_b.step([g.clone() for g in grads[:n]], torch.tensor(lr))
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_adam_refuses_a_tensor_rate_and_is_not_graph_safe() -> None:
    opt = StackedAdam(_params(0), weight_decay=0.0)
    assert not graph_safe(opt) and graph_safe(StackedSGD(_params(0), 0.9, False, 0.0))
    with pytest.raises(TypeError, match="bias correction"):
        opt.step(_params(1), torch.tensor(0.1))


def test_grouped_rates_and_apply_equal_its_step() -> None:
    """airbench-muon's groups: the whitening bias stops after 3 epochs (rate 0, skipped, buffers unmoved);
    ``apply`` with tensor rates reproduces ``step`` with floats."""
    r = muon_recipe(epochs=5)
    stacks = [StackedModels.from_modules(init_models(model_fn(), [0, 1]), CPU, strategy="loop") for _ in range(2)]
    opts = [make_optimizer(r, s.trainable(), names=s.trainable_names(), leading_k=s.leading_k,
                           base_lr=r.resolved_lr(residual=False)) for s in stacks]
    for progress in (0.0, 1.5, 3.5):
        rates = slot_rates(opts[0], r, 0.24, progress)
        active = slot_active(opts[0], rates)
        assert len(rates) == len(opts[0].groups) and active == tuple(x > 0 for x in rates)
        grads = [torch.randn_like(p) for p in stacks[0].trainable()]
        opts[0].step([g.clone() for g in grads], 0.0, progress=progress)
        apply_rates(opts[1], [g.clone() for g in grads], [torch.tensor(x) for x in rates], active)
    assert not all(slot_active(opts[0], slot_rates(opts[0], r, 0.24, 3.5)))  # the whitening bias has stopped
    for x, y in zip(stacks[0].trainable(), stacks[1].trainable(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


class _Graph:
    """Stands in for ``torch.cuda.CUDAGraph``: what the body left to run at capture runs on each replay."""

    def __init__(self) -> None:
        self.run: Callable[[], None] | None = None

    def replay(self) -> None:
        assert self.run is not None
        self.run()


class _Recorder:
    def __init__(self) -> None:
        self.capturing: _Graph | None = None
        self.pools: list[object] = []

    def capture(self) -> tuple[_Graph, Callable[..., contextlib.AbstractContextManager[None]]]:
        return _Graph(), self.ctx

    @contextlib.contextmanager
    def ctx(self, graph: _Graph, pool: object = None) -> Iterator[None]:
        self.pools.append(pool)
        self.capturing = graph
        try:
            yield
        finally:  # like torch.cuda.graph: the capture ends on an error too
            self.capturing = None


def _stateful_body(w: Tensor, rec: _Recorder) -> Callable[..., Tensor]:
    """w <- w - rate_0 * sum(x * y) * prod(sum of each extra input) (plus rate_1 * 1 when slot 1 is active): like a
    CUDA capture, nothing runs while capturing; the work is recorded and reads the static buffers and rate tensors
    on replay."""

    def real(x: Tensor, y: Tensor, rates: Sequence[Tensor], active: tuple[bool, ...], *extra: Tensor) -> Tensor:
        w.sub_(functools.reduce(lambda a, e: a * e.sum(), extra, rates[0] * (x * y).sum()))
        if active[1]:
            w.sub_(rates[1])
        return w.clone()

    def body(x: Tensor, y: Tensor, rates: Sequence[Tensor], active: tuple[bool, ...], *extra: Tensor) -> Tensor:
        if rec.capturing is None:
            return real(x, y, rates, active, *extra)
        out = torch.empty_like(w)
        rec.capturing.run = lambda: out.copy_(real(x, y, rates, active, *extra))
        return out

    return body


def test_graphed_step_matches_the_eager_sequence() -> None:
    rec = _Recorder()
    w_graph, w_eager = torch.zeros(()), torch.zeros(())
    step = GraphedStep(_stateful_body(w_graph, rec), slots=2, device=CPU, warmup=2, capture=rec.capture)
    eager = _stateful_body(w_eager, _Recorder())
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        x, y = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
        rates = [0.1 / (i + 1), 0.5 if i < 6 else 0.0]
        active = (True, rates[1] > 0)
        got = step(x, y, rates, active)
        want = eager(x, y, [torch.tensor(r) for r in rates], active)
        torch.testing.assert_close(got, want)
        x.add_(100.0)  # the caller's batch may change afterwards: the step copied it
    torch.testing.assert_close(w_graph, w_eager)
    # two patterns ((T, T) for 6 steps, then (T, F)): 2 eager warm-ups and one capture each, the rest replays
    assert step.captures == 2 and step.replays == 12 - 4
    assert rec.pools[0] is None  # the second capture would share the first's pool (a CUDA graph has one)


def test_a_failed_capture_falls_back_to_eager_steps() -> None:
    """A body that cannot be captured (here: it raises while capturing, as a host sync would): a warning, this
    and every later step run eagerly, and the sequence equals the eager one."""
    rec = _Recorder()
    w_graph, w_eager = torch.zeros(()), torch.zeros(())
    inner = _stateful_body(w_graph, rec)

    def body(*a: object) -> Tensor:
        if rec.capturing is not None:
            raise RuntimeError("operation not permitted when stream is capturing\nmore")
        return inner(*a)

    step = GraphedStep(body, slots=2, device=CPU, warmup=1, capture=rec.capture)
    eager = _stateful_body(w_eager, _Recorder())
    for i in range(4):
        x, y = torch.full((2, 3), float(i)), torch.ones(2, 3)
        if i == 1:
            with pytest.warns(RuntimeWarning, match="could not be captured"):
                step(x, y, [0.1, 0.2], (True, True))
        else:
            step(x, y, [0.1, 0.2], (True, True))
        eager(x, y, [torch.tensor(0.1), torch.tensor(0.2)], (True, True))
    torch.testing.assert_close(w_graph, w_eager)
    assert step.captures == 0 and step.path == "eager (capture failed: RuntimeError: operation not permitted when " \
        "stream is capturing)"


def test_paused_captures_run_eagerly_and_capture_once_resumed() -> None:
    """While a thread holds pause_captures (the factory's background compile), a step due for capture runs eagerly
    and tries again next step; graphs already captured keep replaying; after resume it captures. The sequence equals
    the eager one, the path says how many steps waited, and resume is idempotent (a second call does not
    release another thread's pause)."""
    from mlaudit.train.graphed import captures_paused, pause_captures

    rec = _Recorder()
    w_graph, w_eager = torch.zeros(()), torch.zeros(())
    step = GraphedStep(_stateful_body(w_graph, rec), slots=2, device=CPU, warmup=1, capture=rec.capture, shapes=None)
    eager = _stateful_body(w_eager, _Recorder())
    assert not captures_paused()

    def run(i: int, width: int = 3) -> None:
        x, y = torch.full((2, width), float(i)), torch.ones(2, width)
        step(x, y, [0.1, 0.2], (True, True))
        eager(x, y, [torch.tensor(0.1), torch.tensor(0.2)], (True, True))

    run(0)
    run(1)  # captured (warm-up 1)
    resume = pause_captures()
    other = pause_captures()  # a second holder
    assert captures_paused()
    run(2)  # replays the captured graph
    for i in range(3, 6):
        run(i, width=4)  # a new shape: 1 warm-up, then due for capture but paused: eager
    assert step.captures == 1 and step.paused == 2
    resume()
    resume()  # idempotent: the other holder still pauses
    run(6, width=4)
    assert step.captures == 1 and step.paused == 3
    other()
    assert not captures_paused()
    run(7, width=4)
    run(8, width=4)
    assert step.captures == 2
    torch.testing.assert_close(w_graph, w_eager)
    assert step.path == "cuda-graph (3 steps eager while captures were paused)"
    fresh = GraphedStep(_stateful_body(torch.zeros(()), rec), slots=2, device=CPU, warmup=0, capture=rec.capture)
    resume = pause_captures()
    fresh(torch.ones(2, 3), torch.ones(2, 3), [0.1, 0.2], (True, True))
    resume()
    assert fresh.path == "eager (captures paused)"


def test_graphed_step_refuses_a_new_shape_after_capture() -> None:
    rec = _Recorder()
    step = GraphedStep(_stateful_body(torch.zeros(()), rec), slots=2, device=CPU, warmup=0, capture=rec.capture)
    step(torch.ones(2, 3), torch.ones(2, 3), [0.1, 0.1], (True, True))
    with pytest.raises(ValueError, match="fixed batch shapes"):
        step(torch.ones(2, 4), torch.ones(2, 4), [0.1, 0.1], (True, True))


def test_graphed_step_keeps_one_graph_per_input_shape() -> None:
    """``shapes=None`` (the DP-SGD step's slot buckets): each input shape gets its own static buffers, warm-up and
    graph, in the one pool; extra static inputs (the DP step's slot weights and noise) are copied like the batch."""
    rec = _Recorder()
    w_graph, w_eager = torch.zeros(()), torch.zeros(())
    step = GraphedStep(_stateful_body(w_graph, rec), slots=2, device=CPU, warmup=1, capture=rec.capture, shapes=None)
    eager = _stateful_body(w_eager, _Recorder())
    g = torch.Generator().manual_seed(0)
    for i in range(10):
        b = (3, 5)[i % 2]
        x, y, m = torch.randn(2, b, generator=g), torch.randn(2, b, generator=g), torch.rand(2, b, generator=g)
        torch.testing.assert_close(step(x, y, [0.1, 0.0], (True, False), m),
                                   eager(x, y, [torch.tensor(0.1), torch.tensor(0.0)], (True, False), m))
        m.add_(1.0)  # the caller's inputs may change afterwards: the step copied them
    torch.testing.assert_close(w_graph, w_eager)
    assert step.captures == 2 and step.replays == 10 - 2 and len(step.inputs) == 2
    assert rec.pools == [None, None]  # a recorder graph has no pool to share; a CUDA one would pass its first


@functools.lru_cache(maxsize=1)
def _cuda() -> torch.device:
    return torch.device("cuda")  # only its type is read: nothing touches a GPU


def test_use_cuda_graph_only_on_cuda_and_refuses_adam() -> None:
    stack = StackedModels.from_modules(init_models(model_fn(), [0]), CPU, strategy="loop")
    sgd = resolve_recipe({"name": "fast", "cuda_graph": True})
    opt = make_optimizer(sgd, stack.trainable())
    assert use_cuda_graph(sgd, _cuda(), opt) and not use_cuda_graph(sgd, CPU, opt)
    assert not use_cuda_graph(sgd.model_copy(update={"cuda_graph": False}), _cuda(), opt)
    assert use_cuda_graph(sgd.model_copy(update={"compile": True}), _cuda(), opt)  # the graph captures the compiled step
    adam = resolve_recipe({"name": "fast", "optimizer": "adam", "cuda_graph": True})
    with pytest.raises(ConfigError, match="bias-correction"):
        use_cuda_graph(adam, _cuda(), make_optimizer(adam, stack.trainable()))
    auto = adam.model_copy(update={"cuda_graph": "auto"})  # the default: Adam simply stays eager
    assert resolve_recipe("fast").cuda_graph == "auto"
    assert not use_cuda_graph(auto, _cuda(), make_optimizer(auto, stack.trainable()))
    dp = resolve_recipe({"name": "fast", "dp": {"epsilon": 1.0, "delta": 1e-5, "clip": 1.0}})
    with pytest.raises(TypeError, match="DPTraining"):  # DP recipes: tests/privacy/test_dpsgd_graphed.py
        use_cuda_graph(dp, _cuda(), opt)


def test_cuda_graph_on_cpu_trains_the_eager_models() -> None:
    r = muon_recipe()
    outs = [train_stack(init_models(model_fn(), [3]), data().train, r.model_copy(update={"cuda_graph": g}),
                        seeds=[3], lr=r.resolved_lr(residual=False), device=CPU, strategy="loop")
            for g in (False, True)]
    for name, t in outs[0][0].state_dict.items():
        torch.testing.assert_close(outs[1][0].state_dict[name], t, rtol=0, atol=0)
