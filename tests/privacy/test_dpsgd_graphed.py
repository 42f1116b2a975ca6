"""The DP-SGD book-keeping step replayed as a CUDA graph (``recipe.cuda_graph`` with ``recipe.dp``), on the CPU.

A CUDA capture records kernels without running them, and every replay runs them again on the static buffers.
:class:`_OpCapture` does the same with a dispatch mode: during capture every aten operation that writes to a
tensor runs on a copy (so nothing changes), every other one runs for its output's shape; replay runs the
recorded operations again in order, writing into the outputs of the capture. Reading a tensor's value on the
host during capture (``.item()``, data-dependent shapes) raises, as it does under CUDA. The training loop then
runs its graph path on the CPU (``use_cuda_graph`` asked as for a CUDA device, ``_cuda_capture`` replaced), and
must train the eager path's models. The real capture runs in tests/gpu/test_cuda_factory.py."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

import mlaudit.privacy.dpsgd as dpsgd
import mlaudit.train.graphed as graphed
import mlaudit.train.loop as loop
from mlaudit.data.registry import DatasetSpec, load_dataset
from mlaudit.data.view import DataView
from mlaudit.errors import ConfigError
from mlaudit.models.registry import ModelSpec, build_model
from mlaudit.privacy.dpsgd import DPTraining
from mlaudit.train.hooks import DPStepHooks, GradientCanary
from mlaudit.train.loop import AugmentConfig, StackedModels, init_models, train_stack
from mlaudit.train.optim import make_optimizer
from mlaudit.train.recipe import Recipe, resolve_recipe

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # only its type is read: nothing touches a GPU
SHAPE = (3, 12, 12)


class _OpGraph:
    """Stands in for ``torch.cuda.CUDAGraph``: the operations recorded during capture, run again on replay."""

    def __init__(self) -> None:
        self.ops: list[Callable[[], None]] = []

    def replay(self) -> None:
        with torch._C._AutoDispatchBelowADInplaceOrView():  # kernels only, as recorded (below autograd)
            for op in self.ops:
                op()


def _arg(schema: Any, args: tuple[Any, ...], kwargs: dict[str, Any], i: int) -> Any:
    a = schema.arguments[i]
    return args[i] if i < len(args) else kwargs.get(a.name)


_METADATA_OPS = frozenset({"squeeze_", "unsqueeze_", "t_", "transpose_", "swapdims_", "swapaxes_", "as_strided_",
                           "detach_"})
"""In-place operations that change a tensor's view of its memory, not the memory."""


class _OpCapture(TorchDispatchMode):
    """Records the aten operations of a capture into ``graph`` (see the module docstring)."""

    def __init__(self, graph: _OpGraph) -> None:
        super().__init__()
        self.graph = graph

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        schema = func._schema
        if func is torch.ops.aten._local_scalar_dense.default or torch.Tag.dynamic_output_shape in func.tags:
            raise RuntimeError(f"operation not permitted when stream is capturing ({func})")
        written = [t for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write
                   for t in tree_flatten(_arg(schema, args, kwargs, i))[0] if isinstance(t, Tensor)]
        if not written and any(r.alias_info is not None for r in schema.returns):
            return func(*args, **kwargs)  # a view: it shares its input's memory, nothing to run again
        if written and func.overloadpacket.__name__ in _METADATA_OPS:
            return func(*args, **kwargs)  # changes shape or strides only: no kernel, under CUDA too
        if written:  # runs on copies now (nothing changes during capture), on the real tensors on replay
            copies = {id(t): t.clone() for t in written}
            back = {id(c): t for t in written for c in [copies[id(t)]]}
            swap = functools.partial(tree_map, lambda v: copies.get(id(v), v) if isinstance(v, Tensor) else v)
            out = tree_map(lambda v: back.get(id(v), v) if isinstance(v, Tensor) else v,
                           func(*swap(args), **swap(kwargs)))
            for t in written:  # an out= argument the operation resized
                if t.shape != copies[id(t)].shape:
                    t.resize_(copies[id(t)].shape)
            self.graph.ops.append(lambda: func(*args, **kwargs))
            return out
        seeded = torch.Tag.nondeterministic_seeded in func.tags
        gen = next((_arg(schema, args, kwargs, i) for i, a in enumerate(schema.arguments) if a.name == "generator"),
                   None) or torch.default_generator
        state = gen.get_state() if seeded else None
        out = func(*args, **kwargs)
        if state is not None:  # a replay draws; the capture does not advance the generator
            gen.set_state(state)
        leaves = tree_flatten(out)[0]
        if not any(isinstance(v, Tensor) for v in leaves):  # a host value: from tensor data, a sync under CUDA
            if any(isinstance(v, Tensor) for v in tree_flatten((args, kwargs))[0]) and leaves != [None]:
                raise RuntimeError(f"operation not permitted when stream is capturing ({func} reads tensor data)")
            return out  # e.g. promote_types(dtype, dtype): nothing to run on replay

        # the outputs' memory as the operation wrote it (a later squeeze_ may change the tensors' metadata)
        where = [None if v is None else (v, v.shape, v.stride(), v.storage_offset()) for v in leaves]

        def rerun() -> None:
            for old, new in zip(where, tree_flatten(func(*args, **kwargs))[0], strict=True):
                if old is not None:
                    old[0].as_strided(*old[1:]).copy_(new)

        self.graph.ops.append(rerun)
        return out


