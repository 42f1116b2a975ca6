"""Label recovery from the last layer's gradient.

For the cross-entropy of logits z = W a + b (softmax p), the gradient w.r.t. the bias of class c is
sum_j (p_jc - y_jc) (scaled by the loss normalisation) and w.r.t. its weight row sum_j (p_jc - y_jc) a_j.

* One input (iDLG, Zhao et al. 2020): p_c - y_c < 0 only for the true class, so the label is the class
  whose bias gradient is negative (without a bias: whose weight-gradient row has a negative sum, exact
  when the features a are non-negative, e.g. after a ReLU).
* A batch: the classes with a negative bias gradient are (nearly always) those present (Wainakh et al.
  2022 call this the sign rule); how many of each follows from sum_j y_jc = sum_j p_jc - g_c / s, with
  the unknown sum_j p_jc estimated as n times the model's mean prediction on public data (the
  impact-and-offset idea of Wainakh et al. and Geng et al. 2021, simplified). Counts are rounded by
  largest remainders to n and every class of the sign rule keeps at least one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...errors import ConfigError
from ...query.features import classification_head
from .base import Observation


def last_linear(model: nn.Module) -> tuple[str, str | None]:
    """Names of the classifier's weight and bias (None without one): the last ``nn.Linear`` of the model
    (:func:`mlaudit.query.classification_head`)."""
    try:
        head = classification_head(model)
    except ConfigError:
        raise ConfigError("label recovery needs a model whose last layer is an nn.Linear (the classifier); "
                          "give the labels instead") from None
    name = next(n for n, m in model.named_modules() if m is head)
    prefix = f"{name}." if name else ""
    return f"{prefix}weight", (f"{prefix}bias" if head.bias is not None else None)


def class_signal(model: nn.Module, obs: Observation) -> Tensor:
    """Per class, the last layer's gradient signal [C]: the bias gradient, else the weight rows' sums."""
    w, b = last_linear(model)
    if b is not None and b in obs.grad:
        return obs.grad[b].detach().float()
    if w not in obs.grad:
        raise ConfigError(f"the observed update has no gradient for the classifier {w!r}")
    return obs.grad[w].detach().float().sum(1)


def idlg_label(model: nn.Module, obs: Observation) -> int:
    """The label of a single input (iDLG): the class with the most negative last-layer signal."""
    return int(class_signal(model, obs).argmin())


def label_counts(model: nn.Module, obs: Observation, *, mean_probs: Tensor | None = None) -> Tensor:
    """How many of the ``obs.inputs`` inputs carry each class: int64 [C] summing to obs.inputs.

    ``mean_probs`` [C]: the model's mean softmax on public data (default uniform). With a bias gradient
    g (sum over users of mean-over-batch gradients) the estimate is n * mean_probs - batch * g."""
    n = obs.inputs
    signal = class_signal(model, obs).cpu()
    c = signal.numel()
    if n == 1:
        out = torch.zeros(c, dtype=torch.long)
        out[int(signal.argmin())] = 1
        return out
    p = torch.full((c,), 1.0 / c) if mean_probs is None else mean_probs.detach().float().cpu()
    present = signal < 0
    _, b = last_linear(model)
    est = (n * p - obs.batch * signal) if b is not None else present.float() * n / max(int(present.sum()), 1)
    est = est.clamp(min=0)
    est = torch.where(present, est.clamp(min=1.0), est)
    return _round_to(est, n, keep=present)


def _round_to(est: Tensor, n: int, *, keep: Tensor) -> Tensor:
    """Largest-remainder rounding of est [C] >= 0 to integers summing to n; then every class in ``keep``
    with a count of 0 takes one from the largest count (while that count exceeds 1)."""
    scaled = est * (n / float(est.sum())) if float(est.sum()) > 0 else torch.full_like(est, n / est.numel())
    out = scaled.floor().long()
    order = torch.argsort(scaled - out.float(), descending=True)
    out[order[: n - int(out.sum())]] += 1
    for c in (keep & (out == 0)).nonzero()[:, 0].tolist():
        top = int(out.argmax())
        if out[top] > 1:
            out[top] -= 1
            out[c] = 1
    return out


def labels_from_counts(counts: Tensor) -> Tensor:
    """Class counts [C] -> sorted labels [sum(counts)] (int64)."""
    return torch.repeat_interleave(torch.arange(counts.numel()), counts.cpu())


def label_accuracy(recovered: Tensor, true: Tensor) -> float:
    """Fraction of the true labels [n] matched by the recovered ones [m] as multisets (order unknown)."""
    c = int(max(int(recovered.max()) if recovered.numel() else 0, int(true.max()))) + 1
    hit = torch.minimum(torch.bincount(recovered.cpu(), minlength=c), torch.bincount(true.cpu(), minlength=c))
    return float(hit.sum()) / max(len(true), 1)
