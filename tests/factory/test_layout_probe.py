"""The layout probe's timing (factory/layout.py): per-epoch time net of what each call pays once."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mlaudit.factory.layout import PROBE_EPOCHS, epoch_times, steady_epoch_time


@pytest.mark.parametrize("once,per_epoch", [(0.05, 0.01), (0.0, 0.02), (3.0, 0.5)])
def test_probe_times_one_call_per_epoch_and_drops_the_first(once: float, per_epoch: float) -> None:
    """A call with a one-time cost (verification, capture, compile) in its first epoch plus a cost per epoch, on a
    fake clock: one call of PROBE_EPOCHS epochs; the first epoch carries the one-time cost, the steady time is the
    per-epoch part only, so a layout with a large one-time cost is not judged by it."""
    now = [0.0]
    calls: list[int] = []

    def run(epochs: int, *, on_epoch) -> None:  # noqa: ANN001
        calls.append(epochs)
        now[0] += once
        for e in range(epochs):
            now[0] += per_epoch
            on_epoch(e, None)

    times = epoch_times(run, clock=lambda: now[0])
    assert calls == [PROBE_EPOCHS] and len(times) == PROBE_EPOCHS
    assert times[0] == pytest.approx(once + per_epoch, abs=1e-12)
    assert steady_epoch_time(times) == pytest.approx(per_epoch, rel=1e-9)


@given(base=st.floats(0.001, 1.0), slow=st.floats(0.0, 100.0), at=st.integers(1, PROBE_EPOCHS - 1))
def test_one_slow_epoch_does_not_move_the_steady_time(base: float, slow: float, at: int) -> None:
    """The steady time is a median: one epoch slowed by any amount (a hiccup of the host, another process) leaves
    it at the others' time. The difference of two calls, the probe before 2026-12-07, moved by all of it."""
    times = [5.0] + [base] * (PROBE_EPOCHS - 1)
    times[at] += slow
    assert steady_epoch_time(times) == pytest.approx(base, rel=1e-12)


