"""``model.train: head`` (only the classifier trains; the rest frozen, BatchNorm statistics included) and
``model.reset_head``: in both stack layouts, with zoo and import-string models; refusals."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from mlaudit.data.base import TensorDataset
from mlaudit.errors import ConfigError, DataError
from mlaudit.models.freeze import frozen_parameters, training_setting
from mlaudit.models.registry import ModelSpec, build_model
from mlaudit.train import init_models, train_stack
from mlaudit.train.checkpoint import sha256_file
from mlaudit.train.recipe import resolve_recipe

CPU = torch.device("cpu")
SHAPE = (1, 8, 8)


def _data(n: int = 128) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.rand(n, *SHAPE, generator=g), torch.arange(n) % 10, tuple(str(i) for i in range(10)))


def _pretrained(tmp_path: Path, norm: str = "batch") -> Path:
    """An mlp whose BatchNorm statistics are not the defaults (so an update would show)."""
    torch.manual_seed(5)
    m = build_model({"name": "mlp", "width": 16, "norm": norm}, input_shape=SHAPE, num_classes=10)
    with torch.no_grad():
        for b in m.buffers():
            if b.is_floating_point():
                b.add_(torch.rand_like(b))
    path = tmp_path / "pre.pt"
    torch.save(m.state_dict(), path)
    return path


def _train(spec: dict, seeds: list[int], *, strategy: str, epochs: int = 2, batch_size: int = 32,
           lr: float = 0.05) -> list:
    r = resolve_recipe({"name": "fast", "epochs": epochs, "batch_size": batch_size})
    fn = functools.partial(build_model, spec, input_shape=SHAPE, num_classes=10)
    return train_stack(init_models(fn, seeds), _data(), r, seeds=seeds, lr=lr, device=CPU, strategy=strategy)


def _head_keys(state: dict) -> set[str]:
    last = max(int(k.split(".")[1]) for k in state if k.startswith("net."))
    return {k for k in state if k.startswith(f"net.{last}.")}


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_head_training_leaves_everything_else_bit_identical(tmp_path: Path, strategy: str) -> None:
    path = _pretrained(tmp_path)
    want = torch.load(path, weights_only=True)
    spec = {"name": "mlp", "width": 16, "init": str(path), "init_sha256": sha256_file(path), "train": "head"}
    outs = _train(spec, [0, 1], strategy=strategy)
    head = _head_keys(want)
    assert head == {"net.7.weight", "net.7.bias"}  # the mlp's last Linear
    for o in outs:
        for k, v in o.state_dict.items():
            if k in head:
                assert not torch.equal(v, want[k]), f"{k}: the classifier must train"
            else:  # weights, BatchNorm running mean / var / num_batches_tracked
                assert torch.equal(v, want[k]), f"{k} of the frozen part changed ({strategy})"


def test_train_all_moves_batchnorm_statistics(tmp_path: Path) -> None:
    """The control: fine-tuning every parameter does update the running statistics."""
    path = _pretrained(tmp_path)
    want = torch.load(path, weights_only=True)
    out = _train({"name": "mlp", "width": 16, "init": str(path)}, [0], strategy="vmap")[0]
    assert not torch.equal(out.state_dict["net.2.running_mean"], want["net.2.running_mean"])


def test_frozen_modules_stay_in_eval_mode_whoever_calls_train(tmp_path: Path) -> None:
    m = build_model({"name": "mlp", "width": 16, "train": "head"}, input_shape=SHAPE, num_classes=10)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.train()
    out = m(torch.rand(8, *SHAPE))
    out.sum().backward()
    bn = [x for x in m.modules() if isinstance(x, nn.modules.batchnorm._BatchNorm)]
    assert bn and all(not x.training for x in bn)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    grads = {n for n, p in m.named_parameters() if p.grad is not None}
    assert grads == {n for n, p in m.named_parameters() if p.requires_grad} and len(grads) == 2
    assert frozen_parameters(m) == sum(p.numel() for p in m.parameters()) - 16 * 10 - 10


def test_train_all_with_init_starts_from_the_checkpoint(tmp_path: Path) -> None:
    """One full-batch step per epoch: the loss of the first step is the pretrained model's loss."""
    path = _pretrained(tmp_path, norm="none")
    pre = build_model({"name": "mlp", "width": 16, "norm": "none", "init": str(path)}, input_shape=SHAPE,
                      num_classes=10)
    d = _data()
    want = F.cross_entropy(pre(d.x), d.y).item()
    out = _train({"name": "mlp", "width": 16, "norm": "none", "init": str(path)}, [0, 7], strategy="vmap",
                 epochs=1, batch_size=len(d))
    for o in out:
        assert o.steps == 1
        assert o.train_loss == pytest.approx(want, rel=1e-5)


