"""Label-only membership inference by data-augmentation robustness (Choquette-Choo, Tramer, Carlini
& Papernot 2021, "Label-Only Membership Inference Attacks", ICML, Sec. 4 "data augmentation").

Threat model: the target answers only labels. The attacker queries it on the example and on
augmented copies (translations, mirrors) and counts how many are labelled correctly: training
examples stay correctly classified under the augmentations the model was trained with more often.

``label-augment`` score of (target m, example n) = fraction of the queries ``queries`` (names as in
:mod:`mlaudit.query`, default ``identity`` and the four 1-pixel shifts, the paper's translation
attack with d = 1) on which model m's label equals the true label, float64 [N] in [0, 1]. The paper
then thresholds this count (or trains a small classifier on it with shadow models); the ROC over
thresholds needs only the count. Every query goes through ``obs.oracle`` (labels only). Image data
only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ...errors import ConfigError
from ...query import parse_queries
from .base import Observations, register_attack

DEFAULT_QUERIES = ("identity", "shift:1,0", "shift:-1,0", "shift:0,1", "shift:0,-1")


def needs_oracle(obs: Observations, attack: str):  # noqa: ANN201  (returns the oracle)
    """``obs.oracle`` or a ConfigError saying that this label-only attack queries the models itself."""
    if obs.oracle is None:
        raise ConfigError(f"{attack} is a label-only attack that queries the models itself: Observations.oracle "
                          "(a LabelOracle over the pool's models) is required")
    return obs.oracle


def label_augment_all_targets(obs: Observations, *, queries: Sequence[str] = DEFAULT_QUERIES) -> Tensor:
    """Scores float64 [M, N] of every model as the target (one oracle call per query)."""
    oracle = needs_oracle(obs, "label-augment")
    if oracle.x.dim() != 4:
        raise ConfigError(f"label-augment augments images [N, C, H, W], but the pool inputs have shape "
                          f"{list(oracle.x.shape)}; use label-boundary for vector data")
    parsed = parse_queries(tuple(queries))
    if not parsed:
        raise ConfigError("label-augment option queries must name at least one query")
    y = obs.labels.cpu()
    correct = torch.zeros(oracle.num_models, oracle.x.shape[0], dtype=torch.float64)
    for q in parsed:
        correct += (oracle(q.apply(oracle.x)) == y).double()
    return correct / len(parsed)


@register_attack("label-augment", all_targets=label_augment_all_targets, needs_oracle=True)
def label_augment(obs: Observations, target: int, *, queries: Sequence[str] = DEFAULT_QUERIES) -> Tensor:
    """Fraction of augmented queries the target labels correctly -> float64 [N] (higher = member)."""
    if not 0 <= target < obs.num_models:
        raise ConfigError(f"target must be a model index in [0, {obs.num_models - 1}], got {target}")
    return label_augment_all_targets(obs, queries=queries)[target]
