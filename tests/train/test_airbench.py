"""The airbench-class recipe: the ``airbench`` network, Muon, parameter groups, alternating flips,
reflect translation, summed loss and test-time augmentation (Jordan 2024, airbench94 with Muon).

Tiny models (width 4-8) on 3x16x16 synthetic data, CPU, one thread."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mlaudit.data.augment import AugmentParams, apply_augment
from mlaudit.data.registry import DatasetSpec, load_dataset
from mlaudit.errors import ConfigError, UnsupportedModelError
from mlaudit.models.airbench import AirbenchNet
from mlaudit.models.registry import ModelSpec, build_model
from mlaudit.train import init_models, predict, train_stack
from mlaudit.train.evaluate import TTA_VIEWS, predict_tta
from mlaudit.train.loop import StackedModels, _alternating_flips
from mlaudit.train.optim import NS_COEFFS, StackedMuon, make_optimizer, orthogonalize
from mlaudit.train.recipe import Recipe, resolve_recipe

CPU = torch.device("cpu")
SHAPE = (3, 16, 16)


@functools.lru_cache(maxsize=2)
def data(n: int = 96):
    return load_dataset(DatasetSpec(name="synthetic", seed=0,
                                    options={"n_train": n, "n_test": 48, "shape": list(SHAPE), "num_classes": 4}))


def model_fn(width: int = 4):
    return functools.partial(build_model, ModelSpec(name="airbench", width=width), input_shape=SHAPE, num_classes=4)


def muon_recipe(**kw: object) -> Recipe:
    return resolve_recipe({"name": "airbench-muon", "batch_size": 32, "epochs": 2, "eval_batch_size": 64, **kw})


def fit(seeds: list[int], r: Recipe, strategy: str = "loop", **kw: object):
    aug = r.augment if not isinstance(r.augment, str) else None
    return train_stack(init_models(model_fn(), seeds), data().train, r, seeds=seeds, lr=r.resolved_lr(residual=False),
                       device=CPU, augment=aug, strategy=strategy, **kw)


# ------------------------------------------------------------------ Muon

@settings(max_examples=15, deadline=None)
@given(st.integers(2, 24), st.integers(2, 24), st.integers(0, 10_000))
def test_orthogonalize_maps_each_singular_value_by_the_quintic(m: int, n: int, seed: int) -> None:
    """``X <- a X + (b XX^T + c (XX^T)^2) X`` keeps the singular vectors and sends each singular value of
    ``g / ||g||_F`` through ``p(s) = a s + b s^3 + c s^5`` once per step."""
    g = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    s = torch.linalg.svdvals(g) / torch.linalg.norm(g)
    a, b, c = NS_COEFFS
    for _ in range(5):
        s = a * s + b * s**3 + c * s**5
    got = torch.linalg.svdvals(orthogonalize(g.float(), steps=5).double())
    torch.testing.assert_close(got, s.sort(descending=True).values, atol=1e-4, rtol=1e-3)
    assert got.max() < 1.3  # the quintic overshoots 1 a little but never blows up


def test_orthogonalize_is_batched_per_matrix() -> None:
    g = torch.randn(3, 5, 7)
    torch.testing.assert_close(orthogonalize(g), torch.stack([orthogonalize(x) for x in g]), atol=1e-5, rtol=1e-5)


def test_muon_step_normalises_weights_and_moves_by_lr_times_an_orthogonal_update() -> None:
    w = torch.randn(2, 6, 3, 3, 3)  # two models' filter banks [K, out, in, kh, kw]
    g = torch.randn_like(w)
    opt = StackedMuon([w], momentum=0.0, nesterov=False, leading_k=True)
    before = w.clone()
    opt.step([g], lr=0.1)
    for k in range(2):
        scaled = before[k] * (6 ** 0.5 / before[k].norm())
        step = (scaled - w[k]).reshape(6, -1) / 0.1
        torch.testing.assert_close(step, orthogonalize(g[k].reshape(6, -1)), atol=1e-5, rtol=1e-4)


def test_loop_and_vmap_layouts_train_the_same_airbench_models() -> None:
    r = muon_recipe()
    a, b = fit([0, 1], r, "loop"), fit([0, 1], r, "vmap")
    for x, y in zip(a, b):
        for name in x.state_dict:
            torch.testing.assert_close(x.state_dict[name], y.state_dict[name], atol=2e-3, rtol=2e-3, msg=name)


# ------------------------------------------------------------------ groups, frozen parameters, data init

def test_frozen_parameters_stay_fixed_and_whitening_comes_from_the_data() -> None:
    out = fit([3], muon_recipe())[0].state_dict
    m = model_fn()()
    x = data().train.x
    assert torch.all(out["blocks.0.norm1.weight"] == 1) and torch.all(out["blocks.2.norm2.weight"] == 1)
    assert out["input_mean"].abs().sum() > 0  # data_init ran on this model's own training images
    torch.testing.assert_close(out["input_mean"], x.mean(dim=(0, 2, 3)), atol=0.02, rtol=0)
    assert not torch.equal(out["whiten.weight"], m.whiten.weight)


def test_whitening_decorrelates_patches() -> None:
    net = AirbenchNet(in_channels=3, num_classes=4, width=4)
    x = data().train.x
    net.data_init(x)
    z = (x - net.input_mean[:, None, None]) / net.input_std[:, None, None]
    h = F.conv2d(z, net.whiten.weight[:12])  # the first half: V^T / sqrt(lambda + eps)
    feats = h.permute(0, 2, 3, 1).reshape(-1, 12).double()
    cov = feats.T @ feats / len(feats)
    torch.testing.assert_close(cov, torch.eye(12, dtype=torch.float64), atol=0.05, rtol=0)


def test_group_trained_for_fewer_epochs_is_fixed_afterwards() -> None:
    r = muon_recipe(epochs=3)
    snaps: dict[int, torch.Tensor] = {}
    fit([0], r, on_epoch_models=lambda e, st: snaps.__setitem__(e, st.state_dict(0)["whiten.bias"]))
    assert not torch.equal(snaps[0], torch.zeros_like(snaps[0]))  # trained in the first epochs
    # the preset trains the whitening bias for 3 epochs: with epochs=3 it moves up to the end...
    r2 = muon_recipe(epochs=3, param_groups=[{"match": "whiten.bias", "optimizer": "sgd", "lr": 0.05, "epochs": 1},
                                             {"match": "*.bias", "optimizer": "sgd", "lr": 0.05},
                                             {"match": "head.weight", "optimizer": "sgd", "lr": 0.5}])
    snaps.clear()
    fit([0], r2, on_epoch_models=lambda e, st: snaps.__setitem__(e, st.state_dict(0)["whiten.bias"]))
    assert torch.equal(snaps[0], snaps[1]) and torch.equal(snaps[1], snaps[2])  # ...one epoch only: fixed after


def test_group_pattern_matching_nothing_names_it_and_the_parameters() -> None:
    r = muon_recipe(param_groups=[{"match": "nohead.*", "lr": 0.1}])
    st = StackedModels.from_modules([model_fn()()], CPU, strategy="loop")
    with pytest.raises(ConfigError, match=r"nohead\.\*.*match no trainable parameter.*head\.weight"):
        make_optimizer(r, st.trainable(), names=st.trainable_names(), leading_k=False, base_lr=0.1)


def test_dp_refuses_muon_groups_summed_loss_and_frozen_parameters() -> None:
    with pytest.raises(ConfigError, match="DP-SGD"):
        resolve_recipe({"name": "airbench-muon", "dp": {"noise_multiplier": 1.0}})
    with pytest.raises(ConfigError, match="loss_reduction"):
        resolve_recipe({"name": "fast", "loss_reduction": "sum", "dp": {"noise_multiplier": 1.0}})
    r = Recipe(lr=0.1, epochs=1, batch_size=16, augment="none", dp={"noise_multiplier": 1.0})
    frozen = build_model(ModelSpec(name="airbench", width=4, norm="group"), input_shape=SHAPE, num_classes=4)
    with pytest.raises(UnsupportedModelError, match="whiten.weight"):
        train_stack([frozen], data().train, r, seeds=[0], lr=0.1, device=CPU)


def test_summed_loss_equals_mean_loss_at_batch_times_the_rate() -> None:
    base = dict(epochs=1, batch_size=16, schedule="constant", augment="none", momentum=0.9, weight_decay=0.0)
    a = fit([0], Recipe(lr=0.01, loss_reduction="sum", **base))[0].state_dict
    b = fit([0], Recipe(lr=0.16, **base))[0].state_dict
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=1e-4, msg=name)


# ------------------------------------------------------------------ augmentation and TTA

@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(0, 1000))
def test_reflect_translation_equals_reflect_pad_then_crop(pad: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(5, 2, 8, 7, generator=g)
    shift = torch.randint(-pad, pad + 1, (5, 2), generator=g)
    flip = torch.rand(5, generator=g) < 0.5
    out = apply_augment(x, AugmentParams(shift, flip), pad_mode="reflect")
    padded = F.pad(x, (pad,) * 4, mode="reflect")
    for i in range(5):
        dx, dy = int(shift[i, 0]), int(shift[i, 1])
        ref = padded[i, :, pad + dy:pad + dy + 8, pad + dx:pad + dx + 7]
        torch.testing.assert_close(out[i], ref.flip(-1) if flip[i] else ref, atol=0, rtol=0)


def test_alternating_flips_alternate_per_example() -> None:
    aug = resolve_recipe("airbench-muon").augment
    pools = [torch.arange(10), torch.arange(3, 12)]
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    bits = _alternating_flips(aug, pools, gens, CPU)
    assert bits is not None and bits.shape == (2, 12) and bits.dtype == torch.bool  # one bit per virtual index
    again = _alternating_flips(aug, pools, [torch.Generator().manual_seed(s) for s in (0, 1)], CPU)
    assert torch.equal(bits, again) and not torch.equal(bits[0], bits[1])  # seeded, per model
    assert _alternating_flips(resolve_recipe("airbench").augment, pools, gens, CPU) is None  # random flips


def test_tta_weights_sum_to_one_and_average_the_views() -> None:
    for views in TTA_VIEWS.values():
        assert abs(sum(w for *_, w in views) - 1.0) < 1e-12
    stack = StackedModels.from_modules([model_fn()().eval()], CPU, strategy="loop")
    x = data().test.x
    torch.testing.assert_close(predict_tta(stack, x, tta="none"), predict(stack, x))
    flip = AugmentParams(torch.zeros(len(x), 2, dtype=torch.int64), torch.ones(len(x), dtype=torch.bool))
    manual = 0.5 * predict(stack, x) + 0.5 * predict(stack, apply_augment(x, flip))
    torch.testing.assert_close(predict_tta(stack, x, tta="flip"), manual)


@pytest.mark.slow  # about a minute of inductor compilation on a 2-core CPU
def test_compiled_forward_trains_like_eager_under_bf16_autocast() -> None:
    """``recipe.compile`` runs the loop layout's forward through one shared ``torch.compile``d call; with
    bf16 autocast the compiled backward must stay finite and match eager (it gave NaN when the network
    pooled with ``Tensor.amax``). CPU inductor; a few seconds of compilation."""
    from mlaudit.train.stacked import _compiled_call

    x, y = data().train.x[:64], data().train.y[:64]
    losses = []
    for fn in (_compiled_call(), lambda m, xb: m(xb)):
        torch.manual_seed(0)
        m = model_fn(8)()
        m.data_init(x)
        names = [n for n, p in m.named_parameters() if p.requires_grad]
        params = [p for p in m.parameters() if p.requires_grad]
        opt = make_optimizer(muon_recipe(), params, names=names, leading_k=False, base_lr=0.24)
        run = []
        for step in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(fn(m, x).float(), y, label_smoothing=0.2)
            grads = torch.autograd.grad(loss * len(y), params)
            assert all(torch.isfinite(g).all() for g in grads)
            opt.step(list(grads), 0.24, progress=step / 10)
            run.append(loss.item())
        losses.append(run)
    assert losses[0] == pytest.approx(losses[1], abs=2e-2)
