"""Deep Partition Aggregation (mlaudit.certify.partition): the certificate of Levine & Feizi's theorem on
hand-made vote counts, ties included, and against an exhaustive search over every way r base models can
change their votes; content-hash partitions disjoint, covering and deterministic; the factory trials; the
size of a poison as insertions plus removals and the partitions it touches."""

from __future__ import annotations

import itertools

import pytest
import torch

from mlaudit.certify import (
    dpa_certify,
    partition_masks,
    partition_of,
    partition_trials,
    partitions_touched,
    symmetric_difference,
    view_partitions,
    vote_counts,
)
from mlaudit.data.base import TensorDataset
from mlaudit.data.view import DataView
from mlaudit.errors import ConfigError


@pytest.mark.parametrize(("counts", "pred", "radius"), [
    ([10, 0, 0], 0, 5),    # (10 - 0) / 2: five models moved to class 1 tie 5-5, and 0 keeps the tie
    ([0, 0, 10], 2, 4),    # rival 0 gets +1 for the smaller index: (10 - 1) / 2 = 4.5 -> 4
    ([6, 2, 2], 0, 2),     # (6 - 2) / 2
    ([5, 5, 0], 0, 0),     # tie won by the smaller index: robust to nothing
    ([3, 5, 5], 1, 0),     # 1 beats 2 on the tie; rival 0 has 3 + 1 = 4, rival 2 has 5: (5 - 5) / 2
    ([4, 5, 1], 1, 0),     # rival 0: 4 + 1 = 5
    ([2, 7, 1], 1, 2),     # rival 0: 2 + 1 = 3; (7 - 3) / 2
    ([1, 1, 1, 7], 3, 2),  # rivals 1 + 1 = 2: (7 - 2) / 2 = 2.5 -> 2
    ([0, 1], 1, 0),        # (1 - (0 + 1)) / 2
    ([1, 0], 0, 0),        # (1 - 0) / 2 = 0.5 -> 0
    ([0, 0, 0, 50], 3, 24),
])
def test_certificate_on_hand_made_votes(counts: list[int], pred: int, radius: int) -> None:
    cert = dpa_certify(torch.tensor([counts]))
    assert int(cert.prediction[0]) == pred and int(cert.radius[0]) == radius
    assert cert.radius.dtype == torch.int64 and torch.equal(cert.counts, torch.tensor([counts]))


def _plurality(counts: tuple[int, ...]) -> int:
    best = max(counts)
    return counts.index(best)  # the smaller class among ties


def _robust(votes: tuple[int, ...], r: int, c: int) -> bool:
    """Whether every change of at most r base models' votes (each to any class) keeps the plurality."""
    k = len(votes)
    target = _plurality(tuple(votes.count(j) for j in range(c)))
    for changed in itertools.combinations(range(k), r):
        for new in itertools.product(range(c), repeat=r):
            v = list(votes)
            for i, j in zip(changed, new, strict=True):
                v[i] = j
            if _plurality(tuple(v.count(j) for j in range(c))) != target:
                return False
    return True


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_certificate_is_exact_against_every_change_of_r_models(k: int) -> None:
    """For every vote vector of k models over 3 classes: the ensemble survives any rho changed models
    (each insertion or removal changes at most one) and some rho + 1 changes flip it (the bound is tight)."""
    c = 3
    for votes in itertools.product(range(c), repeat=k):
        counts = torch.tensor([[votes.count(j) for j in range(c)]])
        cert = dpa_certify(counts)
        rho = int(cert.radius[0])
        assert int(cert.prediction[0]) == _plurality(tuple(counts[0].tolist()))
        assert _robust(votes, rho, c), (votes, rho)
        assert not _robust(votes, rho + 1, c), (votes, rho)


def test_vote_counts_and_batches() -> None:
    pred = torch.tensor([[0, 2, 1], [0, 2, 2], [1, 2, 2], [0, 0, 2]])  # 4 models, 3 inputs
    counts = vote_counts(pred, 3)
    assert counts.tolist() == [[3, 1, 0], [1, 0, 3], [0, 1, 3]]
    cert = dpa_certify(counts)
    assert cert.prediction.tolist() == [0, 2, 2] and cert.radius.tolist() == [1, 0, 0]  # rivals 1 + 1 and 1 + 1
    with pytest.raises(ConfigError, match="outside"):
        vote_counts(torch.tensor([[3]]), 3)
    with pytest.raises(ConfigError, match="C >= 2"):
        dpa_certify(torch.tensor([[4]]))


