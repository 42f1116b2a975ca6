"""The shared interface of membership-inference attacks.

Every attack scores every (model, example) pair of a pool of M models trained on random subsets of
a data pool of N examples (Carlini et al. 2022, "Membership Inference Attacks From First
Principles", leave-one-out evaluation): for target model ``m`` the attack may use the target's own
outputs and those of the other M - 1 models, whose inclusion (``keep``) it knows (they are the
attacker's shadow models). It must not read ``keep[m]``.

Threat model: black-box query access to the target's logits (or probabilities) on chosen inputs,
knowledge of the training recipe and architecture, and a data pool from the same distribution.

Shapes:
    logits  float32 [M, N, A, C]   model m's logits on example n under augmented query a
    labels  int64   [N]            true labels
    keep    bool    [M, N]         example n was in model m's training set
    scores  float   [N]            per target: higher = more likely a member
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ...errors import DataError
from ...registry import Registry


@dataclass(frozen=True, eq=False)
class Observations:
    """Model outputs on the data pool; see the module docstring for shapes."""

    logits: Tensor
    labels: Tensor
    keep: Tensor
    queries: tuple[str, ...] = ("identity",)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.logits.dim() != 4:
            raise DataError(f"logits must be [M, N, A, C], got shape {list(self.logits.shape)}")
        m, n, a, _ = self.logits.shape
        if tuple(self.labels.shape) != (n,):
            raise DataError(f"labels must be [N={n}], got shape {list(self.labels.shape)}")
        if tuple(self.keep.shape) != (m, n):
            raise DataError(f"keep must be [M={m}, N={n}], got shape {list(self.keep.shape)}")
        if len(self.queries) != a:
            raise DataError(f"{a} augmented queries in logits but {len(self.queries)} query names")

    @property
    def num_models(self) -> int:
        return int(self.logits.shape[0])

    @property
    def num_examples(self) -> int:
        return int(self.logits.shape[1])


AttackFn = Callable[..., Tensor]
"""``attack(obs, target, **options) -> scores [N]`` for target model index ``target``."""

ATTACKS: Registry[AttackFn] = Registry("membership attack")


def register_attack(name: str) -> Callable[[AttackFn], AttackFn]:
    return ATTACKS.register(name)
