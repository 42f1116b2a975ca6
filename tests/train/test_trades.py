"""``recipe.adversarial.method: trades`` (Zhang et al. 2019, eq. 5): the config (beta > 0, TRADES only,
default 6.0, the resolved config parses again), the outer loss against the authors' formulation, the
inner PGD maximising the KL through the crafting engine, beta -> 0 giving plain training, more robust
digits models than standard training, and the vmap and loop layouts (any K) training the same models."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlaudit.attacks.evasion import pgd
from mlaudit.data import load_dataset
from mlaudit.data.base import TensorDataset
from mlaudit.errors import ConfigError
from mlaudit.experiments import parse_config
from mlaudit.experiments.base import config_to_dict
from mlaudit.models.registry import ModelSpec, build_model
from mlaudit.train import init_models, train_stack
from mlaudit.train.adversarial import TRADES_START_STD, adversarial_batch, kl_per_example, trades_loss
from mlaudit.train.recipe import AdversarialConfig, resolve_recipe
from mlaudit.train.stacked import StackedModels

CPU = torch.device("cpu")
TRAIN = {"kind": "train", "dataset": "digits", "model": "mlp"}


@pytest.fixture(scope="module")
def digits() -> Any:
    return load_dataset("digits")


def _mlp(norm: str = "batch", width: int = 64) -> functools.partial[nn.Module]:
    return functools.partial(build_model, ModelSpec(name="mlp", width=width, norm=norm), input_shape=(1, 8, 8),
                             num_classes=10)


def _train(data: TensorDataset, fn: Any, seeds: list[int], adversarial: dict[str, Any] | None, *, epochs: int = 4,
           strategy: str = "vmap", batch_size: int = 64) -> list[dict[str, Tensor]]:
    r = resolve_recipe({"name": "fast", "epochs": epochs, "batch_size": batch_size,
                        **({"adversarial": adversarial} if adversarial else {})})
    outs = train_stack(init_models(fn, seeds), data, r, seeds=seeds, lr=0.05, device=CPU, strategy=strategy)
    return [o.state_dict for o in outs]


@pytest.mark.parametrize(("adversarial", "words"), [
    ({"method": "trades", "eps": 0.1, "beta": 0}, ["recipe.adversarial.beta", "greater than 0", "got 0"]),
    ({"method": "trades", "eps": 0.1, "beta": -1.0}, ["recipe.adversarial.beta", "greater than 0"]),
    ({"method": "trades", "eps": 0.1, "beta": float("inf")}, ["recipe.adversarial.beta", "finite"]),
    ({"method": "pgd", "eps": 0.1, "beta": 6.0}, ["adversarial.beta = 6", "method trades only", "method pgd"]),
    ({"eps": 0.1, "beta": 1.0}, ["adversarial.beta = 1", "method trades only"]),
    ({"method": "madry", "eps": 0.1}, ["recipe.adversarial.method", "'pgd' or 'trades'", "'madry'"]),
    ({"method": "trades", "eps": 2.0}, ["adversarial.eps 2.0 is outside the pixel range"]),
])
def test_bad_trades_config_is_refused_naming_the_field(adversarial: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config({**TRAIN, "recipe": {"name": "fast", "adversarial": adversarial}})
    for w in words:
        assert w in str(ei.value), str(ei.value)


@pytest.mark.parametrize(("adversarial", "beta"), [
    ({"method": "trades", "eps": 0.1}, 6.0), ({"method": "trades", "eps": 0.1, "beta": 1.5}, 1.5),
    ({"eps": 0.1}, None),
])
def test_trades_beta_default_and_resolved_config_round_trip(adversarial: dict[str, Any], beta: float | None) -> None:
    """beta defaults to 6.0 for trades and stays unset for pgd, so the resolved config (config.yaml, what
    resume reads) parses again to itself."""
    resolved = config_to_dict(parse_config({**TRAIN, "recipe": {"name": "fast", "adversarial": adversarial}}))
    assert resolved["recipe"]["adversarial"]["beta"] == beta
    assert config_to_dict(parse_config(resolved)) == resolved
    assert AdversarialConfig(**adversarial).beta == beta


def test_trades_loss_is_the_reference_formulation() -> None:
    """CE(clean) + beta * KLDivLoss(sum)(log_softmax(adv), softmax(clean)) / B per model, as in the
    authors' code: same values and same gradients for the clean and the adversarial logits."""
    k, b, c, beta = 3, 5, 4, 6.0
    logits = torch.randn(k, 2 * b, c, generator=torch.Generator().manual_seed(0)) * 3
    y = torch.randint(0, c, (k, b), generator=torch.Generator().manual_seed(1))
    mine = logits.clone().requires_grad_(True)
    ref_in = logits.clone().requires_grad_(True)
    got = trades_loss(mine, y, beta=beta)
    want = torch.stack([F.cross_entropy(ref_in[i, :b], y[i]) + beta / b * nn.KLDivLoss(reduction="sum")(
        F.log_softmax(ref_in[i, b:], 1), F.softmax(ref_in[i, :b], 1)) for i in range(k)])
    assert got.shape == (k,)
    torch.testing.assert_close(got, want)
    (g_mine,) = torch.autograd.grad(got.sum(), mine)
    (g_ref,) = torch.autograd.grad(want.sum(), ref_in)
    torch.testing.assert_close(g_mine, g_ref, rtol=1e-5, atol=1e-6)
    assert float(g_mine[:, :b].abs().sum()) > 0 and float(g_mine[:, b:].abs().sum()) > 0
    # the KL part reaches the clean logits too (not a detached target)
    (g_kl_clean,) = torch.autograd.grad(kl_per_example(mine[:, :b].log_softmax(-1),
                                                       mine[:, b:].log_softmax(-1)).sum(), mine)
    assert float(g_kl_clean[:, :b].abs().sum()) > 0


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_inner_pgd_increases_the_kl_over_the_random_start(digits: Any, norm: str) -> None:
    """TRADES' inner maximisation (PGD on KL(clean || adv) through the crafting engine) ends far above
    the KL of its start x + 0.001 N(0, I), inside the ball and the box; weights and BatchNorm running
    statistics untouched (eval mode throughout); the labels play no part (unlike PGD-AT's CE)."""
    seeds, eps = [0, 1], (0.1 if norm == "linf" else 1.0)
    fn = _mlp()
    trained = _train(digits.train, fn, seeds, None, epochs=2)
    models = [fn() for _ in seeds]
    for m, sd in zip(models, trained, strict=True):
        m.load_state_dict(sd)
    stack = StackedModels.from_modules(models, CPU, strategy="vmap")
    before = [p.clone() for p in stack.trainable()]
    buffers = {n: b.clone() for n, b in stack.buffers.items()}
    x = digits.train.x[:64].view(2, 32, 1, 8, 8)
    y = digits.train.y[:64].view(2, 32)
    spec = AdversarialConfig(method="trades", eps=eps, norm=norm, steps=5)
    x_adv = adversarial_batch(stack, x, y, spec, generators=[torch.Generator().manual_seed(s) for s in seeds])
    other_y = adversarial_batch(stack, x, (y + 3) % 10, spec, generators=[torch.Generator().manual_seed(s) for s in seeds])
    assert torch.equal(x_adv, other_y)
    assert all(torch.equal(b, buffers[n]) for n, b in stack.buffers.items())
    start = torch.stack([(x[i] + TRADES_START_STD * torch.randn(x[i].shape, generator=torch.Generator().manual_seed(s)))
                         .clamp(0, 1) for i, s in enumerate(seeds)])

    def kl(xa: Tensor) -> Tensor:  # [K, B]
        with torch.no_grad():
            return kl_per_example(stack.forward(x, train=False).log_softmax(-1),
                                  stack.forward(xa, train=False).log_softmax(-1))

    kl_start, kl_adv = kl(start), kl(x_adv)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert float(kl_start.max()) < 1e-4
    assert bool((kl_adv.mean(1) > 0.05).all()), kl_adv.mean(1)
    assert float((kl_adv > kl_start).float().mean()) > 0.95
    d = (x_adv - x).flatten(2)
    size = d.abs().amax(-1) if norm == "linf" else d.norm(dim=-1)
    assert float(size.max()) <= eps + 1e-5 and float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    assert all(torch.equal(a, b) and a.requires_grad for a, b in zip(stack.trainable(), before, strict=True))