class _Recorder:
    """The ``capture`` of :class:`~mlaudit.train.graphed.GraphedStep`: counts captures and replays."""

    def __init__(self) -> None:
        self.graphs: list[_OpGraph] = []
        self.capturing = False
        self.replays = 0

    def capture(self) -> tuple[_OpGraph, Callable[..., contextlib.AbstractContextManager[None]]]:
        g = _OpGraph()
        replay = g.replay

        def counted() -> None:
            self.replays += 1
            replay()

        g.replay = counted  # type: ignore[method-assign]
        self.graphs.append(g)
        return g, self.ctx

    @contextlib.contextmanager
    def ctx(self, graph: _OpGraph, pool: object = None) -> Iterator[None]:
        self.capturing = True
        try:
            with _OpCapture(graph):
                yield
        finally:
            self.capturing = False


def test_the_recorder_runs_nothing_while_capturing_and_refuses_host_reads() -> None:
    rec = _Recorder()
    w, x = torch.zeros(3), torch.ones(3)
    g, ctx = rec.capture()
    with ctx(g):
        y = (x * 2).sum()
        w.add_(y)  # deferred to the replays
    assert float(w.sum()) == 0.0
    g.replay()
    x.fill_(3.0)
    g.replay()
    torch.testing.assert_close(w, torch.full((3,), 6.0 + 18.0))
    with pytest.raises(RuntimeError, match="capturing"), ctx(_OpGraph()):
        float(x.sum())


@functools.lru_cache(maxsize=1)
def data():  # noqa: ANN201
    return load_dataset(DatasetSpec(name="synthetic", seed=0,
                                    options={"n_train": 96, "n_test": 16, "shape": list(SHAPE), "num_classes": 4}))


MODELS = {"cnn": ModelSpec(name="fastcnn", norm="group", width=4), "mlp": ModelSpec(name="mlp", width=8, norm="none")}


def dp_recipe(**kw: object) -> Recipe:
    dp = {"noise_multiplier": 1.0, "clip": 1.0, "clipping": "fast", **kw.pop("dp", {})}  # type: ignore[dict-item]
    return resolve_recipe({"name": "fast", "batch_size": 16, "epochs": 2, "schedule": "triangular", "dp": dp, **kw})


def fit(model: str, *, graph: bool, seeds: tuple[int, ...] = (0, 1),
        recipe: Recipe | None = None, hooks: list[DPStepHooks | None] | None = None,
        views: list[Any] | None = None) -> list[loop.TrainOutput]:
    r = (recipe or dp_recipe()).model_copy(update={"cuda_graph": graph})
    aug = AugmentConfig(crop_pad=2, flip=True) if model == "cnn" else None
    fn = functools.partial(build_model, MODELS[model], input_shape=SHAPE, num_classes=4)
    return train_stack(init_models(fn, list(seeds)), data().train, r, seeds=list(seeds), lr=0.05, device=CPU,
                       strategy="loop", augment=aug, hooks=hooks, views=views)


