"""The FL simulation: batched user gradients equal a per-user loop, secure aggregation sums exactly what
the users send (clipping and noise as specified), partitions give every user its data, one FedAvg
step equals lr times the FedSGD gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mlaudit.data.base import TensorDataset
from mlaudit.errors import ConfigError
from mlaudit.federated import (
    fedsgd_aggregate,
    local_batches,
    local_training,
    partition,
    secure_aggregate,
    user_gradients,
)
from mlaudit.query import ParamVector, param_grad, training


def tiny(bn: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4) if bn else nn.Identity(), nn.ReLU(), nn.Flatten(),
              nn.Linear(4 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 5)]
    return nn.Sequential(*layers).eval()


def batch(users: int = 6, b: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(users, b, 1, 8, 8, generator=g), torch.randint(0, 5, (users, b), generator=g)


@pytest.mark.parametrize("chunk", [None, 4])
def test_batched_user_gradients_equal_a_per_user_loop(chunk: int | None) -> None:
    model = tiny()
    x, y = batch()
    got = user_gradients(model, x, y, chunk=chunk)
    assert list(got) == [n for n, _ in model.named_parameters()]
    for u in range(len(x)):
        want = param_grad(model, (x[u], y[u]))
        for n in got:
            torch.testing.assert_close(got[n][u], want[n], rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in model.parameters()) and not model.training


class Attention(nn.Module):
    """A causal LM through nn.MultiheadAttention (scaled_dot_product_attention, whose fused kernels have no vmap
    rule and no derivative of their backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.attn, self.head = nn.Embedding(7, 8), nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 7)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        h = self.tok(t)
        mask = torch.triu(torch.ones(t.shape[1], t.shape[1], dtype=torch.bool), 1)
        return self.head(h + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]).transpose(1, 2)


