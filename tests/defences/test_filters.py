"""Filtering defences (mlaudit.defences): each filter removes planted poisons from a synthetic feature set
far more often than random filtering would, and does no better than random when the poisons look like
clean rows; every filter honours the rate (round(rate * n_c) rows of each class); the removal is compared
with random filtering by the exact hypergeometric expectation and tail; the call shape's errors; the
penultimate features of a trained model through mlaudit.query."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import hypergeom

from mlaudit.data.base import TensorDataset
from mlaudit.data.view import DataView
from mlaudit.defences import FILTERS, class_quota, removal_summary, remove_top, training_features
from mlaudit.errors import ConfigError
from mlaudit.models.registry import ModelSpec, build_model
from mlaudit.stats import random_removal

C, N, D, P = 4, 150, 16, 15
"""Classes, rows per class, feature dimension, poisons (all labelled class 0)."""


def features(kind: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class clusters in R^D with P poisons labelled 0: ``shift`` (a backdoor: the poisons share a direction
    away from class 0's centre), ``collide`` (feature collision: they sit inside class 1's cluster) or
    ``clean`` (drawn like class 0's own rows: nothing to find)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(C, D, generator=g) * 4
    labels = torch.arange(C).repeat_interleave(N)
    f = centres[labels] + torch.randn(C * N, D, generator=g)
    poison = torch.zeros(C * N, dtype=torch.bool)
    poison[:P] = True
    if kind == "shift":
        direction = torch.randn(D, generator=g)
        f[:P] = centres[0] + 9 * direction / direction.norm() + 0.3 * torch.randn(P, D, generator=g)
    elif kind == "collide":
        f[:P] = centres[1] + torch.randn(P, D, generator=g)
    return f, labels, poison


PLANTED = {"spectral": "shift", "outlier": "shift", "activation-clustering": "shift", "knn": "collide"}


def test_every_filter_has_a_planted_case() -> None:
    assert set(PLANTED) == set(FILTERS.names())


@pytest.mark.parametrize("name", sorted(PLANTED))
@pytest.mark.parametrize("seed", [0, 1])
def test_filter_finds_planted_poisons_far_above_random_and_honours_the_rate(name: str, seed: int) -> None:
    f, labels, poison = features(PLANTED[name], seed)
    rate = 0.1
    removed = FILTERS.get(name)(f, labels, rate=rate)
    assert removed.dtype == torch.bool and removed.shape == (C * N,)
    for c, q in class_quota(labels, rate).items():
        assert int(removed[labels == c].sum()) == q == 15  # exactly round(0.1 * 150) of every class
    s = removal_summary(removed, poison, labels)
    assert s["random_poisons_removed"] == pytest.approx(rate * P)  # 1.5 expected at random
    assert s["poisons_removed"] >= 12 and s["p_value"] < 1e-9, s  # measured 15 of 15 (seeds 0-5)


@pytest.mark.parametrize("name", sorted(PLANTED))
def test_filter_is_near_random_when_poisons_look_clean(name: str) -> None:
    """The control: the same filters on poisons drawn like class 0's clean rows find about as many as
    random filtering (seed 002's finding for Witches' Brew), so the planted test can fail."""
    f, labels, poison = features("clean", 3)
    s = removal_summary(FILTERS.get(name)(f, labels, rate=0.1), poison, labels)
    assert s["poisons_removed"] <= 6 and s["p_value"] > 1e-3, s  # measured 0-3 (expected 1.5)


@pytest.mark.parametrize(("name", "kind"), [("activation-clustering", "shift"), ("knn", "collide")])
def test_paper_rules_without_a_rate(name: str, kind: str) -> None:
    """Activation clustering removes the small cluster (15 poisons of 165 rows labelled 0); deep kNN the
    rows outvoted by their neighbours' labels."""
    f, labels, poison = features(kind)
    removed = FILTERS.get(name)(f, labels, rate=None)
    s = removal_summary(removed, poison, labels)
    assert s["poisons_removed"] == P and s["clean_removed"] <= 2, s


def test_activation_clustering_keeps_classes_without_a_small_cluster() -> None:
    f, labels, poison = features("shift")
    removed = FILTERS.get("activation-clustering")(f, labels, rate=None, size_threshold=0.05)  # 15/165 > 5%
    assert int(removed.sum()) == 0