def test_pick_layout_runs_its_cuda_probe_as_one_timed_call_per_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe path (a CUDA device, K > 1) with training and CUDA calls replaced: per layout one call of
    PROBE_EPOCHS epochs, min(K, 16) models; the reason names the timing."""
    import torch

    from mlaudit.data import load_dataset
    from mlaudit.factory import layout
    from mlaudit.models.registry import build_model
    from mlaudit.train.recipe import resolve_recipe

    calls: list[tuple[str, int, int]] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *_: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda *_: None)
    def fake_train(models, data, recipe, **kw):  # noqa: ANN001, ANN202
        calls.append((kw["strategy"], len(models), recipe.epochs))
        for e in range(recipe.epochs):
            kw["on_epoch"](e, None)

    monkeypatch.setattr(layout, "train_stack", fake_train)
    data = load_dataset("digits").train
    best, why = layout.pick_layout("auto", k=40, model_fn=lambda: build_model("mlp", input_shape=(1, 8, 8),
                                                                                num_classes=10),
                                   data=data, recipe=resolve_recipe("fast"), lr=0.1, device=torch.device("cuda"),
                                   augment=None)
    assert best in ("loop", "vmap") and f"median of {PROBE_EPOCHS - 1} epochs after the first" in why
    assert calls == [(s, 16, PROBE_EPOCHS) for s in ("loop", "vmap")]


def test_layout_is_probed_once_per_probe_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """An out-of-memory back-off 150 -> 75 -> 38 -> 19 models per chunk reuses the one probe of 16 models; a
    chunk of 9 (probed with 9) is measured anew."""
    from mlaudit.data import DatasetSpec, load_dataset
    from mlaudit.factory import FactoryJob, TrialSpec, batched
    from mlaudit.models import ModelSpec
    from mlaudit.train.recipe import resolve_recipe

    seen: list[int] = []

    def fake_pick(strategy: str, *, k: int, **_: object) -> tuple[str, str]:
        seen.append(k)
        return "loop", f"fake probe for {k}"

    monkeypatch.setattr(batched, "pick_layout", fake_pick)
    data = load_dataset(DatasetSpec(name="digits"))
    job = FactoryJob(model=ModelSpec(name="mlp"), recipe=resolve_recipe("fast"), data=data,
                     trials=(TrialSpec("a", 0),), device="cpu")
    setup = batched._Setup(job, data, torch_device("cpu"))
    for k in (150, 75, 38, 19, 9, 9):
        assert setup.layout(k) == "loop"
    assert seen == [150, 9] and setup.layout_reason(19) == "fake probe for 150"


def torch_device(name: str):  # noqa: ANN201
    import torch

    return torch.device(name)


def test_dp_with_book_keeping_clipping_takes_the_loop_without_a_probe() -> None:
    """DP-SGD on CUDA whose layers all have fast-clipping rules: loop, no probe (only the device type is read:
    nothing touches a GPU); per-example clipping, BatchNorm (no rule) or the CPU go the usual way."""
    import functools

    import torch

    from mlaudit.factory.layout import DP_LOOP_REASON, dp_fast_loop, pick_layout
    from mlaudit.models.registry import ModelSpec, build_model
    from mlaudit.train.recipe import resolve_recipe

    cuda = torch.device("cuda")
    dp = resolve_recipe({"name": "fast", "dp": {"epsilon": 1.0, "delta": 1e-5, "clip": 1.0}})
    gn = functools.partial(build_model, ModelSpec(name="fastcnn", norm="group", width=8), input_shape=(3, 16, 16),
                           num_classes=4)
    bn = functools.partial(build_model, ModelSpec(name="fastcnn", width=8), input_shape=(3, 16, 16), num_classes=4)
    assert dp_fast_loop(dp, gn, cuda)
    assert pick_layout("auto", k=150, model_fn=gn, data=None, recipe=dp, lr=0.1, device=cuda,  # type: ignore[arg-type]
                       augment=None) == ("loop", DP_LOOP_REASON)
    per_example = dp.model_copy(update={"dp": dp.dp.model_copy(update={"clipping": "per-example"})})
    assert not dp_fast_loop(per_example, gn, cuda)
    assert not dp_fast_loop(dp, bn, cuda)
    assert not dp_fast_loop(dp, gn, torch.device("cpu"))
    assert not dp_fast_loop(resolve_recipe("fast"), gn, cuda)


def test_explicit_fast_clipping_takes_the_loop_layout_on_any_device_and_refuses_vmap() -> None:
    """dp.clipping: fast runs only in the loop layout: auto picks it (on the CPU too, where auto clipping keeps the
    static rule's vmap), and a config that also sets factory.strategy: vmap is refused before any work."""
    import functools

    import torch

    from mlaudit.errors import ConfigError
    from mlaudit.experiments import parse_config
    from mlaudit.factory.layout import DP_FAST_REASON, pick_layout
    from mlaudit.models.registry import ModelSpec, build_model
    from mlaudit.train.recipe import resolve_recipe

    mlp = functools.partial(build_model, ModelSpec(name="mlp", width=8), input_shape=(1, 8, 8), num_classes=4)
    fast = resolve_recipe({"name": "fast", "dp": {"epsilon": 1.0, "delta": 1e-5, "clip": 1.0, "clipping": "fast"}})
    auto = resolve_recipe({"name": "fast", "dp": {"epsilon": 1.0, "delta": 1e-5, "clip": 1.0}})
    cpu = torch.device("cpu")
    assert pick_layout("auto", k=3, model_fn=mlp, data=None, recipe=fast, lr=0.1, device=cpu,  # type: ignore[arg-type]
                       augment=None) == ("loop", DP_FAST_REASON)
    assert pick_layout("auto", k=3, model_fn=mlp, data=None, recipe=auto, lr=0.1, device=cpu,  # type: ignore[arg-type]
                       augment=None)[0] == "vmap"
    cfg = {"kind": "train", "dataset": "digits", "model": "mlp",
           "recipe": {"name": "fast", "dp": {"epsilon": 1.0, "delta": 1e-5, "clip": 1.0, "clipping": "fast"}}}
    parse_config(cfg)
    with pytest.raises(ConfigError, match=r"recipe.dp.clipping = 'fast'.*factory.strategy = 'vmap'"):
        parse_config({**cfg, "factory": {"strategy": "vmap"}})


def test_job_model_steps_counts_partial_batches() -> None:
    from mlaudit.factory.layout import job_model_steps

    assert job_model_steps([100, 64, 1], batch_size=64, epochs=3) == (2 + 1 + 1) * 3
    assert job_model_steps([], batch_size=8, epochs=5) == 0


@given(eager=st.floats(0.01, 10.0), ratio=st.floats(0.5, 1.5), compile_s=st.floats(0.0, 60.0),
       probe_steps=st.integers(1, 64), job_steps=st.integers(1, 10**7))
def test_compile_decision_keeps_the_compiled_step_iff_it_is_3_percent_faster(
        eager: float, ratio: float, compile_s: float, probe_steps: int, job_steps: int) -> None:
    """The compile is sunk once the probe ran, so the decision is the faster step by COMPILE_MIN_GAIN; the reason
    names both timings and the job's estimate (per-step eager time x the job's model-steps)."""
    from mlaudit.factory.layout import COMPILE_MIN_GAIN, compile_decision

    use, why = compile_decision(eager, eager * ratio, compile_s=compile_s, probe_model_steps=probe_steps,
                                job_model_steps=job_steps)
    assert use == (1.0 - ratio >= COMPILE_MIN_GAIN - 1e-12) or abs(1.0 - ratio - COMPILE_MIN_GAIN) < 1e-9
    assert f"{eager:.3f} s eager" in why and f"job estimated at {eager / probe_steps * job_steps:.0f} s" in why
    skip, why = compile_decision(eager, None, compile_s=None, probe_model_steps=probe_steps, job_model_steps=job_steps)
    assert not skip and "not probed" in why


def _fake_compile_probe(monkeypatch: pytest.MonkeyPatch, *, eager_epoch: float, compiled_epoch: float,
                        compile_s: float, compiled_loss_factor: float = 1.0) -> tuple[list[tuple[bool, int]], list[float]]:
    """train_stack and the CUDA calls of factory/layout.py replaced: each call advances a fake clock by its
    epochs' cost (0.2 s set-up plus the epoch's time, then on_epoch), the first compiled epoch also by the compile.
    Each epoch reports the losses 2 / (1 + epoch) per model, times ``compiled_loss_factor`` when compiled."""
    import torch

    from mlaudit.factory import layout

    calls: list[tuple[bool, int]] = []
    now = [0.0]

    def fake_train(models, data, recipe, **kw):  # noqa: ANN001, ANN202
        assert kw["strategy"] == "loop" and len(models) == 16
        comp = recipe.compile is True
        if comp and not any(c for c, _ in calls):
            now[0] += compile_s
        calls.append((comp, recipe.epochs))
        now[0] += 0.2
        for e in range(recipe.epochs):
            now[0] += compiled_epoch if comp else eager_epoch
            kw["on_epoch"](e, torch.full((len(models),), 2.0 / (1 + e) * (compiled_loss_factor if comp else 1.0)))

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *_: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda *_: None)
    monkeypatch.setattr(layout, "train_stack", fake_train)
    return calls, now


