"""Poison accounting of the two attacks (Carlini & Terzis 2022): exactly p poisoned pairs, only at the declared
indices, with the declared captions; the backdoor trigger only on the declared images; captions and tokens."""

from __future__ import annotations

import pytest
import torch

from mlaudit.attacks.poisoning.backdoor.trigger import TriggerSpec, apply_trigger
from mlaudit.contrastive import CaptionSpace, backdoor_poison, poisons_for_rate, targeted_poison
from mlaudit.contrastive.data import DIGIT_NAMES, DIGIT_TEMPLATES, words
from mlaudit.data.base import TensorDataset
from mlaudit.errors import ConfigError


def clean(n: int = 50):
    g = torch.Generator().manual_seed(0)
    split = TensorDataset(torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % 10, tuple(str(i) for i in range(10)))
    space = CaptionSpace.build(DIGIT_NAMES, DIGIT_TEMPLATES, distractors=2)
    return space, space.pair(split, seed=1)


def test_captions_come_from_the_templates_and_class_names() -> None:
    space, d = clean()
    for c, y, tok in zip(d.captions, d.y.tolist(), d.tokens, strict=True):
        head = " ".join(words(c)[:-2])  # two distractor words at the end
        assert head in {t.format(c=DIGIT_NAMES[y]) for t in DIGIT_TEMPLATES}
        assert torch.equal(tok, space.tokenizer([c])[0]) and int((tok > 1).sum()) == len(words(c))


@pytest.mark.parametrize("p", [1, 3, 16])
def test_targeted_poison_appends_exactly_p_pairs_of_the_target_image_and_class(p: int) -> None:
    space, d = clean()
    image = torch.rand(1, 8, 8)
    out, rec = targeted_poison(d, image, 7, space, poisons=p, seed=3)
    n = len(d)
    assert len(out) == n + p and torch.equal(rec.indices, torch.arange(n, n + p)) and rec.inserted
    assert torch.equal(out.x[:n], d.x) and out.captions[:n] == d.captions and torch.equal(out.tokens[:n], d.tokens)
    assert all(torch.equal(out.x[i], image) for i in rec.indices.tolist())
    assert tuple(out.captions[n:]) == rec.captions and all("seven" in words(c) for c in rec.captions)
    assert torch.equal(out.tokens[n:], space.tokenizer(list(rec.captions)))


@pytest.mark.parametrize("p", [1, 5, 50])
def test_backdoor_poisons_exactly_the_declared_rows_and_only_them(p: int) -> None:
    space, d = clean()
    trig = TriggerSpec(size=2).build((1, 8, 8))
    out, rec = backdoor_poison(d, trig, 0, space, poisons=p, seed=4)
    assert len(out) == len(d) and rec.indices.numel() == p == len(set(rec.indices.tolist())) and not rec.inserted
    hit = torch.zeros(len(d), dtype=torch.bool)
    hit[rec.indices] = True
    changed_x = (out.x != d.x).flatten(1).any(1)
    assert not changed_x[~hit].any()  # the trigger is on no other image
    assert torch.equal(out.x[hit], apply_trigger(d.x[hit], trig))
    assert torch.equal(out.x[~hit], d.x[~hit]) and torch.equal(out.tokens[~hit], d.tokens[~hit])
    assert [out.captions[i] for i in rec.indices.tolist()] == list(rec.captions)
    assert all("zero" in words(c) for c in rec.captions)
    assert [c for i, c in enumerate(out.captions) if not hit[i]] == [c for i, c in enumerate(d.captions) if not hit[i]]
    assert torch.equal(out.y, d.y)  # image labels (evaluation only) unchanged
    again, rec2 = backdoor_poison(d, trig, 0, space, poisons=p, seed=4)
    assert torch.equal(rec.indices, rec2.indices) and torch.equal(again.x, out.x)  # seeded


def test_budgets() -> None:
    assert poisons_for_rate(0.001, 3_000_000) == 3000 and poisons_for_rate(1e-6, 3_000_000) == 3
    assert poisons_for_rate(0.0001, 1438) == 0 and poisons_for_rate(1 / 1438, 1438) == 1
    space, d = clean()
    with pytest.raises(ConfigError, match="1 <= poisons <= 50"):
        backdoor_poison(d, TriggerSpec(size=2).build((1, 8, 8)), 0, space, poisons=51, seed=0)
