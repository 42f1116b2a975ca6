"""Fast per-example clipping for DP-SGD: book-keeping with mixed ghost norms.

Book-keeping (BK; Bu et al., "Differentially private optimization on large model at small cost",
ICML 2023, Algorithm 1) computes the DP-SGD clipped sum ``sum_i w_i c_i g_i`` with
``c_i = min(1, C / (||g_i||_2 + 1e-6))`` (Abadi et al. 2016, the norm over *all* parameters jointly)
from ONE forward and ONE backward of the summed loss ``sum_i L_i``, never a second backward:

1. forward hooks record each supported layer's input ``a`` (A_i: [B, T, d_in] after reshaping, T the
   positions: tokens, or output pixels of a conv's unfolded input) and output tensor;
2. ``torch.autograd.grad(sum_i L_i, outputs)`` gives every layer's output gradient ``g`` (G_i: [B, T,
   d_out]; row i is dL_i/d out_i because examples do not interact) and computes no weight gradient;
3. per layer, every example's squared gradient norm: the ghost norm ``<A_i A_i^T, G_i G_i^T>`` (Li et
   al. 2021, "Large language models can be strong differentially private learners"; Bu et al. 2022,
   "Scalable and efficient training of large convolutional neural networks with differential privacy",
   mixed ghost clipping) or the materialised ``||G_i^T A_i||^2``, whichever the cost rule
   (:func:`~mlaudit.privacy.fastclip_rules.use_ghost`) finds cheaper, counting both halves: the ghost
   norm costs B T^2 (d_in + d_out) and then a weighted product B T d_in d_out; materialising costs
   B T d_in d_out and then B d_in d_out for ``sum_i f_i grad_i`` of the kept gradients (or the
   weighted product again when B d_in d_out is too large to keep); so ghost iff
   ``T^2 (d_in + d_out) < d_in d_out`` (kept), else iff ``T (d_in + d_out) < d_in d_out``;
4. ``f_i = w_i min(1, C / (sqrt(sum_layers ||g_i^l||^2) + 1e-6))`` and per layer the clipped sum as one
   weighted product ``sum_i f_i G_i^T A_i`` (Linear: one matmul; Conv2d: one ``convolution_backward`` of
   ``f * G``; or ``sum_i f_i grad_i`` of the kept materialised gradients).

Rules (:mod:`mlaudit.privacy.fastclip_rules`): ``nn.Linear`` ([B, d] or [B, *, d]), ``nn.Conv2d`` (any
stride, padding, padding mode, dilation, groups) and ``nn.Conv1d`` (as a Conv2d of height 1), ``nn.GroupNorm``,
affine ``nn.InstanceNorm*d`` without running statistics (a group per channel), ``nn.LayerNorm``, ``nn.RMSNorm``,
``nn.PReLU``, ``nn.Embedding``, biases, and ``nn.MultiheadAttention`` (so ``nn.TransformerEncoderLayer`` / ``DecoderLayer``): its projections are
used functionally, so while the tape is on the module runs :func:`~mlaudit.privacy.fastclip_rules.mha_forward`,
the same arithmetic written out, which records the query, key, value and output projections' inputs and
outputs, and each is a Linear with T = the sequence length. Attention written with ``nn.Linear`` projections
(as a ViT block does) is covered by the Linear rule. ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` likewise run
:func:`~mlaudit.privacy.fastclip_rules.rnn_forward`: per layer and direction, the input projection and the
recurrent projection are each a Linear over the T steps. Everything else with trainable parameters is refused by
:func:`check_fast_clip` with the layer's name (BatchNorm mixes the examples of a batch; attention with
``add_bias_kv`` or ``add_zero_attn``); a layer called on a tensor without the batch dimension (its output shared by all
examples) is refused when it runs; and :func:`verify_fast_clip` compares, once, the rules' unclipped sum
with autograd's gradient and two examples' norms with their own single-example gradients, which catches
parameters used outside their layer's forward (weight tying, functional calls) and examples that
interact. Results equal :func:`mlaudit.privacy.dpsgd.clipped_sum` of the per-example gradients to float
rounding (tests/privacy/test_fastclip.py), provided the forward is deterministic (dropout draws
different masks than the per-example path).
"""

from __future__ import annotations

