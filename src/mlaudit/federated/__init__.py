"""Federated learning simulated for measurements: users with local data, FedSGD and FedAvg rounds, and
secure aggregation as the server sees it (the sum of the users' updates).

    parts = partition(data.train.y, users=100, scheme="iid", generator=g)
    x, y, _ = local_batches(data.train, parts, batch=8, generator=g)     # [U, B, *shape], [U, B]
    updates = user_gradients(model, x, y)                                # FedSGD, all users in one vmap
    agg = secure_aggregate(updates, clip=None, noise_multiplier=0.0)     # what the server receives

``train_fedsgd`` trains a global model over many rounds with a client-side defence on every update (the
utility side of the defences). The attacks on these updates are :mod:`mlaudit.attacks.federated`; the ``federated`` experiment kind
runs both (docs/federated.md).
"""

from __future__ import annotations

from .aggregate import add_noise, clipped_sum, fedsgd_aggregate, secure_aggregate
from .defences import defend_updates, distortion
from .partition import local_batches, partition
from .training import FedTrainHistory, server_step, train_fedsgd
from .updates import RoundUpdates, local_training, round_updates, user_gradients

__all__ = ["FedTrainHistory", "RoundUpdates", "add_noise", "clipped_sum", "defend_updates", "distortion",
           "fedsgd_aggregate", "local_batches", "local_training", "partition", "round_updates", "secure_aggregate",
           "server_step", "train_fedsgd", "user_gradients"]
