"""DP-SGD: per-example gradients, clipping, noise, Poisson sampling, private training, and the audit hooks
(Dirac gradient canary, deliberately broken fixtures)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mlaudit.data.registry import DatasetSpec, load_dataset
from mlaudit.data.view import DataView
from mlaudit.errors import ConfigError, UnsupportedModelError
from mlaudit.models.registry import ModelSpec, build_model
from mlaudit.privacy.dpsgd import (
    DPTraining,
    clip_per_example,
    clipped_sum,
    gaussian_noise,
    max_batch,
    noisy_average,
    per_example_grads,
    poisson_batch,
)
from mlaudit.train.evaluate import evaluate
from mlaudit.train.hooks import DPStepHooks, GradientCanary
from mlaudit.train.loop import StackedModels, init_models, train_stack
from mlaudit.train.recipe import resolve_recipe

CPU = torch.device("cpu")


def tiny(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 3))


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_per_example_grads_equal_a_loop_over_examples(strategy: str) -> None:
    mods = [tiny(0), tiny(1)]
    x, y = torch.randn(2, 5, 3, 4), torch.randint(0, 3, (2, 5))
    stack = StackedModels.from_modules(mods, CPU, strategy=strategy)
    groups = per_example_grads(stack, x, y, label_smoothing=0.1)
    per_model = [[g[0] for g in gr] for gr, _ in groups] if strategy == "loop" else \
        [[g[k] for g in groups[0][0]] for k in range(2)]
    for k, m in enumerate(mods):
        for i in range(5):
            loss = nn.functional.cross_entropy(m(x[k, i:i + 1]), y[k, i:i + 1], label_smoothing=0.1)
            want = torch.autograd.grad(loss, list(m.parameters()))
            for g, w in zip(per_model[k], want):
                torch.testing.assert_close(g[i], w, rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(clip=st.floats(0.01, 10.0), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 1000))
def test_clipping_bounds_every_per_example_norm(clip: float, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    per = [torch.randn(2, 7, 3, 4, generator=g) * scale, torch.randn(2, 7, 5, generator=g) * scale]
    out = clip_per_example(per, clip)
    before = torch.sqrt(sum(p.flatten(2).pow(2).sum(-1) for p in per))
    after = torch.sqrt(sum(p.flatten(2).pow(2).sum(-1) for p in out))
    assert bool((after <= clip * (1 + 1e-5) + 1e-6).all())
    small = before < clip * 0.99  # those already inside the ball are (almost) unchanged
    torch.testing.assert_close(after[small], before[small], rtol=1e-5, atol=1e-6)
    w = (torch.rand(2, 7, generator=g) < 0.5).float()
    summed = clipped_sum(per, w, clip)
    for s, o in zip(summed, out):
        torch.testing.assert_close(s, (o * w.view(2, 7, *([1] * (o.dim() - 2)))).sum(1), rtol=1e-4, atol=1e-5)


def test_noise_has_the_right_scale_and_is_per_model() -> None:
    sigma, clip, q, n = 1.3, 0.7, 0.05, 1000
    shapes = [torch.Size([100, 50]), torch.Size([20000])]
    z = gaussian_noise(shapes, [torch.Generator().manual_seed(s) for s in (1, 2)], CPU)
    zeros = [torch.zeros(2, *s) for s in shapes]
    out = noisy_average(zeros, z, torch.full((2,), sigma * clip), torch.full((2,), q * n))
    flat = torch.cat([o.flatten(1) for o in out], 1)  # [2, 25000]
    want = sigma * clip / (q * n)
    for k in range(2):
        assert flat[k].std().item() == pytest.approx(want, rel=0.03)
        assert abs(flat[k].mean().item()) < 4 * want / math.sqrt(flat.shape[1])
    alone = gaussian_noise(shapes, [torch.Generator().manual_seed(2)], CPU)  # model 1 trained alone
    assert all(torch.equal(a[0], b[1]) for a, b in zip(alone, z))


def test_poisson_batch_size_is_binomial() -> None:
    n, q, draws = 400, 0.1, 3000
    pool = torch.arange(1000, 1000 + n)
    b_max = max_batch(q, n)
    g = torch.Generator().manual_seed(0)
    sizes = []
    for _ in range(draws):
        idx, w = poisson_batch(pool, q, b_max, g)
        sizes.append(w.sum().item())
        kept = idx[w > 0]
        assert len(set(kept.tolist())) == len(kept) and bool(((kept >= 1000) & (kept < 1000 + n)).all())
    s = torch.tensor(sizes, dtype=torch.float64)
    mean, var = n * q, n * q * (1 - q)
    assert abs(s.mean().item() - mean) < 5 * math.sqrt(var / draws)
    assert s.var().item() == pytest.approx(var, rel=0.15)


def test_poisson_overflow_is_split_into_micro_batches_not_dropped() -> None:
    pool = torch.arange(50)
    idx, w = poisson_batch(pool, 0.9, 8, torch.Generator().manual_seed(0))  # ~45 kept, 8 slots
    assert idx.shape[1] == 8 and idx.shape[0] == math.ceil(w.sum().item() / 8) > 1
    assert len(set(idx[w > 0].tolist())) == int(w.sum().item())


@functools.lru_cache(maxsize=1)
def digits():
    return load_dataset(DatasetSpec(name="digits"))


def dp_fit(seeds: list[int], dp: dict, model: dict | None = None, strategy: str = "vmap", epochs: int = 6):
    b = digits()
    r = resolve_recipe({"name": "custom", "epochs": epochs, "batch_size": 64, "lr": 0.5, "schedule": "constant",
                        "momentum": 0.0, "weight_decay": 0.0, "augment": "none", "dp": dp})
    fn = functools.partial(build_model, ModelSpec(**(model or {"name": "logistic"})), input_shape=b.input_shape,
                           num_classes=b.num_classes)
    outs = train_stack(init_models(fn, seeds), b.train, r, seeds=seeds, lr=0.5, device=CPU, strategy=strategy)
    return fn, outs


def test_dp_training_on_digits_is_accurate_private_and_reproducible() -> None:
    dp = {"epsilon": 4.0, "delta": 1e-5, "clip": 1.0}
    fn, outs = dp_fit([0, 1], dp)
    models = init_models(fn, [0, 1])
    for m, o in zip(models, outs):
        m.load_state_dict(o.state_dict)
    acc = evaluate(StackedModels.from_modules(models, CPU, strategy="vmap"), digits().test, batch_size=512)["accuracy"]
    assert bool((acc > 0.8).all()), acc
    n = len(digits().train)
    for o in outs:
        p = o.privacy
        assert p["dp_epsilon"] <= 4.0 + 1e-6 and p["dp_epsilon"] > 3.9
        assert p["dp_sample_rate"] == pytest.approx(64 / n) and p["dp_steps"] == 6 * math.ceil(n / 64) == o.steps
        assert p["dp_delta"] == 1e-5 and p["dp_noise_multiplier"] > 0.5
    _, again = dp_fit([0, 1], dp)  # same seeds: bitwise the same on CPU
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for a, b in zip(outs, again) for k in a.state_dict)
    _, alone = dp_fit([1], dp)  # a model trained alone = the same trial in a stack (float rounding)
    for k in alone[0].state_dict:
        torch.testing.assert_close(alone[0].state_dict[k], outs[1].state_dict[k], rtol=1e-4, atol=1e-5)


def test_loop_layout_matches_vmap_layout() -> None:
    dp = {"noise_multiplier": 1.0, "clip": 0.5}
    model = {"name": "mlp", "norm": "none", "width": 16}
    _, a = dp_fit([3], dp, model, "vmap", epochs=1)
    _, b = dp_fit([3], dp, model, "loop", epochs=1)
    for k in a[0].state_dict:
        torch.testing.assert_close(a[0].state_dict[k], b[0].state_dict[k], rtol=1e-4, atol=1e-5)


def test_batchnorm_model_is_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="norm: group"):
        dp_fit([0], {"noise_multiplier": 1.0}, {"name": "mlp", "norm": "batch", "width": 8}, epochs=1)


@pytest.mark.parametrize("dp", [{"clip": 1.0}, {"epsilon": 1.0, "noise_multiplier": 1.0}])
def test_exactly_one_of_epsilon_and_noise_multiplier(dp: dict) -> None:
    with pytest.raises(ConfigError, match=r"dp\.epsilon.*dp\.noise_multiplier"):
        resolve_recipe({"name": "fast", "dp": dp})


def test_large_delta_refused_unless_allowed() -> None:
    with pytest.raises(ConfigError, match="1/N"):
        dp_fit([0], {"noise_multiplier": 1.0, "delta": 0.01}, epochs=1)
    with pytest.warns(UserWarning, match="1/N"):
        _, outs = dp_fit([0], {"noise_multiplier": 1.0, "delta": 0.01, "allow_large_delta": True}, epochs=1)
    assert outs[0].privacy["dp_delta"] == 0.01


# ---------------------------------------------------------------- audit hooks (dp-audit's canary and fixtures)
def canary_view(coordinate: int = 3 * 64 + 0, broken: str | None = None) -> tuple[DataView, DPStepHooks]:
    b = digits()
    g = GradientCanary(index=len(b.train), parameter="net.1.weight", coordinate=coordinate)
    view = DataView.identity(b.train).with_inserted(torch.zeros(1, *b.train.shape), [0])
    return view, DPStepHooks(gradient_canary=g, broken=broken)


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_dirac_canary_adds_exactly_c_per_sampled_step(strategy: str) -> None:
    """Without noise, constant lr, no momentum or decay: weight [3, pixel 0] (pixel 0 is 0 in every
    digits training image, so no data gradient reaches it) moves by exactly -lr * C / (qn) per step
    in which the canary was sampled, and not at all for the model without the canary."""
    b = digits()
    q, lr, clip = 0.05, 0.5, 0.7
    view, hook = canary_view()
    r = resolve_recipe({"name": "custom", "epochs": 2, "batch_size": 64, "lr": lr, "schedule": "constant",
                        "momentum": 0.0, "weight_decay": 0.0, "augment": "none",
                        "dp": {"noise_multiplier": 0.0, "clip": clip, "sample_rate": q}})
    fn = functools.partial(build_model, ModelSpec(name="logistic"), input_shape=b.input_shape, num_classes=10)
    seeds = [1, 5, 9]
    outs = train_stack(init_models(fn, seeds), b.train, r, seeds=seeds, lr=lr, device=CPU,
                       views=[view, view, None], hooks=[hook, hook, None], strategy=strategy)
    counts = [o.privacy.get("dp_canary_sampled") for o in outs]
    assert counts[2] is None and all(c is not None and c >= 1 for c in counts[:2])
    for o, m0, c in zip(outs, init_models(fn, seeds), counts):
        moved = o.state_dict["net.1.weight"][:, 0] - m0.net[1].weight.detach()[:, 0]
        want = torch.zeros(10)
        if c is not None:
            want[3] = -lr * clip / (q * (len(b.train) + 1)) * c
        torch.testing.assert_close(moved, want, rtol=1e-5, atol=1e-7)


def test_broken_fixtures_change_noise_and_clip_only_when_asked() -> None:
    b = digits()
    n = len(b.train)
    cfg = resolve_recipe({"name": "fast", "dp": {"noise_multiplier": 2.0, "clip": 0.5, "sample_rate": 0.1}}).dp
    models = [build_model("logistic", input_shape=b.input_shape, num_classes=10)]

    def start(hook: DPStepHooks | None) -> DPTraining:
        return DPTraining.start(cfg, models, [torch.arange(n)], seeds=[0], batch_size=64, epochs=1, default_spe=23,
                                device=CPU, hooks=[hook])

    ok, plain = start(None), start(DPStepHooks())
    assert ok.broken is None and ok.clip == 0.5 and float(ok.sigma_c[0]) == pytest.approx(1.0)
    assert plain.sigma_c.tolist() == ok.sigma_c.tolist() and plain.canaries is None
    noisy = start(DPStepHooks(broken="noise-over-batch"))
    assert float(noisy.sigma_c[0]) == pytest.approx(1.0 / (0.1 * n)) and noisy.clip == 0.5
    noclip = start(DPStepHooks(broken="no-clip"))
    assert noclip.clip == math.inf and float(noclip.sigma_c[0]) == pytest.approx(1.0)
    assert noclip.report(0, 10)["dp_epsilon"] == ok.report(0, 10)["dp_epsilon"]  # the claim is unchanged


def test_audit_hook_errors() -> None:
    b = digits()
    cfg = resolve_recipe({"name": "fast", "dp": {"noise_multiplier": 1.0}}).dp
    models = [build_model("logistic", input_shape=b.input_shape, num_classes=10) for _ in range(2)]
    pools = [torch.arange(len(b.train))] * 2

    def start(hooks: list) -> DPTraining:
        return DPTraining.start(cfg, models, pools, seeds=[0, 1], batch_size=64, epochs=1, default_spe=23,
                                device=CPU, hooks=hooks)

    with pytest.raises(ConfigError, match="share one DP-SGD variant"):
        start([DPStepHooks(broken="no-clip"), None])
    _, hook = canary_view()
    bad = DPStepHooks(gradient_canary=GradientCanary(hook.gradient_canary.index, "net.9.weight", 0))
    with pytest.raises(ConfigError, match="not a parameter of the model; valid: net.1.weight, net.1.bias"):
        start([bad, None])
    with pytest.raises(ConfigError, match="outside parameter 'net.1.weight' \\(640 entries\\)"):
        start([canary_view(coordinate=640)[1], None])
    with pytest.raises(ConfigError, match="noise-over-batch, no-clip"):
        DPStepHooks(broken="typo")


def test_hooks_need_a_dp_recipe() -> None:
    b = digits()
    view, hook = canary_view()
    fn = functools.partial(build_model, ModelSpec(name="logistic"), input_shape=b.input_shape, num_classes=10)
    with pytest.raises(ConfigError, match="hooks act on the DP-SGD step"):
        train_stack(init_models(fn, [0]), b.train, resolve_recipe("fast"), seeds=[0], lr=0.1, device=CPU,
                    views=[view], hooks=[hook])