@pytest.mark.parametrize("compiled_epoch,models,want", [(0.8, 10_000, True), (0.99, 10_000, False), (0.8, 2, None)])
def test_pick_compile_probes_long_jobs_and_keeps_the_faster_step(monkeypatch: pytest.MonkeyPatch,
                                                                 compiled_epoch: float, models: int,
                                                                 want: bool | None) -> None:
    """``recipe.compile: auto`` on CUDA in the loop layout: the eager step is probed as the layout probe does
    (one call of PROBE_EPOCHS epochs); a job estimated below COMPILE_PROBE_MIN_S stops there (want None: not compiled,
    no compiled call); a longer one probes the compiled step the same way and keeps it only if 3% faster."""
    import torch

    from mlaudit.data import load_dataset
    from mlaudit.factory import layout
    from mlaudit.models.registry import build_model
    from mlaudit.train.recipe import resolve_recipe

    calls, now = _fake_compile_probe(monkeypatch, eager_epoch=1.0, compiled_epoch=compiled_epoch, compile_s=25.0)
    data = load_dataset("digits").train
    recipe = resolve_recipe({"name": "fast", "compile": "auto"})
    use, why = layout.pick_compile(recipe, layout="loop", k=32, data=data, lr=0.1, device=torch.device("cuda"),
                                   model_fn=lambda: build_model("mlp", input_shape=(1, 8, 8), num_classes=10),
                                   augment=None, job_sizes=[len(data)] * models, clock=lambda: now[0])
    assert use is bool(want)
    eager_calls = [(False, PROBE_EPOCHS)]
    if want is None:
        assert calls == eager_calls and "not probed" in why
    else:
        assert calls == eager_calls + [(True, PROBE_EPOCHS)]
        assert f"{compiled_epoch:.3f} s compiled" in why and "compile 25.0 s" in why


