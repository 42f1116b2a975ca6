"""Deep Partition Aggregation (Levine & Feizi, "Deep Partition Aggregation: Provable Defenses against
General Poisoning Attacks", ICLR 2021): a certified defence against poisoning.

The training set is cut into k disjoint partitions by a deterministic hash of each sample; base model i
trains on partition i only; the ensemble predicts the plurality vote of the k models, ties to the smaller
class index. With n_c(x) the votes for class c and c the prediction, the paper's theorem certifies

    rho(x) = floor((n_c(x) - max_{c' != c} (n_c'(x) + [c' < c])) / 2)

against any poisoned training set T' with |T (symmetric difference) T'| <= rho(x): the ensemble trained
on T' predicts c at x too. Each inserted or removed sample lands in one partition, so it changes at most
one base model, and one changed vote moves the gap between c and any c' by at most 2 (the ``[c' < c]``
term because a tie goes to the smaller index). A *modified* sample (perturbed image, flipped label)
is a removal plus an insertion: it counts 2.

The hash (:func:`partition_of`) is of the sample's content (the input's bytes, as the paper hashes the
image: the sum of its pixel values modulo k), not of its position: the partition of every clean sample
must not depend on the rest of the training set nor on an order the attacker could influence, or an
insertion could move clean samples between partitions and the certificate would not hold. The label is
not hashed (as in the paper), so a label flip stays in its partition. Each base model must be a
deterministic function of its partition: mlaudit's models are, given their seed (the partition index),
up to float rounding of batched kernels (see docs/defend.md).

    part = partition_of(x, k)                                 # int64 [N] in [0, k)
    trials = partition_trials(part, k, seeds=seeds, view="poisoned")   # one factory job of k trials
    cert = dpa_certify(vote_counts(pred, num_classes))        # pred int64 [k, B]: each model's votes
    cert.prediction, cert.radius                              # int64 [B] each
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..data.view import DataView
from ..errors import ConfigError
from ..factory.spec import TrialSpec


def partition_of(x: Tensor, k: int) -> Tensor:
    """Partition int64 [N] in [0, k) of every row of ``x`` [N, *shape]: the first 8 bytes of the BLAKE2b
    digest of the row's float32 little-endian bytes, as an unsigned integer, modulo ``k``. Equal rows share
    a partition; any change of a row's content moves it to a partition drawn afresh."""
    if k < 1:
        raise ConfigError(f"k (partitions) must be >= 1, got {k}")
    rows = x.detach().cpu().contiguous().numpy().astype("<f4", copy=False).reshape(len(x), -1)
    out = np.empty(len(rows), dtype=np.int64)
    for i, row in enumerate(rows):
        out[i] = int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little") % k
    return torch.from_numpy(out)


def partition_masks(part: Tensor, k: int) -> Tensor:
    """bool [k, N]: row j of partition i is ``mask[i, j]`` (disjoint rows, covering every column)."""
    return part.cpu()[None, :] == torch.arange(k)[:, None]


def view_partitions(view: DataView, k: int) -> Tensor:
    """Partition int64 [N + I] of every virtual index of ``view`` (of its content: perturbed rows with their
    delta, inserted rows), -1 where ``keep`` drops the row (it is not in the training set)."""
    x, _ = view.gather(torch.arange(view.num_total, device=view.device), validate=False)
    part = partition_of(x, k)
    if view.keep is not None:
        part[~view.keep.cpu()] = -1
    return part


def partition_trials(part: Tensor, k: int, *, seeds: Sequence[int], view: str | None = None, prefix: str = "dpa",
                     tags: Mapping[str, Any] | None = None) -> list[TrialSpec]:
    """The k trials of one factory job: trial ``<prefix>-p<i>`` trains on partition i only (its mask over
    the virtual indices of ``view``, None = the clean training split), with ``seeds[i]``. Raises
    :class:`ConfigError` when a partition is empty (a model with nothing to train on)."""
    if len(seeds) != k:
        raise ConfigError(f"partition_trials needs one seed per partition, got {len(seeds)} for k = {k}")
    masks = partition_masks(part, k)
    sizes = masks.sum(1)
    if bool((sizes == 0).any()):
        empty = (sizes == 0).nonzero().squeeze(1).tolist()
        raise ConfigError(f"k = {k} leaves {len(empty)} partition(s) of the {int((part >= 0).sum())} training rows "
                          f"empty (first: {empty[0]}); use fewer partitions")
    return [TrialSpec(f"{prefix}-p{i:04d}", seed=int(seeds[i]), mask=masks[i], view=view,
                      tags={**dict(tags or {}), "partition": i, "size": int(sizes[i])}) for i in range(k)]


