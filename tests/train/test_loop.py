"""The stacked training loop (mlaudit.train.loop), its optimizers, schedules, evaluation and ``train``.

Everything runs on CPU with one torch thread (several threads on a busy 2-core box are ~50x slower
for these tiny models) and tiny models: MLP width 8 / fastcnn width 4 on 3x8x8 synthetic data.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mlaudit.data.base import DataBundle, TensorDataset
from mlaudit.data.registry import DatasetSpec, load_dataset
from mlaudit.data.view import DataView
from mlaudit.errors import ConfigError, TrainingError
from mlaudit.factory import FactoryJob, TrialSpec, run_trials
from mlaudit.models.registry import ModelSpec, build_model
from mlaudit.train import (
    Recipe,
    evaluate,
    init_models,
    lr_at,
    predict,
    stack_from_state_dicts,
    train,
    train_stack,
)
from mlaudit.train.loop import StackedModels, _epoch_order
from mlaudit.train.optim import StackedAdam, StackedSGD

CPU = torch.device("cpu")


@functools.lru_cache(maxsize=4)
def bundle(n: int = 64, seed: int = 0) -> DataBundle:
    return load_dataset(DatasetSpec(name="synthetic", seed=seed, options={"n_train": n, "n_test": 32}))


def recipe(**kw: object) -> Recipe:
    base: dict[str, object] = dict(lr=0.05, epochs=1, batch_size=16, schedule="triangular", warmup_fraction=0.2,
                                   augment="none")
    return Recipe(**{**base, **kw})


def model_fn(name: str = "mlp", width: int = 8):
    return functools.partial(build_model, ModelSpec(name=name, width=width), input_shape=(3, 8, 8), num_classes=4)


def fit(seeds: list[int], data: TensorDataset | None = None, r: Recipe | None = None, name: str = "mlp", **kw: object):
    data, r = (data if data is not None else bundle().train), (r or recipe())
    return train_stack(init_models(model_fn(name), seeds), data, r, seeds=seeds, lr=r.resolved_lr(residual=False),
                       device=CPU, **kw)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ reproducibility, NaN detection

def test_same_seed_is_bitwise_reproducible_and_seeds_differ() -> None:
    r = recipe(epochs=2, augment={"crop_pad": 1, "flip": True})
    a, b = fit([3, 4], r=r, name="fastcnn"), fit([3, 4], r=r, name="fastcnn")
    assert same(a[0].state_dict, b[0].state_dict) and same(a[1].state_dict, b[1].state_dict)
    assert not torch.equal(a[0].state_dict["head.weight"], a[1].state_dict["head.weight"])
    assert a[0].steps == 2 * math.ceil(64 / 16)


def test_nan_in_data_raises_training_error_naming_epoch_and_step() -> None:
    d = bundle().train
    bad = TensorDataset(torch.full_like(d.x, float("nan")), d.y, d.classes)
    with pytest.raises(TrainingError, match=r"epoch 1, step 1\b") as e:
        fit([0], data=bad)
    assert "epoch" in str(e.value) and "step" in str(e.value)


def test_a_nan_under_compile_points_at_the_compile_first() -> None:
    """The same NaN, from a compiled step (inductor's bf16 fastcnn on an H100, 2026-12-07): the message says to
    retry without compile before it blames the learning rate; without compile it says what it always said."""
    from mlaudit.train.loop import _raise_nonfinite

    bad = torch.tensor([-1, 5])
    with pytest.raises(TrainingError, match=r"model 1 \(seed 8\) at epoch 2, step 2 .*retry with compile: false"):
        _raise_nonfinite(bad, [7, 8], 4, compiled=True)
    with pytest.raises(TrainingError, match="lower the learning rate") as e:
        _raise_nonfinite(bad, [7, 8], 4)
    assert "compile" not in str(e.value)


def test_divergent_learning_rate_raises_training_error() -> None:
    with pytest.raises(TrainingError, match=r"epoch \d+, step \d+"):
        fit([0], r=recipe(lr=1e30, schedule="constant", epochs=3))


# ------------------------------------------------------------------ recipes: optimizers, schedules, smoothing

@pytest.mark.parametrize("schedule", ["constant", "step", "triangular", "cosine"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_every_schedule_and_optimizer_trains(schedule: str, optimizer: str) -> None:
    r = recipe(schedule=schedule, optimizer=optimizer, lr=0.01, epochs=2, milestones=(1,) if schedule == "step" else (),
               label_smoothing=0.1)
    init = init_models(model_fn(), [0])[0].state_dict()
    out = fit([0], r=r)[0]
    assert math.isfinite(out.train_loss)
    assert not torch.equal(out.state_dict["net.1.weight"], init["net.1.weight"])


def test_lr_at_step_milestones() -> None:
    r = recipe(schedule="step", epochs=6, milestones=(2, 4), gamma=0.1)
    assert [lr_at(r, 1.0, t) for t in (0.0, 1.99)] == [1.0, 1.0]
    assert lr_at(r, 1.0, 2.0) == pytest.approx(0.1) and lr_at(r, 1.0, 3.5) == pytest.approx(0.1)
    assert lr_at(r, 1.0, 4.0) == pytest.approx(0.01) and lr_at(r, 1.0, 6.0) == pytest.approx(0.01)


def test_lr_at_triangular_and_cosine_endpoints() -> None:
    tri = recipe(schedule="triangular", epochs=10, warmup_fraction=0.2, final_lr_fraction=0.1)
    assert lr_at(tri, 0.4, 0.0) == 0.0
    assert lr_at(tri, 0.4, 1.0) == pytest.approx(0.2)  # halfway up the warm-up
    assert lr_at(tri, 0.4, 2.0) == pytest.approx(0.4)  # peak
    assert lr_at(tri, 0.4, 10.0) == pytest.approx(0.04)  # final fraction
    cos = recipe(schedule="cosine", epochs=4, final_lr_fraction=0.0)
    assert lr_at(cos, 1.0, 0.0) == pytest.approx(1.0) and lr_at(cos, 1.0, 2.0) == pytest.approx(0.5)
    assert lr_at(cos, 1.0, 4.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(recipe(schedule="constant"), 0.3, 0.7) == 0.3


@settings(max_examples=50, deadline=None)
@given(schedule=st.sampled_from(["constant", "step", "triangular", "cosine"]), frac=st.floats(0.0, 1.0),
       warm=st.floats(0.0, 0.9), final=st.floats(0.0, 1.0))
def test_lr_at_stays_within_zero_and_base(schedule: str, frac: float, warm: float, final: float) -> None:
    r = recipe(schedule=schedule, epochs=8, warmup_fraction=warm, final_lr_fraction=final,
               milestones=(3, 6) if schedule == "step" else ())
    assert 0.0 <= lr_at(r, 0.5, 8 * frac) <= 0.5 + 1e-12


# ------------------------------------------------------------------ stacked optimizers == torch.optim

def _optimizer_equivalence(make_torch, make_stacked, steps: int = 4) -> None:
    """K=2 plain models stepped by ``torch.optim`` vs their stack stepped by our optimizer with
    the same per-model gradients; weights agree after every step (bitwise on CPU with torch 2.13;
    the tolerance allows for fused/vectorised kernels elsewhere)."""
    models = init_models(model_fn("mlp", 8), [1, 2])
    for m in models:
        m.train()
    stacked = [torch.stack([dict(m.named_parameters())[n].detach().clone() for m in models])
               for n, _ in models[0].named_parameters()]
    opts = [make_torch(m.parameters()) for m in models]
    ours = make_stacked(stacked)
    x, y = bundle().train.x[:16], bundle().train.y[:16]
    for step in range(steps):
        grads = []
        for m, opt in zip(models, opts):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x + 0.01 * step), y).backward()
            grads.append([p.grad.clone() for p in m.parameters()])
            opt.step()
        ours.step([torch.stack([g[i] for g in grads]) for i in range(len(stacked))], 0.05)
        for k, m in enumerate(models):
            for i, p in enumerate(m.parameters()):
                torch.testing.assert_close(stacked[i][k], p.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("momentum,nesterov,wd", [(0.9, True, 5e-4), (0.9, False, 0.1), (0.0, False, 0.0)])
def test_stacked_sgd_equals_torch_sgd(momentum: float, nesterov: bool, wd: float) -> None:
    _optimizer_equivalence(lambda p: torch.optim.SGD(p, lr=0.05, momentum=momentum, nesterov=nesterov, weight_decay=wd),
                           lambda ps: StackedSGD(ps, momentum, nesterov, wd))


@pytest.mark.parametrize("wd", [0.0, 5e-4])
def test_stacked_adam_equals_torch_adam(wd: float) -> None:
    _optimizer_equivalence(lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=wd), lambda ps: StackedAdam(ps, wd))


# ------------------------------------------------------------------ views, subsets, per-model BatchNorm

def test_relabelling_view_changes_the_result_and_never_mutates_the_base() -> None:
    d = bundle().train
    x0, y0 = d.x.clone(), d.y.clone()
    view = DataView.identity(d).with_labels(torch.arange(8), (d.y[:8] + 1) % 4)
    clean, poisoned = fit([5, 5], views=[None, view])
    assert not same(clean.state_dict, poisoned.state_dict)
    assert torch.equal(d.x, x0) and torch.equal(d.y, y0) and torch.equal(view.base.y, y0)
    identity = fit([5], views=[DataView.identity(d)])[0]
    assert same(identity.state_dict, fit([5])[0].state_dict)  # an identity view is the clean data


def test_batchnorm_running_stats_are_per_model() -> None:
    """Two models with the same init trained on disjoint halves get different running stats, and
    each equals (to float32 rounding) the same model trained alone: nothing is shared in the stack."""
    masks = torch.zeros(2, 64, dtype=torch.bool)
    masks[0, :32], masks[1, 32:] = True, True
    both = fit([7, 7], masks=masks, name="fastcnn")
    rm = "blocks.0.net.2.running_mean"
    assert not torch.allclose(both[0].state_dict[rm], both[1].state_dict[rm])
    for i in range(2):
        alone = fit([7], masks=masks[i:i + 1], name="fastcnn")[0]
        for k, v in alone.state_dict.items():
            torch.testing.assert_close(both[i].state_dict[k], v, rtol=1e-4, atol=1e-5)


def test_bad_inputs_are_config_errors() -> None:
    d = bundle().train
    with pytest.raises(ConfigError, match="steps per epoch"):
        fit([0, 1], masks=torch.stack([torch.ones(64, dtype=torch.bool), torch.arange(64) < 16]))
    with pytest.raises(ConfigError, match="mask"):
        fit([0], masks=torch.ones(1, 10, dtype=torch.bool))
    with pytest.raises(ConfigError, match="no training examples"):
        fit([0], masks=torch.zeros(1, 64, dtype=torch.bool))
    with pytest.raises(ConfigError, match="base of 8"):
        fit([0], views=[DataView.identity(d.subset(torch.arange(8)))])
    with pytest.raises(ConfigError, match="one seed"):
        fit([0, 1], views=[None])


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), bsz=st.integers(1, 16), seed=st.integers(0, 100))
def test_epoch_order_is_a_permutation_topped_up_from_its_start(n: int, bsz: int, seed: int) -> None:
    pool = torch.randperm(100, generator=torch.Generator().manual_seed(seed))[:n]
    total = math.ceil(n / bsz) * bsz
    order = _epoch_order(pool, total, torch.Generator().manual_seed(seed))
    assert len(order) == total
    assert torch.equal(order[:n].sort().values, pool.sort().values)
    assert torch.equal(order[n:], order[:total - n])


# ------------------------------------------------------------------ evaluation and the single-model API

def test_predict_and_evaluate_match_each_model_in_eval_mode() -> None:
    outs = fit([0, 1], name="fastcnn")
    sds = [o.state_dict for o in outs]
    template = model_fn("fastcnn")()
    stack = stack_from_state_dicts(template, sds, CPU)
    test = bundle().test
    logits = predict(stack, test.x, batch_size=20)
    assert logits.shape == (2, len(test), 4)
    ev = evaluate(stack, test)
    for k, sd in enumerate(sds):
        m = model_fn("fastcnn")()
        m.load_state_dict(sd)
        ref = m.eval()(test.x).detach()
        torch.testing.assert_close(logits[k], ref, rtol=1e-4, atol=1e-5)
        assert float(ev["accuracy"][k]) == pytest.approx(float((ref.argmax(1) == test.y).float().mean()))
        assert float(ev["loss"][k]) == pytest.approx(float(nn.functional.cross_entropy(ref, test.y)), rel=1e-4)


def test_train_mutates_returns_and_matches_the_factory_trial() -> None:
    b = bundle()
    r = recipe(epochs=2, augment={"crop_pad": 1, "flip": True})
    spec = ModelSpec(name="fastcnn", width=4)
    model = init_models(functools.partial(build_model, spec, input_shape=(3, 8, 8), num_classes=4), [11])[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    returned = train(model, b, r, seed=11)
    assert returned is model and not model.training
    assert not same(before, model.state_dict())
    job = FactoryJob(model=spec, recipe=r, data=b, trials=(TrialSpec("t", seed=11),), evaluate=False)
    factory_sd = run_trials(job)[0].state_dict
    assert same({k: v for k, v in model.state_dict().items()}, factory_sd)


def test_on_epoch_reports_every_epoch_and_stacked_state_dict_loads() -> None:
    seen: list[tuple[int, list[float]]] = []
    outs = fit([0, 1, 2], r=recipe(epochs=3), on_epoch=lambda e, loss: seen.append((e, loss.tolist())))
    assert [e for e, _ in seen] == [0, 1, 2] and all(len(v) == 3 for _, v in seen)
    assert seen[-1][1] == pytest.approx([o.train_loss for o in outs])
    m = model_fn()()
    m.load_state_dict(outs[2].state_dict)  # strict: keys and shapes of a plain module
    stack = StackedModels.from_modules([m], CPU)
    assert stack.k == 1 and same(stack.state_dict(0), outs[2].state_dict)


def test_vmap_and_loop_stack_strategies_agree() -> None:
    """The ``loop`` strategy (CUDA conv nets) and ``vmap`` give the same logits, gradients and
    per-model BatchNorm running statistics (checked here on CPU, where ``auto`` picks vmap)."""
    models = init_models(model_fn("fastcnn", 4), [0, 1])
    stacks = [StackedModels.from_modules(models, CPU, strategy=s) for s in ("vmap", "loop")]
    x = bundle().train.x[:32].view(2, 16, 3, 8, 8)
    logits = [s.forward(x, train=True) for s in stacks]
    grads = [torch.autograd.grad(lg.square().sum(), s.trainable()) for lg, s in zip(logits, stacks)]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-6)
    n_params = len(grads[0])  # vmap: one stacked [K, ...] grad per parameter; loop: K * P per-model grads
    loop_stacked = [torch.stack([grads[1][k * n_params + j] for k in range(2)]) for j in range(n_params)]
    for ga, gb in zip(grads[0], loop_stacked, strict=True):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)
    for name in stacks[0].buffers:
        torch.testing.assert_close(stacks[0].buffers[name], stacks[1].buffers[name], rtol=1e-5, atol=1e-6)
    rm = "blocks.0.net.2.running_mean"
    assert not torch.equal(stacks[1].buffers[rm][0], models[0].state_dict()[rm])  # stats were updated in place
    with pytest.raises(ConfigError, match="strategy"):
        StackedModels.from_modules(models, CPU, strategy="nope")
