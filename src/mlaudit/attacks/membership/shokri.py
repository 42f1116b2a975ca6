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

Cost: one attack model per class and target, M * C in all for a pool used leave-one-out. They are
trained *together*: the attack models of all targets and all classes (all classes with the same
number of records, which is every class when ``max_train <= (M - 1) * |class|``) are one batched
network (weights [T * C, ...]; the evaluation inputs [T * C, E, F] zero-padded to the largest class
and cut back) trained full-batch with Adam in torch, on ``device`` (``auto``: CUDA when available),
so ``steps`` Adam steps in all instead of ``steps`` per class; each model's loss, gradient and Adam
state are its own, so batching does not change its result. That is on CUDA (launch-bound); on the
CPU (memory-bound) one class at a time is faster: measured 2026-12-02 on a 2-core CPU, 64 targets,
50,000 examples, ``logistic``: 22.7 s class by class, 50.8 s all classes batched. Each class's training set is a seeded uniform sample of at
most ``max_train`` (shadow, example) records per target (default 5,000) on standardised features.
``classifier="mlp"`` (default; one hidden layer of ``hidden`` ReLU units, as the paper's neural
attack models) or ``"logistic"`` (logistic regression, L2 weight decay). ``steps`` full-batch Adam
steps (lr 0.01). A class whose sampled records are all IN (or all OUT) gets that constant as its
score. Measured on one CPU thread (2026-11-23), 64 targets, 5,000 records of 10 features each:
5.1 s per class with ``logistic`` and 66 s with ``mlp`` (300 steps). The scikit-learn fits used
before, one per (target, class), were measured at 1.3 s (``logistic``) and 6.6 s (``mlp``) per
target for all 10 classes, i.e. about 8 s and 42 s per class for 64 targets (derived, not measured
side by side); a digits pool of 64 took 439 s for the whole attack with ``mlp``. On the CPU the
batched ``mlp`` is therefore slower; the GPU timing has not been measured yet.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ...errors import ConfigError
from .base import Observations, register_attack
from .signals import softmax_probs, warn_clipped

CLASSIFIERS = ("mlp", "logistic")
"""Attack-model kinds: a one-hidden-layer ReLU network or logistic regression."""


def _check_options(obs: Observations, targets: list[int], query: int, max_train: int, classifier: str,
                   hidden: int, steps: int) -> None:
    for target in targets:
        if not 0 <= target < obs.num_models:
            raise ConfigError(f"target must be a model index in [0, {obs.num_models - 1}], got {target}")
    if obs.num_models < 2:
        raise ConfigError("shokri needs shadow models: the pool has only the target model (M = 1)")
    if not 0 <= query < len(obs.queries):
        raise ConfigError(f"shokri option query must index one of the {len(obs.queries)} queries "
                          f"{list(obs.queries)}, got {query}")
    if classifier not in CLASSIFIERS:
        raise ConfigError(f"shokri option classifier={classifier!r} is unknown; use one of {sorted(CLASSIFIERS)}")
    for name, value in (("max_train", max_train), ("hidden", hidden), ("steps", steps)):
        if int(value) != value or value < 1:
            raise ConfigError(f"shokri option {name} must be a positive integer, got {value!r}")


def fit_predict(x_train: Tensor, y_train: Tensor, x_eval: Tensor, *, hidden: int | None, steps: int,
                seeds: list[int], lr: float = 0.01, weight_decay: float = 1e-4) -> Tensor:
    """Train T independent binary classifiers at once and return P(y = 1) on ``x_eval``.

    ``x_train`` [T, R, F], ``y_train`` [T, R] (0/1), ``x_eval`` [T, E, F] -> [T, E] float64.
    Features are standardised with each classifier's own training mean and std. ``hidden`` None
    gives logistic regression, else one hidden ReLU layer of that width. Classifier t is
    initialised from ``seeds[t]`` alone, so its result does not depend on the others. Full-batch
    Adam for ``steps`` steps on the mean binary cross-entropy (+ L2 ``weight_decay`` on weights).
    """
    t, _, f = x_train.shape
    x_train, x_eval = x_train.float(), x_eval.float()
    mu = x_train.mean(1, keepdim=True)
    sd = x_train.std(1, keepdim=True).clamp_min(1e-6)
    xs, xe = (x_train - mu) / sd, (x_eval - mu) / sd
    y = y_train.float()
    shapes = [(f, hidden), (hidden,), (hidden,), ()] if hidden else [(f,), ()]
    params = []
    for shape in shapes:
        rows = []
        for seed in seeds:
            g = torch.Generator().manual_seed(int(seed) * 7919 + len(params))
            fan_in = shape[0] if len(shape) == 2 else (hidden if len(params) == 2 else f)
            rows.append((torch.rand(shape, generator=g) * 2 - 1) / fan_in ** 0.5 if shape else torch.zeros(()))
        params.append(torch.stack(rows).to(x_train.device).requires_grad_(True))

    def logits(x: Tensor) -> Tensor:  # batched matmuls with the bias fused (baddbmm): no [T, R, H] products
        if hidden:
            w1, b1, w2, b2 = params
            h = torch.relu(torch.baddbmm(b1[:, None], x, w1))  # [T, R, H]
            return torch.baddbmm(b2[:, None, None], h, w2[:, :, None]).squeeze(-1)
        w, b = params
        return torch.baddbmm(b[:, None, None], x, w[:, :, None]).squeeze(-1)

    opt = torch.optim.Adam(params, lr=lr)
    weights = [params[0]] + ([params[2]] if hidden else [])
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = F.binary_cross_entropy_with_logits(logits(xs), y, reduction="none").mean(1).sum()
            loss = loss + weight_decay * sum(w.pow(2).sum() for w in weights)
            loss.backward()
            opt.step()
    with torch.no_grad():
        return torch.sigmoid(logits(xe)).double()