@pytest.fixture
def rec(monkeypatch: pytest.MonkeyPatch) -> _Recorder:
    """The loop's graph path on the CPU: ``use_cuda_graph`` decides as for a CUDA device, captures record ops."""
    r = _Recorder()
    real = loop.use_cuda_graph
    monkeypatch.setattr(loop, "use_cuda_graph", lambda recipe, device, opt, **kw: real(recipe, CUDA, opt, **kw))
    monkeypatch.setattr(graphed, "_cuda_capture", r.capture)
    return r


def assert_same_models(a: list[loop.TrainOutput], b: list[loop.TrainOutput], *, tol: float = 1e-5) -> None:
    for x, y in zip(a, b, strict=True):
        for name, t in x.state_dict.items():
            torch.testing.assert_close(y.state_dict[name], t, rtol=tol, atol=tol, msg=name)
        assert y.train_loss == pytest.approx(x.train_loss, rel=tol, abs=tol)


@pytest.mark.parametrize("model", ["cnn", "mlp"])
def test_graph_path_trains_the_eager_models(model: str, rec: _Recorder) -> None:
    """2 models x 2 epochs of 6 steps: step 1 eager (fast clipping verified), each slot bucket 2 eager warm-ups,
    then captured and replayed. Same seeds -> the eager path's weights (noise sigma C = 1 on sums of norm <= 16:
    a wrong or reused noise draw moves them by ~1e-2); another seed differs."""
    eager = fit(model, graph=False)
    assert not rec.graphs
    got = fit(model, graph=True)
    assert all(o.step_path == "cuda-graph" for o in got) and rec.graphs and rec.replays >= 3
    assert got[0].steps == eager[0].steps == 12 and rec.replays < 12
    assert_same_models(eager, got)
    other = fit(model, graph=True, seeds=(0, 2))
    with pytest.raises(AssertionError):
        assert_same_models(got[1:], other[1:])
    if model == "mlp":  # model 0 draws from its own generators (the augmentation draws count the widest draw's slots)
        assert_same_models(got[:1], other[:1])


def test_verification_runs_eagerly_before_any_capture(rec: _Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    real = dpsgd.verify_fast_clip

    def verify(*a: Any, **kw: Any) -> None:
        calls.append(rec.capturing or bool(rec.graphs))
        real(*a, **kw)

    monkeypatch.setattr(dpsgd, "verify_fast_clip", verify)
    assert fit("mlp", graph=True)[0].step_path == "cuda-graph"
    assert calls == [False]


def test_padding_to_a_wider_bucket_changes_nothing() -> None:
    """The same draw (same generators) eagerly (8-slot multiples) and widened to a 64-slot bucket (capped at b_max): padded slots
    have weight 0 and contribute nothing to the clipped, noised gradient or the loss; augmentation is drawn for
    the same slots, so the generators end in the same state."""
    r = dp_recipe()
    d = data().train
    fn = functools.partial(build_model, MODELS["cnn"], input_shape=SHAPE, num_classes=4)
    out = []
    for bucket in (None, 64):
        models = init_models(fn, [0, 1])
        stack = StackedModels.from_modules(models, CPU, strategy="loop")
        dp = DPTraining.start(r.dp, models, [torch.arange(len(d))] * 2, seeds=[0, 1], batch_size=16, epochs=1,
                              default_spe=6, device=CPU, augment=AugmentConfig(crop_pad=2, flip=True))
        b = dp.draw(stack, lambda i: (d.x[i], d.y[i]), bucket=bucket)
        loss, grads = dp.update(stack, b.x, b.y, b.w, b.z)
        out.append((b, loss, grads, [g.get_state() for g in dp.sample_gens]))
    (b0, l0, g0, s0), (b1, l1, g1, s1) = out
    assert b0.x.shape[2] % 8 == 0 and b0.x.shape[2] < dp.b_max == 41 and b1.x.shape[2] == 41  # capped at b_max
    assert float(b1.w[..., b0.x.shape[2]:].abs().sum()) == 0.0
    torch.testing.assert_close(b1.x[:, :, :b0.x.shape[2]], b0.x, rtol=0, atol=0)
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    for a, c in zip(g0, g1, strict=True):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(a, c) for a, c in zip(s0, s1, strict=True))


