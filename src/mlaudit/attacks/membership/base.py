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

Optional, for attacks that need more than the pool's logits:
    population_logits  float32 [M, Z, A, C]  every model's logits on Z population examples that no
                                             model trained on (RMIA's reference population z)
    population_labels  int64   [Z]
    oracle             :class:`~.oracle.LabelOracle`: label-only query access to the M models on
                       inputs of the attack's choosing (label-only attacks), with the pool inputs
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from ...errors import DataError
from ...registry import Registry

if TYPE_CHECKING:
    from .oracle import LabelOracle


@dataclass(frozen=True, eq=False)
class Observations:
    """Model outputs on the data pool; see the module docstring for shapes."""

    logits: Tensor
    labels: Tensor
    keep: Tensor
    queries: tuple[str, ...] = ("identity",)
    meta: dict[str, Any] = field(default_factory=dict)
    population_logits: Tensor | None = None
    population_labels: Tensor | None = None
    oracle: LabelOracle | None = None

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
        pop, pop_y = self.population_logits, self.population_labels
        if (pop is None) != (pop_y is None):
            raise DataError("population_logits and population_labels go together: give both or neither")
        if pop is not None and pop_y is not None:
            if pop.dim() != 4 or pop.shape[0] != m or pop.shape[2:] != self.logits.shape[2:]:
                raise DataError(f"population_logits must be [M={m}, Z, A={a}, C={self.logits.shape[3]}], got shape "
                                f"{list(pop.shape)}")
            if tuple(pop_y.shape) != (pop.shape[1],):
                raise DataError(f"population_labels must be [Z={pop.shape[1]}], got shape {list(pop_y.shape)}")
        if self.oracle is not None and self.oracle.num_models != m:
            raise DataError(f"the label oracle answers for {self.oracle.num_models} models but logits hold {m}")

    @property
    def num_models(self) -> int:
        return int(self.logits.shape[0])

    @property
    def num_examples(self) -> int:
        return int(self.logits.shape[1])


class AttackFn(Protocol):
    """The uniform call of a membership attack: ``attack(obs, target, **options) -> scores`` float
    [N] for the target model index ``target`` (higher = more likely a member)."""

    def __call__(self, obs: Observations, target: int, /, *args: Any, **options: Any) -> Tensor: ...


class AllTargetsFn(Protocol):
    """Every model as the target at once: ``all_targets(obs, **options) -> scores`` [M, N], row m
    equal to ``attack(obs, m, **options)`` (up to float rounding)."""

    def __call__(self, obs: Observations, /, *args: Any, **options: Any) -> Tensor: ...


@dataclass(frozen=True)
class MembershipAttack:
    """A registered attack: ``score`` (the uniform call, :class:`AttackFn`) and ``all_targets``
    (:class:`AllTargetsFn`, when scoring all M targets together is cheaper than M calls; None: M
    calls); ``requirements(**options) -> (IN, OUT)``, the fewest leave-one-out reference models every
    example needs per target under these options (None: no per-example need); ``needs_oracle``: the
    attack queries the models itself through ``obs.oracle`` (label-only attacks). Calling the entry calls ``score``; its signature is ``score``'s (options are checked
    against it)."""

    name: str
    score: AttackFn
    all_targets: AllTargetsFn | None = None
    requirements: Callable[..., tuple[int, int]] | None = None
    needs_oracle: bool = False

    def __call__(self, obs: Observations, target: int, /, **options: Any) -> Tensor:
        return self.score(obs, target, **options)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.score)

    def required(self, **options: Any) -> tuple[int, int]:
        """Fewest (IN, OUT) leave-one-out reference models per example under ``options``."""
        return self.requirements(**options) if self.requirements is not None else (0, 0)

    def score_all(self, obs: Observations, **options: Any) -> Tensor:
        """Scores [M, N] of every model as the target (``all_targets`` when there is one)."""
        if self.all_targets is not None:
            return self.all_targets(obs, **options)
        return torch.stack([self.score(obs, m, **options) for m in range(obs.num_models)])


ATTACKS: Registry[MembershipAttack] = Registry("membership attack")


def register_attack(name: str, *, all_targets: AllTargetsFn | None = None,
                    requirements: Callable[..., tuple[int, int]] | None = None,
                    needs_oracle: bool = False) -> Callable[[AttackFn], AttackFn]:
    """Decorator registering ``fn`` (an :class:`AttackFn`) as attack ``name``, with its optional
    all-targets form, reference-model requirements and oracle need; returns ``fn`` unchanged."""

    def deco(fn: AttackFn) -> AttackFn:
        ATTACKS.register(name)(MembershipAttack(name, fn, all_targets, requirements, needs_oracle))
        return fn

    return deco