import functools
import math
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from . import fastclip_rules
from .fastclip_rules import RULES, WRITTEN_OUT, Mode, Rule, matmul_tf32, tf32_enabled

PER_EXAMPLE_HINT = "use `dp: {clipping: per-example}`"


@dataclass(frozen=True)
class _Layer:
    name: str  # module path ("" for the model itself)
    module: nn.Module
    rule: Rule
    params: tuple[tuple[str, str], ...]  # (full parameter name, name within the module)


def _label(name: str, module: nn.Module) -> str:
    return f"layer {name!r} ({type(module).__name__})" if name else f"the model itself ({type(module).__name__})"


def _plan(model: nn.Module, report: list[dict[str, object]] | None = None) -> list[_Layer]:
    """The layers with parameters and their rules; raises :class:`UnsupportedModelError` naming the first
    module that has none (or shares a parameter with another module). With ``report`` (a list), appends a row per
    module with parameters (or BatchNorm) instead of raising (see :func:`fast_clip_report`)."""
    layers, owner = [], {}
    covered: set[str] = set()  # an attention module's out_proj: its parameters are the attention rule's

    def row(name: str, m: nn.Module, n: int, error: str | None) -> None:
        if report is None:
            if error is not None:
                raise UnsupportedModelError(error)
            return
        report.append({"layer": name, "type": type(m).__name__, "parameters": n, "supported": error is None,
                       "error": error})

    for name, m in model.named_modules():
        if name in covered:
            continue
        own = list(m.named_parameters(recurse=False))
        n = sum(p.numel() for _, p in own)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            row(name, m, n, f"{_label(name, m)} mixes the examples of a batch, so no per-example gradient exists; use "
                            "GroupNorm (`model: {name: ..., norm: group}`) or no normalisation")
            continue
        if type(m) is nn.MultiheadAttention:
            own += [(f"out_proj.{s}", p) for s, p in m.out_proj.named_parameters(recurse=False)]
            n = sum(p.numel() for _, p in own)
            covered.add(f"{name}.out_proj" if name else "out_proj")
        if not own:
            continue
        shared = [(short, owner[id(p)]) for short, p in own if id(p) in owner]
        for _, p in own:
            owner.setdefault(id(p), name)
        rule = RULES.get(type(m))
        why = None
        if shared:
            short, first = shared[0]
            why = (f"{_label(name, m)} shares parameter {short!r} with layer {first!r} (weight tying); fast clipping "
                   f"needs one layer per parameter: {PER_EXAMPLE_HINT}")
        elif rule is None:
            why = (f"{_label(name, m)} has trainable parameters but no fast-clipping rule; rules exist for "
                   f"{', '.join(t.__name__ for t in RULES)}: {PER_EXAMPLE_HINT}")
        else:
            reason = rule.check(m)
            unknown = sorted({s for s, _ in own} - rule.params)
            if reason is None and unknown:
                reason = f"parameters {unknown} that the {type(m).__name__} rule does not cover"
            if reason is not None:
                why = f"{_label(name, m)} is not supported by fast clipping: {reason}; {PER_EXAMPLE_HINT}"
        row(name, m, n, why)
        if why is None and rule is not None:
            prefix = f"{name}." if name else ""
            layers.append(_Layer(name, m, rule, tuple((prefix + s, s) for s, _ in own)))
    return layers


def fast_clip_report(model: nn.Module) -> list[dict[str, object]]:
    """One row per module with trainable parameters (and per BatchNorm): ``layer`` (its name), ``type``,
    ``parameters`` (its own, an attention module's out_proj included), ``supported`` by book-keeping clipping (the
    rule of its type), or the ``error`` :func:`check_fast_clip` would raise for it (what is wrong and the fix), as
    Opacus's ``ModuleValidator.validate`` lists every problem at once. Static: a layer called twice, on inputs
    without the batch dimension or modified in place shows only when the model runs (:func:`verify_fast_clip`)."""
    report: list[dict[str, object]] = []
    _plan(model, report)
    return report


