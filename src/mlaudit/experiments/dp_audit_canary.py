"""Pieces of the ``dp-audit`` kind: canaries, user trainers, canary scores and the distinguishing
test (threshold on one half of the models, false positives / negatives on the other half).

Canaries are registered in :data:`CANARIES` as ``make(train: TensorDataset, *, seed) -> Canary``.
Only ``mislabeled`` exists so far (a natural training example inserted once more with a wrong
label); the input-space (crafted) and gradient (white-box, Dirac) canaries of issue 6 are not
implemented yet.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ..data.base import TensorDataset
from ..errors import ConfigError
from ..registry import Registry
from ..stats import eps_lower_bound

TRAINER_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
MIN_USEFUL_EPS = 0.01
"""A best-case lower bound below this is "no bound": the audit is refused as too small."""


@dataclass(frozen=True)
class Canary:
    """The example that D' = D + {canary} adds: ``x`` float32 [1, *shape], label ``y`` (the wrong
    one for ``mislabeled``), and where it came from (``source_index`` into the training split and
    its true label ``source_label``; -1 when crafted)."""

    x: Tensor
    y: int
    source_index: int
    source_label: int


CANARIES: Registry[Callable[..., Canary]] = Registry("canary")


@CANARIES.register("mislabeled")
def mislabeled_canary(train: TensorDataset, *, seed: int) -> Canary:
    """A training example chosen with ``seed``, relabelled to a different class chosen with ``seed``."""
    c = len(train.classes)
    if c < 2:
        raise ConfigError(f"canary mislabeled needs >= 2 classes, the dataset has {c}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x43414E]))
    i = int(rng.integers(len(train)))
    y = int(train.y[i])
    wrong = (y + 1 + int(rng.integers(c - 1))) % c
    return Canary(train.x[i : i + 1].clone(), wrong, i, y)


def with_canary(train: TensorDataset, canary: Canary) -> TensorDataset:
    """D' = ``train`` with ``canary`` appended (N + 1 examples)."""
    y = torch.tensor([canary.y], dtype=torch.int64, device=train.y.device)
    return TensorDataset(torch.cat([train.x, canary.x.to(train.x.device)]), torch.cat([train.y, y]), train.classes)


def load_trainer(spec: str) -> Callable[[TensorDataset, int], nn.Module]:
    """Import the user's ``"package.module:function"``; a ConfigError naming what failed otherwise."""
    if not TRAINER_PATTERN.match(spec):
        raise ConfigError(f"trainer = {spec!r} is neither 'mlaudit' nor 'package.module:function' (a function "
                          "train(dataset: mlaudit.data.base.TensorDataset, seed: int) -> torch.nn.Module)")
    mod_name, fn_name = spec.split(":")
    try:
        module = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's module
        raise ConfigError(f"trainer {spec!r}: cannot import module {mod_name!r} ({type(e).__name__}: {e}); "
                          "make it importable (install it, or put its folder on PYTHONPATH)") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"trainer {spec!r}: module {mod_name!r} has no function {fn_name!r}; it must define "
                          "train(dataset, seed) -> torch.nn.Module")
    return fn


@torch.no_grad()
def canary_loss(model: nn.Module, canary: Canary, *, device: str = "cpu") -> float:
    """Black-box score: the model's cross-entropy loss on (canary x, canary label), in eval mode."""
    model = model.to(device).eval()
    logits = model(canary.x.to(device))
    return float(nn.functional.cross_entropy(logits.float(), torch.tensor([canary.y], device=device)))


def best_possible_bound(models_per_side: int, *, delta: float, confidence: float) -> float:
    """eps_LB of a perfect attack (no errors) on the test half of ``models_per_side`` models per side."""
    n = models_per_side - models_per_side // 2
    return eps_lower_bound(0, 0, n, n, delta=delta, alpha=1.0 - confidence)


def models_needed(*, delta: float, confidence: float, at_least: float = MIN_USEFUL_EPS) -> int:
    """Fewest models per side for which a perfect attack gives eps_LB >= ``at_least``."""
    for m in range(2, 1_000_000):
        if best_possible_bound(m, delta=delta, confidence=confidence) >= at_least:
            return m
    return 1_000_000


@dataclass(frozen=True)
class Distinguisher:
    """Outcome of the distinguishing test. "in" = predicted trained on D'; a model is predicted "in"
    when its canary loss is <= ``threshold``. Counts are on the held-out halves."""

    threshold: float
    fp: int
    fn: int
    n_neg: int
    n_pos: int
    epsilon_lower_bound: float
    selection_bound: float

    @property
    def accuracy(self) -> float:
        return 1.0 - (self.fp + self.fn) / (self.n_neg + self.n_pos)


def _best_threshold(loss_in: np.ndarray, loss_out: np.ndarray, *, delta: float, alpha: float) -> tuple[float, float]:
    """Threshold on the canary loss maximising (eps_LB, accuracy) on the selection half."""
    vals = np.unique(np.concatenate([loss_in, loss_out]))
    cands = np.concatenate([[-math.inf], (vals[1:] + vals[:-1]) / 2 if vals.size > 1 else [], [math.inf]])
    best = (-1.0, -1.0, math.inf)
    for t in cands:
        fp, fn = int((loss_out <= t).sum()), int((loss_in > t).sum())
        b = eps_lower_bound(fp, fn, loss_out.size, loss_in.size, delta=delta, alpha=alpha)
        acc = 1.0 - (fp + fn) / (loss_in.size + loss_out.size)
        if (b, acc) > best[:2]:
            best = (b, acc, float(t))
    return best[2], best[0]


def distinguish(loss_in: np.ndarray, loss_out: np.ndarray, *, delta: float, confidence: float,
                seed: int) -> Distinguisher:
    """Split each side's canary losses [M] at random (``seed``) into a selection half (floor(M/2)
    models) and a test half; pick the threshold on the selection half and count errors on the
    test half; eps_LB by :func:`mlaudit.stats.eps_lower_bound` at level alpha = 1 - confidence."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x534C4354]))
    a_in, a_out = rng.permutation(np.asarray(loss_in, float)), rng.permutation(np.asarray(loss_out, float))
    h_in, h_out = a_in.size // 2, a_out.size // 2
    alpha = 1.0 - confidence
    t, sel = _best_threshold(a_in[:h_in], a_out[:h_out], delta=delta, alpha=alpha)
    test_in, test_out = a_in[h_in:], a_out[h_out:]
    fp, fn = int((test_out <= t).sum()), int((test_in > t).sum())
    lb = eps_lower_bound(fp, fn, test_out.size, test_in.size, delta=delta, alpha=alpha)
    return Distinguisher(t, fp, fn, test_out.size, test_in.size, lb, sel)