def vote_counts(pred: Tensor, num_classes: int) -> Tensor:
    """int64 [B, C]: how many of the k base models (``pred`` int [k, B], class indices) vote for each class."""
    if pred.dim() != 2:
        raise ConfigError(f"pred must be [k, B] class indices, got shape {list(pred.shape)}")
    pred = pred.cpu().long()
    if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= num_classes):
        raise ConfigError(f"pred holds classes outside [0, {num_classes - 1}]")
    counts = torch.zeros(pred.shape[1], num_classes, dtype=torch.int64)
    return counts.scatter_add_(1, pred.t(), torch.ones_like(pred.t()))


@dataclass(frozen=True)
class DPACertificate:
    """The ensemble's answer for B inputs: ``prediction`` int64 [B] (plurality, ties to the smaller
    class), ``radius`` int64 [B] (the certified size of the symmetric difference between the clean and
    the poisoned training set, insertions plus removals) and the vote ``counts`` int64 [B, C]."""

    prediction: Tensor
    radius: Tensor
    counts: Tensor


def dpa_certify(counts: Tensor) -> DPACertificate:
    """Plurality vote and certificate of every input (the paper's theorem, module docstring) from vote
    ``counts`` int [B, C] (C >= 2)."""
    if counts.dim() != 2 or counts.shape[1] < 2:
        raise ConfigError(f"counts must be [B, C] with C >= 2 classes, got shape {list(counts.shape)}")
    counts = counts.cpu().long()
    c = counts.shape[1]
    idx = torch.arange(c)
    pred = (counts * c - idx).argmax(1)  # the largest count; among equal counts the smaller index
    top = counts.gather(1, pred[:, None]).squeeze(1)
    rival = counts + (idx[None, :] < pred[:, None]).long()  # n_c' + [c' < c]
    rival[torch.arange(len(pred)), pred] = torch.iinfo(torch.int64).min
    gap = top - rival.max(1).values  # >= 0: c wins every comparison
    return DPACertificate(pred, gap.div(2, rounding_mode="floor"), counts)


def symmetric_difference(view: DataView) -> int:
    """|T (symmetric difference) T'| between the clean training split T and the view T': a base row whose
    content or label changed counts 2 (removed and inserted), a base row dropped by ``keep`` 1, a kept
    inserted row 1. The number a DPA certificate must reach for the ensemble to be provably unchanged."""
    n = view.num_base
    kept = torch.ones(view.num_total, dtype=torch.bool) if view.keep is None else view.keep.cpu()
    changed = torch.zeros(view.num_total, dtype=torch.bool)
    changed[view.changed_indices().cpu()] = True
    base_changed, base_kept = changed[:n], kept[:n]
    return int((base_changed & base_kept).sum()) * 2 + int((~base_kept).sum()) + int(kept[n:].sum())


def partitions_touched(view: DataView, k: int) -> int:
    """How many of the k partitions differ between the clean training split and the view: those holding a
    changed row's clean or poisoned version, a dropped row or an inserted one. At most this many base
    models differ from the clean-data ensemble's, so an input whose certificate reaches it predicts what
    the clean-data ensemble predicts (a fact about this poison, not a certificate against any)."""
    changed = view.changed_indices().cpu()
    n = view.num_base
    hit: set[int] = set()
    base = changed[changed < n]
    if view.keep is not None:
        base = torch.unique(torch.cat([base, (~view.keep.cpu()[:n]).nonzero().squeeze(1)]))
    if base.numel():
        hit |= set(partition_of(view.base.x[base.to(view.device)], k).tolist())
    poisoned = view_partitions(view, k)[changed]
    hit |= {int(p) for p in poisoned.tolist() if p >= 0}
    return len(hit)
