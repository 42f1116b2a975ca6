"""Index-stable views over a clean training split: the one representation every attack produces.

A :class:`DataView` never copies or mutates its base :class:`~mlaudit.data.base.TensorDataset`
(``x`` float32 [N, *shape], ``y`` int64 [N]). It records, as tensors on the base's device:

* additive perturbations ``delta`` float32 [P, *shape] on base rows ``indices`` int64 [P]
  (l-inf bounded by ``eps`` in [0, 1] pixel units, or ``eps=None`` for unbounded);
* label overrides ``relabel_indices`` int64 [R] -> ``relabel_to`` int64 [R];
* inserted examples ``inserted_x`` float32 [I, *shape], ``inserted_y`` int64 [I], whose
  *virtual indices* are ``N .. N+I-1`` (appended after the base);
* an optional ``keep`` bool mask [N + I] selecting a subset (``None`` keeps everything).

Every example is addressed by its virtual index in ``[0, N + I)``; these never change under the
``with_*`` calls, so results (which points were poisoned, which were members) are reported
against the clean data. :meth:`DataView.gather` is the training loop's vectorised hot path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, DataError
from .base import TensorDataset

TOL = 1e-6
"""Float tolerance of the eps and [0, 1] box checks (absorbs rounding of ``clamp(x+d) - x``)."""

IndexLike = Tensor | Sequence[int]


def _as_index(value: IndexLike, device: torch.device, what: str) -> Tensor:
    t = torch.as_tensor(value)
    if t.numel() and (t.dtype == torch.bool or t.is_floating_point() or t.is_complex()):
        raise DataError(f"{what} must be an integer tensor, got dtype {t.dtype}")
    return t.detach().reshape(-1).to(device=device, dtype=torch.int64, copy=True)


def _as_float(value: Tensor, device: torch.device, dtype: torch.dtype, what: str) -> Tensor:
    t = torch.as_tensor(value)
    if not t.is_floating_point():
        raise DataError(f"{what} must be a floating-point tensor, got dtype {t.dtype}")
    return t.detach().to(device=device, dtype=dtype, copy=True)


def _check_unique(idx: Tensor, what: str) -> None:
    uniq, counts = torch.unique(idx, return_counts=True)
    if bool((counts > 1).any()):
        raise DataError(f"{what} must be unique; index {int(uniq[counts > 1][0])} appears more than once")


def _check_range(idx: Tensor, hi: int, what: str) -> None:
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= hi):
        raise DataError(f"{what} must lie in [0, {hi - 1}], got [{int(idx.min())}, {int(idx.max())}]")


def _check_box(x: Tensor, where: Tensor, what: str) -> None:
    """Raise naming the first row of ``x`` [M, ...] outside [0, 1] (NaN counts as outside)."""
    bad = ~((x >= -TOL) & (x <= 1 + TOL)).flatten(1).all(1)
    if bool(bad.any()):
        k = int(bad.nonzero()[0, 0])
        row = x[k].flatten()
        v = float(row[~((row >= -TOL) & (row <= 1 + TOL))][0])
        raise DataError(
            f"{what} at index {int(where[k])} leaves the [0, 1] box (value {v:.6g}); views never clamp "
            "silently: project the perturbation, e.g. delta = clamp(x + delta, 0, 1) - x"
        )


def _wider(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else max(a, b)


@dataclass(frozen=True, eq=False)
class DataView:
    """A perturbed / relabelled / extended / subset view of ``base`` (see the module docstring).

    Build with :meth:`identity` or :meth:`from_delta` and the composable ``with_*`` methods;
    each returns a new validated view. Construction raises :class:`DataError` when a delta
    exceeds ``eps`` (+1e-6), when ``base.x[indices] + delta`` leaves [0, 1] (nothing is clamped
    silently), or when shapes, dtypes, devices, ranges or uniqueness are wrong.
    """

    base: TensorDataset
    indices: Tensor
    delta: Tensor
    relabel_indices: Tensor
    relabel_to: Tensor
    inserted_x: Tensor
    inserted_y: Tensor
    keep: Tensor | None = None
    eps: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    _delta_slot: Tensor = field(init=False, repr=False)
    _delta_table: Tensor = field(init=False, repr=False)
    _labels: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n, shape, dev, k = len(self.base), self.base.shape, self.base.device, len(self.base.classes)
        ni = int(self.inserted_y.shape[0]) if self.inserted_y.dim() == 1 else 0
        total = n + ni
        if self.eps is not None and not 0.0 <= float(self.eps) <= 1.0:
            raise ConfigError(f"eps must be in [0, 1] (pixel units) or None for unbounded, got {self.eps}")
        specs: list[tuple[str, Tensor | None, torch.dtype, tuple[int, ...] | None]] = [  # None: any 1-D
            ("indices", self.indices, torch.int64, None),
            ("delta", self.delta, self.base.x.dtype, (self.indices.numel(), *shape)),
            ("relabel_indices", self.relabel_indices, torch.int64, None),
            ("relabel_to", self.relabel_to, torch.int64, tuple(self.relabel_indices.shape)),
            ("inserted_y", self.inserted_y, torch.int64, None),
            ("inserted_x", self.inserted_x, self.base.x.dtype, (ni, *shape)),
            ("keep", self.keep, torch.bool, (total,)),
        ]
        for name, t, dtype, want in specs:
            if t is not None and (t.dtype != dtype or t.device != dev):
                raise DataError(f"{name} must be {dtype} on {dev}, got {t.dtype} on {t.device}")
            if t is not None and (t.dim() != 1 if want is None else tuple(t.shape) != want):
                raise DataError(f"{name} has shape {tuple(t.shape)}, expected {want or '[M] (1-D)'}")
        _check_unique(self.indices, "indices")
        _check_range(self.indices, n, "delta indices (base rows only)")
        _check_unique(self.relabel_indices, "relabel_indices")
        _check_range(self.relabel_indices, total, "relabel_indices (virtual indices)")
        _check_range(self.relabel_to, k, "relabel_to labels")
        _check_range(self.inserted_y, k, "inserted_y labels")
        if self.indices.numel():
            if self.eps is not None:
                mag = self.delta.abs().flatten(1).amax(1)
                bad = ~(mag <= self.eps + TOL)
                if bool(bad.any()):
                    j = int(bad.nonzero()[0, 0])
                    raise DataError(
                        f"delta at index {int(self.indices[j])} has |delta|_inf = {float(mag[j]):.6g} > eps = "
                        f"{self.eps:.6g}; project it with delta.clamp(-eps, eps) or pass a larger eps"
                    )
            _check_box(self.base.x[self.indices] + self.delta, self.indices, "perturbed image")
        if ni:
            _check_box(self.inserted_x, torch.arange(n, total), "inserted image")
        slot = torch.full((total,), -1, dtype=torch.int64, device=dev)
        slot[self.indices] = torch.arange(self.indices.numel(), device=dev)
        table = torch.cat([self.delta, self.delta.new_zeros((1, *shape))])
        labels = torch.cat([self.base.y, self.inserted_y])
        labels[self.relabel_indices] = self.relabel_to
        object.__setattr__(self, "meta", dict(self.meta))
        object.__setattr__(self, "eps", None if self.eps is None else float(self.eps))
        object.__setattr__(self, "_delta_slot", slot)
        object.__setattr__(self, "_delta_table", table)
        object.__setattr__(self, "_labels", labels)

    # ---------------------------------------------------------------- construction
    @classmethod
    def identity(cls, base: TensorDataset) -> DataView:
        """The clean view: no perturbation, no relabelling, nothing inserted, everything kept."""
        x, dev = base.x, base.device
        empty_i = torch.zeros(0, dtype=torch.int64, device=dev)
        empty_x = x.new_zeros((0, *base.shape))
        return cls(base, empty_i, empty_x, empty_i.clone(), empty_i.clone(), empty_x.clone(), empty_i.clone())

    @classmethod
    def from_delta(
        cls, base: TensorDataset, indices: IndexLike, delta: Tensor, *, eps: float | None,
        meta: dict[str, Any] | None = None,
    ) -> DataView:
        """One-call view for a perturbation attack: ``delta`` [P, *shape] on base rows ``indices`` [P].

        ``delta`` is detached and copied, so the attack may keep optimising its own tensor.
        """
        return cls.identity(base).with_delta(indices, delta, eps=eps).with_meta(**(meta or {}))

    def with_delta(self, indices: IndexLike, delta: Tensor, *, eps: float | None) -> DataView:
        """Set the perturbation of base rows ``indices`` [P] to ``delta`` [P, *shape].

        Existing deltas on other rows are kept; those on ``indices`` are replaced. The new view's
        eps is ``eps`` when no older delta survives, else the wider of both (``None`` = unbounded).
        """
        idx = _as_index(indices, self.device, "indices")
        d = _as_float(delta, self.device, self.base.x.dtype, "delta")
        if tuple(d.shape) != (idx.numel(), *self.shape):
            raise DataError(f"delta has shape {tuple(d.shape)}, expected {(idx.numel(), *self.shape)} = [P, *shape]")
        old = ~torch.isin(self.indices, idx)
        new_eps = _wider(self.eps, eps) if bool(old.any()) else eps
        idx, d = torch.cat([self.indices[old], idx]), torch.cat([self.delta[old], d])
        return replace(self, indices=idx, delta=d, eps=new_eps)

    def with_labels(self, indices: IndexLike, labels: IndexLike | int) -> DataView:
        """Override the labels of virtual ``indices`` [R] with ``labels`` [R] (or one int for all).

        Later overrides of the same index replace earlier ones.
        """
        idx = _as_index(indices, self.device, "relabel indices")
        if isinstance(labels, int):
            lab = torch.full((idx.numel(),), labels, dtype=torch.int64, device=self.device)
        else:
            lab = _as_index(labels, self.device, "labels")
        old = ~torch.isin(self.relabel_indices, idx)
        idx, lab = torch.cat([self.relabel_indices[old], idx]), torch.cat([self.relabel_to[old], lab])
        return replace(self, relabel_indices=idx, relabel_to=lab)

    def with_inserted(self, x: Tensor, y: IndexLike) -> DataView:
        """Append examples ``x`` [M, *shape] in [0, 1] with labels ``y`` [M] (virtual indices
        ``num_total .. num_total+M-1``); a ``keep`` mask is extended with True for them."""
        xi = _as_float(x, self.device, self.base.x.dtype, "inserted x")
        yi = _as_index(y, self.device, "inserted y")
        if tuple(xi.shape) != (yi.numel(), *self.shape):
            raise DataError(f"inserted x has shape {tuple(xi.shape)}, expected {(yi.numel(), *self.shape)} = [M, *shape]")
        keep = self.keep
        if keep is not None:
            keep = torch.cat([keep, torch.ones(yi.numel(), dtype=torch.bool, device=self.device)])
        xi, yi = torch.cat([self.inserted_x, xi]), torch.cat([self.inserted_y, yi])
        return replace(self, inserted_x=xi, inserted_y=yi, keep=keep)

    def with_keep(self, mask: Tensor) -> DataView:
        """Restrict to a subset: ``mask`` bool [N + I], or int64 [K] of virtual indices to keep.

        Composes with an existing mask by logical AND (a subset of the current subset).
        """
        m = torch.as_tensor(mask).to(self.device)
        if m.dtype != torch.bool:
            idx = _as_index(m, self.device, "keep indices")
            _check_range(idx, self.num_total, "keep indices")
            m = torch.zeros(self.num_total, dtype=torch.bool, device=self.device)
            m[idx] = True
        elif tuple(m.shape) != (self.num_total,):
            raise DataError(f"keep mask has shape {tuple(m.shape)}, expected ({self.num_total},) = N + I")
        return replace(self, keep=m.clone() if self.keep is None else self.keep & m)

    def with_meta(self, **items: Any) -> DataView:
        """Return a view whose ``meta`` is updated with ``items`` (e.g. ``method="bullseye"``)."""
        return replace(self, meta={**self.meta, **items})

    def to(self, device: torch.device | str) -> DataView:
        """Copy every tensor (base included) to ``device``."""
        return replace(
            self,
            base=self.base.to(device),
            **{name: getattr(self, name).to(device) for name in
               ("indices", "delta", "relabel_indices", "relabel_to", "inserted_x", "inserted_y")},
            keep=None if self.keep is None else self.keep.to(device),
        )

    def __repr__(self) -> str:
        return (
            f"DataView(N={self.num_base}, perturbed={self.indices.numel()}, relabelled="
            f"{self.relabel_indices.numel()}, inserted={self.num_inserted}, kept={len(self)}, eps={self.eps}, "
            f"method={self.meta.get('method')!r}, device={self.device})"
        )

    # ---------------------------------------------------------------- queries
    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one example (without the leading batch dimension)."""
        return self.base.shape

    @property
    def num_base(self) -> int:
        return len(self.base)

    @property
    def num_inserted(self) -> int:
        return int(self.inserted_y.shape[0])

    @property
    def num_total(self) -> int:
        """N + I: the number of virtual indices (kept or not)."""
        return self.num_base + self.num_inserted

    @property
    def delta_slot(self) -> Tensor:
        """int64 [N + I]: row of ``delta`` for each virtual index, -1 where unperturbed."""
        return self._delta_slot

    @property
    def labels(self) -> Tensor:
        """int64 [N + I]: the effective label of every virtual index (overrides applied)."""
        return self._labels

    def __len__(self) -> int:
        return self.num_total if self.keep is None else int(self.keep.sum())

    def kept_indices(self) -> Tensor:
        """int64 [len(self)]: the kept virtual indices, ascending."""
        if self.keep is None:
            return torch.arange(self.num_total, device=self.device)
        return self.keep.nonzero().squeeze(1)

    def gather(self, idx: Tensor, *, validate: bool = True) -> tuple[Tensor, Tensor]:
        """Examples at virtual indices ``idx`` int64 [B] -> (x [B, *shape], y int64 [B]).

        Deltas are added and labels overridden; inserted examples come from ``inserted_x``.
        Vectorised (no loop over the batch, no host sync when ``validate=False``); ``idx`` may
        name examples outside ``keep``. ``validate`` checks ``0 <= idx < N + I`` (one sync).
        """
        idx = idx.to(device=self.device, dtype=torch.int64)
        if validate:
            _check_range(idx, self.num_total, "gather indices")
        n, ni, p = self.num_base, self.num_inserted, int(self.indices.shape[0])
        if ni == 0 or n == 0:
            x = self.base.x[idx] if ni == 0 else self.inserted_x[idx - n]
        else:  # both sources: gather from each with clamped indices, then select (no host sync)
            xi = self.inserted_x[(idx - n).clamp(min=0, max=ni - 1)]
            is_ins = (idx >= n).view(-1, *([1] * len(self.shape)))
            x = torch.where(is_ins, xi, self.base.x[idx.clamp(max=n - 1)])
        if p:
            slot = self._delta_slot[idx]
            x = x + self._delta_table[torch.where(slot >= 0, slot, p)]
        return x, self._labels[idx]

    def materialize(self) -> TensorDataset:
        """The kept examples as a plain dataset, in ascending virtual-index order."""
        x, y = self.gather(self.kept_indices(), validate=False)
        return TensorDataset(x, y, self.base.classes)

    def changed_indices(self) -> Tensor:
        """int64 ascending: virtual indices whose (x, y) differ from the base (a nonzero delta
        or a label override that changes the label) plus every inserted index; ignores ``keep``."""
        changed = torch.zeros(self.num_total, dtype=torch.bool, device=self.device)
        if self.indices.numel():
            changed[self.indices[self.delta.flatten(1).ne(0).any(1)]] = True
        orig = torch.cat([self.base.y, self.inserted_y])
        changed[self.relabel_indices[self.relabel_to != orig[self.relabel_indices]]] = True
        changed[self.num_base:] = True
        return changed.nonzero().squeeze(1)

    def summary(self) -> dict[str, Any]:
        """Counts, eps and max |delta| (plus ``meta``) for logs and results.json."""
        return {
            "num_base": self.num_base,
            "num_inserted": self.num_inserted,
            "num_total": self.num_total,
            "num_kept": len(self),
            "num_perturbed": int(self.indices.numel()),
            "num_relabelled": int(self.relabel_indices.numel()),
            "num_changed": int(self.changed_indices().numel()),
            "eps": self.eps,
            "max_abs_delta": float(self.delta.abs().max()) if self.delta.numel() else 0.0,
            "meta": dict(self.meta),
        }