def test_random_removal_expectation_and_tail() -> None:
    # one class: 2000 poisons among 5000 rows, 500 removed at random (seed 002 Table 1.4's 10% column)
    one = random_removal([5000], [2000], [500], observed=248)
    assert one["expected"] == pytest.approx(200.0)
    assert one["p_value"] == pytest.approx(float(hypergeom.sf(247, 5000, 2000, 500)), rel=1e-6)
    # two classes: brute force over the joint distribution
    sizes, marked, draws = [8, 6], [3, 2], [4, 3]
    pmf_a = hypergeom.pmf(range(4), 8, 3, 4)
    pmf_b = hypergeom.pmf(range(3), 6, 2, 3)
    for obs in range(6):
        want = sum(pmf_a[a] * pmf_b[b] for a in range(4) for b in range(3) if a + b >= obs)
        got = random_removal(sizes, marked, draws, observed=obs)
        assert got["p_value"] == pytest.approx(want, abs=1e-12)
        assert got["expected"] == pytest.approx(4 * 3 / 8 + 3 * 2 / 6)
    assert random_removal([10, 10], [0, 0], [5, 5], observed=0) == {"expected": 0.0, "p_value": 1.0}
    with pytest.raises(ConfigError, match="marked <= size"):
        random_removal([5], [6], [1], observed=0)


def test_removal_summary_counts() -> None:
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    poison = torch.tensor([1, 1, 0, 0, 0, 0, 0, 0], dtype=torch.bool)
    removed = torch.tensor([1, 0, 1, 0, 1, 0, 0, 0], dtype=torch.bool)
    s = removal_summary(removed, poison, labels)
    assert (s["poisons"], s["removed"], s["poisons_removed"], s["clean_removed"]) == (2, 3, 1, 2)
    assert s["random_poisons_removed"] == pytest.approx(2 * 2 / 4)  # class 0: 2 of 4 removed, 2 poisons
    assert s["random_clean_removed"] == pytest.approx(3 - 1.0)
    assert s["p_value"] == pytest.approx(1 - hypergeom.pmf(0, 4, 2, 2))


def test_quota_and_remove_top() -> None:
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 1)
    assert class_quota(labels, 0.25) == {0: 3, 1: 1, 2: 0}  # 2.5 -> 3, 1.25 -> 1, 0.25 -> 0
    scores = torch.tensor([5.0, 1, 5, 9, 0, 0, 0, 0, 0, 0, 2, 2, 1, 0, 0, 7])
    removed = remove_top(scores, labels, 0.25)
    assert removed.nonzero().squeeze(1).tolist() == [0, 2, 3, 10]  # ties: the lower index
    tiebreak = torch.zeros(16)
    tiebreak[11] = 1.0
    assert remove_top(scores, labels, 0.25, tiebreak=tiebreak).nonzero().squeeze(1).tolist() == [0, 2, 3, 11]


def test_call_shape_errors() -> None:
    f, labels, _ = features("shift")
    spectral = FILTERS.get("spectral")
    with pytest.raises(ConfigError, match="needs a rate"):
        spectral(f, labels, rate=None)
    with pytest.raises(ConfigError, match=r"rate must lie in \(0, 1\)"):
        spectral(f, labels, rate=1.5)
    with pytest.raises(ConfigError, match=r"features \[N, D\] and labels \[N\]"):
        spectral(f, labels[:-1], rate=0.1)
    with pytest.raises(ConfigError, match="options.components"):
        FILTERS.get("activation-clustering")(f, labels, rate=0.1, components=0)
    with pytest.raises(ConfigError, match="options.bogus"):
        FILTERS.get("knn")(f, labels, rate=0.1, bogus=1)
    with pytest.raises(ConfigError, match="needs more than k"):
        FILTERS.get("knn")(f[:5], labels[:5], rate=None, k=5)
    with pytest.raises(ConfigError, match="valid"):
        FILTERS.get("nope")


def test_training_features_are_the_penultimate_layer_of_the_view() -> None:
    torch.manual_seed(0)
    data = TensorDataset(torch.rand(30, 1, 4, 4), torch.arange(30) % 3, ("a", "b", "c"))
    model = build_model(ModelSpec(name="mlp"), input_shape=(1, 4, 4), num_classes=3)
    model.train()
    view = DataView.identity(data).with_labels([0], 2).with_keep(torch.arange(30) != 4)
    kept, feats, labels = training_features(model, view, batch_size=7)
    assert kept.tolist() == [i for i in range(30) if i != 4] and labels[0] == 2
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    box: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda mod, inp, out: box.append(inp[0]))
    with torch.no_grad():
        model.eval()
        model(data.x[kept])
        model.train()
    handle.remove()
    assert torch.allclose(feats, box[0].flatten(1), atol=1e-6) and feats.device.type == "cpu"
    assert model.training  # the query restores the mode