def shokri_all_targets(obs: Observations, *, query: int = 0, max_train: int = 5000,
                       classifier: Literal["mlp", "logistic"] = "mlp", hidden: int = 32, steps: int = 300,
                       seed: int = 0, device: str = "auto") -> Tensor:
    """Scores [M, N] with every model as the target, all attack models of a class trained at once
    (row m equals ``shokri(obs, m, ...)`` up to float rounding)."""
    return _shokri(obs, list(range(obs.num_models)), query=query, max_train=max_train, classifier=classifier,
                   hidden=hidden, steps=steps, seed=seed, device=device)


@register_attack("shokri", all_targets=shokri_all_targets)
def shokri(obs: Observations, target: int, *, query: int = 0, max_train: int = 5000,
           classifier: Literal["mlp", "logistic"] = "mlp", hidden: int = 32, steps: int = 300,
           seed: int = 0, device: str = "auto") -> Tensor:
    """Shokri et al.'s per-class shadow attack: scores float64 [N] = P(IN | target's softmax vector).

    Args:
        obs: the pool's outputs (see :mod:`.base`); shadows are all models except ``target``.
        target: index of the attacked model.
        query: which augmented query's softmax vector is the feature (default 0).
        max_train: most (shadow, example) training records per class (seeded uniform sample).
        classifier: ``"mlp"`` or ``"logistic"`` (see the module docstring).
        hidden, steps: MLP width and full-batch Adam steps.
        seed: seeds the record sample and the attack models (same seed, same scores).
        device: where the attack models train (``auto``: CUDA when available, else CPU).
    """
    return _shokri(obs, [target], query=query, max_train=max_train, classifier=classifier, hidden=hidden,
                   steps=steps, seed=seed, device=device)[0]




def _shokri(obs: Observations, targets: list[int], *, query: int, max_train: int, classifier: str, hidden: int,
            steps: int, seed: int, device: str) -> Tensor:
    _check_options(obs, targets, query, max_train, classifier, hidden, steps)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    probs, clipped = softmax_probs(obs.logits[:, :, query])  # [M, N, C]
    warn_clipped(clipped, probs.shape[0] * probs.shape[1], attack="shokri")
    probs = probs.float().to(device)
    labels = obs.labels.cpu().numpy()
    keep = obs.keep.cpu().numpy().astype(bool)  # keep[target] is never read for that target
    m = obs.num_models
    scores = torch.zeros(len(targets), obs.num_examples, dtype=torch.float64)
    groups: dict[int, list[tuple[np.ndarray, Tensor, Tensor, Tensor, dict[int, float], list[int]]]] = {}
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        xs, ys, consts = [], [], {}
        for j, t in enumerate(targets):
            shadows = np.array([i for i in range(m) if i != t])
            rng = np.random.default_rng([seed, t, int(c)])  # per (target, class): independent of the others
            n_pairs = len(shadows) * len(idx)
            pick = rng.choice(n_pairs, size=min(max_train, n_pairs), replace=False)
            s_row, n_col = shadows[pick // len(idx)], idx[pick % len(idx)]
            y = keep[s_row, n_col]
            if y.all() or not y.any():
                consts[j] = float(y.mean())
            xs.append(probs[torch.from_numpy(s_row).to(device), torch.from_numpy(n_col).to(device)])
            ys.append(torch.from_numpy(y))
        r = min(len(x) for x in xs)  # equal when max_train <= (M - 1) * |class|, as usual
        x_train = torch.stack([x[:r] for x in xs])
        y_train = torch.stack([y[:r] for y in ys]).to(x_train.device)
        x_eval = probs[torch.tensor(targets, device=device)][:, torch.from_numpy(idx).to(device)]
        groups.setdefault((r, int(c)) if torch.device(device).type == "cpu" else (r, -1), []).append((idx, x_train, y_train, x_eval, consts,
                                         [seed * 1_000_003 + t * 101 + int(c) for t in targets]))
    for group in groups.values():  # CUDA: the classes with as many records, all T * C' models in one fit
        e = max(g[3].shape[1] for g in group)
        x_eval = torch.cat([F.pad(g[3], (0, 0, 0, e - g[3].shape[1])) for g in group])  # [T * C', E, F], 0-padded
        p = fit_predict(torch.cat([g[1] for g in group]), torch.cat([g[2] for g in group]), x_eval,
                        hidden=hidden if classifier == "mlp" else None, steps=steps,
                        seeds=[s for g in group for s in g[5]]).cpu()
        for i, (idx, _, _, _, consts, _) in enumerate(group):
            pc = p[i * len(targets):(i + 1) * len(targets), :len(idx)]
            for j, v in consts.items():
                pc[j] = v
            scores[:, torch.from_numpy(idx)] = pc
    return scores
