"""Robbing the Fed without an architecture change (Fowl et al., ICLR 2022: the imprint "can be realised in
an existing first linear layer"): a malicious server that may only choose parameter *values* plants the
imprint in the rows of the user's own first fully connected layer.

For a model whose first layer is ``nn.Linear`` W1 (D -> H) on the flattened input, followed by ReLU and
then ``nn.Linear`` W2 (H -> H2), the server takes k <= H hidden units u_0..u_{k-1} (in bin order) and sets

    W1[u_i] = s a,    b1[u_i] = -s c_i,    W2[:, u_i] = v   (the same vector for every i),

with a and c_i the measurement and offsets of :func:`~mlaudit.attacks.federated.imprint.place_bins` (the
module variant's bins) and s the scale. Unit u_i then computes y_i = ReLU(s (<a, x> - c_i)), and because
every planted unit feeds the next layer through the same column v, dL/dy_i = <v, dL/dz2> =: g is the
same for all bins of an input: the property the module variant gets from its feedback direction. So

    dL/dW1[u_i] = sum_{j: h_j > c_i} g_j x_j,      dL/db1[u_i] = sum_{j: h_j > c_i} g_j

exactly as for the module's rows, and :func:`~mlaudit.attacks.federated.imprint.imprint_candidates` on the
chosen rows of the aggregated update recovers every input alone in its bin, through secure aggregation.
v is a random direction (from ``generator``) of norm feedback / (s k std h): a fixed direction such as
the all-ones vector would be orthogonal to dL/dz2 whenever W2 is the logits layer (softmax minus one-hot
sums to zero), a random one is orthogonal to it with probability zero. The other H - k units and every
other parameter keep the user's values.

    planted = plant_imprint_parameters(model, public_x, bins=64)   # same class, same state_dict keys
    planted.model                       # the user's model (a deep copy) with the planted values
    rec = imprint(planted, obs)         # obs: the users' summed update of planted (or of planted.model)

**Convolutions in front** (Boenisch et al., "When the Curious Abandon Honesty", EuroS&P 2023, carry the input
through a network's convolutions the same way): when ``nn.Conv2d`` layers run before the first Linear, the server
sets each to carry its input unchanged, kernel W[c, c, k//2, k//2] = 1 for the input's C channels and 0 elsewhere,
bias 0, so the first C channels hold x and the rest are zero. A ReLU between them passes x when the inputs are
non-negative (pixels), and after the flattening the Linear sees z = [x.flatten(1), 0]. The imprint rows then take
the measurement on z's first D entries and 0 on the rest, and the recovered rows' first D entries are the inputs.
Each such convolution needs stride 1, dilation 1, groups 1, zero padding k//2 of an odd kernel (the size is kept)
and at least C output channels; pooling, a norm layer or anything else between them is refused (pooling and
strides drop pixels). The convolutions are planted slices too, so FedAvg's re-planting restores them.

Requirements, checked on the public inputs (a ConfigError names what was found): the first layer the input
reaches is an ``nn.Linear`` with a bias whose input is x.flatten(1) (or, behind pass-through convolutions,
[x.flatten(1), 0]); the modules run between it and the next
``nn.Linear`` are only ReLU, Identity or Dropout (a norm layer in between is refused); the planted units
reach the next layer as ReLU(s (h - c_i)); and one public input's gradient has the shared-g form (nothing
else reads the first layer's output, e.g. no skip connection).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ConfigError
from ...query.modes import in_mode
from .base import Observation
from .imprint import Cdf, ImprintBins, Measurement, PlantedSlice, _observed, place_bins

PASSIVE = (nn.ReLU, nn.Identity, nn.Dropout, nn.Flatten)
"""Modules allowed between the imprint layer and the next Linear, and between pass-through convolutions (Dropout:
users compute in eval mode)."""
NEEDS = "the parameter-only imprint needs a first nn.Linear on the flattened input followed by ReLU"
PREFLIGHT = 64
"""Public inputs the architecture checks run on."""


class ParameterImprint(ImprintBins, nn.Module):
    """The user's model with an imprint planted in its parameters: ``model`` (a deep copy of the user's, same
    class, planted values), ``layer`` / ``next_layer`` (the names of W1 and W2 in it), ``units`` (the hidden
    units of W1 in bin order). ``forward`` is the model's; the state_dict is the user's, keys prefixed by
    ``model.`` (``planted.model.state_dict()`` loads into a fresh instance of the user's class).

    A wrapper rather than the bare model: one object carries the planted model and where its bins are, so a
    simulation computes the users' gradients on it and passes it to :func:`imprint` unchanged."""

    def __init__(self, model: nn.Module, layer: str, next_layer: str, units: tuple[int, ...],
                 convs: tuple[str, ...] = (), width: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.layer, self.next_layer, self.units = layer, next_layer, tuple(units)
        self.imprint_keys = (f"{layer}.weight", f"{layer}.bias")
        self.convs = tuple(convs)
        """The pass-through convolutions in front of ``layer`` (module docstring), in call order."""
        self.width = width if width is not None else model.get_submodule(layer).in_features
        """D, the flattened input's size: the first D features of ``layer`` hold the input."""

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    @property
    def bins(self) -> int:
        return len(self.units)

    def _rows(self) -> tuple[Tensor, Tensor]:
        first = self.model.get_submodule(self.layer)
        rows = list(self.units)
        return first.weight[rows, : self.width], first.bias[rows]

    def imprint_gradients(self, obs: Observation) -> tuple[Tensor, Tensor]:
        """The chosen rows of the first layer's update (their first D entries: the input's), named as in the user's
        model or as in this wrapper."""
        rows = list(self.units)
        w, b = self.imprint_keys
        return (_observed(obs, (w, f"model.{w}"), f"layer {self.layer!r}")[rows, : self.width],
                _observed(obs, (b, f"model.{b}"), f"layer {self.layer!r}")[rows])

    def planted(self) -> list[PlantedSlice]:
        """What the server re-plants every round, in the user's state_dict names: the chosen rows of W1 and
        b1 and the chosen columns of W2 (their current values here, i.e. as planted)."""
        first, nxt = self.model.get_submodule(self.layer), self.model.get_submodule(self.next_layer)
        rows = list(self.units)
        convs = [PlantedSlice(f"{name}.{k}", 0, tuple(range(len(t))), t.detach().cpu().clone())
                 for name in self.convs for k, t in self.model.get_submodule(name).named_parameters(recurse=False)]
        return convs + [PlantedSlice(f"{self.layer}.weight", 0, self.units, first.weight.detach()[rows].cpu().clone()),
                PlantedSlice(f"{self.layer}.bias", 0, self.units, first.bias.detach()[rows].cpu().clone()),
                PlantedSlice(f"{self.next_layer}.weight", 1, self.units, nxt.weight.detach()[:, rows].cpu().clone())]


def _trace(model: nn.Module, x: Tensor) -> list[tuple[str, nn.Module, Tensor]]:
    """The leaf modules ``model`` runs on x, in call order, each with its first input (eval mode, no grad)."""
    calls: list[tuple[str, nn.Module, Tensor]] = []
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: calls.append(
        (name, mod, args[0] if args and isinstance(args[0], Tensor) else torch.empty(0))))
        for name, m in model.named_modules() if not any(True for _ in m.children())]
    try:
        with torch.no_grad(), in_mode(model, train=False):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return calls


