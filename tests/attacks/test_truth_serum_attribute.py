"""Truth Serum's attribute inference (Tramer et al. 2022): completions, poisons, and the effect on digits
with a random categorical attribute that only memorisation can reveal."""

from __future__ import annotations

import pytest
import torch

from mlaudit.attacks.membership.truth_serum import (
    attribute_inference,
    attribute_scores,
    completions,
    truth_serum_attribute_poisons,
    with_random_attribute,
)
from mlaudit.data.registry import load_dataset


def test_completions_set_exactly_the_block() -> None:
    x = torch.arange(12.0).view(2, 6)
    c = completions(x, 2, 3)
    assert c.shape == (2, 3, 6)
    for v in range(3):
        assert c[:, v, 2:5].argmax(1).tolist() == [v, v] and float(c[:, v, 2:5].sum()) == 2
        assert torch.equal(c[:, v, :2], x[:, :2]) and torch.equal(c[:, v, 5:], x[:, 5:])
    with pytest.raises(ValueError, match="one-hot block"):
        completions(x, 5, 3)


def test_poisons_are_every_completion_with_a_wrong_label() -> None:
    x, y = torch.zeros(5, 7), torch.tensor([0, 1, 2, 3, 4])
    px, py = truth_serum_attribute_poisons(x, y, 3, 4, copies=2, num_classes=10, seed=0)
    assert px.shape == (5 * 4 * 2, 7) and py.shape == (40,)
    assert (py.view(5, 8) != y[:, None]).all()  # wrong for its target, one wrong class per target
    assert (py.view(5, 8) == py.view(5, 8)[:, :1]).all()
    assert px.view(5, 8, 7)[:, :, 3:7].argmax(2).tolist() == [[0, 0, 1, 1, 2, 2, 3, 3]] * 5


def test_attribute_scores_pick_the_completion_the_model_prefers() -> None:
    class Prefers(torch.nn.Module):  # the label's logit grows with the attribute value
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = x[:, 2:5].argmax(1).float()
            return torch.stack([a, -a], 1)

    s = attribute_scores(Prefers(), torch.zeros(3, 5), torch.zeros(3, dtype=torch.long), 2, 3)
    assert s.shape == (3, 3) and s.argmax(1).tolist() == [2, 2, 2]


def test_poisoning_reveals_a_random_attribute_that_the_model_only_memorised() -> None:
    d = load_dataset({"name": "digits"})
    train = with_random_attribute(d.train, 4, seed=0)
    r = attribute_inference(train, start=64, k=4, targets=40, copies=2, model={"name": "mlp", "width": 128},
                            recipe={"name": "fast", "epochs": 10}, seeds=[0])
    assert r["poisons"] == 40 * 4 * 2 and r["chance"] == 0.25
    assert r["with"]["mean"] >= 0.9, r  # the poisoned model gives the true completion away
    assert r["with"]["mean"] > r["without"]["mean"] + 0.3, r
    assert r["control"]["mean"] <= 0.5, r  # targets left out: the same poisons reveal nothing
