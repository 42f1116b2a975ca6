"""Label-only query access to a pool of M models, for label-only membership inference
(Choquette-Choo et al. 2021, "Label-Only Membership Inference Attacks", ICML).

A :class:`LabelOracle` holds the pool's inputs ``x`` [N, *shape] (the attacker's candidate examples)
and a private logits function; the only thing an attack can get from it is ``oracle(x')``: the
argmax label of every model, int64 [M, N'], for inputs of its choosing, either shared by all models
(x' [N', *shape]) or one batch per model (x' [M, N', *shape]). It counts the model queries it answered
(``queries``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ...errors import ConfigError
from ...query import forward_batched
from ...train.stacked import StackedModels


class LabelOracle:
    """``oracle(x') -> labels int64 [M, N']``: the argmax of each model's logits, never the logits."""

    def __init__(self, logits_fn: Callable[[Tensor], Tensor], x: Tensor, num_models: int, *,
                 device: torch.device | str | None = None) -> None:
        self._logits_fn = logits_fn
        self.x = x
        self.num_models = int(num_models)
        self.queries = 0
        # Where the models run: an attack that builds many queries (label-boundary's [M, b, *shape] noisy copies)
        # builds them there instead of on the host and copying each one over. Labels still come back on the CPU.
        self.device = torch.device(device) if device is not None else x.device

    def __call__(self, x: Tensor) -> Tensor:
        per_model = x.dim() == self.x.dim() + 1
        if per_model and x.shape[0] != self.num_models:
            raise ConfigError(f"per-model inputs must be [M={self.num_models}, N, ...], got shape {list(x.shape)}")
        if not per_model and x.shape[1:] != self.x.shape[1:]:
            raise ConfigError(f"oracle inputs must be [N, {', '.join(map(str, self.x.shape[1:]))}] or per model, got "
                              f"shape {list(x.shape)}")
        with torch.no_grad():
            labels = self._logits_fn(x).argmax(-1).cpu()
        self.queries += int(labels.numel())
        return labels

    @classmethod
    def from_modules(cls, models: Sequence[nn.Module], x: Tensor, *, batch_size: int = 1024) -> LabelOracle:
        """An oracle over separate modules (eval mode, no gradient; model m sees x'[m] when per model)."""

        def logits(xq: Tensor) -> Tensor:
            per = xq.dim() == x.dim() + 1
            return torch.stack([forward_batched(m, xq[i] if per else xq, batch_size=batch_size).cpu()
                                for i, m in enumerate(models)])

        first = next(iter(models[0].parameters()), None) if len(models) else None
        return cls(logits, x, len(models), device=first.device if first is not None else None)

    @classmethod
    def from_stacks(cls, stacks: Sequence[StackedModels], x: Tensor, *, batch_size: int = 1024) -> LabelOracle:
        """An oracle over stacks of models (their models in order), each input batch moved to its stack."""

        def logits(xq: Tensor) -> Tensor:
            per = xq.dim() == x.dim() + 1
            out, first = [], 0
            for stack in stacks:
                parts = []
                for i in range(0, xq.shape[1 if per else 0], batch_size):
                    xb = (xq[first:first + stack.k, i:i + batch_size] if per
                          else xq[i:i + batch_size].unsqueeze(0).expand(stack.k, *xq[i:i + batch_size].shape))
                    parts.append(stack.forward(xb.to(stack.device), train=False).float().cpu())
                out.append(torch.cat(parts, 1))
                first += stack.k
            return torch.cat(out)

        return cls(logits, x, sum(s.k for s in stacks), device=stacks[0].device if stacks else None)