def test_pick_compile_without_a_probe_where_compile_does_not_apply() -> None:
    """true / false are kept as set; auto off the GPU or outside the loop layout is false, and nothing trains
    (train_stack would fail on data=None)."""
    import torch

    from mlaudit.factory.layout import pick_compile
    from mlaudit.train.recipe import resolve_recipe

    kw = {"k": 4, "model_fn": None, "data": None, "lr": 0.1, "augment": None, "job_sizes": [10]}
    for value in (True, False):
        r = resolve_recipe({"name": "fast", "compile": value})
        assert pick_compile(r, layout="loop", device=torch.device("cuda"), **kw) == (value, "set by recipe.compile")  # type: ignore[arg-type]
    auto = resolve_recipe({"name": "fast", "compile": "auto"})
    assert not pick_compile(auto, layout="loop", device=torch.device("cpu"), **kw)[0]  # type: ignore[arg-type]
    use, why = pick_compile(auto, layout="vmap", device=torch.device("cuda"), **kw)  # type: ignore[arg-type]
    assert not use and "loop layout on CUDA (here vmap on cuda)" in why
    private = resolve_recipe({"name": "fast", "compile": "auto",
                              "dp": {"noise_multiplier": 1.0, "clip": 1.0, "clipping": "per-example"}})
    use, why = pick_compile(private, layout="loop", device=torch.device("cuda"), **kw)  # type: ignore[arg-type]
    assert not use and "compile only with book-keeping clipping" in why and "per-example" in why


