"""Targeted-poisoning scenarios as data: which test image is the target, which class it should be
classified as, and which training images carry the poison (seed 002, section 1.7).

The paper's methodology: for each of n experiments draw, from that experiment's random seed, a random
target class, a random *different* poison (= adversarial) class, a random target image of the target
class from the test set and random training images of the poison class to be poisoned; evaluate each
poisoned dataset on m victims and report the mean +- standard error over the n per-scenario success
rates. The paper's CIFAR-10 seeds are 2000000000, 2100000000, 2110000000, ..., 2111111111:
:func:`scenario_seeds` gives that series for any base seed (``base + 10**9 * 0.1...``, i.e. the i-th
seed replaces the first i zeros after the leading digit by ones), continuing with ``+ 1, + 2, ...``
after the tenth. The draws themselves (numpy ``default_rng``) are mlaudit's own, so the target ids
differ from the paper's tables; they are reproducible from the seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from torch import Tensor

from ....errors import ConfigError


@dataclass(frozen=True)
class Scenario:
    """One threat-model instance. ``target_ids`` index the test split (one id, or several for the
    multi-target setting of section 1.5.11, all of ``target_class``); ``poison_ids`` index the
    training split (images of ``poison_class`` whose pixels the attacker may perturb); the attack
    wants every target classified as ``adv_class`` (= ``poison_class``)."""

    index: int
    seed: int | None
    target_class: int
    poison_class: int
    target_ids: tuple[int, ...]
    poison_ids: tuple[int, ...]

    @property
    def adv_class(self) -> int:
        return self.poison_class

    def to_dict(self, classes: Sequence[str] | None = None) -> dict[str, Any]:
        d = asdict(self)
        d["target_ids"], d["poison_ids"] = list(self.target_ids), list(self.poison_ids)
        if classes is not None:
            d["target_class_name"] = classes[self.target_class]
            d["poison_class_name"] = classes[self.poison_class]
        return d


def scenario_seeds(base: int, n: int) -> list[int]:
    """The paper's seed series: base, base + 1e8, base + 1.1e8, ..., base + 111111111, then + 1, ...

    >>> scenario_seeds(2000000000, 3)
    [2000000000, 2100000000, 2110000000]
    """
    out = []
    for i in range(n):
        if i < 10:
            out.append(base + (int("1" * i) * 10 ** (9 - i) if i else 0))
        else:
            out.append(base + 111111111 + (i - 9))
    return out


def poison_count(budget: float, n_train: int) -> int:
    """P = round(budget * N) poisons (at least 1): 1% of CIFAR-10's 50k images is 500."""
    return max(1, int(round(budget * n_train)))


def sample_scenario(index: int, seed: int, *, train_y: Tensor, test_y: Tensor, num_classes: int, budget: float,
                    targets: int = 1) -> Scenario:
    """Draw one scenario from ``seed`` (see the module docstring).

    Raises :class:`ConfigError` when the poison class has fewer than P training images or the target
    class fewer than ``targets`` test images (the message says which class and how many exist).
    """
    if num_classes < 2:
        raise ConfigError(f"targeted poisoning needs >= 2 classes, the dataset has {num_classes}")
    rng = np.random.default_rng(seed)
    ytr, yte = train_y.cpu().numpy(), test_y.cpu().numpy()
    target_class = int(rng.integers(num_classes))
    poison_class = int((target_class + 1 + rng.integers(num_classes - 1)) % num_classes)
    cand_t = np.flatnonzero(yte == target_class)
    cand_p = np.flatnonzero(ytr == poison_class)
    p = poison_count(budget, len(ytr))
    if len(cand_t) < targets:
        raise ConfigError(f"scenario {index} (seed {seed}): target class {target_class} has {len(cand_t)} test "
                          f"images, fewer than attack.targets = {targets}")
    if len(cand_p) < p:
        raise ConfigError(f"attack.budget = {budget} means {p} poisons, but poison class {poison_class} of scenario "
                          f"{index} (seed {seed}) has only {len(cand_p)} training images; lower the budget to at most "
                          f"{len(cand_p) / len(ytr):.4g}")
    target_ids = tuple(int(i) for i in np.sort(rng.choice(cand_t, size=targets, replace=False)))
    poison_ids = tuple(int(i) for i in np.sort(rng.choice(cand_p, size=p, replace=False)))
    return Scenario(index, seed, target_class, poison_class, target_ids, poison_ids)


def explicit_scenario(index: int, *, target_ids: Sequence[int], poison_class: int, test_y: Tensor, train_y: Tensor,
                      budget: float, num_classes: int, poison_ids: Sequence[int] | None = None,
                      seed: int = 0) -> Scenario:
    """A user-given scenario: targets (test ids) of one class, an adversarial class, and either the
    poison ids (training images of that class) or ``budget`` (random ones drawn with ``seed``).
    Every id, class and count is checked, with an error naming what is wrong."""
    n_test, n_train = len(test_y), len(train_y)
    where = f"scenarios[{index}]"
    if not target_ids:
        raise ConfigError(f"{where}.target_ids is empty; give at least one test-set id")
    bad = [i for i in target_ids if not 0 <= i < n_test]
    if bad:
        raise ConfigError(f"{where}.target_ids {bad} are out of range: the test split has ids 0..{n_test - 1}")
    if not 0 <= poison_class < num_classes:
        raise ConfigError(f"{where}.poison_class = {poison_class} is out of range 0..{num_classes - 1}")
    tcls = {int(test_y[i]) for i in target_ids}
    if len(tcls) != 1:
        raise ConfigError(f"{where}.target_ids must all be of one class, got classes {sorted(tcls)}")
    target_class = tcls.pop()
    if target_class == poison_class:
        raise ConfigError(f"{where}: the target's class ({target_class}) equals poison_class; a targeted attack "
                          "needs a different adversarial class")
    if poison_ids is None:
        cand = np.flatnonzero(train_y.cpu().numpy() == poison_class)
        p = poison_count(budget, n_train)
        if len(cand) < p:
            raise ConfigError(f"attack.budget = {budget} means {p} poisons, but poison class {poison_class} has only "
                              f"{len(cand)} training images")
        poison_ids = np.sort(np.random.default_rng(seed).choice(cand, size=p, replace=False)).tolist()
    else:
        bad = [i for i in poison_ids if not 0 <= i < n_train]
        if bad:
            raise ConfigError(f"{where}.poison_ids {bad[:5]} are out of range: the training split has ids "
                              f"0..{n_train - 1}")
        if len(set(poison_ids)) != len(poison_ids):
            raise ConfigError(f"{where}.poison_ids repeat an id")
        wrong = [i for i in poison_ids if int(train_y[i]) != poison_class]
        if wrong:
            raise ConfigError(f"{where}.poison_ids {wrong[:5]} are not of poison_class {poison_class} (clean-label "
                              "poisons keep their true label, which must be the adversarial class)")
    return Scenario(index, None, target_class, poison_class, tuple(int(i) for i in target_ids),
                    tuple(int(i) for i in poison_ids))