def test_reset_head_keeps_the_seeded_classifier_and_the_pretrained_features(tmp_path: Path) -> None:
    path = _pretrained(tmp_path)
    want = torch.load(path, weights_only=True)
    spec = {"name": "mlp", "width": 16, "init": str(path), "train": "head", "reset_head": True}
    a, b = init_models(functools.partial(build_model, spec, input_shape=SHAPE, num_classes=10), [0, 1])
    head = _head_keys(want)
    for k, v in a.state_dict().items():
        assert torch.equal(v, want[k]) == (k not in head), k
    assert not torch.equal(a.state_dict()["net.7.weight"], b.state_dict()["net.7.weight"])  # seeded per victim
    # the file's classifier may be of another number of classes
    torch.manual_seed(0)
    other = build_model({"name": "mlp", "width": 16}, input_shape=SHAPE, num_classes=3)
    torch.save(other.state_dict(), tmp_path / "three.pt")
    m = build_model({**spec, "init": str(tmp_path / "three.pt")}, input_shape=SHAPE, num_classes=10)
    assert m(torch.rand(2, *SHAPE)).shape == (2, 10)


class NoLinear(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, num_classes, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).flatten(1)


class LinearFirst(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.out = nn.Linear(16, num_classes)
        self.feat = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.feat(x))


class Tiny(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.feat = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
        self.fc = nn.Linear(4 * 6 * 6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.feat(x))


def test_refusals_name_the_field_and_what_is_required(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model.train = 'head'.*last torch.nn.Linear.*has no nn.Linear"):
        build_model({"name": f"{__name__}:NoLinear", "train": "head"}, input_shape=SHAPE, num_classes=10)
    with pytest.raises(ConfigError, match=r"model.train = 'head'.*has 16 outputs, so it is not the classifier"):
        build_model({"name": f"{__name__}:LinearFirst", "train": "head"}, input_shape=SHAPE, num_classes=10)
    with pytest.raises(ValidationError, match="reset_head.*needs model.init"):
        ModelSpec(name="mlp", reset_head=True)
    with pytest.raises(ValidationError, match="train"):
        ModelSpec(name="mlp", train="features")
    path = _pretrained(tmp_path)
    with pytest.raises(DataError, match="sha256"):
        build_model({"name": "mlp", "width": 16, "init": str(path), "init_sha256": "1" * 64, "train": "head"},
                    input_shape=SHAPE, num_classes=10)


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_user_model_by_import_string(strategy: str) -> None:
    spec = {"name": f"{__name__}:Tiny", "train": "head"}
    torch.manual_seed(0)
    want = build_model(spec, input_shape=SHAPE, num_classes=10).state_dict()
    outs = _train(spec, [0], strategy=strategy)
    for k, v in outs[0].state_dict.items():
        assert torch.equal(v, want[k]) == (not k.startswith("fc.")), k


def test_setting_names() -> None:
    assert training_setting(ModelSpec(name="mlp")) == "from scratch"
    assert training_setting(ModelSpec(name="mlp", train="head")) == "head on random features"