def _owns_parameters(m: nn.Module) -> bool:
    return any(True for _ in m.parameters(recurse=False))


def _layers(model: nn.Module, calls: list[tuple[str, nn.Module, Tensor]], x: Tensor, layer: str | None,
            next_layer: str | None, convs: tuple[str, ...] = ()) -> tuple[str, str, int, int]:
    """Names of W1 and W2 and their positions in ``calls``, checked: W1 a Linear with a bias on x.flatten(1)
    (behind the pass-through ``convs``: on [x.flatten(1), 0]), called once, then only passive modules up to W2, a
    Linear taking W1's width."""
    names = [n for n, _, _ in calls]
    modules = dict(model.named_modules())
    if layer is None:
        first = next(((n, m) for n, m, _ in calls if _owns_parameters(m) and n not in convs), None)
        if first is None:
            raise ConfigError(f"{NEEDS}; found no layer with parameters in the model's forward")
        if not isinstance(first[1], nn.Linear):
            raise ConfigError(f"{NEEDS}; found {type(first[1]).__name__} {first[0]!r} first")
        layer = first[0]
    if layer not in modules:
        raise ConfigError(f"imprint layer {layer!r} is not a module of the model; allowed: a name from "
                          "model.named_modules() of an nn.Linear")
    if not isinstance(modules[layer], nn.Linear):
        raise ConfigError(f"{NEEDS}; imprint layer {layer!r} is a {type(modules[layer]).__name__}")
    if names.count(layer) != 1:
        raise ConfigError(f"{NEEDS}; layer {layer!r} runs {names.count(layer)} times in one forward (allowed: once)")
    at = names.index(layer)
    seen, flat = calls[at][2], x.flatten(1)
    d = flat.shape[1]
    carried = (seen.dim() == 2 and seen.shape[0] == flat.shape[0] and seen.shape[1] >= d
               and torch.equal(seen[:, :d], flat.to(seen)) and not bool(seen[:, d:].any()))
    if not carried or (not convs and seen.shape[1] != d):
        raise ConfigError(f"{NEEDS}; layer {layer!r} sees an input of shape {list(seen.shape)} that is not the "
                          f"flattened input x.flatten(1) {list(flat.shape)}"
                          + (" followed by zeros (the pass-through convolutions' output)" if convs else "")
                          + " (another layer runs before it?)")
    if modules[layer].bias is None:
        raise ConfigError(f"{NEEDS} and a bias (the bin offsets go there); layer {layer!r} has bias=False (the zoo's "
                          "mlp drops it with norm batch or group: use norm none)")
    if next_layer is None:
        nxt = next((i for i in range(at + 1, len(calls)) if isinstance(calls[i][1], nn.Linear)), None)
        if nxt is None:
            raise ConfigError(f"{NEEDS}, then another nn.Linear; found none after {layer!r}")
        next_layer = names[nxt]
    if next_layer not in modules or not isinstance(modules[next_layer], nn.Linear):
        found = type(modules[next_layer]).__name__ if next_layer in modules else "no such module"
        raise ConfigError(f"imprint next_layer {next_layer!r}: {found}; allowed: the nn.Linear after {layer!r}")
    if next_layer not in names[at + 1:]:
        raise ConfigError(f"imprint next_layer {next_layer!r} does not run after layer {layer!r}")
    nxt = names.index(next_layer, at + 1)
    width = modules[layer].out_features
    if modules[next_layer].in_features != width:
        raise ConfigError(f"imprint next_layer {next_layer!r} takes {modules[next_layer].in_features} features, not the "
                          f"{width} units of {layer!r}; allowed: the nn.Linear reading {layer!r}'s ReLU")
    between = [(n, m) for n, m, _ in calls[at + 1:nxt] if not isinstance(m, PASSIVE)]
    if between:
        n, m = between[0]
        raise ConfigError(f"{NEEDS}, with nothing in between but Identity (or Dropout); found {type(m).__name__} {n!r} "
                          f"between {layer!r} and {next_layer!r} (a norm layer there is not handled)")
    return layer, next_layer, at, nxt


