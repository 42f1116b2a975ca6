"""Truth Serum's poisoning (Tramer, Shokri, San Joaquin, Le, Jagielski, Hong, Carlini 2022, "Truth
Serum: Poisoning Machine Learning Models to Reveal Their Secrets"; seed 000).

Threat model: the adversary may add examples to the training set before training, then gets
black-box access to the trained model and wants to tell whether a target example z was in it. The
poison is ``copies`` copies of z with a wrong label: a model that trains on them but not on z is
confidently wrong on z, one that also holds z is pulled back towards the right label, so the IN and
OUT confidences on z separate. Any membership attack then scores the poisoned models.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...data.base import TensorDataset
from ...data.view import DataView


def truth_serum_view(train_x: Tensor, train_y: Tensor, base: DataView, pool_rows: Tensor, *, targets: int,
                     copies: int, num_classes: int, seed: int) -> tuple[DataView, Tensor, Tensor]:
    """The poisoned view and its targets.

    Picks ``targets`` positions of the pool (seeded, ascending) and inserts ``copies`` copies of each
    target's x [*shape] with one wrong label per target ((y + U{1..K-1}) mod K). Returns
    ``(view, target positions in the pool int64 [T], wrong labels int64 [T])``; the inserted
    examples have virtual indices N_train .. N_train + T * copies - 1.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5345_5255]))
    pos = torch.from_numpy(np.sort(rng.choice(pool_rows.numel(), size=targets, replace=False)))
    y = train_y[pool_rows[pos]]
    wrong = (y + torch.from_numpy(rng.integers(1, num_classes, size=targets))) % num_classes
    x = train_x[pool_rows[pos]].repeat_interleave(copies, 0)
    view = base.with_inserted(x, wrong.repeat_interleave(copies)).with_meta(method="truth-serum", copies=copies)
    return view, pos, wrong


# ------------------------------------------------------------------------------------ attribute inference
# Truth Serum, sec. "attribute inference" (Tramer et al. 2022): a target record z = (x, y) of the training
# set has one sensitive categorical attribute a (one of k values) that the adversary does not know; it knows
# every other feature of x and the label y. Without poisoning, it completes x with each candidate value v and
# guesses the completion the model fits best (lowest loss on y). With poisoning, before training it adds
# ``copies`` copies of every completion x[a = v], v = 1..k, each with a wrong label: every completion is
# pushed away from y, except the true one, which the training set also holds with its right label, so the
# true value stands out. The attribute is a one-hot block of k columns of a vector input x [d].


def completions(x: Tensor, start: int, k: int) -> Tensor:
    """x [T, d] -> [T, k, d]: each row with its one-hot block x[:, start:start + k] set to each of the k
    values in turn."""
    if x.dim() != 2 or not 0 <= start <= x.shape[1] - k or k < 2:
        raise ValueError(f"completions: x must be [T, d] with a one-hot block of k >= 2 columns inside it; got "
                         f"shape {list(x.shape)}, start {start}, k {k}")
    out = x.unsqueeze(1).repeat(1, k, 1)
    out[:, :, start:start + k] = torch.eye(k, dtype=x.dtype)
    return out


def attribute_scores(model: torch.nn.Module, x: Tensor, y: Tensor, start: int, k: int, *,
                     batch_size: int = 4096) -> Tensor:
    """[T, k]: the model's log-probability of each target's label y [T] at each completion of x [T, d]
    (higher = fits better); the guess is the argmax."""
    from ...query import forward_batched

    c = completions(x, start, k)
    logits = forward_batched(model, c.flatten(0, 1), batch_size=batch_size).float().cpu()
    logp = torch.log_softmax(logits, 1).view(len(x), k, -1)
    return logp.gather(2, y.cpu().view(-1, 1, 1).expand(-1, k, 1)).squeeze(2)