def test_partitions_are_disjoint_covering_and_content_determined() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(500, 1, 4, 4, generator=g)
    k = 7
    part = partition_of(x, k)
    assert part.dtype == torch.int64 and part.shape == (500,) and int(part.min()) >= 0 and int(part.max()) < k
    masks = partition_masks(part, k)
    assert torch.equal(masks.sum(0), torch.ones(500, dtype=torch.long))  # each row in exactly one partition
    assert int(masks.sum(1).min()) > 30  # a hash spreads 500 rows over 7 partitions (expected 71 each)
    assert torch.equal(partition_of(x, k), part)  # deterministic
    perm = torch.randperm(500, generator=g)
    assert torch.equal(partition_of(x[perm], k), part[perm])  # a row's partition is its content's, not its place
    assert torch.equal(partition_of(x[:100], k), part[:100])  # nor does it depend on the other rows
    y = x.clone()
    y[3, 0, 0, 0] += 0.25  # a changed row may move; every other row stays
    moved = partition_of(y, k)
    assert torch.equal(moved[torch.arange(500) != 3], part[torch.arange(500) != 3])
    dup = torch.cat([x[:5], x[:5]])
    assert torch.equal(partition_of(dup, k)[:5], partition_of(dup, k)[5:])  # equal rows share a partition


def test_partition_trials_mask_each_partition() -> None:
    x = torch.rand(60, 3, generator=torch.Generator().manual_seed(1))
    part = partition_of(x, 4)
    trials = partition_trials(part, 4, seeds=[10, 11, 12, 13], view="poisoned", tags={"view": "poisoned"})
    assert [t.trial_id for t in trials] == ["dpa-p0000", "dpa-p0001", "dpa-p0002", "dpa-p0003"]
    assert [t.seed for t in trials] == [10, 11, 12, 13] and all(t.view == "poisoned" for t in trials)
    stacked = torch.stack([t.mask for t in trials])
    assert torch.equal(stacked, partition_masks(part, 4)) and torch.equal(stacked.sum(0), torch.ones(60, dtype=torch.long))
    assert [t.tags["size"] for t in trials] == stacked.sum(1).tolist() and trials[2].tags["partition"] == 2
    with pytest.raises(ConfigError, match="empty"):
        partition_trials(part[:2], 4, seeds=[0, 1, 2, 3])
    with pytest.raises(ConfigError, match="one seed per partition"):
        partition_trials(part, 4, seeds=[0])


def _base() -> TensorDataset:
    g = torch.Generator().manual_seed(2)
    return TensorDataset(torch.rand(40, 1, 2, 2, generator=g), torch.arange(40) % 4, ("a", "b", "c", "d"))


def test_poison_size_counts_a_modified_row_twice() -> None:
    base = _base()
    view = DataView.identity(base)
    assert symmetric_difference(view) == 0 and partitions_touched(view, 5) == 0
    delta = torch.zeros(3, 1, 2, 2)
    delta[:, 0, 0, 0] = -0.01
    stamped = view.with_delta([0, 1, 2], delta, eps=None).with_labels([0, 1, 2], 3)  # modified: 2 each
    assert symmetric_difference(stamped) == 6
    flipped = view.with_labels([5], 2).with_labels([6], int(base.y[6]))  # row 6 keeps its label: no change
    assert symmetric_difference(flipped) == 2
    grown = stamped.with_inserted(torch.rand(2, 1, 2, 2), [0, 1])  # + 2 insertions
    assert symmetric_difference(grown) == 8
    keep = torch.ones(grown.num_total, dtype=torch.bool)
    keep[[0, 10, 41]] = False  # a modified row dropped (1: its removal), a clean one (1), an insertion (0)
    assert symmetric_difference(grown.with_keep(keep)) == 2 * 2 + 1 + 1 + 1


def test_partitions_touched_and_view_partitions() -> None:
    base = _base()
    delta = torch.zeros(2, 1, 2, 2)
    delta[:, 0, 1, 1] = 1 - base.x[[3, 4], 0, 1, 1]  # one pixel set to white
    view = DataView.identity(base).with_delta([3, 4], delta, eps=None).with_inserted(torch.rand(1, 1, 2, 2), [1])
    k = 50
    parts = view_partitions(view, k)
    clean = partition_of(base.x, k)
    assert parts.shape == (41,) and torch.equal(parts[:3], clean[:3]) and torch.equal(parts[5:40], clean[5:40])
    expected = {int(clean[3]), int(clean[4]), int(parts[3]), int(parts[4]), int(parts[40])}
    assert partitions_touched(view, k) == len(expected)
    keep = torch.ones(41, dtype=torch.bool)
    keep[7] = False
    assert int(view_partitions(view.with_keep(keep), k)[7]) == -1
    assert partitions_touched(view.with_keep(keep), k) == len(expected | {int(clean[7])})