def _pass_through(model: nn.Module, calls: list[tuple[str, nn.Module, Tensor]], x: Tensor, layer: str | None
                  ) -> tuple[str, ...]:
    """The ``nn.Conv2d`` layers that run before the imprint layer (``layer``, else the first nn.Linear), each set to
    carry the input's C channels unchanged (module docstring); () when a Linear comes first. ConfigError naming the
    layer and what is allowed when one cannot."""
    names = [n for n, _, _ in calls]
    if layer is not None and layer not in names:
        return ()  # _layers names what is wrong with it
    stop = names.index(layer) if layer is not None else next(
        (i for i, (_, m, _) in enumerate(calls) if isinstance(m, nn.Linear)), len(calls))
    before = [(n, m) for n, m, _ in calls[:stop] if _owns_parameters(m) or not isinstance(m, PASSIVE)]
    if not before or not isinstance(before[0][1], nn.Conv2d):
        return ()
    channels = x.shape[1] if x.dim() == 4 else None
    for n, m in before:
        if not isinstance(m, nn.Conv2d):
            raise ConfigError(f"{NEEDS}, or nn.Conv2d layers in front that carry the input unchanged; found "
                              f"{type(m).__name__} {n!r} between them (pooling, strides and norm layers are not "
                              "handled: they do not pass every pixel through)")
        k = m.kernel_size
        wrong = []
        if channels is None:
            wrong.append(f"inputs of shape {list(x.shape[1:])} (allowed: images [C, H, W])")
        if m.stride != (1, 1) or m.dilation != (1, 1) or m.groups != 1:
            wrong.append(f"stride {m.stride}, dilation {m.dilation}, groups {m.groups} (allowed: 1)")
        if m.padding_mode != "zeros" or any(s % 2 == 0 for s in k) or m.padding != (k[0] // 2, k[1] // 2):
            wrong.append(f"padding {m.padding} ({m.padding_mode}) for a {k[0]}x{k[1]} kernel (allowed: an odd "
                         "kernel with zero padding k//2, which keeps the size)")
        if channels is not None and m.out_channels < channels:
            wrong.append(f"{m.out_channels} output channels for the input's {channels} (allowed: at least {channels})")
        if wrong:
            raise ConfigError(f"{NEEDS}; found Conv2d {n!r} first, which cannot carry the input through unchanged: "
                              + "; ".join(wrong))
    if float(x.min()) < 0 and any(isinstance(m, nn.ReLU) for _, m, _ in calls[:stop]):
        raise ConfigError(f"{NEEDS}; the pass-through convolutions carry the input through ReLU, which needs "
                          f"non-negative inputs (pixels); the public inputs reach {float(x.min()):.4g}")
    assert channels is not None
    with torch.no_grad():
        for _, m in before:
            m.weight.zero_()
            for c in range(channels):
                m.weight[c, c, m.kernel_size[0] // 2, m.kernel_size[1] // 2] = 1.0
            if m.bias is not None:
                m.bias.zero_()
    return tuple(n for n, _ in before)


def plant_imprint_parameters(model: nn.Module, public_x: Tensor, *, bins: int, layer: str | None = None,
                             next_layer: str | None = None, units: list[int] | tuple[int, ...] | None = None,
                             measurement: Measurement = "brightness", cdf: Cdf = "empirical", feedback: float = 1e-2,
                             scale: float = 1.0, generator: torch.Generator | None = None) -> ParameterImprint:
    """The malicious parameters (module docstring) in a deep copy of ``model``: ``bins`` units of ``layer``
    (None: the first layer the input reaches, which must be an nn.Linear) feeding ``next_layer`` (None: the
    next nn.Linear run) through one shared column. ``units``: the hidden units, in bin order (None: 0..k-1).
    The bins are :func:`~mlaudit.attacks.federated.imprint.plant_imprint`'s for the same ``public_x``,
    ``measurement``, ``cdf``, ``scale`` and ``generator``. Raises ConfigError when the architecture does not
    allow it (the preflight on ``public_x``) or the bins cannot be placed."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    planted = copy.deepcopy(model)
    device = next((p.device for p in planted.parameters()), torch.device("cpu"))
    probe = public_x[:PREFLIGHT].to(device)
    calls = _trace(planted, probe)
    convs = _pass_through(planted, calls, probe, layer)
    if convs:  # the Linear's input changed: trace the planted convolutions' output
        calls = _trace(planted, probe)
    layer, next_layer, _, _ = _layers(planted, calls, probe, layer, next_layer, convs)
    first, nxt = planted.get_submodule(layer), planted.get_submodule(next_layer)
    d = probe.flatten(1).shape[1]
    width = first.out_features
    if not 1 <= bins <= width:
        raise ConfigError(f"imprint bins = {bins} exceeds the {width} hidden units of {layer!r} (Linear "
                          f"{first.in_features} -> {width}); allowed 1 <= bins <= {width}")
    chosen = tuple(range(bins)) if units is None else tuple(int(u) for u in units)
    if len(chosen) != bins or len(set(chosen)) != bins or not all(0 <= u < width for u in chosen):
        raise ConfigError(f"imprint units {list(chosen)[:8]}{'...' if len(chosen) > 8 else ''}: allowed {bins} distinct "
                          f"unit indices in [0, {width}) (one per bin)")
    placed = place_bins(public_x, bins=bins, measurement=measurement, cdf=cdf, scale=scale, generator=g)
    v = torch.randn(nxt.out_features, generator=g, dtype=torch.float64)
    v *= placed.feedback_norm(feedback, scale) / float(v.norm())
    rows = list(chosen)
    with torch.no_grad():
        first.weight[rows] = 0.0  # behind pass-through convolutions the features past D are zeros
        first.weight[rows, :d] = (scale * placed.direction).to(first.weight)
        first.bias[rows] = -(scale * placed.offsets).to(first.bias)
        nxt.weight[:, rows] = v.to(nxt.weight)[:, None]
    out = ParameterImprint(planted, layer, next_layer, chosen, convs=convs, width=d)
    _preflight(out, public_x, scale)
    return out


def _preflight(out: ParameterImprint, public_x: Tensor, scale: float) -> None:
    """The planted units reach the next layer as ReLU(s (h - c_i)), and on the public input with the largest
    measurement (it fires every bin) their gradients have the shared-g form: equal bias gradients g != 0
    and weight rows g x."""
    w, b = (t.detach().double().cpu() for t in out._rows())
    x = public_x.detach().flatten(1).double().cpu()
    top = int((x @ w[0]).argmax())
    probe = torch.cat([public_x[:PREFLIGHT], public_x[top:top + 1]]).to(next(out.parameters()).device)
    calls = _trace(out.model, probe)
    seen = next(inp for n, _, inp in calls if n == out.next_layer)[:, list(out.units)].double().cpu()
    xp = probe.flatten(1).double().cpu()
    want = F.relu(xp @ w.T + b)
    tol = 1e-4 * max(float(want.abs().max()), float((xp.abs() @ w.abs().T).max()), 1e-30)
    dev = float((seen - want).abs().max())
    if not dev <= tol:
        raise ConfigError(f"{NEEDS}; the planted units of {out.layer!r} do not reach {out.next_layer!r} as "
                          f"ReLU(s (h - c_i)) on the public inputs (largest deviation {dev:.3g}, tolerance {tol:.3g}): "
                          f"no ReLU after {out.layer!r}, or something between it and {out.next_layer!r}")
    model = copy.deepcopy(out.model).double().cpu()
    xt = public_x[top:top + 1].double().cpu()
    first = model.get_submodule(out.layer)
    with in_mode(model, train=False):
        logits = model(xt)
        loss = F.cross_entropy(logits.flatten(1), logits.flatten(1).argmin(1))
        gw, gb = torch.autograd.grad(loss, [first.weight, first.bias])
    rows = list(out.units)
    gw, gb = gw[rows, : out.width], gb[rows]
    if not (float(gb.abs().max()) > 0 and math.isfinite(float(gb.abs().max()))):
        raise ConfigError(f"{NEEDS}, whose units reach the loss through {out.next_layer!r}; the planted units get no "
                          "(finite) gradient on a public input")
    spread = float((gb - gb[0]).abs().max()) / float(gb.abs().max())
    off = float((gw - gb[:, None] * xt.flatten(1)).abs().max()) / max(float(gw.abs().max()), 1e-300)
    if not (spread < 1e-6 and off < 1e-6):
        raise ConfigError(f"{NEEDS}, whose output reaches the loss only through {out.next_layer!r}; on a public input "
                          f"the planted units' gradients differ between bins (relative spread {spread:.3g}; rows off "
                          f"g x by {off:.3g}): another path reads {out.layer!r} (a skip connection?)")
