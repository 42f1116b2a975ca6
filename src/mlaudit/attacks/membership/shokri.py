"""The shadow-model attack of Shokri et al. 2017, "Membership Inference Attacks Against Machine
Learning Models" (IEEE S&P), seed 004.

Threat model: black-box access to the target's prediction vector (softmax probabilities) on the
example, the example's label, and shadow models trained by the attacker on data from the same
distribution with known membership. Here the shadows of target m are the other M - 1 models of the
pool and their ``keep`` rows give the IN/OUT labels (``keep[m]`` is never read).

For every class c, an *attack model* is trained on records ``(softmax vector of shadow s on example
n, IN/OUT)`` for the pool examples n of label c (the paper's per-class attack models, Sec. V-A);
the target's vectors on the examples of class c are then scored with the attack model's probability
of IN. The vector is the softmax of augmented query ``query`` (default 0, usually ``identity``).

Cost: one fit per class and target. To keep M up to 64 and N up to 50k practical, each class's
training set is a seeded uniform sample of at most ``max_train`` (shadow, example) records (default
5,000), and the attack model is small: ``classifier="mlp"`` (default; one hidden layer of
``hidden`` ReLU units on standardised features, at most ``max_iter`` Adam epochs, as the paper's
neural attack models) or ``"logistic"`` (logistic regression; faster, weaker). Measured on the CPU
(one thread) for one target of M = 64, N = 50,000, C = 10 random logits: 6.6 s with ``mlp``, 1.3 s
with ``logistic``. A class whose sampled records are all IN (or all OUT) gets that constant as its
score.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor

from ...errors import ConfigError
from .base import Observations, register_attack
from .signals import softmax_probs, warn_clipped


def _mlp(*, hidden: int, max_iter: int, seed: int) -> Any:
    return make_pipeline(StandardScaler(), MLPClassifier((hidden,), max_iter=max_iter, random_state=seed))


def _logistic(*, hidden: int, max_iter: int, seed: int) -> Any:
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=max(max_iter, 100), random_state=seed))


CLASSIFIERS: dict[str, Callable[..., Any]] = {"mlp": _mlp, "logistic": _logistic}
"""Attack-model builders by name (keyword arguments ``hidden``, ``max_iter``, ``seed``)."""


def _check_options(obs: Observations, target: int, query: int, max_train: int, classifier: str,
                   hidden: int, max_iter: int) -> None:
    if not 0 <= target < obs.num_models:
        raise ConfigError(f"target must be a model index in [0, {obs.num_models - 1}], got {target}")
    if obs.num_models < 2:
        raise ConfigError("shokri needs shadow models: the pool has only the target model (M = 1)")
    if not 0 <= query < len(obs.queries):
        raise ConfigError(f"shokri option query must index one of the {len(obs.queries)} queries "
                          f"{list(obs.queries)}, got {query}")
    if classifier not in CLASSIFIERS:
        raise ConfigError(f"shokri option classifier={classifier!r} is unknown; use one of {sorted(CLASSIFIERS)}")
    for name, value in (("max_train", max_train), ("hidden", hidden), ("max_iter", max_iter)):
        if int(value) != value or value < 1:
            raise ConfigError(f"shokri option {name} must be a positive integer, got {value!r}")


@register_attack("shokri")
def shokri(obs: Observations, target: int, *, query: int = 0, max_train: int = 5000,
           classifier: Literal["mlp", "logistic"] = "mlp", hidden: int = 32, max_iter: int = 50,
           seed: int = 0) -> Tensor:
    """Shokri et al.'s per-class shadow attack: scores float64 [N] = P(IN | target's softmax vector).

    Args:
        obs: the pool's outputs (see :mod:`.base`); shadows are all models except ``target``.
        target: index of the attacked model.
        query: which augmented query's softmax vector is the feature (default 0).
        max_train: most (shadow, example) training records per class (seeded uniform sample).
        classifier: ``"mlp"`` or ``"logistic"`` (see the module docstring).
        hidden, max_iter: MLP width and most training epochs.
        seed: seeds the record sample and the attack models (same seed, same scores).
    """
    _check_options(obs, target, query, max_train, classifier, hidden, max_iter)
    probs_t, clipped = softmax_probs(obs.logits[:, :, query])
    warn_clipped(clipped, probs_t.shape[0] * probs_t.shape[1], attack="shokri")
    probs = probs_t.cpu().numpy().astype(np.float32)  # [M, N, C]
    labels = obs.labels.cpu().numpy()
    shadows = np.array([i for i in range(obs.num_models) if i != target])
    keep = obs.keep.cpu().numpy().astype(bool)[shadows]  # [M - 1, N]; keep[target] is not read
    rng = np.random.default_rng(seed)
    scores = np.zeros(obs.num_examples, dtype=np.float64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_pairs = len(shadows) * len(idx)
        pick = rng.choice(n_pairs, size=min(max_train, n_pairs), replace=False)
        s_row, n_col = pick // len(idx), idx[pick % len(idx)]
        x_train, y_train = probs[shadows[s_row], n_col], keep[s_row, n_col]
        if y_train.all() or not y_train.any():
            scores[idx] = float(y_train.mean())
            continue
        model = CLASSIFIERS[classifier](hidden=hidden, max_iter=max_iter, seed=seed + int(c))
        with warnings.catch_warnings():  # few epochs by design; not converging is expected
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(x_train, y_train)
        col = list(model.classes_).index(True)
        scores[idx] = model.predict_proba(probs[target, idx])[:, col]
    return torch.from_numpy(scores)
