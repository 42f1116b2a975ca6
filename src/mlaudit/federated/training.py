"""FedSGD training of a global model over many rounds, with a client-side defence on every user's update:
the utility side of the defences whose privacy side :mod:`mlaudit.attacks.federated` measures.

Each round (McMahan et al. 2017, FedSGD): every user draws a batch from its share (:func:`.local_batches`),
computes the gradient of its mean loss at the global weights (:func:`.user_gradients`, all users in one
vmap), transforms it with the defence (:func:`.defend_updates`), and the server steps the global weights by
``lr`` times the mean of the defended updates (secure aggregation: it sees only their sum).

    hist = train_fedsgd(model, data, users=8, batch=16, rounds=300, lr=0.5, defence={"method": "prune", "prune": 0.9})
    hist.test_accuracy[-1]

Shapes: the model maps [B, *shape] -> [B, C]; data a :class:`~mlaudit.data.base.DataBundle` (train and test).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..data.base import DataBundle
from ..errors import ConfigError
from ..query import forward_batched
from .aggregate import secure_aggregate
from .defences import defend_updates, distortion
from .partition import local_batches, partition
from .updates import user_gradients


@dataclass
class FedTrainHistory:
    """Per evaluation point (every ``eval_every`` rounds and the last): the round, the global model's test
    accuracy, and the mean relative distortion ||g' - g|| / ||g|| of the users' updates over the rounds since (users
    whose gradient is zero left out)."""

    rounds: list[int] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    distortion: list[float] = field(default_factory=list)


def train_fedsgd(model: nn.Module, data: DataBundle, *, users: int, batch: int, rounds: int, lr: float,
                 defence: dict[str, Any] | None = None, scheme: str = "iid", eval_every: int = 50,
                 seed: int = 0) -> FedTrainHistory:
    """Train ``model`` (in place, its current weights the start) by FedSGD with a client-side ``defence``
    ({"method": ..., its options}; None: none); returns the test accuracy history."""
    if users < 1 or batch < 1 or rounds < 1 or not lr > 0 or eval_every < 1:
        raise ConfigError(f"train_fedsgd needs users, batch, rounds, eval_every >= 1 and lr > 0; got users={users}, "
                          f"batch={batch}, rounds={rounds}, lr={lr}, eval_every={eval_every}")
    d = dict(defence or {"method": "none"})
    method = d.pop("method", "none")
    g = torch.Generator().manual_seed(seed)
    parts = partition(data.train.y.cpu(), users=users, scheme=scheme, generator=g)  # type: ignore[arg-type]
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    device = next(iter(params.values())).device
    # the defence's noise is drawn on the updates' device; on the CPU that is ``g`` itself (the same stream as
    # the batches), elsewhere a generator of that device seeded from ``g``
    noise = g if device.type == "cpu" else torch.Generator(device=device).manual_seed(
        int(torch.randint(2**62, (1,), generator=g)))
    hist, dist = FedTrainHistory(), []
    for r in range(1, rounds + 1):
        x, y, _ = local_batches(data.train, parts, batch=batch, generator=g)
        updates = user_gradients(model, x, y)
        defended = defend_updates(updates, method=method, generator=noise, **d)
        if method != "none":
            dist.append(float(distortion(updates, defended).nanmean()))  # a user with a zero gradient: nan
        step = secure_aggregate(defended, mean=True)
        with torch.no_grad():
            for n, p in params.items():
                p -= lr * step[n].to(p.dtype)
        if r % eval_every == 0 or r == rounds:
            acc = float((forward_batched(model, data.test.x).argmax(1).cpu() == data.test.y.cpu()).float().mean())
            hist.rounds.append(r)
            hist.test_accuracy.append(acc)
            hist.distortion.append(sum(dist) / len(dist) if dist else 0.0)
            dist = []
    return hist


def server_step(model: nn.Module, total: Mapping[str, Tensor], *, users: int, step: float,
                buffers: Mapping[str, Tensor] | None = None) -> None:
    """The FedAvg server's update of ``model`` in place, users weighted equally (equal batches): every parameter
    w <- w - step * total[w] / users, where ``total`` is the sum of the users' (defended) updates in gradient
    units, what secure aggregation hands the server, and ``step`` the users' lr * local steps; this is the mean
    of the users' weights w - step * g_u. ``buffers`` {name: [U, *shape]} (the users' buffers after local
    training, e.g. BatchNorm's running statistics): each floating buffer becomes the users' mean, as FedAvg
    averages everything the clients send."""
    if users < 1 or not step > 0:
        raise ConfigError(f"server_step needs users >= 1 and step > 0, got users={users}, step={step}")
    params = dict(model.named_parameters())
    own = dict(model.named_buffers())
    with torch.no_grad():
        for n, t in total.items():
            params[n].sub_(step * (t / users).to(params[n].dtype))
        for n, b in (buffers or {}).items():
            if n in own and own[n].is_floating_point():
                own[n].copy_(b.to(own[n].dtype).mean(0))
