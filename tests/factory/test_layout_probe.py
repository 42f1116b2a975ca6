"""The layout probe's timing (factory/layout.py): per-epoch time net of what each call pays once."""

from __future__ import annotations

import pytest

from mlaudit.factory.layout import steady_epoch_time


@pytest.mark.parametrize("once,per_epoch", [(0.05, 0.01), (0.0, 0.02), (3.0, 0.5)])
def test_steady_epoch_time_drops_the_one_time_cost(once: float, per_epoch: float) -> None:
    """A run with a fixed cost per call (verification, tracing) plus a cost per epoch, on a fake clock: the
    probe sees the per-epoch part only, so a layout with a large one-time cost is not judged by it."""
    now = [0.0]
    calls: list[int] = []

    def run(epochs: int) -> None:
        calls.append(epochs)
        now[0] += once + per_epoch * epochs

    got = steady_epoch_time(run, clock=lambda: now[0])
    assert calls == [1, 2]
    assert got == pytest.approx(per_epoch, rel=1e-9)


def test_pick_layout_runs_its_cuda_probe_with_a_warm_up_and_two_timed_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe path (a CUDA device, K > 1) with training and CUDA calls replaced: per layout one warm-up epoch,
    then 1 and 2 epochs, min(K, 16) models each; the reason names the timing."""
    import torch

    from mlaudit.data import load_dataset
    from mlaudit.factory import layout
    from mlaudit.models.registry import build_model
    from mlaudit.train.recipe import resolve_recipe

    calls: list[tuple[str, int, int]] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *_: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda *_: None)
    monkeypatch.setattr(layout, "train_stack", lambda models, data, recipe, **kw: calls.append(
        (kw["strategy"], len(models), recipe.epochs)))
    data = load_dataset("digits").train
    best, why = layout.pick_layout("auto", k=40, model_fn=lambda: build_model("mlp", input_shape=(1, 8, 8),
                                                                                num_classes=10),
                                   data=data, recipe=resolve_recipe("fast"), lr=0.1, device=torch.device("cuda"),
                                   augment=None)
    assert best in ("loop", "vmap") and "2 epochs minus 1" in why
    assert calls == [(s, 16, e) for s in ("loop", "vmap") for e in (1, 1, 2)]


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
