"""Tests of the model zoo: shapes, width/norm options, determinism, input checks, and compatibility
with the batched (``torch.func.vmap`` over stacked parameters) trainer."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

from mlaudit.errors import ConfigError, UnsupportedModelError
from mlaudit.models import MODELS, build_model, has_batchnorm, model_entry
from mlaudit.models.norm import group_count, make_norm1d, make_norm2d, scale_channels, uses_bias

model_entry("mlp")  # make sure the zoo is registered before parametrising
NAMES = MODELS.names()
IMAGE = (3, 16, 16)
NUM_CLASSES = 3
TINY_WIDTH = {"mobilenetv2": 4, "mlp": 16}  # everything else: 8


def tiny(
    name: str, norm: str = "batch", *, shape: tuple[int, ...] = IMAGE, width: int | None = None
) -> nn.Module:
    spec = {"name": name, "norm": norm, "width": width or TINY_WIDTH.get(name, 8)}
    return build_model(spec, input_shape=shape, num_classes=NUM_CLASSES)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_zoo_registers_all_architectures() -> None:
    assert set(NAMES) == {"airbench", "convnet6", "fastcnn", "logistic", "mlp", "mobilenetv2", "resnet18", "vgg11",
                          "scatter-cnn", "scatter-linear", "tanhcnn"}
    for name in NAMES:
        entry = model_entry(name)
        assert entry.description and "\n" not in entry.description
    assert model_entry("resnet18").residual and model_entry("mobilenetv2").residual
    assert not model_entry("convnet6").residual and not model_entry("fastcnn").residual
    assert not model_entry("mlp").image_only and not model_entry("logistic").image_only


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [IMAGE, (1, 8, 8), (3, 9, 11)])
def test_forward_shape(name: str, shape: tuple[int, ...]) -> None:
    if len(shape) == 3 and min(shape[1:]) < model_entry(name).min_size:
        with pytest.raises(UnsupportedModelError, match=f"at least {model_entry(name).min_size}x"):
            tiny(name, shape=shape)
        return
    model = tiny(name, shape=shape)
    assert model(torch.rand(2, *shape)).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("name", ["mlp", "logistic"])
def test_vector_models_accept_vectors(name: str) -> None:
    model = tiny(name, shape=(5,))
    out = model(torch.randn(4, 5))
    assert out.shape == (4, NUM_CLASSES)


@pytest.mark.parametrize("name", [n for n in NAMES if model_entry(n).image_only])
def test_image_models_reject_vectors_and_small_images(name: str) -> None:
    with pytest.raises(UnsupportedModelError, match="image inputs"):
        build_model(name, input_shape=(20,), num_classes=NUM_CLASSES)
    side = model_entry(name).min_size
    with pytest.raises(UnsupportedModelError, match=f"at least {side}x{side}"):
        build_model(name, input_shape=(3, side - 1, 16), num_classes=NUM_CLASSES)


@pytest.mark.parametrize("name", NAMES)
def test_width_scales_parameter_count(name: str) -> None:
    small = n_params(tiny(name, width=8))
    large = n_params(tiny(name, width=16))
    if name in ("logistic", "scatter-linear"):  # no hidden layer: width is documented as ignored
        assert small == large
    else:
        assert large > small


@pytest.mark.parametrize("name", NAMES)
def test_norm_option(name: str) -> None:
    assert not has_batchnorm(tiny(name, "none"))
    assert not has_batchnorm(tiny(name, "group"))
    assert has_batchnorm(tiny(name, "batch")) == (name != "logistic")
    if name != "logistic":
        assert any(isinstance(m, nn.GroupNorm) for m in tiny(name, "group").modules())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("norm", ["batch", "none"])
def test_backward_reaches_every_parameter(name: str, norm: str) -> None:
    torch.manual_seed(0)
    model = tiny(name, norm)
    loss = F.cross_entropy(model(torch.rand(4, *IMAGE)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    frozen = {pname for pname, p in model.named_parameters() if not p.requires_grad}
    # only airbench freezes parameters: its whitening filters and, with BatchNorm, the BN scales
    assert frozen == (set() if name != "airbench" else
                      {"whiten.weight"} | ({n for n, _ in model.named_parameters() if "norm" in n and n.endswith("weight")}
                                           if norm == "batch" else set()))
    for pname, p in model.named_parameters():
        assert pname in frozen or (p.grad is not None and torch.isfinite(p.grad).all()), pname
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert grads.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_init_is_deterministic_under_manual_seed(name: str) -> None:
    states = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        states.append(tiny(name, "none").state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_paper_sizes() -> None:
    resnet = build_model("resnet18", input_shape=(3, 32, 32), num_classes=10)
    assert n_params(resnet) == 11_173_962  # the usual CIFAR-10 ResNet-18 count
    convnet = build_model("convnet6", input_shape=(3, 32, 32), num_classes=10)
    assert convnet.fc.in_features == 256 * 3 * 3  # Witches' Brew: 32 -> 10 -> 3 after two 3x3 pools
    # The paper's ConvNet (seed 002 section 1.7.3) is norm="none": 5 biased 3x3 convs
    # 3-64-128-128-256-256 and a 2304 -> 10 linear layer, nothing else with parameters.
    paper = build_model({"name": "convnet6", "norm": "none"}, input_shape=(3, 32, 32), num_classes=10)
    assert not has_batchnorm(paper)
    convs = [(3, 64), (64, 128), (128, 128), (128, 256), (256, 256)]
    assert n_params(paper) == sum(i * o * 9 + o for i, o in convs) + 2304 * 10 + 10 == 1_131_530


def _stacked(
    name: str, norm: str, k: int = 2, dtype: torch.dtype = torch.float32
) -> tuple[list[nn.Module], nn.Module]:
    torch.manual_seed(0)
    models = [tiny(name, norm).to(dtype) for _ in range(k)]
    return models, copy.deepcopy(models[0]).to("meta")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("norm", ["none", "group", "batch"])
def test_vmap_matches_separate_models_in_eval_mode(name: str, norm: str) -> None:
    models, base = _stacked(name, norm)
    for m in models:
        m.eval()
    base.eval()
    params, buffers = stack_module_state(models)
    x = torch.rand(len(models), 4, *IMAGE)
    out = vmap(lambda p, b, xb: functional_call(base, (p, b), (xb,)))(params, buffers, x)
    expected = torch.stack([m(x[i]) for i, m in enumerate(models)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "logistic"])
def test_vmap_batchnorm_train_mode_updates_stacked_running_stats(name: str) -> None:
    """Train-mode BatchNorm under vmap writes each model's running stats into its slice of the
    stacked buffers (when the buffers are vmapped too), exactly like separate forwards; gradients
    through ``vmap(grad(...))`` match too. Float64, because in float32 a rounding difference can flip
    a near-tie in a max-pool and legitimately change a gradient by ~1%."""
    models, base = _stacked(name, "batch", dtype=torch.float64)
    separate = copy.deepcopy(models)
    base.train()
    params, buffers = stack_module_state(models)
    x = torch.rand(len(models), 4, *IMAGE, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (len(models), 4))

    def loss(p: dict, b: dict, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(base, (p, b), (xb,)), yb)

    grads = vmap(grad(loss))(params, buffers, x, y)
    for i, m in enumerate(separate):
        m.train()
        F.cross_entropy(m(x[i]), y[i]).backward()
        for bname, buf in m.named_buffers():
            torch.testing.assert_close(buffers[bname][i], buf, atol=1e-10, rtol=1e-8)
        scale = max(p.grad.abs().max() for p in m.parameters() if p.requires_grad)
        for pname, p in m.named_parameters():
            if not p.requires_grad:  # airbench's frozen whitening filters and BN scales: no .grad
                continue
            torch.testing.assert_close(grads[pname][i], p.grad, atol=1e-9 * scale, rtol=1e-7)
    running_means = [v for k, v in buffers.items() if k.endswith("running_mean")]
    assert all(v.abs().sum() > 0 for v in running_means)  # started at zero, so they were updated
    assert all((v == 1).all() for k, v in buffers.items() if k.endswith("num_batches_tracked"))


def test_vmap_batchnorm_with_shared_buffers_is_rejected_by_torch() -> None:
    """Documents the limit: unbatched (shared) BN buffers cannot be updated in train mode."""
    models, base = _stacked("fastcnn", "batch")
    base.train()
    params, buffers = stack_module_state(models)
    shared = {k: v[0].clone() for k, v in buffers.items()}
    x = torch.rand(len(models), 4, *IMAGE)
    with pytest.raises(RuntimeError, match="running_mean or running_var"):
        vmap(lambda p, b, xb: functional_call(base, (p, b), (xb,)), in_dims=(0, None, 0))(params, shared, x)


@pytest.mark.parametrize("name", NAMES)
def test_unnormalised_models_can_fit_a_tiny_batch(name: str) -> None:
    """norm="none" (the DP-SGD setting) still trains: He init and zero-init residual branches."""
    torch.manual_seed(0)
    side = max(8, model_entry(name).min_size)
    model = tiny(name, "none", shape=(1, side, side))
    x, y = torch.rand(12, 1, side, side), torch.arange(12) % NUM_CLASSES
    shallow = ("mlp", "logistic", "scatter-linear", "scatter-cnn")  # scatter-*: features of noise vary little
    opt = torch.optim.Adam(model.parameters(), lr=1e-2 if name in shallow else 3e-3)
    first = None
    # airbench's stem is frozen (random without data_init) and its filters start as identities: slower start
    for _ in range(40 if name == "airbench" else 20):
        loss = F.cross_entropy(model(x), y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.6 * first


@given(st.integers(1, 5000), st.integers(1, 64))
def test_group_count_divides_and_is_bounded(channels: int, min_size: int) -> None:
    g = group_count(channels, min_group_size=min_size)
    assert channels % g == 0 and 1 <= g <= 32
    assert g == 1 or channels // g >= min_size


def test_group_count_examples() -> None:
    assert [group_count(c) for c in (8, 16, 64, 256, 512)] == [1, 2, 8, 32, 32]


@pytest.mark.parametrize(
    "kind, cls", [("batch", nn.BatchNorm2d), ("group", nn.GroupNorm), ("none", nn.Identity)]
)
def test_make_norm(kind: str, cls: type) -> None:
    assert isinstance(make_norm2d(kind, 64), cls)
    assert make_norm1d(kind, 64)(torch.randn(4, 64)).shape == (4, 64)
    assert uses_bias(kind) == (kind == "none")


def test_make_norm_rejects_unknown_kind() -> None:
    with pytest.raises(ConfigError, match="valid norms: batch, group, none"):
        make_norm2d("layer", 8)


def test_scale_channels() -> None:
    assert scale_channels(256, None, 64) == 256
    assert scale_channels(256, 8, 64) == 32
    assert scale_channels(3, 1, 64) == 1


@pytest.mark.parametrize("bf16", [True, False])
@pytest.mark.parametrize("quantised", [True, False])
def test_fastcnn_float32_max_pool_is_bitwise_the_bf16_amax_in_eager_mode(bf16: bool, quantised: bool) -> None:
    """fastcnn takes its global max pool in at least float32 (the compiled bf16 backward of ``amax`` gave NaN, 2026-12-07):
    in eager mode the logits and every gradient equal, bit for bit, those of the pool taken in the map's own dtype,
    with or without bf16 autocast, also with many tied maxima (a coarsely quantised input)."""
    torch.manual_seed(0)
    m = tiny("fastcnn", shape=(3, 32, 32))
    x = torch.rand(48, 3, 32, 32)
    if quantised:
        x = (x * 2).round() / 2
    y = torch.randint(0, NUM_CLASSES, (48,))

    def reference(mod: nn.Module, xb: torch.Tensor) -> torch.Tensor:
        return mod.head(mod.blocks(mod.stem(xb)).amax(dim=(-2, -1))) * mod.logit_scale

    outs = []
    for fn in (lambda mod, xb: mod(xb), reference):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            z = fn(m, x)
        loss = F.cross_entropy(z.float(), y)
        outs.append((z, torch.autograd.grad(loss, list(m.parameters()))))
    assert outs[0][0].dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert torch.equal(outs[0][0], outs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outs[0][1], outs[1][1], strict=True))


@pytest.mark.slow  # inductor compiles the forward and backward on the CPU (~30 s on 2 cores)
def test_compiled_fastcnn_gradients_are_finite_under_bf16_autocast() -> None:
    """The bug the float32 pool fixes: fastcnn through ``torch.compile`` under bf16 autocast had NaN gradients in
    every layer below the head (CPU torch 2.13; on an H100 with torch 2.11 the factory's loss was NaN at step 2)."""
    from mlaudit.train.stacked import _compiled_call

    torch.manual_seed(0)
    m = tiny("fastcnn", shape=(3, 32, 32)).to(memory_format=torch.channels_last)
    x = torch.rand(32, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (32,))
    losses = []
    for fn in (_compiled_call(), lambda mod, xb: mod(xb)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(fn(m, x).float(), y)
        grads = torch.autograd.grad(loss, list(m.parameters()))
        assert all(torch.isfinite(g).all() for g in grads)
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=2e-2)
