"""Robbing the Fed (Fowl, Geiping, Czaja, Goldblum & Goldstein, ICLR 2022; seed 002, chapter 3): a
malicious server puts a linear "imprint" module in front of the model it sends, and reads users' inputs
verbatim off the aggregated update, through secure aggregation.

The module (:class:`ImprintedModel`): a measurement h(x) = <a, x> of the flattened input (``brightness``:
a = 1/D, the mean value; ``random``: a ~ N(0, I/D), a random projection), copied into k bins

    y_i = ReLU(<a, x> - c_i),   c_0 < c_1 < ... < c_{k-1},

with the offsets c_i at the quantiles i/k of h's distribution, estimated on public data (``cdf``:
``empirical`` quantiles, or ``gaussian``: mean + std * Phi^-1(i/k) of the public measurements; c_0
is set below every public value, so bin 0 catches everything). The next layer feeds s = sum_i y_i back
into the input the model sees, x' = x + s * u for a small fixed direction u, so dL/dy_i = <u, grad_x' L>
=: g is the *same* for every bin of an input. Bin i's gradients over the inputs j of the round are then

    dL/dW_i = sum_{j: h_j > c_i} g_j x_j,      dL/db_i = sum_{j: h_j > c_i} g_j,

and for consecutive bins (the paper's recovery, section 3.3.3)

    (dL/dW_i - dL/dW_{i+1}) / (dL/db_i - dL/db_{i+1}) = x_j   when input j alone has c_i < h_j <= c_{i+1}

(the last bin alone: dL/dW_{k-1} / dL/db_{k-1}). Sums over users and per-user scalings (the mean over a
user's batch, clipping) cancel in the ratio, so secure aggregation does not stop it; the fraction
recovered is the fraction of inputs alone in their bin, which the quantile placement maximises.

    malicious = plant_imprint(model, public_x, bins=64, measurement="brightness")
    ... users compute updates on ``malicious``; the server sums them into ``obs`` ...
    rec = imprint(malicious, obs)             # one candidate per bin with a non-zero bias difference

The same bins without an architecture change, in rows of the model's own first Linear layer:
:mod:`.imprint_parameters` (:func:`place_bins` is the one bin placement of both; :class:`ImprintBins` what
the attack reads from either).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConfigError
from .base import Observation, Reconstruction, register_federated

Measurement = Literal["brightness", "random"]
Cdf = Literal["empirical", "gaussian"]


@dataclass(frozen=True)
class PlantedSlice:
    """Entries the server writes into one tensor of the user's state_dict: ``name`` (the user's key), rows
    (``dim`` 0) or columns (``dim`` 1) ``index``, their ``values``."""

    name: str
    dim: int
    index: tuple[int, ...]
    values: Tensor

    def write(self, array: Any) -> None:
        """Put the values into ``array`` (a tensor or a numpy array of the entry's shape), in place."""
        values = self.values if isinstance(array, Tensor) else self.values.cpu().numpy()
        if isinstance(array, Tensor):
            values = values.to(array)
        if self.dim == 0:
            array[list(self.index)] = values
        else:
            array[:, list(self.index)] = values

    def read(self, array: Any) -> Any:
        """The planted entries of ``array`` (rows or columns, in bin order)."""
        return array[list(self.index)] if self.dim == 0 else array[:, list(self.index)]


class ImprintBins:
    """What the two imprints share (a mixin of an ``nn.Module``): k bins y_i = ReLU(<w, x> + b_i) with one
    measurement row w and biases b_i = -s c_i, from :meth:`_rows` (weight [k, D], bias [k], as planted), and
    :meth:`imprint_gradients`, the rows of an observed update the read-out takes. :class:`ImprintedModel`
    (an extra module) and :class:`~mlaudit.attacks.federated.imprint_parameters.ParameterImprint` (rows of
    the model's own first layer) are the two."""

    imprint_keys: tuple[str, str]
    """The names of the imprint's weight and bias in the state_dict the server sends."""

    @property
    def bins(self) -> int:
        return len(self._rows()[1])

    def _rows(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def imprint_gradients(self, obs: Observation) -> tuple[Tensor, Tensor]:
        """The bins' rows of the observed update: weight [k, D] and bias [k], in bin order."""
        raise NotImplementedError

    def planted(self) -> list[PlantedSlice]:
        """What the server re-plants every round (names in the state_dict it sends), as planted now."""
        raise NotImplementedError

    def thresholds(self) -> Tensor:
        """The bin offsets [k] (ascending), in the units of :meth:`measure` (both times the planted scale)."""
        return -self._rows()[1].detach()

    def measure(self, x: Tensor) -> Tensor:
        """h(x) [N] of inputs x [N, *shape] along bin 0's measurement direction (times the planted scale)."""
        w = self._rows()[0].detach()
        return x.flatten(1).to(w) @ w[0]

    def bin_of(self, x: Tensor) -> Tensor:
        """The bin interval of each input [N]: i for c_i < h <= c_{i+1} (k-1 above the last offset; -1 below
        every offset: such an input fires no bin and cannot be recovered)."""
        return torch.searchsorted(self.thresholds().contiguous(), self.measure(x).contiguous(), side="left") - 1


def _observed(obs: Observation, names: tuple[str, ...], what: str) -> Tensor:
    """The first of ``names`` the observed update holds."""
    for name in names:
        if name in obs.grad:
            return obs.grad[name]
    raise ConfigError(f"the observed update has no gradient for the {what} ({' or '.join(names)})")


class ImprintedModel(ImprintBins, nn.Module):
    """``model`` behind an imprint module of k bins: x -> model(x + sum_i ReLU(W x + b)_i * u).

    ``weight`` [k, D] (every row the measurement direction), ``bias`` [k] (minus the bin offsets),
    ``feedback`` [D] the direction u (a buffer: fixed by the server, not trained)."""

    imprint_keys = ("imprint.weight", "imprint.bias")

    def __init__(self, model: nn.Module, weight: Tensor, bias: Tensor, feedback: Tensor) -> None:
        super().__init__()
        k, d = weight.shape
        self.imprint = nn.Linear(d, k, device="meta")  # no random init (the global RNG is left alone)
        self.imprint.weight = nn.Parameter(weight.detach().clone())
        self.imprint.bias = nn.Parameter(bias.detach().clone())
        self.register_buffer("feedback", feedback.clone())
        self.model = model

    @property
    def bins(self) -> int:
        return self.imprint.out_features

    def forward(self, x: Tensor) -> Tensor:
        s = F.relu(self.imprint(x.flatten(1))).sum(1, keepdim=True)
        return self.model(x + (s * self.feedback).view_as(x))

    def _rows(self) -> tuple[Tensor, Tensor]:
        return self.imprint.weight, self.imprint.bias

    def imprint_gradients(self, obs: Observation) -> tuple[Tensor, Tensor]:
        w, b = self.imprint_keys
        return _observed(obs, (w,), "imprint module"), _observed(obs, (b,), "imprint module")

    def planted(self) -> list[PlantedSlice]:
        every = tuple(range(self.bins))
        return [PlantedSlice(k, 0, every, t.detach().cpu().clone()) for k, t in zip(self.imprint_keys, self._rows(),
                                                                                  strict=True)]


@dataclass(frozen=True)
class Bins:
    """Where :func:`place_bins` put k bins: the measurement direction a [D] and offsets c [k] (float64, CPU,
    not yet scaled) and the std of the public measurements h = <a, x>."""

    direction: Tensor
    offsets: Tensor
    std: float

    def feedback_norm(self, feedback: float, scale: float) -> float:
        """||u||: the feedback direction's norm, feedback / (s k std h), so sum_i y_i * ||u|| stays ~ feedback."""
        return feedback / (scale * len(self.offsets) * max(self.std, 1e-12))


def place_bins(public_x: Tensor, *, bins: int, measurement: Measurement = "brightness", cdf: Cdf = "empirical",
               scale: float = 1.0, generator: torch.Generator | None = None) -> Bins:
    """The one bin placement of both imprints: ``bins`` offsets at the quantiles of the ``measurement`` on
    ``public_x`` [P, *shape] (``cdf``), moved off observed values (:func:`off_observed`); refuses what
    cannot work (bins < 1 or above P, scale <= 0, a constant measurement, coinciding quantiles)."""
    if bins < 1:
        raise ConfigError(f"imprint bins = {bins}; allowed bins >= 1")
    if not scale > 0:
        raise ConfigError(f"imprint scale = {scale}; allowed scale > 0")
    if len(public_x) < bins:
        raise ConfigError(f"imprint bins = {bins} exceeds the {len(public_x)} public inputs its quantiles are estimated "
                          f"from; allowed 1 <= bins <= {len(public_x)}")
    x = public_x.detach().flatten(1).double().cpu()  # the bins are placed on the CPU, in float64
    d = x.shape[1]
    if measurement == "brightness":
        a = torch.full((d,), 1.0 / d, dtype=torch.float64)
    elif measurement == "random":
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        a = torch.randn(d, generator=g, dtype=torch.float64) / math.sqrt(d)
    else:
        raise ConfigError(f"imprint measurement {measurement!r}; allowed: brightness, random")
    h = x @ a
    lo, hi, std = float(h.min()), float(h.max()), float(h.std()) if len(h) > 1 else 0.0
    if not hi > lo:
        raise ConfigError(f"the {measurement} measurement is constant ({lo:.6g}) on the {len(h)} public inputs: it has "
                          "no quantiles to place bins at; use another measurement or other public data")
    c = off_observed(_offsets(h, bins, cdf, lo - (hi - lo)), h)
    if not bool((c[1:] > c[:-1]).all()):
        distinct = int(torch.unique(h).numel())
        raise ConfigError(f"imprint bins = {bins}: the {measurement} measurement takes only {distinct} distinct values "
                          f"on the public inputs, so some of its {bins} quantiles coincide; allowed bins <= the "
                          "number of distinct quantiles (try fewer bins or measurement: random)")
    return Bins(a, c, std)


def plant_imprint(model: nn.Module, public_x: Tensor, *, bins: int, measurement: Measurement = "brightness",
                  cdf: Cdf = "empirical", feedback: float = 1e-2, scale: float = 1.0,
                  generator: torch.Generator | None = None) -> ImprintedModel:
    """The malicious model: ``model`` behind ``bins`` imprint bins placed at the quantiles of the
    ``measurement`` on ``public_x`` [P, *shape] (:func:`place_bins`); ``feedback`` scales u (||u|| =
    feedback / (k * std h)).

    ``scale`` s multiplies the imprint weights and biases and divides u: y_i = ReLU(s (h - c_i)) fires in
    the same bins, the model sees the same input, but the bins' gradients grow by 1/s relative to
    their weights, so an update sent in float32 (w - lr * grad, rounded to w's precision) keeps more of
    the gradient's digits (for a server that only sees updated float32 weights, e.g. over Flower)."""
    placed = place_bins(public_x, bins=bins, measurement=measurement, cdf=cdf, scale=scale, generator=generator)
    d = len(placed.direction)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    u = torch.full((d,), placed.feedback_norm(feedback, scale) / math.sqrt(d), dtype=torch.float32)
    weight = (scale * placed.direction).float().expand(bins, d).contiguous()
    return ImprintedModel(model, weight, -(scale * placed.offsets).float(), u).to(device)


def _offsets(h: Tensor, bins: int, cdf: Cdf, floor: float) -> Tensor:
    """Offsets c_i at quantile levels i/k of h (float64 [k]); level 0 at ``floor`` (below every public value)."""
    levels = torch.arange(1, bins, dtype=torch.float64) / bins
    if cdf == "empirical":
        inner = torch.quantile(h, levels)
    elif cdf == "gaussian":
        inner = h.mean() + h.std() * math.sqrt(2) * torch.erfinv(2 * levels - 1)
    else:
        raise ConfigError(f"imprint cdf {cdf!r}; allowed: empirical, gaussian")
    return torch.cat([torch.tensor([floor], dtype=torch.float64), inner])


def off_observed(c: Tensor, h: Tensor) -> Tensor:
    """Offsets c [k] (ascending) moved inside the gap between observed measurements h [P] they fall in: the
    m offsets c_i (i >= 1) with h_lo < c_i <= h_hi for adjacent distinct values of h go to h_lo + j (h_hi -
    h_lo) / (m + 1), j = 1..m (one offset: the middle; an offset on a value belongs to the gap below it). No
    public input then sits on a knee: on discrete data (digits' 17 grey levels, text tokens) an empirical
    quantile is an observed value, or interpolates within a hair of one, and whether such an input fires
    bin i would hang on the float rounding of s * h - s * c_i (ReLU'(0) = 0), i.e. on the planted scale s.
    Offsets outside [min h, max h] stay."""
    c = c.clone()
    uniq = torch.unique(h.double())
    k = torch.searchsorted(uniq, c[1:])  # uniq[k - 1] < c <= uniq[k]
    inside = ((k > 0) & (k < len(uniq))).nonzero().flatten().tolist()
    i = 0
    while i < len(inside):  # c ascending: the offsets of one gap are consecutive
        run = [inside[i]]
        while i + len(run) < len(inside) and k[inside[i + len(run)]] == k[run[0]]:
            run.append(inside[i + len(run)])
        lo, hi = uniq[k[run[0]] - 1], uniq[k[run[0]]]
        for j, at in enumerate(run, start=1):
            c[1 + at] = lo + j * (hi - lo) / (len(run) + 1)
        i += len(run)
    return c


def imprint_candidates(weight_grad: Tensor, bias_grad: Tensor, *, rel_tol: float = 1e-6) -> tuple[Tensor, Tensor]:
    """The paper's recovery from the imprint layer's gradients (weight [k, D], bias [k]): per bin interval
    i, (dW_i - dW_{i+1}) / (db_i - db_{i+1}) (the last one dW_{k-1} / db_{k-1}), computed in float64.

    Returns (candidates [m, D] for the intervals whose bias difference exceeds ``rel_tol`` times the largest
    bias gradient, the interval index of each [m])."""
    w, b = weight_grad.detach().double(), bias_grad.detach().double()
    dw = w - torch.cat([w[1:], torch.zeros_like(w[:1])])
    db = b - torch.cat([b[1:], torch.zeros_like(b[:1])])
    scale = float(b.abs().max())
    keep = db.abs() > rel_tol * scale if scale > 0 else torch.zeros_like(db, dtype=torch.bool)
    return dw[keep] / db[keep, None], keep.nonzero()[:, 0]


@register_federated("imprint")
def imprint(model: nn.Module, obs: Observation, *, rel_tol: float = 1e-6) -> Reconstruction:
    """Inputs read off the imprint of ``obs`` (``model`` is what the users trained: the :class:`ImprintedModel`
    of :func:`plant_imprint`, or the ``ParameterImprint`` of ``plant_imprint_parameters``, whose bins are rows
    of the model's own first layer): one candidate [*shape] per non-empty bin interval; a bin holding one
    input gives it exactly, a bin holding several gives their gradient-weighted mean."""
    if not isinstance(model, ImprintBins):
        raise ConfigError(f"the imprint attack reads the imprint the server planted: pass the ImprintedModel "
                          f"plant_imprint returned or the ParameterImprint plant_imprint_parameters returned, not a "
                          f"{type(model).__name__}")
    weight, bias = model.imprint_gradients(obs)
    x, bins = imprint_candidates(weight, bias, rel_tol=rel_tol)
    x = x.to(weight.dtype).view(len(x), *obs.input_shape)
    return Reconstruction(x, None, {"bins": model.bins, "nonempty_bins": len(bins), "bin_index": bins.tolist()})