def test_user_gradients_of_an_attention_model_equal_a_per_user_loop_and_differentiate_again() -> None:
    import warnings

    from mlaudit.attacks.federated import Observation
    from mlaudit.attacks.federated.objective import GradientInversion
    from mlaudit.attacks.federated.text_inversion import EmbeddingsIn

    torch.manual_seed(0)
    model = Attention().eval()
    t = torch.randint(0, 7, (3, 2, 5), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 7, (3, 2, 5), generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no per-user fallback loop ("batching rule ... not implemented")
        got = user_gradients(model, t, y)
    for u in range(3):
        want = param_grad(model, (t[u], y[u]))
        for n in got:
            torch.testing.assert_close(got[n][u], want[n], rtol=1e-5, atol=1e-6)
    # the gradient-matching objective's second backward goes through the attention (the math kernel)
    obs = Observation(ParamVector({f"lm.{k}": v.sum(0) for k, v in got.items()}), users=3, batch=2, input_shape=(5, 8))
    objective = GradientInversion(EmbeddingsIn(model, model.tok), obs, y.flatten(0, 1),
                                  params=[k for k in obs.grad if k != "lm.tok.weight"])
    v = torch.randn(6, 5, 8, requires_grad=True)
    objective(v, torch.arange(6)).backward()
    assert v.grad is not None and float(v.grad.abs().sum()) > 0


def test_train_mode_uses_each_users_batch_statistics_and_leaves_the_running_ones() -> None:
    model = tiny(bn=True)
    before = {n: b.clone() for n, b in model.named_buffers()}
    x, y = batch(users=4, b=5)
    got = user_gradients(model, x, y, train_mode=True)
    for u in range(len(x)):
        import copy

        alone = copy.deepcopy(model)
        with training(alone):
            want = param_grad(alone, (x[u], y[u]))
        for n in got:
            torch.testing.assert_close(got[n][u], want[n], rtol=1e-4, atol=1e-6)
    assert all(torch.equal(before[n], b) for n, b in model.named_buffers())
    assert not model.training


def test_secure_aggregation_is_the_sum_and_clipping_and_noise_act_per_user() -> None:
    g = torch.Generator().manual_seed(0)
    ups = {"w": torch.randn(5, 3, 2, generator=g), "b": torch.randn(5, 3, generator=g)}
    agg = secure_aggregate(ups)
    assert isinstance(agg, ParamVector)
    assert torch.equal(agg["w"], ups["w"].sum(0)) and torch.equal(agg["b"], ups["b"].sum(0))
    torch.testing.assert_close(secure_aggregate(ups, mean=True)["w"], ups["w"].mean(0))
    norms = torch.sqrt(ups["w"].flatten(1).pow(2).sum(1) + ups["b"].pow(2).sum(1))
    clip = float(norms.median())
    f = (clip / (norms + 1e-6)).clamp(max=1.0)
    clipped = secure_aggregate(ups, clip=clip)
    torch.testing.assert_close(clipped["w"], (ups["w"] * f[:, None, None]).sum(0))
    a = secure_aggregate(ups, clip=clip, noise_multiplier=2.0, generator=torch.Generator().manual_seed(3))
    b = secure_aggregate(ups, clip=clip, noise_multiplier=2.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a["w"], b["w"]) and not torch.allclose(a["w"], clipped["w"])
    with pytest.raises(ConfigError, match="needs a clip"):
        secure_aggregate(ups, noise_multiplier=1.0, generator=g)


@pytest.mark.parametrize("scheme", ["iid", "by-class", "dirichlet"])
def test_partitions_are_disjoint_and_give_every_user_enough(scheme: str) -> None:
    y = torch.arange(600) % 10
    parts = partition(y, users=12, scheme=scheme, alpha=1.0, classes_per_user=2, min_size=8,
                      generator=torch.Generator().manual_seed(0))
    flat = torch.cat(parts)
    assert len(parts) == 12 and len(flat) == len(set(flat.tolist())) and min(len(p) for p in parts) >= 8
    if scheme == "by-class":
        per_user = [len(torch.unique(y[p])) for p in parts]  # 2 shards, each may straddle a class boundary
        assert max(per_user) <= 4 and sum(per_user) / len(per_user) <= 3
    data = TensorDataset(torch.rand(600, 1, 2, 2), y, tuple("0123456789"))
    x, yb, rows = local_batches(data, parts, batch=8, generator=torch.Generator().manual_seed(1))
    assert x.shape == (12, 8, 1, 2, 2) and torch.equal(yb, y[rows])
    assert all(set(rows[u].tolist()) <= set(parts[u].tolist()) for u in range(12))


def test_users_without_enough_data_are_refused() -> None:
    y = torch.arange(50) % 10
    with pytest.raises(ConfigError, match="allowed users \\* batch <= 50"):
        partition(y, users=10, min_size=8, generator=torch.Generator())
    with pytest.raises(ConfigError, match="partition.alpha = 0.01"):
        partition(y, users=10, scheme="dirichlet", alpha=0.01, min_size=5, generator=torch.Generator())


def test_one_fedavg_step_is_lr_times_the_fedsgd_gradient() -> None:
    model = tiny()
    x, y = batch(users=3, b=4)
    delta, steps = local_training(model, x, y, epochs=1, batch_size=4, lr=0.05, seeds=[0, 1, 2], device="cpu",
                                  classes=5)
    assert steps == 1
    with training(model):
        g = user_gradients(model, x, y, train_mode=True)
    for n in g:
        torch.testing.assert_close(delta[n] / 0.05, g[n], rtol=1e-4, atol=1e-5)


def test_fedsgd_aggregate_in_chunks_equals_the_sum_of_all_users() -> None:
    model = tiny()
    x, y = batch(users=7, b=2)
    for clip, sigma in ((None, 0.0), (0.05, 0.5)):
        want = secure_aggregate(user_gradients(model, x, y), clip=clip, noise_multiplier=sigma,
                                generator=torch.Generator().manual_seed(0))
        got = fedsgd_aggregate(model, x, y, chunk=3, clip=clip, noise_multiplier=sigma,
                               generator=torch.Generator().manual_seed(0))
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6)
