"""Split-view and frontrunning simulations and the split-view cost model (mlaudit.attacks.web)."""

from __future__ import annotations

import math

import pytest
import torch

from mlaudit.attacks.web import (
    fetched_training_set,
    simulate_frontrunning,
    simulate_split_view,
    split_view_cost,
)
from mlaudit.attacks.web.frontrunning import exponential_reverts
from mlaudit.errors import ConfigError


def test_split_view_hash_check_keeps_every_poison_out() -> None:
    items = [bytes([i % 256]) * 32 for i in range(200)]
    res = simulate_split_view(items, attacker_fraction=0.05, link_rot=0.1, seed=1)
    s = res.summary()
    assert s["attacker_controlled"] == 10 and s["link_rot"] == 20
    assert s["poisoned_in_training_set_unverified"] == 10  # the unchecked client trains on every poison
    assert s["poisoned_in_training_set_verified"] == 0
    assert s["rejected_verified"] == 10 and s["unavailable"] == 20 and s["clean_accepted_verified"] == 170


def test_split_view_bad_input() -> None:
    with pytest.raises(ConfigError, match="attacker_fraction"):
        simulate_split_view([b"a"], attacker_fraction=1.5)
    with pytest.raises(ConfigError, match="<= 1"):
        simulate_split_view([b"a"], attacker_fraction=0.6, link_rot=0.6)


def test_frontrunning_matches_the_closed_form() -> None:
    """Exact predictions (no error): captured iff R > lead; with R ~ Exp(mean m), P = exp(-lead / m)."""
    mean, lead = 600.0, 300.0
    res = simulate_frontrunning(pages=10_000, attacked=20_000 // 2, lead=lead, reverts=exponential_reverts(mean),
                                trust_delay=3600.0, window=86_400.0, seed=0)
    want = math.exp(-lead / mean)
    se = math.sqrt(want * (1 - want) / res.attacked)
    assert abs(res.captured["none"] - want) < 5 * se
    # the trust delay (an edit must have stood an hour) leaves only edits older than an hour still live
    assert res.captured["trust_delay"] == 0.0  # age == lead < delay: never captured
    assert res.captured["random_order"] < res.captured["none"] / 10
    assert res.dataset_fraction("none") == pytest.approx(res.captured["none"] * res.attacked / res.pages)


def test_frontrunning_with_trust_delay_needs_reverts_slower_than_the_delay() -> None:
    g_mean = 7200.0
    res = simulate_frontrunning(pages=1000, attacked=1000, lead=3700.0, reverts=exponential_reverts(g_mean),
                                trust_delay=3600.0, seed=3)
    want = math.exp(-3700.0 / g_mean)
    assert abs(res.captured["trust_delay"] - want) < 5 * math.sqrt(want * (1 - want) / 1000)


def test_frontrunning_bad_input() -> None:
    with pytest.raises(ConfigError, match="attacked"):
        simulate_frontrunning(pages=10, attacked=11, lead=1.0, reverts=exponential_reverts(1.0))
    with pytest.raises(ConfigError, match="lead"):
        simulate_frontrunning(pages=10, attacked=1, lead=-1.0, reverts=exponential_reverts(1.0))
    with pytest.raises(ConfigError, match="non-negative"):
        simulate_frontrunning(pages=10, attacked=2, lead=1.0, reverts=lambda n, g: -torch.ones(n))


def test_split_view_cost_buys_the_most_urls_per_dollar_first() -> None:
    urls = [f"http://a.com/{i}" for i in range(6)] + [f"http://b.com/{i}" for i in range(2)] + \
           [f"http://c.com/{i}" for i in range(2)]
    out = split_view_cost(urls, {"a.com": 12.0, "b.com": 1.0, "c.com": 10.0}, target_fraction=0.2)
    assert out["domains"] == ["b.com"] and out["usd"] == 1.0 and out["reachable"]
    out = split_view_cost(urls, {"a.com": 12.0, "b.com": 1.0}, target_fraction=0.9)
    assert not out["reachable"] and out["max_fraction"] == pytest.approx(0.8)
    with pytest.raises(ConfigError, match="target_fraction"):
        split_view_cost(urls, {}, target_fraction=0)


def test_split_view_attacker_buys_only_eligible_urls_and_clients_train_on_the_index_labels() -> None:
    """With ``eligible`` (e.g. the target class's URLs) every controlled URL is eligible; the unchecked
    client's training set holds the attacker's content under the index's labels, the checking client's none
    of it; the decoded tensors and labels line up with the manifest positions."""
    n = 60
    items = [torch.full((1, 2, 2), i / n).numpy().tobytes() for i in range(n)]
    labels = [i % 3 for i in range(n)]
    eligible = [lab == 0 for lab in labels]
    res = simulate_split_view(items, attacker_fraction=0.1, labels=labels, eligible=eligible, seed=3,
                              poison=lambda i, b: torch.full((1, 2, 2), 9.0).numpy().tobytes())
    assert int(res.controlled.sum()) == 6 and all(eligible[i] for i in torch.nonzero(res.controlled).flatten())

    def decode(b: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(b), dtype=torch.float32).view(1, 2, 2)

    x_u, y_u, idx_u = fetched_training_set(res.unverified, res.manifest, decode)
    x_v, y_v, idx_v = fetched_training_set(res.verified, res.manifest, decode)
    poisoned = (x_u == 9.0).flatten(1).all(1)
    assert int(poisoned.sum()) == 6 and bool((y_u[poisoned] == 0).all())
    assert not bool((x_v == 9.0).any()) and len(idx_v) == n - 6
    assert torch.equal(y_v, torch.tensor([labels[i] for i in idx_v.tolist()]))
    assert torch.allclose(x_v[:, 0, 0, 0], idx_v.float() / n)
    with pytest.raises(ConfigError, match="only 20 are eligible"):
        simulate_split_view(items, attacker_fraction=0.5, eligible=eligible)
