"""Canary scores of the distinguishing game: the white-box parameter update along the canary."""

from __future__ import annotations

import functools

import numpy as np
import torch

from mlaudit.audit.canaries import crafted_canary
from mlaudit.audit.scores import update_scores
from mlaudit.data import load_dataset
from mlaudit.models.registry import build_model
from mlaudit.train.loop import init_models


def logistic_fn():
    return functools.partial(build_model, "logistic", input_shape=(1, 8, 8), num_classes=10)


def test_update_scores_of_an_input_canary_follow_its_gradient() -> None:
    """score = <theta_T - theta_0, g / ||g||>: a final model moved against the canary gradient by t has
    score -t; one moved along it, +t."""
    b = load_dataset("digits")
    c = crafted_canary(b.train, seed=1)
    fn = logistic_fn()
    m0 = init_models(fn, [7])[0]
    loss = torch.nn.functional.cross_entropy(m0(c.x), torch.tensor([c.y]))
    grads = torch.autograd.grad(loss, list(m0.parameters()))
    norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
    finals = [{n: p.detach() + s * 0.3 * g / norm for (n, p), g in zip(m0.named_parameters(), grads)} for s in (-1, 1)]
    scores = update_scores(fn, [7, 7], lambda i: finals[i], c)
    np.testing.assert_allclose(scores, [-0.3, 0.3], rtol=1e-5)
