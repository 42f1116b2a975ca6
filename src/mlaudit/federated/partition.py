"""Users' local data: a split partitioned among users, and each user's batch of a round.

    parts = partition(data.train.y, users=100, scheme="dirichlet", alpha=0.5, min_size=8, generator=g)
    x, y = local_batches(data.train, parts, batch=8, generator=g)      # [U, B, *shape], [U, B]

Schemes (every example goes to at most one user; with ``per_user`` only that many are handed out):

* ``iid``: a seeded random permutation cut into equal shares;
* ``by-class``: pathological non-iid (McMahan et al. 2017): examples sorted by label, cut into
  ``users * classes_per_user`` equal shards, each user gets ``classes_per_user`` random shards (a shard
  straddles two classes where a class boundary falls inside it);
* ``dirichlet``: per class, the class's examples are split among users in proportions drawn from
  Dir(alpha) (Hsu et al. 2019); small alpha = few classes per user. Redrawn (up to 100 times) until
  every user holds at least ``min_size`` examples, else a ConfigError naming alpha and the sizes.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..data.base import TensorDataset
from ..errors import ConfigError

Scheme = Literal["iid", "by-class", "dirichlet"]
DIRICHLET_TRIES = 100


def partition(y: Tensor, *, users: int, scheme: Scheme = "iid", per_user: int | None = None, alpha: float = 0.5,
              classes_per_user: int = 2, min_size: int = 1, generator: torch.Generator) -> list[Tensor]:
    """Split the examples with labels ``y`` [N] among ``users``: one int64 index tensor per user (CPU).

    ``per_user`` caps each user's share (iid and by-class: exactly that many when given);
    ``min_size`` is the fewest examples a user may hold (a ConfigError otherwise).
    """
    n = len(y)
    if users < 1:
        raise ConfigError(f"users = {users}; allowed users >= 1")
    share = n // users if per_user is None else per_user
    if share < max(1, min_size) or share * users > n:
        raise ConfigError(f"{users} users x {max(share, min_size)} examples each need {users * max(share, min_size)} "
                          f"examples; the split has {n}; allowed users * batch <= {n}")
    y = y.cpu()
    if scheme == "iid":
        return list(torch.randperm(n, generator=generator)[: share * users].view(users, share))
    if scheme == "by-class":
        return _by_class(y, users, share, classes_per_user, generator)
    if scheme == "dirichlet":
        return _dirichlet(y, users, per_user, alpha, min_size, generator)
    raise ConfigError(f"partition scheme {scheme!r}; allowed: iid, by-class, dirichlet")


def _by_class(y: Tensor, users: int, share: int, per: int, generator: torch.Generator) -> list[Tensor]:
    if per < 1:
        raise ConfigError(f"classes_per_user = {per}; allowed classes_per_user >= 1")
    jitter = torch.rand(len(y), generator=generator)  # random order within a class
    order = torch.from_numpy(np.lexsort((jitter.numpy(), y.numpy())))
    shards = users * per
    size = share // per
    if size < 1:
        raise ConfigError(f"by-class partition: {share} examples per user cannot fill {per} shards; "
                          f"allowed classes_per_user <= {share}")
    pieces = order[: shards * size].view(shards, size)
    pick = torch.randperm(shards, generator=generator).view(users, per)
    return [pieces[p].flatten() for p in pick]


def _dirichlet(y: Tensor, users: int, per_user: int | None, alpha: float, min_size: int,
               generator: torch.Generator) -> list[Tensor]:
    if not alpha > 0:
        raise ConfigError(f"partition.alpha = {alpha}; allowed alpha > 0")
    rng = np.random.default_rng(int(torch.randint(2**62, (), generator=generator)))  # Dirichlet draws, seeded
    labels = y.numpy()
    sizes: list[int] = []
    for _ in range(DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(users)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = np.round(np.cumsum(rng.dirichlet(np.full(users, alpha)))[:-1] * len(idx)).astype(int)
            for u, chunk in enumerate(np.split(idx, cuts)):
                parts[u].append(chunk)
        out = [rng.permutation(np.concatenate(p))[:per_user] for p in parts]
        sizes = [len(p) for p in out]
        if min(sizes) >= max(1, min_size):
            return [torch.from_numpy(p).long() for p in out]
    raise ConfigError(f"partition.alpha = {alpha}: in {DIRICHLET_TRIES} Dirichlet draws some user always held fewer "
                      f"than {max(1, min_size)} examples (last sizes min {min(sizes)}, max {max(sizes)}); allowed: a "
                      "larger alpha, fewer users or a smaller batch")


def local_batches(data: TensorDataset, parts: list[Tensor], *, batch: int, generator: torch.Generator
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Each user's batch of one round: ``batch`` examples drawn without replacement from its share.

    Returns (x [U, B, *shape], y [U, B], idx [U, B] the rows of ``data`` they came from)."""
    small = [u for u, p in enumerate(parts) if len(p) < batch]
    if small:
        raise ConfigError(f"users {small[:5]} hold fewer than batch = {batch} examples (smallest share "
                          f"{min(len(parts[u]) for u in small)}); allowed batch <= every user's share")
    idx = torch.stack([p[torch.randperm(len(p), generator=generator)[:batch]] for p in parts])
    flat = idx.flatten().to(data.x.device)
    return data.x[flat].view(*idx.shape, *data.shape), data.y[flat].view(idx.shape), idx