def test_trades_with_beta_to_zero_is_plain_training(digits: Any) -> None:
    """With beta -> 0 the TRADES loss is the clean CE: the same weights as standard training (MLP without
    BatchNorm, whose statistics would see the adversarial half of the batch); beta 6 moves them
    (measured: identical weights at beta 1e-9, max |diff| 4e-3 at beta 6)."""
    data = TensorDataset(digits.train.x[:256], digits.train.y[:256], digits.train.classes)
    fn, seeds = _mlp(norm="none", width=32), [0, 1]
    plain = _train(data, fn, seeds, None, epochs=3)
    tiny = _train(data, fn, seeds, {"method": "trades", "eps": 0.1, "steps": 2, "beta": 1e-9}, epochs=3)
    full = _train(data, fn, seeds, {"method": "trades", "eps": 0.1, "steps": 2, "beta": 6.0}, epochs=3)
    for p, t, f in zip(plain, tiny, full, strict=True):
        for n in p:
            torch.testing.assert_close(t[n], p[n], rtol=1e-6, atol=1e-6)
        assert max(float((f[n] - p[n]).abs().max()) for n in p) > 1e-3


def test_trades_model_is_more_robust_on_digits(digits: Any) -> None:
    """Robust accuracy under PGD-10 at l-inf 0.1 (mlaudit.attacks.evasion) of a TRADES-trained MLP is well
    above the standardly trained one of the same seed (measured 0.78 vs 0.55 on seeds 0-4)."""
    fn = _mlp()
    x, y = digits.test.x[:200], digits.test.y[:200]
    acc = {}
    for name, adv in (("std", None), ("trades", {"method": "trades", "eps": 0.1, "steps": 3})):
        m = fn()
        m.load_state_dict(_train(digits.train, fn, [0], adv)[0])
        m.eval()
        x_adv = pgd(m, x, y, eps=0.1, steps=10, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            acc[name] = (float((m(x).argmax(1) == y).float().mean()), float((m(x_adv).argmax(1) == y).float().mean()))
    assert acc["trades"][0] > 0.85, acc
    assert acc["trades"][1] > acc["std"][1] + 0.12, acc


class _UserNet(nn.Module):
    """A user's own module (not from the zoo), with BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def test_trades_vmap_and_loop_layouts_agree_for_any_k(digits: Any) -> None:
    """TRADES on a user nn.Module with BatchNorm: K = 2 under vmap, K = 2 under loop and model 1 alone.
    One step trains the same weights and BatchNorm statistics to float32 rounding. Over more steps the
    layouts drift apart a little but predict alike: near TRADES' start x + 0.001 N(0, I) the KL gradient
    is a difference of nearly equal probabilities (~1e-4 relative error in float32), so a weight differing
    by rounding already turns some signs of the l-inf step (measured: max |diff| 4e-4 after 8 steps,
    while PGD-AT stays at 6e-8)."""
    adv = {"method": "trades", "eps": 0.1, "steps": 3, "beta": 6.0}

    def three(data: TensorDataset, epochs: int) -> list[tuple[dict[str, Tensor], dict[str, Tensor]]]:
        vmap2 = _train(data, _UserNet, [0, 1], adv, epochs=epochs, strategy="vmap")
        loop2 = _train(data, _UserNet, [0, 1], adv, epochs=epochs, strategy="loop")
        alone = _train(data, _UserNet, [1], adv, epochs=epochs, strategy="loop")
        assert not torch.allclose(vmap2[0]["head.weight"], vmap2[1]["head.weight"])
        return [(vmap2[0], loop2[0]), (vmap2[1], loop2[1]), (vmap2[1], alone[0])]

    for a, b in three(TensorDataset(digits.train.x[:64], digits.train.y[:64], digits.train.classes), 1):  # 1 step
        assert a.keys() == b.keys()
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-6)
    x = digits.test.x
    for a, b in three(TensorDataset(digits.train.x[:256], digits.train.y[:256], digits.train.classes), 2):
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=0.0, atol=5e-3)
        ma, mb = _UserNet(), _UserNet()
        ma.load_state_dict(a), mb.load_state_dict(b), ma.eval(), mb.eval()
        with torch.no_grad():
            assert float((ma(x).argmax(1) == mb(x).argmax(1)).float().mean()) >= 0.99
