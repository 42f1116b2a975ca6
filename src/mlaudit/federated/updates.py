"""What each user sends the server in one round: FedSGD gradients or FedAvg weight updates.

    g = user_gradients(model, x, y)                 # FedSGD: ParamVector {name: [U, *shape]}
    d = local_training(model, x, y, epochs=1, batch_size=4, lr=0.1, seeds=seeds, device=dev)  # FedAvg

FedSGD (McMahan et al. 2017): user u computes g_u = grad_theta (1/B) sum_b CE(f_theta(x_ub), y_ub) on
its batch x [U, B, *shape] at the global weights. All users' gradients come from one call: ``torch.func``
``grad`` of the user's mean loss, ``vmap``-ed over users (the parameters shared, the user axis batched),
so a hundred users cost one batched backward, not a hundred. ``chunk`` users at a time bounds memory
(U x parameters floats). The per-example gradients of DP-SGD
(:func:`mlaudit.privacy.dpsgd.per_example_grads`) do not fit here: a user's gradient is the gradient of
its *batch* loss, and with BatchNorm in train mode the batch statistics couple its examples, so it is
not the mean of per-example gradients.

``train_mode``: the users' forward mode. False (default): eval mode (BatchNorm running statistics,
dropout off). True: train mode; each user's BatchNorm uses its own batch statistics (the buffers are
copied per user, so the running statistics of the global model are left untouched).

FedAvg: each user trains a copy of the global model for ``epochs`` local epochs of plain SGD (no
momentum, no weight decay, constant ``lr``) on its own data, through the one training loop
(:func:`mlaudit.train.loop.train_stack`: the U users are U stacked models, each restricted to its data
by a mask), and sends ``w_global - w_user``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..data.base import TensorDataset
from ..errors import ConfigError
from ..query import ParamVector, in_mode
from ..train.loop import train_stack
from ..train.recipe import Recipe


def user_gradients(model: nn.Module, x: Tensor, y: Tensor, *, train_mode: bool = False,
                   chunk: int | None = None, weights: Mapping[str, Tensor] | None = None) -> ParamVector:
    """FedSGD: each user's gradient of its mean cross-entropy at the model's weights.

    ``x`` [U, B, *shape], ``y`` [U, B] (or [U, B, L] next-token targets of a language model) on the model's device
    -> {name: [U, *shape]} for every trainable parameter (``requires_grad``), in the model's order. The model and
    its ``.grad`` are not changed. ``weights``: each user's own values {name: [U, *shape]} of the trainable
    parameters (a FedAvg user's weights after its local steps), in place of the model's shared ones.
    """
    if x.dim() < 3 or y.shape[:2] != x.shape[:2]:
        raise ConfigError(f"user_gradients needs x [U, B, *shape] and y [U, B] (or [U, B, L] sequence targets), got "
                          f"{list(x.shape)} and {list(y.shape)}")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ConfigError("user_gradients needs a model with trainable parameters (requires_grad=True)")
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in names}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def loss(p: dict[str, Tensor], b: dict[str, Tensor], xu: Tensor, yu: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, ({**p, **frozen}, b), (xu,)).float(), yu)

    if weights is not None and set(weights) != set(names):
        raise ConfigError(f"user_gradients weights name {sorted(weights)[:4]}...; allowed: exactly the model's "
                          f"trainable parameters {names[:4]}...")
    step = chunk or x.shape[0]
    parts: list[dict[str, Tensor]] = []
    # the math attention kernel: scaled_dot_product_attention's fused kernels (nn.MultiheadAttention's, Hugging
    # Face models') have no vmap rule and would fall back to a Python loop over the users
    with in_mode(model, train=train_mode), sdpa_kernel([SDPBackend.MATH]):
        for i in range(0, x.shape[0], step):
            xs, ys = x[i:i + step], y[i:i + step]
            at, p_dim = (params, None) if weights is None else ({n: w[i:i + step] for n, w in weights.items()}, 0)
            if train_mode:  # BatchNorm updates its running statistics in place: one copy per user
                per_user = {n: t.unsqueeze(0).expand(len(xs), *t.shape).clone() for n, t in buffers.items()}
                g = vmap(grad(loss), in_dims=(p_dim, 0, 0, 0), randomness="different")(at, per_user, xs, ys)
            else:
                g = vmap(grad(loss), in_dims=(p_dim, None, 0, 0), randomness="different")(at, buffers, xs, ys)
            parts.append(g)
    return ParamVector({n: torch.cat([p[n] for p in parts]) for n in names})


def local_training(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, batch_size: int, lr: float,
                   seeds: Sequence[int], device: torch.device | str, classes: int | None = None
                   ) -> tuple[ParamVector, int]:
    """FedAvg: every user trains a copy of ``model`` on its data x [U, n, *shape], y [U, n] for ``epochs``
    epochs of SGD (batch ``batch_size``, constant ``lr``; user u's data order from ``seeds[u]``).

    Returns ({name: [U, *shape]} the updates w_global - w_user of the trainable parameters, on the model's
    device; local SGD steps per user)."""
    updates, steps, _ = _train_users(model, x, y, epochs=epochs, batch_size=batch_size, lr=lr, seeds=seeds,
                                     device=device, classes=classes)
    return updates, steps


def _train_users(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, batch_size: int, lr: float,
                 seeds: Sequence[int], device: torch.device | str, classes: int | None
                 ) -> tuple[ParamVector, int, dict[str, Tensor]]:
    """:func:`local_training`, and the users' buffers after it {name: [U, *shape]} (BatchNorm's running
    statistics, trained in train mode), on the model's device. Next-token targets y [U, n, L] train through
    :func:`_train_sequences`."""
    if y.dim() == 3:
        return _train_sequences(model, x, y, epochs=epochs, batch_size=batch_size, lr=lr, seeds=seeds)
    u, n = y.shape
    if len(seeds) != u:
        raise ConfigError(f"local_training needs one seed per user: {u} users, {len(seeds)} seeds")
    num_classes = classes or int(y.max()) + 1
    data = TensorDataset(x.flatten(0, 1).detach(), y.flatten().detach(), tuple(str(c) for c in range(num_classes)))
    masks = torch.zeros(u, u * n, dtype=torch.bool)
    for i in range(u):
        masks[i, i * n:(i + 1) * n] = True
    recipe = Recipe(optimizer="sgd", lr=lr, momentum=0.0, nesterov=False, weight_decay=0.0, epochs=epochs,
                    batch_size=batch_size, schedule="constant", augment="none", precision="fp32", channels_last=False)
    users = [copy.deepcopy(model) for _ in range(u)]
    out = train_stack(users, data, recipe, seeds=list(seeds), lr=lr, device=torch.device(device), masks=masks,
                      strategy="vmap")
    start = ParamVector.from_module(model)
    dev = next(iter(start.values())).device
    updates = ParamVector({k: torch.stack([w - o.state_dict[k].to(dev) for o in out]) for k, w in start.items()})
    buffers = {k: torch.stack([o.state_dict[k].to(dev) for o in out]) for k, _ in model.named_buffers()
               if k in out[0].state_dict}
    return updates, epochs * math.ceil(n / batch_size), buffers


def _train_sequences(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, batch_size: int, lr: float,
                     seeds: Sequence[int]) -> tuple[ParamVector, int, dict[str, Tensor]]:
    """FedAvg's local training for a language model's users: tokens x [U, n, L], next-token targets y [U, n, L],
    which the stacked training loop (:func:`~mlaudit.train.loop.train_stack`, class targets [N]) does not take.
    The same plain SGD as there: every user's own float32 copy of the weights, for ``epochs`` epochs of minibatches
    of ``batch_size`` drawn as train_stack draws them (user u's data-order generator seeded ``seeds[u] + 0x5EED``,
    each epoch a permutation of its n rows, the last minibatch topped up from the epoch's start), each step
    w <- w - lr * the gradient of the minibatch's mean loss, with every user's gradient from
    :func:`user_gradients` at the users' own weights (one vmap, train mode). Returns (w_global - w_user
    {name: [U, *shape]}, local steps per user, the buffers {name: [U, *shape]}, unchanged)."""
    from ..train.loop import _epoch_order  # the training loop's epoch order: the same minibatches

    u, n = y.shape[:2]
    if len(seeds) != u:
        raise ConfigError(f"local_training needs one seed per user: {u} users, {len(seeds)} seeds")
    spe = math.ceil(n / batch_size)
    start = ParamVector({k: p.detach() for k, p in model.named_parameters() if p.requires_grad})
    w = {k: t.unsqueeze(0).expand(u, *t.shape).clone() for k, t in start.items()}
    gens = [torch.Generator().manual_seed(int(s) + 0x5EED) for s in seeds]
    rows = torch.arange(u, device=x.device)[:, None]
    for _ in range(epochs):
        order = torch.stack([_epoch_order(torch.arange(n), spe * batch_size, g) for g in gens]).to(x.device)
        for s in range(spe):
            idx = order[:, s * batch_size:(s + 1) * batch_size]  # [U, b]
            g = user_gradients(model, x[rows, idx], y[rows, idx], train_mode=True, weights=w)
            with torch.no_grad():
                for k in w:
                    w[k] = w[k] - lr * g[k]
    buffers = {k: b.detach().unsqueeze(0).expand(u, *b.shape).clone() for k, b in model.named_buffers()}
    return ParamVector({k: t - w[k] for k, t in start.items()}), epochs * spe, buffers


ROUND_SEED = 100_003
"""Offset between a user's local data-order seeds of consecutive rounds (:func:`local_seed`)."""


def local_seed(seed: int, server_round: int) -> int:
    """The local-training data-order seed of a user with base seed ``seed`` in round ``server_round`` (from 1):
    ``seed`` itself in round 1, so a one-round run is unchanged."""
    return seed + ROUND_SEED * (server_round - 1)


@dataclass
class RoundUpdates:
    """What the users of one round computed: ``updates`` {name: [U, *shape]} in gradient units (the FedSGD
    gradient, or the FedAvg weight change / (lr * steps)), ``steps`` local SGD steps per user, and ``buffers``
    {name: [U, *shape]} the users' buffers after local training (FedAvg; None under FedSGD, where they do
    not change)."""

    updates: ParamVector
    steps: int
    buffers: dict[str, Tensor] | None = None


def round_updates(model: nn.Module, x: Tensor, y: Tensor, *, protocol: str, lr: float, epochs: int = 1,
                  batch_size: int | None = None, seeds: Sequence[int] | None = None,
                  device: torch.device | str | None = None, classes: int | None = None, train_mode: bool = False,
                  chunk: int | None = None) -> RoundUpdates:
    """One round of every user on x [U, B, *shape], y [U, B] at the model's weights: ``fedsgd`` (one gradient,
    :func:`user_gradients` in ``train_mode``, ``chunk`` users per call) or ``fedavg`` (:func:`local_training`:
    ``epochs`` of SGD at ``lr``, batch ``batch_size`` (None: B), user u's data order from ``seeds[u]``). The
    one implementation of a user's update, shared by the simulated rounds of the ``federated`` kind and the
    Flower client (:class:`mlaudit.federated.flower.TorchClient`)."""
    if protocol == "fedsgd":
        return RoundUpdates(user_gradients(model, x, y, train_mode=train_mode, chunk=chunk), 1)
    if protocol != "fedavg":
        raise ConfigError(f"protocol = {protocol!r}; allowed: fedsgd, fedavg")
    if seeds is None:
        raise ConfigError("FedAvg round_updates needs one data-order seed per user (seeds)")
    dev = device if device is not None else next(model.parameters()).device
    delta, steps, buffers = _train_users(model, x, y, epochs=epochs, batch_size=batch_size or x.shape[1], lr=lr,
                                         seeds=seeds, device=dev, classes=classes)
    return RoundUpdates(delta / (lr * steps), steps, buffers)