def truth_serum_attribute_poisons(x: Tensor, y: Tensor, start: int, k: int, *, copies: int, num_classes: int,
                                  seed: int) -> tuple[Tensor, Tensor]:
    """The poisons for targets (x [T, d], y [T]): ``copies`` copies of each of the k completions of each
    target, labelled with one wrong class per target ((y + U{1..K-1}) mod K, seeded): x [T * k * copies, d],
    y [T * k * copies]."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x4154_5452]))
    wrong = (y.cpu() + torch.from_numpy(rng.integers(1, num_classes, size=len(y)))) % num_classes
    c = completions(x.cpu(), start, k)  # [T, k, d]
    px = c.repeat_interleave(copies, 1).flatten(0, 1)
    py = wrong.repeat_interleave(k * copies)
    return px, py


def with_random_attribute(data: TensorDataset, k: int, *, seed: int) -> TensorDataset:
    """``data`` with k one-hot columns appended to its flattened inputs: a categorical attribute drawn
    uniformly and independently of everything else (seeded), so only memorisation can reveal it;
    x [N, d] -> [N, d + k], the attribute block at columns d .. d + k - 1."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(k, (len(data),), generator=g)
    x = torch.cat([data.x.flatten(1), torch.nn.functional.one_hot(a, k).to(data.x.dtype)], 1)
    return TensorDataset(x, data.y, data.classes)


def attribute_inference(train: TensorDataset, *, start: int, k: int, targets: int = 50, copies: int = 4,
                        model: str | dict = "mlp", recipe: str | dict = "fast", seeds: Sequence[int] = (0, 1, 2),
                        device: str = "cpu") -> dict[str, Any]:
    """Truth Serum's attribute inference, with and without poisoning, on a training set whose inputs carry a
    one-hot attribute block at columns start .. start + k - 1. ``targets`` training rows (seeded) are the
    targets; per seed one model is trained on ``train`` and one on ``train`` plus the poisons
    (:func:`truth_serum_attribute_poisons`, ``copies`` per completion); the guess is the completion with the
    highest log-probability of the label. Returns the guessing accuracy (mean ± SE over seeds) ``without``
    and ``with`` poisoning and in the ``control`` (poisoned, the targets left out of training: the rate a
    guess reaches without the secret), the chance rate 1/k and the number of poisons."""
    from ...models.registry import build_model
    from ...stats import MeanSE
    from ...train.api import train as fit
    from ...train.loop import init_models

    if not 1 <= targets <= len(train):
        raise ValueError(f"targets = {targets}; allowed 1 <= targets <= {len(train)} (the training rows)")
    rng = np.random.default_rng(np.random.SeedSequence([len(train), targets, 0x5441]))
    rows = torch.from_numpy(np.sort(rng.choice(len(train), size=targets, replace=False)))
    x, y = train.x[rows], train.y[rows]
    truth = x[:, start:start + k].argmax(1)
    px, py = truth_serum_attribute_poisons(x, y, start, k, copies=copies, num_classes=len(train.classes), seed=0)
    poisoned = DataView.identity(train).with_inserted(px, py)
    keep = torch.ones(poisoned.num_total, dtype=torch.bool)
    keep[rows] = False
    control = poisoned.with_keep(keep)  # the same poisons, the targets left out: nothing to reveal
    acc: dict[str, list[float]] = {"without": [], "with": [], "control": []}
    for s in seeds:
        for name, view in (("without", None), ("with", poisoned), ("control", control)):
            net = init_models(lambda: build_model(model, input_shape=train.shape, num_classes=len(train.classes)),
                              [s])[0]
            net = fit(net, train, recipe, seed=s, device=device, view=view)
            guess = attribute_scores(net, x, y, start, k).argmax(1)
            acc[name].append(float((guess == truth).float().mean()))
    return {"chance": 1 / k, "targets": targets, "k": k, "copies": copies, "poisons": len(py),
            **{name: MeanSE.of(v).to_dict() for name, v in acc.items()}, "per_seed": acc}
