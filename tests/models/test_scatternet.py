"""The 2D scattering transform (mlaudit.models.scatternet) and the ScatterNet DP models of Tramèr & Boneh
(ICLR 2021): kymatio agreement, shapes, stability to small shifts, no trainable front end, DP training on digits
through both clipping paths, and input checks."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from mlaudit.data.registry import DatasetSpec, load_dataset
from mlaudit.errors import ConfigError
from mlaudit.models import build_model
from mlaudit.models.scatternet import (
    ScatterClassifier,
    ScatterNet,
    auto_J,
    scatter_channels,
    scatter_features,
)
from mlaudit.train.evaluate import evaluate
from mlaudit.train.loop import StackedModels, init_models, train_stack
from mlaudit.train.recipe import resolve_recipe

CPU = torch.device("cpu")


def _kymatio_2d():  # noqa: ANN202
    pytest.importorskip("kymatio")
    try:  # kymatio.torch also imports the 3D transform, which needs scipy's removed sph_harm
        from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D
    except ImportError as e:  # pragma: no cover - depends on the installed kymatio
        pytest.skip(f"kymatio's torch 2D frontend does not import: {e}")
    return ScatteringTorch2D


@pytest.mark.parametrize("J, L, shape", [(2, 8, (32, 32)), (1, 8, (8, 8)), (2, 6, (16, 24)), (3, 4, (32, 32))])
def test_matches_kymatio_coefficient_for_coefficient(J: int, L: int, shape: tuple[int, int]) -> None:
    """Same coefficients in the same order as kymatio 0.3's Scattering2D (reshaped [N, C*K, h, w]); the
    remaining 3e-5 relative difference is kymatio's Gabor normaliser 2 * 3.1415 * sigma^2 (ours uses pi)."""
    kym = _kymatio_2d()(J=J, shape=shape, L=L)
    torch.manual_seed(0)
    x = torch.rand(3, 2, *shape)
    want = kym(x).reshape(3, -1, shape[0] // 2**J, shape[1] // 2**J)
    got = ScatterNet(J=J, L=L, input_shape=(2, *shape))(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("J, L, order", [(1, 8, 2), (2, 8, 2), (2, 4, 1), (3, 6, 2), (2, 1, 2)])
def test_output_shape_and_channel_formula(J: int, L: int, order: int) -> None:
    k = 1 + J * L + (L * L * J * (J - 1) // 2 if order == 2 else 0)
    assert scatter_channels(J=J, L=L, order=order) == k
    net = ScatterNet(J=J, L=L, order=order, input_shape=(3, 32, 16))
    out = net(torch.rand(2, 3, 32, 16))
    assert out.shape == (2, 3 * k, 32 // 2**J, 16 // 2**J) == (2, *net.output_shape)
    assert scatter_channels(J=2, L=8) == 81  # CIFAR-10: 243 x 8 x 8


def test_front_end_has_no_parameters_and_checkpoints_only_the_head() -> None:
    model = build_model({"name": "scatter-linear", "norm": "group"}, input_shape=(3, 32, 32), num_classes=10)
    assert isinstance(model, ScatterClassifier)
    assert list(model.front.parameters()) == []
    assert {n for n, _ in model.named_parameters()} == {"head.fc.weight", "head.fc.bias"}
    assert model.head.fc.in_features == 243 * 8 * 8 and model.front.J == 2
    assert all(k.startswith("head.") for k in model.state_dict())  # filters are non-persistent buffers
    x = torch.rand(2, 3, 32, 32)
    F.cross_entropy(model(x), torch.tensor([1, 2])).backward()
    assert model.head.fc.weight.grad is not None


def test_small_shifts_change_the_features_little() -> None:
    """Local translation invariance up to scale 2^J (Mallat 2012): a one-pixel shift of a digit (on a 32x32
    canvas) changes ~80% of its pixel norm, and less of its scattering coefficients the larger J is
    (measured 0.49, 0.25, 0.10 for J = 1, 2, 3)."""
    x = F.pad(digits().train.x[:16], (12, 12, 12, 12))
    shifted = torch.roll(x, shifts=1, dims=-1)  # blank borders: a roll is a shift

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).mean())

    dx = rel(shifted, x)
    ds = []
    for J in (1, 2, 3):
        net = ScatterNet(J=J, input_shape=(1, 32, 32))
        ds.append(rel(net(shifted), net(x)))
    assert dx > 0.7 and dx > 1.5 * ds[0] > 3 * ds[1] > 6 * ds[2], (dx, ds)


def test_features_helper_equals_the_model_and_runs_under_autocast_and_float64() -> None:
    torch.manual_seed(0)
    x = torch.rand(5, 1, 8, 8)
    model = build_model({"name": "scatter-cnn", "norm": "group", "width": 8}, input_shape=(1, 8, 8), num_classes=3)
    feats = scatter_features(x, J=auto_J(8, 8), batch_size=2)
    assert feats.shape == (5, 9, 4, 4)
    torch.testing.assert_close(model.head(feats), model(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.front(x).dtype == torch.float32
    assert model.double().front(x.double()).dtype == torch.float64


def test_odd_sides_are_padded_and_bad_J_is_a_clear_error() -> None:
    model = build_model({"name": "scatter-linear", "norm": "group"}, input_shape=(3, 9, 11), num_classes=4)
    assert model(torch.rand(2, 3, 9, 11)).shape == (2, 4)
    with pytest.raises(ConfigError, match=r"J=4 needs H and W divisible by 2\^J = 16.*got input 8x8"):
        ScatterNet(J=4, input_shape=(1, 8, 8))
    with pytest.raises(ConfigError, match="J must be an integer >= 1, got 0"):
        ScatterNet(J=0, input_shape=(1, 8, 8))
    with pytest.raises(ConfigError, match="order must be 1 or 2, got 3"):
        ScatterNet(J=1, order=3, input_shape=(1, 8, 8))
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        scatter_features(torch.rand(2, 1, 8, 8), J=1, batch_size=0)


@functools.lru_cache(maxsize=1)
def digits():  # noqa: ANN201
    return load_dataset(DatasetSpec(name="digits"))


def _dp_train(name: str, clipping: str, dp: dict, epochs: int):  # noqa: ANN202
    b = digits()
    r = resolve_recipe({"name": "custom", "epochs": epochs, "batch_size": 128, "lr": 1.0, "schedule": "constant",
                        "momentum": 0.0, "weight_decay": 0.0, "augment": "none", "dp": {**dp, "clipping": clipping}})
    fn = functools.partial(build_model, {"name": name, "norm": "group", "width": 8}, input_shape=b.input_shape,
                           num_classes=b.num_classes)
    outs = train_stack(init_models(fn, [0]), b.train, r, seeds=[0], lr=1.0, device=CPU, strategy="loop")
    model = init_models(fn, [0])[0]
    model.load_state_dict(outs[0].state_dict)
    return model, outs[0]


@pytest.mark.parametrize("clipping", ["fast", "per-example"])
def test_dp_scatter_linear_learns_digits(clipping: str) -> None:
    """DP-SGD (eps = 3, delta = 1e-5) on scatter-linear through the book-keeping path and the torch.func
    per-example path: only the head is clipped and noised, and the model beats chance (10%) by far."""
    model, out = _dp_train("scatter-linear", clipping, {"epsilon": 3.0, "delta": 1e-5, "clip": 1.0}, epochs=8)
    acc = evaluate(StackedModels.from_modules([model], CPU, strategy="loop"), digits().test, batch_size=512)
    assert float(acc["accuracy"][0]) > 0.6, acc
    assert out.privacy["dp_epsilon"] <= 3.0 + 1e-6


def test_fast_and_per_example_clipping_agree_on_scatter_cnn() -> None:
    """The two DP paths compute the same clipped noisy step (same generators) for scatter-cnn (conv,
    GroupNorm and linear layers behind the parameter-free front end)."""
    dp = {"noise_multiplier": 1.0, "clip": 0.5}
    fast, _ = _dp_train("scatter-cnn", "fast", dp, epochs=1)
    ref, _ = _dp_train("scatter-cnn", "per-example", dp, epochs=1)
    for (n, a), (_, b) in zip(fast.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)
