"""Parameter vectors: the named tensors of a model's parameters seen as one flat vector.

    w = ParamVector.from_module(model)            # detached copies of the trainable parameters
    g = param_grad(model, (x, y))                  # a ParamVector with the same names
    w2 = w + g * (-lr)                             # entrywise, by name
    g.dot(w), g.norm(), g.cos(w)                   # 0-dim tensors, over all entries

A :class:`ParamVector` is a ``dict[str, Tensor]`` (name -> tensor of that parameter's shape), so it
goes wherever a state_dict-like mapping goes (``torch.func.functional_call``, ``load_state_dict``
with ``strict=False``). Pass ``dict(v)`` to ``torch.func`` transforms (``grad``, ``vmap``, ``jvp``):
their pytrees treat a dict *subclass* as one leaf.

Inner products run over all entries concatenated in the left operand's name order (one ``torch.dot``; entry by
entry when shapes or dtypes differ), so results are reproducible to the bit for the same inputs and device.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError

Scalar = float | int | Tensor


class ParamVector(dict[str, Tensor]):
    """Named parameter tensors {name: [*shape_of_name]} with vector algebra over all their entries.

    Binary operations need the same names (any order; the result follows the left operand's order)
    and broadcastable shapes; a :class:`~mlaudit.errors.ConfigError` names the differing keys.
    """

    @classmethod
    def from_module(cls, model: nn.Module, *, trainable_only: bool = True, clone: bool = True) -> ParamVector:
        """The parameters of ``model`` by name (only those with ``requires_grad`` unless
        ``trainable_only=False``), detached; copies unless ``clone=False`` (then aliases of the
        model's storage: later in-place updates of the model show through)."""
        out = cls()
        for name, p in model.named_parameters():
            if p.requires_grad or not trainable_only:
                out[name] = p.detach().clone() if clone else p.detach()
        return out

    def zeros_like(self) -> ParamVector:
        """Zeros of every entry's shape, dtype and device."""
        return self.map(torch.zeros_like)

    def map(self, fn: Callable[[Tensor], Tensor]) -> ParamVector:
        """``fn`` applied to every tensor, names kept."""
        return ParamVector({k: fn(v) for k, v in self.items()})

    def detach(self) -> ParamVector:
        return self.map(Tensor.detach)

    def to(self, *args: Any, **kwargs: Any) -> ParamVector:
        """``Tensor.to(*args, **kwargs)`` on every entry (device and/or dtype)."""
        return self.map(lambda v: v.to(*args, **kwargs))

    def _keys_of(self, other: Mapping[str, Tensor]) -> None:
        if self.keys() != other.keys():
            mine, theirs = set(self), set(other)
            raise ConfigError(f"parameter vectors differ in names: only left {sorted(mine - theirs)[:4]}, "
                              f"only right {sorted(theirs - mine)[:4]}")

    def dot(self, other: Mapping[str, Tensor]) -> Tensor:
        """<self, other> = sum over names and entries of self[k] * other[k]: a 0-dim tensor
        (differentiable; 0 for an empty vector)."""
        self._keys_of(other)
        if not self:
            return torch.zeros(())
        same = all(other[k].shape == v.shape and other[k].dtype == v.dtype and other[k].device == v.device
                   for k, v in self.items())
        if len(self) == 1 or not same:  # one tensor, or broadcasting / mixed dtypes: entry by entry
            return sum((self[k] * other[k]).sum() for k in self)  # type: ignore[return-value]
        # One flat inner product: per-name products and sums launch ~3 kernels per tensor forward and more
        # backward (a ResNet-18 has 62 tensors), which dominated a gradient-matching step on a GPU.
        a = torch.cat([v.reshape(-1) for v in self.values()])
        b = a if other is self else torch.cat([other[k].reshape(-1) for k in self])
        return torch.dot(a, b)

    def norm(self) -> Tensor:
        """Euclidean norm of the flat vector, sqrt(<self, self>): a 0-dim tensor."""
        return torch.sqrt(self.dot(self))

    def cos(self, other: Mapping[str, Tensor], *, eps: float = 1e-12) -> Tensor:
        """Cosine similarity <a, b> / max(||a|| ||b||, eps): a 0-dim tensor (0 when either is 0)."""
        other = other if isinstance(other, ParamVector) else ParamVector(other)
        return self.dot(other) / (self.norm() * other.norm()).clamp_min(eps)

    def __add__(self, other: Mapping[str, Tensor]) -> ParamVector:
        self._keys_of(other)
        return ParamVector({k: v + other[k] for k, v in self.items()})

    def __sub__(self, other: Mapping[str, Tensor]) -> ParamVector:
        self._keys_of(other)
        return ParamVector({k: v - other[k] for k, v in self.items()})

    def __neg__(self) -> ParamVector:
        return self.map(torch.neg)

    def __mul__(self, s: Scalar) -> ParamVector:
        """Every entry times the scalar ``s`` (a number or a 0-dim tensor)."""
        if isinstance(s, Mapping):
            raise ConfigError("ParamVector * ParamVector is not defined; use a.dot(b) for the inner product")
        return ParamVector({k: v * s for k, v in self.items()})

    def __rmul__(self, s: Scalar) -> ParamVector:
        if isinstance(s, Mapping):
            raise ConfigError("ParamVector * ParamVector is not defined; use a.dot(b) for the inner product")
        return ParamVector({k: s * v for k, v in self.items()})

    def __truediv__(self, s: Scalar) -> ParamVector:
        return ParamVector({k: v / s for k, v in self.items()})

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {list(v.shape)}" for k, v in self.items())
        return f"ParamVector({{{shapes}}})"