def test_compile_auto_probes_a_dp_job_only_where_book_keeping_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    """dp.clipping auto on a model with a layer fast clipping has no rule for (BatchNorm) stays eager with the
    reason; on a supported model (GroupNorm) the probe goes on to time the eager step (stood in for here: the
    eager timing is the first thing it does)."""
    import torch

    from mlaudit.factory import layout
    from mlaudit.models import ModelSpec, build_model
    from mlaudit.train.recipe import resolve_recipe

    kw = {"k": 4, "data": None, "lr": 0.1, "augment": None, "job_sizes": [10]}
    private = resolve_recipe({"name": "fast", "compile": "auto", "dp": {"noise_multiplier": 1.0, "clip": 1.0}})

    def model(norm: str):  # noqa: ANN202
        return lambda: build_model(ModelSpec(name="fastcnn", norm=norm, width=8), input_shape=(3, 32, 32),
                                   num_classes=10)

    use, why = layout.pick_compile(private, layout="loop", device=torch.device("cuda"),  # type: ignore[arg-type]
                                   model_fn=model("batch"), **kw)
    assert not use and "compile only with book-keeping clipping" in why and "auto" in why

    class Probed(Exception):
        pass

    def probe_run(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise Probed

    monkeypatch.setattr(layout, "_probe_run", probe_run)
    with pytest.raises(Probed):
        layout.pick_compile(private, layout="loop", device=torch.device("cuda"),  # type: ignore[arg-type]
                            model_fn=model("group"), **kw)


def test_factory_trains_each_chunk_with_the_compile_decided_so_far_and_records_why(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The job's CompileProbe is made once (first chunk, with background=True and the chunk's evaluation as its
    warm-up) and asked before every chunk: each chunk's train_stack gets the answer of that moment (here eager
    while "compiling", then compiled), each model's stack_layout_reason carries it, and the probe is closed when
    the job ends. Trains for real on the CPU (where compiling is a no-op)."""
    from mlaudit.data import DatasetSpec, load_dataset
    from mlaudit.factory import FactoryJob, TrialSpec, batched
    from mlaudit.models import ModelSpec
    from mlaudit.train.recipe import resolve_recipe

    made: list[dict[str, object]] = []
    closed: list[bool] = []
    seen: list[object] = []
    real_train = batched.train_stack
    answers = iter([(False, "compile auto: eager while compiling, fake"), (True, "compile auto: compiled, fake")])

    class FakeProbe:
        def __init__(self, recipe, **kw):  # noqa: ANN001, ANN003
            assert recipe.compile == "auto" and len(kw["job_sizes"]) == 3
            made.append(kw)

        def decision(self) -> tuple[bool, str]:
            return next(answers)

        def close(self) -> None:
            closed.append(True)

    def spy(models, data, recipe, **kw):  # noqa: ANN001, ANN202
        seen.append(recipe.compile)
        return real_train(models, data, recipe, **kw)

    monkeypatch.setattr(batched, "CompileProbe", FakeProbe)
    monkeypatch.setattr(batched, "train_stack", spy)
    data = load_dataset(DatasetSpec(name="digits"))
    job = FactoryJob(model=ModelSpec(name="mlp", width=16), recipe=resolve_recipe({"name": "fast", "epochs": 1,
                                                                                    "compile": "auto"}),
                     data=data, trials=tuple(TrialSpec(f"m{i}", i) for i in range(3)), device="cpu", max_chunk=2,
                     batched=True, evaluate=True)
    out = batched.run_trials(job)
    assert len(made) == 1 and made[0]["k"] == 2 and made[0]["background"] is True and callable(made[0]["warm"])
    assert seen == [False, True] and closed == [True]
    assert ["fake" in m.metrics["stack_layout_reason"] for m in out] == [True] * 3
    assert [m.metrics["stack_layout_reason"].endswith("eager while compiling, fake") for m in out] == [True, True,
                                                                                                       False]


def test_the_probe_is_closed_when_a_chunk_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A job that raises (here a NaN loss) still waits for its background compile (run_trials' finally)."""
    from mlaudit.data import DatasetSpec, load_dataset
    from mlaudit.errors import TrainingError
    from mlaudit.factory import FactoryJob, TrialSpec, batched
    from mlaudit.models import ModelSpec
    from mlaudit.train.recipe import resolve_recipe

    closed: list[bool] = []

    class FakeProbe:
        def __init__(self, recipe, **kw) -> None:  # noqa: ANN001, ANN003
            pass

        def decision(self) -> tuple[bool, str]:
            return False, "compile auto: fake"

        def close(self) -> None:
            closed.append(True)

    monkeypatch.setattr(batched, "CompileProbe", FakeProbe)
    data = load_dataset(DatasetSpec(name="digits"))
    job = FactoryJob(model=ModelSpec(name="mlp", width=16), recipe=resolve_recipe({"name": "fast", "epochs": 1,
                                                                                    "lr": 1e30, "compile": "auto"}),
                     data=data, trials=(TrialSpec("m0", 0),), device="cpu", max_chunk=1, batched=True, evaluate=False)
    with pytest.raises(TrainingError):
        batched.run_trials(job)
    assert closed == [True]


def _background_probe(monkeypatch: pytest.MonkeyPatch, *, fail: bool = False):  # noqa: ANN202
    """A CompileProbe with background=True over the fake train_stack of :func:`_fake_compile_probe`, whose
    background call (1 model, 1 epoch, compile on, no CUDA graph) blocks until the returned event is set."""
    import threading

    import torch

    from mlaudit.data import load_dataset
    from mlaudit.factory import layout
    from mlaudit.models.registry import build_model
    from mlaudit.train.recipe import resolve_recipe

    calls, now = _fake_compile_probe(monkeypatch, eager_epoch=1.0, compiled_epoch=0.8, compile_s=0.0)
    fake = layout.train_stack
    release = threading.Event()
    background: list[tuple[int, int, object, str]] = []
    warmed: list[object] = []

    def train(models, data, recipe, **kw):  # noqa: ANN001, ANN202
        if threading.current_thread() is threading.main_thread():
            return fake(models, data, recipe, **kw)
        background.append((len(models), recipe.epochs, recipe.cuda_graph, threading.current_thread().name))
        assert recipe.compile is True
        release.wait(10)
        if fail:
            raise RuntimeError("BackendCompilerFailed: fake\nsecond line")
        kw["on_epoch_models"](0, "the trained stack")
        return None

    monkeypatch.setattr(layout, "train_stack", train)
    data = load_dataset("digits").train
    probe = layout.CompileProbe(resolve_recipe({"name": "fast", "compile": "auto"}), layout="loop", k=16, data=data,
                                lr=0.1, device=torch.device("cuda"), augment=None, job_sizes=[len(data)] * 10_000,
                                model_fn=lambda: build_model("mlp", input_shape=(1, 8, 8), num_classes=10),
                                clock=lambda: now[0], background=True, warm=warmed.append)
    return probe, release, calls, background, warmed


