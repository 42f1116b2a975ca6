"""Contrastive training: reproducible from its seed (init and data order), the loss falls, the temperature
stays clamped, and recipe options it does not use are refused."""

from __future__ import annotations

import pytest
import torch

from mlaudit.contrastive import CaptionSpace, build_dual_encoder, init_seeded, train_contrastive
from mlaudit.contrastive.data import DIGIT_NAMES, DIGIT_TEMPLATES
from mlaudit.data.base import TensorDataset
from mlaudit.errors import ConfigError
from mlaudit.train.recipe import resolve_recipe

RECIPE = {"optimizer": "adam", "lr": 0.003, "weight_decay": 0.0, "epochs": 4, "batch_size": 32, "schedule": "cosine"}


def setup():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(120) % 10
    x = (torch.rand(120, 1, 8, 8, generator=g) * 0.3 + (y.view(-1, 1, 1, 1) == torch.arange(64).view(1, 1, 8, 8) % 10)
         .float() * 0.7).clamp(0, 1)  # a class-dependent stripe pattern plus noise
    space = CaptionSpace.build(DIGIT_NAMES, DIGIT_TEMPLATES)
    data = space.pair(TensorDataset(x, y, tuple(str(i) for i in range(10))), seed=0)
    build = lambda: build_dual_encoder("mlp", input_shape=(1, 8, 8), vocab_size=space.tokenizer.vocab_size,  # noqa: E731
                                       context_length=space.tokenizer.context_length, embed_dim=16, text_width=16,
                                       text_layers=1, text_heads=2)
    return data, build


def test_same_seed_same_weights_and_the_loss_falls() -> None:
    data, build = setup()
    runs = []
    for seed in (3, 3, 4):
        m = init_seeded(build, seed)
        losses: list[float] = []
        train_contrastive(m, data, resolve_recipe(RECIPE), seed=seed, on_epoch=lambda e, v, out=losses: out.append(v))
        runs.append((m.state_dict(), losses))
    (a, la), (b, lb), (c, _) = runs
    assert la == lb and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert la[-1] < la[0]
    assert float(a["logit_scale"].exp()) <= 100.0 + 1e-4


def test_unused_recipe_options_are_refused() -> None:
    data, build = setup()
    with pytest.raises(ConfigError, match="drop recipe.dp"):
        train_contrastive(build(), data, resolve_recipe({**RECIPE, "noise_sigma": 0.1}), seed=0)


def test_a_lone_last_pair_joins_the_batch_before_it() -> None:
    """121 pairs in batches of 40 with a BatchNorm image tower: the last step takes 41 pairs instead of
    stopping on a batch of one (which BatchNorm refuses in training mode and InfoNCE learns nothing from)."""
    data, _ = setup()
    space = CaptionSpace.build(DIGIT_NAMES, DIGIT_TEMPLATES)
    extra = space.pair(TensorDataset(data.x[:1], data.y[:1], tuple(str(i) for i in range(10))), seed=1)
    both = type(data)(torch.cat([data.x, extra.x]), data.captions + extra.captions,
                      torch.cat([data.tokens, extra.tokens]), torch.cat([data.y, extra.y]))
    assert len(both) == 121
    m = init_seeded(lambda: build_dual_encoder({"name": "mlp", "norm": "batch"}, input_shape=(1, 8, 8),
                                               vocab_size=space.tokenizer.vocab_size,
                                               context_length=space.tokenizer.context_length, embed_dim=16,
                                               text_width=16, text_layers=0), 0)
    loss = train_contrastive(m, both, resolve_recipe({**RECIPE, "epochs": 1, "batch_size": 40}), seed=0)
    assert loss == loss and loss > 0