def test_draws_beyond_b_max_run_eagerly_between_replays(rec: _Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    """With b_max = 16 (about the expected batch), some draws need two micro-batches: those steps run eagerly,
    the others replay graphs, and training equals the eager path's."""
    monkeypatch.setattr(dpsgd, "max_batch", lambda q, n: 16)
    eager = fit("mlp", graph=False)
    got = fit("mlp", graph=True)
    assert got[0].step_path == "cuda-graph" and 0 < rec.replays < 12 - 3
    assert_same_models(eager, got)


def test_audit_hooks_keep_the_step_eager(rec: _Recorder) -> None:
    """A Dirac canary (host-side choice of slots and coordinates per step) or a broken fixture: eager steps."""
    d = data().train
    view = DataView.identity(d).with_inserted(torch.zeros(1, *SHAPE), [0])
    canary = DPStepHooks(gradient_canary=GradientCanary(index=len(d), parameter="net.1.weight", coordinate=3))
    for hooks, views in (([canary, None], [view, view]), ([DPStepHooks(broken="no-clip")] * 2, None)):
        outs = fit("mlp", graph=True, hooks=hooks, views=views)
        assert all(o.step_path == "eager" for o in outs) and not rec.graphs
    watch = DPStepHooks(watch=("net.1.weight", 0))  # reads weights before and after: the step is unchanged
    assert fit("mlp", graph=True, hooks=[watch, None])[0].step_path == "cuda-graph" and rec.graphs


def _start(r: Recipe, model: str, strategy: str, hooks: list[DPStepHooks | None] | None = None
           ) -> tuple[DPTraining, StackedModels, Any]:
    fn = functools.partial(build_model, MODELS[model], input_shape=SHAPE, num_classes=4)
    models = init_models(fn, [0])
    stack = StackedModels.from_modules(models, CPU, strategy=strategy)
    dp = DPTraining.start(r.dp, models, [torch.arange(96)], seeds=[0], batch_size=16, epochs=1, default_spe=6,
                          device=CPU, hooks=hooks)
    return dp, stack, make_optimizer(r, stack.trainable())


def test_use_cuda_graph_for_dp_recipes() -> None:
    yes = dp_recipe(cuda_graph=True)
    dp, stack, opt = _start(yes, "mlp", "loop")
    assert loop.use_cuda_graph(yes, CUDA, opt, dp=dp, stack=stack)
    assert not loop.use_cuda_graph(yes, CPU, opt, dp=dp, stack=stack)
    assert not loop.use_cuda_graph(yes.model_copy(update={"cuda_graph": False}), CUDA, opt, dp=dp, stack=stack)
    # auto graphs the book-keeping step too (first run on a GPU, an H100, 2026-12-05: tests/gpu/test_cuda_factory.py)
    assert loop.use_cuda_graph(yes.model_copy(update={"cuda_graph": "auto"}), CUDA, opt, dp=dp, stack=stack)
    with pytest.raises(TypeError, match="DPTraining"):
        loop.use_cuda_graph(yes, CUDA, opt)
    for clipping, strategy in (("per-example", "loop"), ("fast", "vmap")):
        r = dp_recipe(cuda_graph=True, dp={"clipping": clipping})
        dp, stack, opt = _start(r, "mlp", strategy)
        with pytest.raises(ConfigError, match=rf"recipe.cuda_graph: true needs a DP-SGD step with book-keeping "
                                              rf"clipping.*dp.clipping: '{clipping}', {strategy} layout"):
            loop.use_cuda_graph(r, CUDA, opt, dp=dp, stack=stack)
        auto = r.model_copy(update={"cuda_graph": "auto"})
        assert not loop.use_cuda_graph(auto, CUDA, opt, dp=dp, stack=stack)
    adam = dp_recipe(cuda_graph=True, optimizer="adam")
    dp, stack, opt = _start(adam, "mlp", "loop")
    with pytest.raises(ConfigError, match="bias-correction"):
        loop.use_cuda_graph(adam, CUDA, opt, dp=dp, stack=stack)
    dp, stack, opt = _start(yes, "mlp", "loop", hooks=[DPStepHooks(broken="noise-over-batch")])
    assert dp.has_hooks and not loop.use_cuda_graph(yes, CUDA, opt, dp=dp, stack=stack)


def test_cuda_graph_true_with_per_example_clipping_is_refused_by_the_loop(rec: _Recorder) -> None:
    with pytest.raises(ConfigError, match="recipe.cuda_graph: true needs a DP-SGD step with book-keeping"):
        fit("mlp", graph=True, recipe=dp_recipe(dp={"clipping": "per-example"}))