def test_compile_probe_in_the_background_answers_eager_until_the_compile_is_done(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """background=True: after the eager probe (on this thread) the compile runs in a thread (one model, one epoch,
    no CUDA graph, then warm(stack)); decision() answers eager without blocking while it runs, then times the
    compiled step here (compile already done) and decides as the synchronous probe does."""
    import sys

    from mlaudit.train.graphed import captures_paused

    before = sys.getswitchinterval()
    assert not captures_paused()
    probe, release, calls, background, warmed = _background_probe(monkeypatch)
    assert sys.getswitchinterval() <= 1e-4  # while the compile runs (COMPILE_SWITCH_INTERVAL_S)
    assert captures_paused()  # the job's steps capture no CUDA graph while the thread is on the GPU
    for _ in range(3):
        use, why = probe.decision()
        assert not use and "eager while the step compiles in the background" in why
    release.set()
    probe.close()
    assert sys.getswitchinterval() == before and not captures_paused()
    assert background == [(1, 1, False, "mlaudit-compile")] and warmed == ["the trained stack"]
    use, why = probe.decision()
    assert use and "1.000 s eager vs 0.800 s compiled" in why and "while 3 chunk(s) trained eagerly" in why
    assert calls == [(False, PROBE_EPOCHS), (True, PROBE_EPOCHS)]  # the probes on this thread
    assert probe.decision() == (use, why)  # final


def test_compile_probe_in_the_background_reports_a_failed_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from mlaudit.train.graphed import captures_paused

    before = sys.getswitchinterval()
    probe, release, calls, _, warmed = _background_probe(monkeypatch, fail=True)
    assert captures_paused()
    release.set()
    probe.close()
    assert sys.getswitchinterval() == before and not captures_paused()  # resumed after a failure too
    use, why = probe.decision()
    assert not use and "compiled probe failed (RuntimeError: BackendCompilerFailed: fake)" in why
    assert calls == [(False, PROBE_EPOCHS)] and warmed == []


def test_pick_compile_falls_back_to_eager_when_the_compiled_probe_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model inductor cannot compile (or a compiled step out of memory) fails in the probe, after the eager step
    has run: the job trains without compile and the reason names the error."""
    import torch

    from mlaudit.data import load_dataset
    from mlaudit.factory import layout
    from mlaudit.models.registry import build_model
    from mlaudit.train.recipe import resolve_recipe

    calls, now = _fake_compile_probe(monkeypatch, eager_epoch=1.0, compiled_epoch=0.5, compile_s=1.0)
    real = layout.train_stack

    def failing(models, data, recipe, **kw):  # noqa: ANN001, ANN202
        if recipe.compile is True:
            raise RuntimeError("BackendCompilerFailed: inductor could not lower op\nmore lines")
        return real(models, data, recipe, **kw)

    monkeypatch.setattr(layout, "train_stack", failing)
    data = load_dataset("digits").train
    use, why = layout.pick_compile(resolve_recipe({"name": "fast", "compile": "auto"}), layout="loop", k=16, data=data,
                                   lr=0.1, device=torch.device("cuda"), augment=None, job_sizes=[len(data)] * 10_000,
                                   model_fn=lambda: build_model("mlp", input_shape=(1, 8, 8), num_classes=10),
                                   clock=lambda: now[0])
    assert not use and "compiled probe failed (RuntimeError: BackendCompilerFailed" in why and "more lines" not in why
    assert calls == [(False, PROBE_EPOCHS)]


@pytest.mark.parametrize("factor,agree", [(1.0, True), (1.04, True), (0.93, True), (1.2, False), (float("nan"), False)])
def test_pick_compile_keeps_the_compiled_step_only_if_it_trains_like_the_eager_one(
        monkeypatch: pytest.MonkeyPatch, factor: float, agree: bool) -> None:
    """A compiled step 20% faster whose probe losses differ from the eager step's beyond COMPILE_LOSS_RTOL (or are
    NaN: inductor's bf16 fastcnn on an H100, 2026-12-07) is not kept; the reason names the model, epoch and losses."""
    import torch

    from mlaudit.data import load_dataset
    from mlaudit.factory import layout
    from mlaudit.models.registry import build_model
    from mlaudit.train.recipe import resolve_recipe

    _, now = _fake_compile_probe(monkeypatch, eager_epoch=1.0, compiled_epoch=0.8, compile_s=5.0,
                                 compiled_loss_factor=factor)
    data = load_dataset("digits").train
    use, why = layout.pick_compile(resolve_recipe({"name": "fast", "compile": "auto"}), layout="loop", k=16, data=data,
                                   lr=0.1, device=torch.device("cuda"), augment=None, job_sizes=[len(data)] * 10_000,
                                   model_fn=lambda: build_model("mlp", input_shape=(1, 8, 8), num_classes=10),
                                   clock=lambda: now[0])
    assert use is agree
    if not agree:
        assert "losses differ from the eager step's (model 0's mean loss in probe epoch" in why


def test_compile_disagreement_reads_the_worst_model_and_epoch() -> None:
    from mlaudit.factory.layout import compile_disagreement

    eager = [[2.0, 2.1], [1.5, 1.6], [0.01, 0.02]]
    assert compile_disagreement(eager, eager) is None
    assert compile_disagreement(eager, [[2.05, 2.0], [1.45, 1.65], [0.05, 0.0]]) is None  # within 10% / 0.05
    msg = compile_disagreement(eager, [[2.0, 2.1], [1.5, 2.4], [0.01, 0.02]])
    assert msg is not None and "model 1's mean loss in probe epoch 2: 1.6 eager vs 2.4 compiled" in msg
    assert "inf" not in (compile_disagreement(eager, [[2.0, 2.1], [float("nan"), 1.6], [0.01, 0.02]]) or "inf")
    assert compile_disagreement(eager, eager[:2]) is not None


def test_a_job_trains_the_same_models_beside_a_training_thread() -> None:
    """What the background compile relies on (CompileProbe's docstring): training in another thread does not
    change the models a job trains. A thread trains throwaway models (built before it starts, as CompileProbe does)
    again and again while the factory trains a job, and the job's weights equal those of the same job alone
    (bitwise on the CPU): initial weights, data order and augmentation come from per-model generators, not from a
    global state the thread could advance."""
    import threading

    import torch

    from mlaudit.data import DatasetSpec, load_dataset
    from mlaudit.factory import FactoryJob, TrialSpec, run_trials
    from mlaudit.models import ModelSpec
    from mlaudit.models.registry import build_model
    from mlaudit.train.loop import init_models, train_stack
    from mlaudit.train.recipe import resolve_recipe

    data = load_dataset(DatasetSpec(name="digits"))
    recipe = resolve_recipe({"name": "fast", "epochs": 2, "batch_size": 64})
    job = FactoryJob(model=ModelSpec(name="mlp", width=16), recipe=recipe, data=data,
                     trials=tuple(TrialSpec(f"m{i}", 10 + i) for i in range(4)), device="cpu", max_chunk=2,
                     batched=True, evaluate=False)
    alone = run_trials(job)
    stop, started = threading.Event(), threading.Event()
    spare = [init_models(lambda: build_model(ModelSpec(name="mlp", width=16), input_shape=(1, 8, 8), num_classes=10),
                         [99]) for _ in range(400)]
    rounds = [0]

    def beside() -> None:
        while not stop.is_set() and rounds[0] < len(spare):
            started.set()
            train_stack(spare[rounds[0]], data.train, recipe.model_copy(update={"epochs": 1}), seeds=[99], lr=0.1,
                        device=torch.device("cpu"))
            rounds[0] += 1

    th = threading.Thread(target=beside)
    th.start()
    try:
        assert started.wait(30)
        together = run_trials(job)
        overlapped = th.is_alive()  # the thread trained before the job began and was still training when it ended
    finally:
        stop.set()
        th.join()
    assert overlapped
    for a, b in zip(alone, together, strict=True):
        assert a.trial_id == b.trial_id
        for name, t in a.state_dict.items():
            assert torch.equal(t, b.state_dict[name]), name