def check_fast_clip(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` naming the first module of ``model`` with trainable parameters
    but no fast-clipping rule (BatchNorm: "mixes examples of a batch; use GroupNorm")."""
    _plan(model)


def fast_clip_supported(model: nn.Module) -> bool:
    """Whether every layer with parameters has a rule (:func:`check_fast_clip` raises nothing)."""
    try:
        _plan(model)
    except UnsupportedModelError:
        return False
    return True


@dataclass
class _Record:
    a: Tensor | tuple[Tensor, ...]  # the layer's input, detached (attention: its four projections' inputs)
    out: Tensor | tuple[Tensor, ...]  # its output, in the graph (attention: the four projections' outputs)
    versions: tuple[int, ...]


def _seq(t: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return t if isinstance(t, tuple) else (t,)


def _versions(r: _Record) -> tuple[int, ...]:
    return tuple(t._version for t in (*_seq(r.a), *_seq(r.out)))


@contextmanager
def _tape(layers: list[_Layer], batch: int) -> Iterator[dict[str, _Record]]:
    """Forward hooks recording each layer's (input, output) of one forward pass of ``batch`` examples."""
    rec: dict[str, _Record] = {}

    def hook(layer: _Layer, _m: nn.Module, args: tuple[object, ...], out: object) -> None:
        if layer.name in rec:
            raise UnsupportedModelError(f"{_label(layer.name, layer.module)} is called more than once per forward "
                                        f"(weight sharing); {PER_EXAMPLE_HINT}")
        if len(args) != 1 or not isinstance(args[0], Tensor) or not isinstance(out, Tensor):
            raise UnsupportedModelError(f"{_label(layer.name, layer.module)} must take one tensor and return one "
                                        f"tensor for fast clipping; {PER_EXAMPLE_HINT}")
        a = args[0].detach()
        if a.dim() == 0 or a.shape[0] != batch or out.dim() == 0 or out.shape[0] != batch:
            raise UnsupportedModelError(
                f"{_label(layer.name, layer.module)} is called on a tensor of shape {tuple(a.shape)} (output "
                f"{tuple(out.shape)}) without the batch dimension ({batch} examples first), so its output is shared "
                f"by all examples; give it per-example inputs (e.g. positions expanded to [B, T]) or {PER_EXAMPLE_HINT}")
        rec[layer.name] = _Record(a, out, (a._version, out._version))

    def written_out(layer: _Layer, *args: object, **kwargs: object) -> tuple[Tensor, Any]:
        """An nn.MultiheadAttention's or nn.LSTM's / nn.GRU's forward, written out so that its linear maps are
        recorded."""
        if layer.name in rec:
            raise UnsupportedModelError(f"{_label(layer.name, layer.module)} is called more than once per forward "
                                        f"(weight sharing); {PER_EXAMPLE_HINT}")

        def record(a: tuple[Tensor, ...], out: tuple[Tensor, ...]) -> None:
            if any(t.shape[0] != batch for t in a):
                raise UnsupportedModelError(
                    f"{_label(layer.name, layer.module)} is called on inputs of shapes {[tuple(t.shape) for t in a[:3]]}"
                    f" without the batch dimension ({batch} examples); {PER_EXAMPLE_HINT}")
            r = _Record(tuple(t.detach() for t in a), out, ())
            r.versions = _versions(r)
            rec[layer.name] = r

        return WRITTEN_OUT[type(layer.module)](layer.module, record, *args, **kwargs)

    handles, patched = [], []
    for lay in layers:
        if type(lay.module) in WRITTEN_OUT:
            # its weights are used inside one fused call (F.multi_head_attention_forward, the recurrent kernels): no
            # hook sees them, so the module runs its arithmetic written out while the tape is on
            patched.append((lay.module, lay.module.__dict__.get("forward")))
            lay.module.forward = functools.partial(written_out, lay)
        else:
            handles.append(lay.module.register_forward_hook(functools.partial(hook, lay)))
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()
        for m, own in patched:
            if own is None:
                del m.forward
            else:
                m.forward = own


@contextmanager
def _all_require_grad(model: nn.Module) -> Iterator[list[nn.Parameter]]:
    """Every parameter requires grad inside (the per-example path differentiates all of them)."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield frozen
    finally:
        for p in frozen:
            p.requires_grad_(False)


def _forward(model: nn.Module, layers: list[_Layer], x: Tensor, y: Tensor, label_smoothing: float,
             extra: list[Tensor], bf16: bool = False
             ) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]], list[Tensor | None]]:
    """One forward and one backward of sum_i L_i: (losses [B], {layer: (a, g)}, grads of ``extra``);
    the forward under bf16 autocast when ``bf16``."""
    # no autocast cast cache: each parameter is used once per forward here (weight sharing is refused), so it
    # saves nothing, and a step captured as a CUDA graph must not keep cast weights across replays
    with torch.enable_grad(), _tape(layers, len(x)) as rec, \
            torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
        out = model(x)
    with torch.enable_grad():
        losses = F.cross_entropy(out.float(), y, reduction="none", label_smoothing=label_smoothing)
    for lay in layers:
        r = rec.get(lay.name)
        if r is not None and _versions(r) != r.versions:
            raise UnsupportedModelError(
                f"{_label(lay.name, lay.module)}: its input or output is modified in place later in the forward "
                f"(e.g. ReLU(inplace=True)); use inplace=False or {PER_EXAMPLE_HINT}")
    names = [n for n, r in rec.items() if any(o.requires_grad for o in _seq(r.out))]
    outs = [o for n in names for o in _seq(rec[n].out)]
    grads = torch.autograd.grad(losses.sum(), outs + extra, allow_unused=True)
    # under autocast a layer's input and output may differ in dtype (a conv after a float32 GroupNorm):
    # its rule computes in its output gradient's dtype (a conv casts while it unfolds)
    ag: dict[str, tuple[Any, Any]] = {}
    i = 0
    for n in names:
        r = rec[n]
        got = grads[i:i + len(_seq(r.out))]
        i += len(got)
        if not isinstance(r.out, tuple):
            if got[0] is not None:
                ag[n] = (r.a, got[0])
        elif any(g is not None for g in got):  # attention: an unused projection's gradient is zero
            ag[n] = (r.a, tuple(g if g is not None else torch.zeros_like(o) for g, o in zip(got, r.out)))
    return losses.detach(), ag, list(grads[len(outs):])


def _clipped_sums(model: nn.Module, layers: list[_Layer], ag: dict[str, tuple[Tensor, Tensor]], weights: Tensor,
                  clip: float, mode: Mode) -> tuple[list[Tensor], Tensor]:
    """Per-layer norms, clip factors f_i = w_i min(1, C / (||g_i|| + 1e-6)): (weighted sums in
    ``named_parameters`` order, squared norms ||g_i||^2 [B])."""
    dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)
    states, parts = {}, []
    with torch.no_grad():
        for lay in layers:
            if lay.name in ag:
                s, states[lay.name] = lay.rule.norms(lay.module, *ag[lay.name], mode)
                parts.append(s.to(dtype))
        # one reduction over the layers (a kernel per layer when accumulated one by one; the step is launch-bound
        # on small models)
        sq = torch.stack(parts).sum(0) if parts else torch.zeros(len(weights), dtype=dtype, device=weights.device)
        f = (clip / (sq.sqrt() + 1e-6)).clamp(max=1.0) * weights.to(dtype)
        sums: dict[str, Tensor] = {}
        for lay in layers:
            if lay.name in ag:
                a, g = ag[lay.name]
                got = lay.rule.sums(lay.module, a, g, f.to(_seq(g)[0].dtype), states[lay.name])
                sums.update({full: got[short] for full, short in lay.params})
        return [sums[n].to(p.dtype) if n in sums else torch.zeros_like(p) for n, p in model.named_parameters()], sq


COMPILE_RECORD: bool = False
"""With ``compiled``, also compile book-keeping's recording forward and its backward to the layer outputs (steps 1-2
of the module docstring), not only the norms and sums. Off by default until timed on a GPU (issue 15: on an H100 the
fast CNN's graphed compiled step spent about as long in the eager recording pass as the whole non-private step).

A compiled forward is one autograd node, so the gradient with respect to an inner layer's output cannot be asked of
it. Instead each recorded layer's output gets a zero added, ``out + z`` (z a stride-0 zero of the output's shape and
dtype, an input of the compiled graph that requires grad), and the backward asks for ``dL/dz``, which equals
``dL/d out`` (the total, through every later layer). The parameters do not require grad during the pass, so
AOT-autograd's backward computes only those input gradients, no weight gradient. Adding an exact zero changes no
value. The first call per model and input shape runs the eager pass (:func:`_forward`: its checks, in-place
modification and batch dimension included), which also gives the output shapes; later calls take the compiled one.
Models with a written-out layer (attention, recurrent; :data:`~mlaudit.privacy.fastclip_rules.WRITTEN_OUT`) keep the
eager pass."""


class _Probe:
    """The compiled recording pass's per-call state, read by the forward hooks while it runs (one pass at a time:
    :data:`_PROBE_LOCK`): the zeros added to the outputs and the recorded inputs, by hook position."""

    zs: list[Tensor] | None = None
    acts: list[Tensor | None] | None = None


_PROBE = _Probe()
_PROBE_LOCK = threading.Lock()  # a background compile (the factory's compile: auto) and the job's thread
_OUT_SHAPES: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], list[tuple[str, torch.Size, torch.dtype]]]] = \
    weakref.WeakKeyDictionary()  # per model and input: the recorded layers' (name, output shape, dtype)


def _probe_hook(i: int, _m: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
    """Forward hook of the ``i``-th recorded layer in the compiled pass: keep its input, add its zero."""
    assert _PROBE.acts is not None and _PROBE.zs is not None
    _PROBE.acts[i] = args[0]
    return out + _PROBE.zs[i]


def _probe_forward(model: nn.Module, x: Tensor, y: Tensor, zs: list[Tensor], label_smoothing: float,
                   bf16: bool) -> tuple[Tensor, list[Tensor | None]]:
    """The recording forward traced by :func:`_compiled_probe_forward`: (per-example losses [B], the recorded
    layers' inputs in hook order). Sets and clears :data:`_PROBE` inside, so dynamo sees the hooks' reads."""
    _PROBE.zs, _PROBE.acts = zs, [None] * len(zs)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
        out = model(x)
    losses = F.cross_entropy(out.float(), y, reduction="none", label_smoothing=label_smoothing)
    acts = _PROBE.acts
    _PROBE.zs = _PROBE.acts = None
    return losses, acts


@functools.cache
def _compiled_probe_forward() -> Callable[..., tuple[Tensor, list[Tensor | None]]]:
    """:func:`_probe_forward` under ``torch.compile``, built once (models of one architecture share its graphs, as
    :func:`_compiled_sums`' do); its backward is AOT-autograd's, compiled with it."""
    return torch.compile(_probe_forward)


def _compiled_record(model: nn.Module, layers: list[_Layer], x: Tensor, y: Tensor, label_smoothing: float,
                     bf16: bool, shapes: list[tuple[str, torch.Size, torch.dtype]]
                     ) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]]]:
    """Steps 1-2 compiled (:data:`COMPILE_RECORD`): (losses [B] detached, {layer: (a, g)}) as :func:`_forward`
    gives them, to float rounding. ``shapes``: the recorded layers' (name, output shape, dtype) from the eager pass
    of this model at this input."""
    by_name = {lay.name: lay.module for lay in layers}
    zs = [torch.zeros((), dtype=dt, device=x.device).expand(s).requires_grad_() for _, s, dt in shapes]
    trainable = [p for p in model.parameters() if p.requires_grad]
    with _PROBE_LOCK:
        handles = [by_name[n].register_forward_hook(functools.partial(_probe_hook, i))
                   for i, (n, _, _) in enumerate(shapes)]
        for p in trainable:
            p.requires_grad_(False)
        try:
            with torch.enable_grad():
                losses, acts = _compiled_probe_forward()(model, x, y, zs, label_smoothing, bf16)
                grads = torch.autograd.grad(losses.sum(), zs, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
            for p in trainable:
                p.requires_grad_(True)
    ag: dict[str, tuple[Any, Any]] = {}
    for (n, _, _), a, g, z in zip(shapes, acts, grads, zs):
        assert a is not None  # the eager pass saw this layer run on this input
        ag[n] = (a.detach(), g if g is not None else torch.zeros(z.shape, dtype=z.dtype, device=z.device))
    return losses.detach(), ag


def _record(model: nn.Module, layers: list[_Layer], x: Tensor, y: Tensor, label_smoothing: float, bf16: bool,
            compiled: bool) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]]]:
    """Steps 1-2 for :func:`clipped_grad_sum`: the compiled pass where :data:`COMPILE_RECORD` and ``compiled`` ask
    for it and it can run (no written-out layer, and an eager pass of this model at this input has recorded the
    output shapes), else the eager one (which then records them for the next call)."""
    known = None
    if compiled and COMPILE_RECORD and not any(type(lay.module) in WRITTEN_OUT for lay in layers):
        known = _OUT_SHAPES.setdefault(model, {})
        key = (tuple(x.shape), x.dtype, x.device, bf16)
        if key in known:
            return _compiled_record(model, layers, x, y, label_smoothing, bf16, known[key])
    with _all_require_grad(model):
        losses, ag, _ = _forward(model, layers, x, y, label_smoothing, [], bf16)
    if known is not None:
        known[key] = [(n, g.shape, g.dtype) for n, (_, g) in ag.items()]
    return losses, ag


@functools.cache
def _compiled_sums() -> Callable[..., tuple[list[Tensor], Tensor]]:
    """:func:`_clipped_sums` under ``torch.compile``, built once: the model and its layer plan are arguments, so
    models of one architecture share the compiled graphs. Dynamo's automatic dynamic shapes: the first slot count
    compiles a static graph, the second one graph with a symbolic batch size that serves every later count, as
    long as no rule loops over the batch (a layer whose transients exceed one chunk,
    :data:`~mlaudit.privacy.fastclip_rules.CHUNK_ELEMENTS`, does, and then each count compiles: so the compiled
    DP steps draw a few bucketed widths). The cost rule's choices become guards on the batch size, not
    specialisations. On the CPU (ResNet-18-GN, width 8) the dynamic graph ran as fast as a static one."""
    return torch.compile(_clipped_sums)


def clipped_grad_sum(model: nn.Module, x: Tensor, y: Tensor, weights: Tensor, *, clip: float,
                     label_smoothing: float = 0.0, mode: Mode = "auto", bf16: bool = False, compiled: bool = False
                     ) -> tuple[list[Tensor], Tensor]:
    """``sum_i w_i clip_C(g_i)`` for ONE model by book-keeping (see the module docstring).

    x [B, *shape], y [B] (int64), weights [B] (the 0/1 Poisson slot weights; 0 contributes nothing) ->
    (clipped sums in ``model.named_parameters()`` order, each of its parameter's shape; per-example
    cross-entropy losses [B], detached). The same as
    ``clipped_sum(per_example_grads(...), weights, clip)`` of :mod:`mlaudit.privacy.dpsgd` to float
    rounding. ``mode`` forces the ghost norm or materialised per-example gradients for Linear and
    Conv2d weights (default: the cost rule per layer). ``bf16``: the forward runs under bf16 autocast
    (as the non-private loop's ``precision: bf16``) and each layer's norms and sum are computed from
    its bf16 output gradients and inputs, squared norms summed in float32; the result then equals the
    float32 one to bf16 rounding (~1e-2 relative), not float rounding. ``compiled``: the norms, clip factors and
    sums (step 3 and 4 above) run as one ``torch.compile``d graph (inductor fuses their reductions and pointwise
    work; the same result to float rounding); the forward and backward stay eager, since book-keeping
    differentiates with respect to every layer's output and a compiled forward would hide those in one autograd
    node, unless :data:`COMPILE_RECORD` (zeros added to the outputs stand in for them). Uses the model's current
    train/eval mode; raises :class:`UnsupportedModelError` naming an unsupported layer.
    """
    layers = _plan(model)
    losses, ag = _record(model, layers, x, y, label_smoothing, bf16, compiled)
    if not compiled:
        return _clipped_sums(model, layers, ag, weights, clip, mode)[0], losses
    # CONV_NORMS_TF32 around the compiled call: inside it dynamo cannot switch precisions (a graph break per conv)
    tf32 = fastclip_rules.CONV_NORMS_TF32
    with matmul_tf32(tf32) if tf32 is not None and fastclip_rules.on_cuda(x) else nullcontext():
        return _compiled_sums()(model, layers, ag, weights, clip, mode)[0], losses


@contextmanager
def exact_float32() -> Iterator[None]:
    """IEEE float32 convolutions and matmuls inside (cuDNN's TF32 default off), restored on exit.

    :func:`verify_fast_clip` checks structure (parameters used outside their layer, examples that interact),
    not rounding: with TF32 a batch's and a lone example's gradient norms differ by cancellation, and on the
    H200 (2026-12-03, a fast-CNN DP audit) one example's norm came out 1.1% apart (16.03 vs 15.86), which
    failed the 1% check and sent the run to the per-example path."""
    cudnn = tf32_enabled("conv")  # read through the fp32_precision API, set through the legacy flags (see there)
    with matmul_tf32(False):
        torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32 = cudnn


@contextmanager
def native_rnn(model: nn.Module, device: torch.device) -> Iterator[None]:
    """cuDNN off inside when ``model`` has a recurrent layer (``nn.LSTM`` / ``GRU`` / ``RNN``) and runs on CUDA: cuDNN's
    recurrent kernels refuse a backward pass in eval mode ("cudnn RNN backward can only be called in training mode",
    which :func:`verify_fast_clip` needs) and fail under ``vmap`` ("Cannot access data pointer of Tensor that doesn't
    have storage", the per-example path); H100, 2026-12-07, an LSTM in ``benchmarks/dp_throughput.py``. PyTorch's
    native kernels do both, as on the CPU."""
    if device.type != "cuda" or not any(isinstance(m, nn.RNNBase) for m in model.modules()):
        yield
        return
    before = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False
    try:
        yield
    finally:
        torch.backends.cudnn.enabled = before


def verify_fast_clip(model: nn.Module, x: Tensor, y: Tensor, *, label_smoothing: float = 0.0, rtol: float = 1e-2,
                     mode: Mode = "auto", examples: int = 2) -> None:
    """Check the rules on one batch (x [B, *shape], y [B]) with the model in eval mode (no dropout); raise
    :class:`UnsupportedModelError` unless

    * the rules' unclipped sum ``sum_i g_i`` equals autograd's gradient of ``sum_i L_i`` for every
      parameter, to ``rtol`` of its norm (plus 1e-3 of the total norm): catches parameters used outside
      their layer's forward;
    * the first ``examples`` per-example norms ``||g_i||`` equal those of a forward and backward of example
      i alone, to ``rtol``: catches examples that interact (a layer's output shared across the batch).

    Runs in exact float32 (:func:`exact_float32`), so TF32 rounding cannot fail it.
    """
    layers = _plan(model)
    named = list(model.named_parameters())
    was_training = model.training
    model.eval()
    try:
        with _all_require_grad(model), exact_float32(), native_rnn(model, y.device):
            _, ag, true = _forward(model, layers, x, y, label_smoothing, [p for _, p in named])
            fast, sq = _clipped_sums(model, layers, ag, torch.ones(len(y), device=y.device), math.inf, mode)
            alone = []
            for i in range(min(examples, len(y))):
                loss = F.cross_entropy(model(x[i:i + 1]).float(), y[i:i + 1], label_smoothing=label_smoothing)
                gi = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
                alone.append(sum(float(g.double().square().sum()) for g in gi if g is not None))
    finally:
        model.train(was_training)
    want = [t if t is not None else torch.zeros_like(p) for t, (_, p) in zip(true, named)]
    total = math.sqrt(sum(float(w.double().square().sum()) for w in want))
    for (name, _), got, w in zip(named, fast, want):
        err, ref = float((got.double() - w.double()).norm()), float(w.double().norm())
        if not err <= rtol * (ref + 1e-3 * total) + 1e-12:
            raise UnsupportedModelError(
                f"parameter {name!r}: the fast-clipping rules' gradient differs from autograd's (relative error "
                f"{err / max(ref, 1e-30):.2g}), so it is used outside its layer's forward (weight tying, a "
                f"functional call, a patched forward); {PER_EXAMPLE_HINT}")
    for i, a in enumerate(alone):
        got_norm, ref_norm = math.sqrt(float(sq[i])), math.sqrt(a)
        if not abs(got_norm - ref_norm) <= rtol * ref_norm + 1e-12:
            raise UnsupportedModelError(
                f"example {i}'s gradient norm is {got_norm:.6g} by the fast-clipping rules on the batch but "
                f"{ref_norm:.6g} alone: the examples of a batch interact (a layer mixes them or shares its "
                f"output); {PER_EXAMPLE_HINT}")
