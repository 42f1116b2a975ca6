"""Per-layer rules of book-keeping clipping (:mod:`mlaudit.privacy.fastclip`).

A rule turns one layer's recorded input activations ``a`` and output gradients ``g`` (of the
*summed* loss, so row i of ``g`` is example i's own output gradient) into

* ``norms(m, a, g, mode) -> (sq [B], state)``: every example's squared gradient norm over the
  layer's parameters, and what the second half needs;
* ``sums(m, a, g, f [B], state) -> {param name: sum_i f_i grad_i}``: the clipped, weighted sum.

Linear and Conv2d weights (per example ``grad_i = G_i^T A_i`` with ``A_i [T, d_in]``, ``G_i [T, d_out]``;
for a conv ``A_i`` is the unfolded input, ``d_in = C_in k_h k_w / groups`` and ``T = H_out W_out``)
choose per layer by the cost rule of :func:`use_ghost`:

* ghost norm (Goodfellow 2015 for T = 1; Li et al. 2021, "Large language models can be strong
  differentially private learners", eq. 6; Bu et al. 2022, "Scalable and efficient training of large
  convolutional neural networks with differential privacy", mixed ghost clipping):
  ``||G_i^T A_i||_F^2 = <A_i A_i^T, G_i G_i^T>``, O(B T^2 (d_in + d_out)) time and B T^2 memory;
  the clipped sum is then one weighted weight gradient ``(G * f)^T A`` (for a conv one
  ``convolution_backward``), as in book-keeping (Bu et al. 2023, "Differentially private optimization
  on large model at small cost", ICML, Algorithm 1);
* materialising ``grad_i`` (O(B T d_in d_out) time, B d_in d_out memory; a conv's by ONE
  ``convolution_backward`` with the batch folded into the groups, Rochette et al. 2019, "Efficient
  per-example gradient computations in convolutional neural networks", or by unfold + bmm, see
  :data:`CONV_MATERIALISE`); the clipped sum is then ``sum_i f_i grad_i`` of the kept per-example
  gradients (O(B d_in d_out)).

Biases (``sum_t G_i[t]``), GroupNorm/LayerNorm affine parameters (``sum_t G_i[t] * xhat_i[t]`` with the
normalised input recomputed from ``a``) have per-example gradients no larger than their outputs:
always materialised. Embedding rows: ghost norm with ``A_i A_i^T`` the 0/1 matrix of equal token ids.
Memory: batches are cut into chunks of at most :data:`CHUNK_ELEMENTS` transient elements.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnsupportedModelError

Mode = Literal["auto", "ghost", "materialise"]
CHUNK_ELEMENTS = 2**27
"""Largest transient tensor (unfolded inputs, Gram matrices, per-example gradients) of one batch chunk."""
KEEP_ELEMENTS = 2**26
"""Materialised per-example gradients of one layer ([B, *weight]) are kept for the clipped sum up to this
size; above it the sum is recomputed as a weighted weight gradient."""
CONV_MATERIALISE: Literal["grouped", "unfold"] = "unfold"
"""How a conv's per-example gradients are materialised: unfold (:func:`im2col`, one strided copy) + one
batched matmul (``unfold``), or one convolution_backward with groups = B * groups (``grouped``)."""


def use_ghost(t: int, d_in: int, d_out: int, mode: Mode, *, keep: bool = True) -> bool:
    """The cost rule (``mode`` auto; else as forced), per example and counting both halves:

    * ghost: norm T^2 (d_in + d_out), then the weighted product T d_in d_out;
    * materialise: T d_in d_out, then sum_i f_i grad_i: d_in d_out when the gradients are ``keep``-t
      (then ghost iff T^2 (d_in + d_out) < d_in d_out), else the weighted product again, T d_in d_out
      (then ghost iff T (d_in + d_out) < d_in d_out).
    """
    if mode != "auto":
        return mode == "ghost"
    return t * t * (d_in + d_out) < (d_in * d_out if keep else t * d_in * d_out)


def use_ghost_shifted(t: int, t_wide: int, positions: int, c_in: int, c_out: int, taps: int, mode: Mode, *,
                      keep: bool = True) -> bool:
    """The cost rule for a stride-1 conv through shifted windows (:class:`_Shifted`), per example: ghost
    ``L^2 C_in + T'^2 (C_out + taps)`` for the norm, then the weighted weight gradient ``T taps C_in C_out``;
    materialise ``taps C_out C_in T'``, then ``taps C_in C_out`` (kept) or the weighted gradient again."""
    if mode != "auto":
        return mode == "ghost"
    weighted = t * taps * c_in * c_out
    ghost = positions * positions * c_in + t_wide * t_wide * (c_out + taps) + weighted
    return ghost < taps * c_out * c_in * t_wide + (taps * c_in * c_out if keep else weighted)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums of squares are accumulated in: float32 for half-precision (bf16 autocast) layers."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _up(x: Tensor) -> Tensor:
    return x.to(_acc(x.dtype))


def _chunks(b: int, per_example: int) -> list[slice]:
    n = max(1, CHUNK_ELEMENTS // max(1, per_example))
    if b <= n:  # one chunk: no loop over b, so torch.compile keeps a dynamic batch size symbolic (a guard b <= n)
        return [slice(None)]
    return [slice(i, min(b, i + n)) for i in range(0, b, n)]


def ghost_sq(a: Tensor, g: Tensor) -> Tensor:
    """<A_i A_i^T, G_i G_i^T> per example: a [B, T, p], g [B, T, d] -> [B] (= ||G_i^T A_i||_F^2)."""
    b, t = a.shape[:2]
    if t == 1:
        return _up(a).square().sum((1, 2)) * _up(g).square().sum((1, 2))
    out = a.new_empty(b, dtype=_acc(a.dtype))
    for s in _chunks(b, 2 * t * t):
        out[s] = (_up(torch.bmm(a[s], a[s].mT)) * _up(torch.bmm(g[s], g[s].mT))).sum((1, 2))
    return out


def materialise(per: Callable[[slice], Tensor], b: int, numel: int, transient: int) -> tuple[Tensor, Tensor | None]:
    """Squared norms [B] of the per-example gradients ``per(slice) -> [n, *s]`` (``numel`` entries each,
    ``transient`` more elements per example to build them), and all of them [B, *s] when small enough."""
    keep = b * numel <= KEEP_ELEMENTS
    sq, parts = [], []
    for s in _chunks(b, numel + transient):
        p = per(s)
        sq.append(_up(p.flatten(1)).square().sum(1))
        if keep:
            parts.append(p)
    kept = (parts[0] if len(parts) == 1 else torch.cat(parts)) if keep else None
    return (sq[0] if len(sq) == 1 else torch.cat(sq)), kept


def weigh(f: Tensor, per: Tensor) -> Tensor:
    """sum_i f_i per_i: f [B], per [B, *s] -> [*s]."""
    return (f @ per.flatten(1)).view(per.shape[1:])


@dataclass(frozen=True)
class Rule:
    """How one layer type gives per-example norms and clipped sums (see the module docstring)."""

    params: frozenset[str]
    norms: Callable[[Any, Tensor, Tensor, Mode], tuple[Tensor, dict[str, Any]]]
    sums: Callable[[Any, Tensor, Tensor, Tensor, dict[str, Any]], dict[str, Tensor]]
    check: Callable[[Any], str | None] = lambda m: None


def _tokens(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _with_bias(sq: Tensor, st: dict[str, Any], gb: Tensor | None) -> tuple[Tensor, dict[str, Any]]:
    if gb is not None:
        st["bias"] = gb
        sq = sq + _up(gb).square().sum(1)
    return sq, st


# ------------------------------------------------------------------------------------------ nn.Linear
def _linear_norms(m: nn.Linear, a: Tensor, g: Tensor, mode: Mode) -> tuple[Tensor, dict[str, Any]]:
    """a [B, *, d_in], g [B, *, d_out] (T = prod(*))."""
    a3, g3 = _tokens(a).to(g.dtype), _tokens(g)
    (b, t, d_in), d_out = a3.shape, g3.shape[2]
    st: dict[str, Any] = {}
    if use_ghost(t, d_in, d_out, mode, keep=b * d_in * d_out <= KEEP_ELEMENTS):
        sq = ghost_sq(a3, g3)
    else:
        sq, st["weight"] = materialise(lambda s: torch.bmm(g3[s].mT, a3[s]), b, d_in * d_out, 0)
    return _with_bias(sq, st, g3.sum(1) if m.bias is not None else None)


def _linear_sums(m: nn.Linear, a: Tensor, g: Tensor, f: Tensor, st: dict[str, Any]) -> dict[str, Tensor]:
    if st.get("weight") is not None:
        out = {"weight": weigh(f, st["weight"])}
    else:
        a3, g3 = _tokens(a).to(g.dtype), _tokens(g)
        out = {"weight": (g3 * f.view(-1, 1, 1)).flatten(0, 1).mT @ a3.flatten(0, 1)}
    if "bias" in st:
        out["bias"] = f @ st["bias"]
    return out


# ------------------------------------------------------------------------------------------ nn.Conv2d
def _conv_input(m: nn.Conv2d, a: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """The input as the convolution sees it (non-zero padding modes and string paddings applied
    explicitly, as ``Conv2d`` does) and the remaining symmetric zero padding."""
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        pads = list(m._reversed_padding_repeated_twice)
        if any(pads):
            a = F.pad(a, pads, mode="constant" if m.padding_mode == "zeros" else m.padding_mode)
        return a, (0, 0)
    return a, tuple(m.padding)


def _conv_check(m: nn.Conv2d) -> str | None:
    return None if len(m.kernel_size) == 2 else "not a 2-d convolution"


def im2col(a: Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...],
           padding: tuple[int, ...], *, channels_inner: bool = False, dtype: torch.dtype | None = None) -> Tensor:
    """The unfolded input of a 2-d convolution as ONE strided copy (and cast to ``dtype``): a [B, C, H,
    W] (any memory format) -> [B, T, C k_h k_w] with T = H_out W_out; row t holds the patch output
    pixel t sees, in the weight's (C, k_h, k_w) order, or in (k_h, k_w, C) order with
    ``channels_inner`` (contiguous reads of a channels_last input). ``F.unfold`` gives the (C, k_h,
    k_w) numbers transposed ([B, C k_h k_w, T]) but its CUDA kernel loops over the batch (one launch per
    example), which made it the largest cost of the ghost norms (benchmarks/results/dp_fastclip_profile_h200.md).
    A depthwise convolution with one-hot kernels was tried instead (H200, 2026-12-02): slower for
    ResNet-18 (38.2 vs 28.8 ms per clipped sum) and not exact in float32 for 3x3 stride-1 convs (cuDNN
    rounds the inputs), so the copy stays (benchmarks/results/dp_fastclip_profile_h200.txt)."""
    if torch.compiler.is_compiling():
        # torch.compile cannot trace storage_offset(); inductor lowers F.unfold to one gather kernel instead
        cols = F.unfold(a.to(dtype or a.dtype), kernel, dilation=dilation, padding=padding, stride=stride)
        b, ck, t = cols.shape
        if channels_inner:
            k = kernel[0] * kernel[1]
            return cols.view(b, ck // k, k, t).permute(0, 3, 2, 1).reshape(b, t, ck)
        return cols.transpose(1, 2)
    if any(padding):
        a = F.pad(a, (padding[1], padding[1], padding[0], padding[0]))
    b, c, h, w = a.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    s_b, s_c, s_h, s_w = a.stride()
    size, strides = (b, ho, wo, c, kh, kw), (s_b, s_h * sh, s_w * sw, s_c, s_h * dh, s_w * dw)
    if channels_inner:
        size, strides = (b, ho, wo, kh, kw, c), (s_b, s_h * sh, s_w * sw, s_h * dh, s_w * dw, s_c)
    win = a.as_strided(size, strides, a.storage_offset())
    out = torch.empty(size, dtype=dtype or a.dtype, device=a.device)
    return out.copy_(win).view(b, ho * wo, c * kh * kw)


@dataclass(frozen=True)
class _Shifted:
    """A stride-1, ungrouped convolution seen through flat shifted windows (no unfolded copy).

    With the input zero-padded to ``[B, C, H_p, W_p]`` (plus one spare row) and flattened to ``L`` positions,
    output pixel (i, j) on a *wide* grid of ``W_p`` columns, ``t = i W_p + j``, reads kernel tap k = (k_h,
    k_w) at flat position ``t + off_k`` with ``off_k = d_h k_h W_p + d_w k_w``; the grid's last ``W_p - W_out``
    columns are not outputs, and their gradient rows are zero. So with ``Ap [B, L, C]`` (channels inner) and
    ``Gw [B, T', C_out]`` (T' = H_out W_p):

    * per-example gradient of tap k: ``Gw_i^T Ap_i[off_k : off_k + T']`` ([C_out, C]), one batched matmul of a
      strided *view* per tap (Rochette et al. 2019 compute per-example conv gradients as convolutions; this
      is the same sum as matmuls over shifted views);
    * ghost norm: the unfolded input's Gram is ``sum_k P_i[off_k : off_k + T', off_k : off_k + T']`` with
      ``P_i = Ap_i Ap_i^T`` ([L, L], L^2 C flops instead of T^2 C k_h k_w for the unfolded patches), so
      ``||grad_i||^2 = <sum_k P_i[shifted k], Gw_i Gw_i^T>``.
    """

    ap: Tensor  # [B, L, C] (strided view of the padded input; channels inner or not)
    gw: Tensor  # [B, T', C_out]
    offsets: tuple[int, ...]  # off_k in the weight's (k_h, k_w) order
    t_wide: int

    def window(self, s: slice, k: int) -> Tensor:  # [n, T', C]
        return self.ap[s, self.offsets[k]:self.offsets[k] + self.t_wide]

    def per_example(self, s: slice) -> Tensor:  # [n, k_h k_w, C_out, C]
        return torch.stack([self.gw[s].mT @ self.window(s, k) for k in range(len(self.offsets))], 1)

    def ghost_sq(self, s: slice) -> Tensor:  # [n]
        ap = self.ap[s]
        p, t = _up(ap @ ap.mT), self.t_wide
        gram = sum(p[:, o:o + t, o:o + t] for o in self.offsets)
        return (gram * _up(self.gw[s] @ self.gw[s].mT)).sum((1, 2))


CONV_SHIFT: bool | None = None
"""Stride-1 ungrouped convs take :class:`_Shifted` (no unfolded copy) when True, or when None and on the CPU;
the others unfold (:data:`CONV_MATERIALISE`). Measured 2026-12-03: on the CPU (benchmarks/results/dp_shift_cpu.txt,
1 thread, width 16, 64 slots) the clipped sum took 462 vs 951 ms for ResNet-18-GN and 120 vs 137 ms for the fast
CNN (non-private forward+backward 276 / 64 ms); on the H200 (dp_throughput_shift_h200.md) the ResNet-18-GN DP step
was unchanged (36.6 vs 35.8 ms) and the fast CNN's 9% slower (14.4 vs 13.2 ms): there the nine small strided
matmuls per conv and the padded copies cost what the unfold saved."""


def _shifted(m: nn.Conv2d, a: Tensor, g: Tensor, pad: tuple[int, ...]) -> _Shifted | None:
    """The shifted-window view of a stride-1 ungrouped conv (a [B, C, H, W] as the conv sees it, g [B, C_out,
    H_out, W_out]), or None when it does not apply. One zero-padded copy of the input in the dtype of ``g``
    (channels inner), one of ``g`` padded to the wide grid."""
    on = CONV_SHIFT if CONV_SHIFT is not None else a.device.type == "cpu"
    if not on or m.groups != 1 or tuple(m.stride) != (1, 1):
        return None
    b, c, h, w = a.shape
    (kh, kw), (dh, dw), (ph, pw) = m.kernel_size, m.dilation, pad
    hp, wp = h + 2 * ph, w + 2 * pw
    ho, wo = g.shape[2], g.shape[3]
    spare = 1 if kw > 1 else 0  # the last wide row's taps run up to d_w (k_w - 1) < W_p past the end
    ap = a.new_zeros(b, hp + spare, wp, c, dtype=g.dtype)
    ap[:, ph:ph + h, pw:pw + w].copy_(a.permute(0, 2, 3, 1))
    gw = g.new_zeros(b, ho, wp, g.shape[1])
    gw[:, :, :wo].copy_(g.permute(0, 2, 3, 1))
    offsets = tuple(dh * i * wp + dw * j for i in range(kh) for j in range(kw))
    return _Shifted(ap.view(b, -1, c), gw.view(b, ho * wp, -1), offsets, ho * wp)


def tf32_enabled(kind: Literal["matmul", "conv"]) -> bool:
    """Whether PyTorch runs float32 CUDA matmuls (``matmul``) or cuDNN convolutions (``conv``) in TF32.

    Read through the ``fp32_precision`` settings (PyTorch >= 2.9; a leaf set to "none" inherits from its parent,
    and the legacy ``allow_tf32 = False`` reads as "none"), because reading a legacy ``allow_tf32`` flag after a
    user set the new API raises; falls back to the legacy flags on older PyTorch."""
    backends = torch.backends
    if kind == "matmul":
        leaf, parent = getattr(backends.cuda.matmul, "fp32_precision", None), None
    else:
        conv = getattr(backends.cudnn, "conv", None)
        leaf, parent = getattr(conv, "fp32_precision", None), getattr(backends.cudnn, "fp32_precision", None)
    if leaf is None:  # PyTorch before the fp32_precision API
        return bool(backends.cuda.matmul.allow_tf32 if kind == "matmul" else backends.cudnn.allow_tf32)
    for level in (leaf, parent, getattr(backends, "fp32_precision", None)):
        if level not in (None, "none"):
            return level == "tf32"
    return False


@contextmanager
def matmul_tf32(on: bool) -> Iterator[None]:
    """float32 CUDA matmuls in TF32 (``on``) or IEEE inside, the setting before restored on exit. Set through the
    legacy flag, which PyTorch allows after either API, so a caller's later read of either keeps working."""
    before = tf32_enabled("matmul")
    if before == on:
        yield
        return
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


CONV_NORMS_TF32: bool | None = None
"""Precision of the matmuls behind a convolution's per-example norms (unfolded or shifted per-example gradients,
ghost Grams) on CUDA: None (the default) the user's float32 matmul setting (PyTorch's default: IEEE), True / False
force TF32 / IEEE float32 for these matmuls alone.

Measured on an H100 (2026-12-07, benchmarks/results/dp_throughput_tf32norms_h100.md), TF32 norms do not pay:
ResNet-18-GN's eager step 28.6 ms against 29.4 ms with IEEE norms (3%), the fast CNN's 11.6 against 11.0 ms. In
the same call the float32 step with TF32 convolutions and TF32 norms differed from the float64 per-example path
by up to 5.4% (ResNet-18-GN) and 7.6% (fast CNN) of a tensor's largest entry (tests/gpu), and how much of that the
TF32 norms add to the TF32 convolutions' own rounding was not measured. So the default leaves the user's setting
alone (IEEE unless they chose TF32). Where the per-example gradients are kept (materialised), the clipped sum is
``sum_i f_i grad_i`` of the very tensors whose norms set f_i, so each example's contribution has norm <= C to
float32 rounding whatever precision computed them; where the sum is recomputed (ghost norms, or gradients too large
to keep), TF32 norms and a TF32 ``convolution_backward`` can disagree by TF32's rounding.

Under ``recipe.compile`` (the compiled sums) the setting covers every matmul of the compiled norms and sums, the
Linear layers' too: a precision cannot be switched inside one compiled graph."""


def on_cuda(t: Tensor) -> bool:
    """Whether :data:`CONV_NORMS_TF32` applies to ``t``'s matmuls (CUDA; a function so CPU tests can stand in)."""
    return t.is_cuda


def _conv_norms(m: nn.Conv2d, a: Tensor, g: Tensor, mode: Mode) -> tuple[Tensor, dict[str, Any]]:
    """:func:`_conv_norms_at` with the matmuls at :data:`CONV_NORMS_TF32`'s precision on CUDA. Not while
    ``torch.compile`` traces: dynamo cannot trace the precision flags (a graph break per conv layer, and the
    compiled sums fall apart), so the compiled path sets the precision around the whole compiled call instead
    (:func:`mlaudit.privacy.fastclip.clipped_grad_sum`)."""
    if CONV_NORMS_TF32 is None or not on_cuda(g) or torch.compiler.is_compiling():
        return _conv_norms_at(m, a, g, mode)
    with matmul_tf32(CONV_NORMS_TF32):
        return _conv_norms_at(m, a, g, mode)


def _conv_norms_at(m: nn.Conv2d, a: Tensor, g: Tensor, mode: Mode) -> tuple[Tensor, dict[str, Any]]:
    """a [B, C_in, H, W], g [B, C_out, H_out, W_out]; per group: d_in = C_in k_h k_w / groups,
    d_out = C_out / groups, T = H_out W_out (Bu et al. 2022 for the unfolded conv). A channels_last
    input without groups is unfolded in (k_h, k_w, C) order: norms do not depend on the order, and the
    kept per-example gradients are permuted back (a view: the channels_last weight's own layout)."""
    a, pad = _conv_input(m, a)
    b, c_out = g.shape[:2]
    t, grp = g.shape[2] * g.shape[3], m.groups
    d_in, d_out = m.in_channels // grp * math.prod(m.kernel_size), c_out // grp
    # G_i^T per group, [B, groups, d_out, T]: a view of g in either memory format (NCHW or channels_last)
    gct = (g.reshape(b, grp, d_out, t) if g.is_contiguous()
           else g.permute(0, 2, 3, 1).reshape(b, t, grp, d_out).permute(0, 2, 3, 1))
    inner = grp == 1 and a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last) and a.shape[1] > 1

    def unfold(s: slice) -> Tensor:  # [n, groups, T, d_in]
        u = im2col(a[s], m.kernel_size, m.stride, m.dilation, pad, channels_inner=inner, dtype=g.dtype)
        return u.unflatten(2, (grp, d_in)).transpose(1, 2)

    def per_example(s: slice) -> Tensor:  # [n, *weight.shape] (inner: [n, C_out, k_h, k_w, C_in]) by unfold + bmm
        gw = gct[s] @ unfold(s)  # [n, groups, d_out, d_in]
        return gw.view(-1, c_out, *m.kernel_size, m.in_channels) if inner else gw.reshape(-1, *m.weight.shape)

    def grouped(s: slice) -> Tensor:  # [n, *weight.shape]: the batch folded into the groups
        n = len(range(b)[s])
        shape = (n * c_out, *m.weight.shape[1:])
        return torch.ops.aten.convolution_backward(
            g[s].reshape(1, n * c_out, *g.shape[2:]), a[s].reshape(1, n * a.shape[1], *a.shape[2:]).to(g.dtype),
            g.new_empty(1).expand(shape), None, list(m.stride), list(pad), list(m.dilation), False, [0, 0],
            n * grp, [False, True, False])[1].view(n, *m.weight.shape)

    st: dict[str, Any] = {"input": a, "padding": pad, "inner": inner and CONV_MATERIALISE == "unfold"}
    keep = b * m.weight.numel() <= KEEP_ELEMENTS
    sh = _shifted(m, a, g, pad)
    if sh is not None:
        taps, lp, tw = len(sh.offsets), sh.ap.shape[1], sh.t_wide
        c_in = m.in_channels
        if use_ghost_shifted(t, tw, lp, c_in, d_out, taps, mode, keep=keep):
            sq = a.new_empty(b, dtype=_acc(g.dtype))
            for s in _chunks(b, lp * lp + 2 * tw * tw):
                sq[s] = sh.ghost_sq(s)
        else:  # kept as [B, taps, C_out, C]: the weight's [C_out, C, k_h, k_w] after a permute (see _conv_sums)
            sq, st["weight"] = materialise(sh.per_example, b, m.weight.numel(), m.weight.numel())
            st["taps"] = True
        return _with_bias(sq, st, g.sum((2, 3)) if m.bias is not None else None)
    if use_ghost(t, d_in, d_out, mode, keep=keep):
        sq = a.new_empty(b, dtype=_acc(g.dtype))
        for s in _chunks(b, grp * (d_in * t + 2 * t * t)):
            u, gs = unfold(s), gct[s]
            sq[s] = (_up(u @ u.mT) * _up(gs.mT @ gs)).sum((1, 2, 3))
    elif CONV_MATERIALISE == "grouped":
        sq, st["weight"] = materialise(grouped, b, m.weight.numel(), a[0].numel() + g[0].numel())
    else:
        sq, st["weight"] = materialise(per_example, b, m.weight.numel(), grp * d_in * t)
    return _with_bias(sq, st, g.sum((2, 3)) if m.bias is not None else None)


def _conv_sums(m: nn.Conv2d, a: Tensor, g: Tensor, f: Tensor, st: dict[str, Any]) -> dict[str, Tensor]:
    if st.get("weight") is not None and st.get("taps"):  # [taps, C_out, C] -> [C_out, C, k_h, k_w]
        out = {"weight": weigh(f, st["weight"]).permute(1, 2, 0).reshape(m.weight.shape)}
    elif st.get("weight") is not None:  # kept per-example gradients ((k_h, k_w, C) order: back to the weight's)
        out = {"weight": weigh(f, st["weight"]).permute(0, 3, 1, 2) if st["inner"] else weigh(f, st["weight"])}
    else:
        gw = torch.ops.aten.convolution_backward(
            g * f.view(-1, 1, 1, 1), st["input"].to(g.dtype), g.new_empty(1).expand(m.weight.shape), None, list(m.stride), list(st["padding"]),
            list(m.dilation), False, [0, 0], m.groups, [False, True, False])[1]
        out = {"weight": gw}
    if "bias" in st:
        out["bias"] = f @ st["bias"]
    return out


# ------------------------------------------------------------------------------ GroupNorm, LayerNorm
def _affine_sums(m: nn.Module, a: Tensor, g: Tensor, f: Tensor, st: dict[str, Any]) -> dict[str, Tensor]:
    if "both" not in st:
        return {"weight": weigh(f, st["weight"])}
    both = f @ st["both"]  # weight and bias in one product, split after
    k = st["weight_shape"].numel()
    return {"weight": both[:k].view(st["weight_shape"]), "bias": both[k:].view(st["bias_shape"])}


def _affine_norms(gw: Tensor, gb: Tensor | None) -> tuple[Tensor, dict[str, Any]]:
    """Squared norms [B] of the per-example weight (and bias) gradients gw, gb [B, *s], and the state of
    :func:`_affine_sums`. Weight and bias go through one reduction and one weighted product (three and one
    kernels instead of five and two: small models' DP steps are bound by kernel launches)."""
    if gb is None:
        return _up(gw.flatten(1)).square().sum(1), {"weight": gw}
    both = torch.cat([gw.flatten(1), gb.flatten(1)], 1)
    return _up(both).square().sum(1), {"both": both, "weight_shape": gw.shape[1:], "bias_shape": gb.shape[1:]}


def _group_norms(m: nn.GroupNorm, a: Tensor, g: Tensor, mode: Mode) -> tuple[Tensor, dict[str, Any]]:
    """a, g [B, C, *]: grad_i(weight)[c] = sum_* G_i[c] xhat_i[c], grad_i(bias)[c] = sum_* G_i[c]; with
    xhat = (a - mu_g) r_g per group g of c, ``sum_* G xhat = r_g (sum_* G a - mu_g sum_* G)``: reductions
    over * only (no normalised copy of the input; any memory format, no reshape copies)."""
    b, c = a.shape[:2]
    a = a.to(g.dtype)
    dims = tuple(range(2, a.dim()))
    var, mu = torch.var_mean(a.unflatten(1, (m.num_groups, -1)), dim=(2, *(d + 1 for d in dims)), unbiased=False)
    r = torch.rsqrt(var + m.eps)  # [B, groups]
    gb, ga = (g.sum(dims), (g * a).sum(dims)) if dims else (g, g * a)  # sum(()) would sum every dim
    # per group by broadcasting over its channels ([B, groups, C / groups]): no repeated copies of r and mu
    per = (m.num_groups, c // m.num_groups)
    gw = (r.unsqueeze(-1) * (ga.unflatten(1, per) - mu.unsqueeze(-1) * gb.unflatten(1, per))).flatten(1)
    return _affine_norms(gw, gb)


def _layer_norms(m: nn.LayerNorm, a: Tensor, g: Tensor, mode: Mode) -> tuple[Tensor, dict[str, Any]]:
    """a, g [B, *, *normalized_shape]: sums over the positions * of G_i xhat_i and of G_i."""
    ns = tuple(m.normalized_shape)
    xhat = F.layer_norm(a.to(g.dtype), ns, eps=m.eps)
    gw = (g * xhat).reshape(a.shape[0], -1, *ns).sum(1)
    return _affine_norms(gw, g.reshape(a.shape[0], -1, *ns).sum(1) if m.bias is not None else None)


def _rms_norms(m: nn.RMSNorm, a: Tensor, g: Tensor, mode: Mode) -> tuple[Tensor, dict[str, Any]]:
    """a, g [B, *, *normalized_shape]: the weight's per-example gradient sum_* G_i xhat_i, xhat = a / rms(a)."""
    ns = tuple(m.normalized_shape)
    xhat = F.rms_norm(a.to(g.dtype), ns, eps=m.eps)
    return _affine_norms((g * xhat).reshape(a.shape[0], -1, *ns).sum(1), None)


def _prelu_norms(m: nn.PReLU, a: Tensor, g: Tensor, mode: Mode) -> tuple[Tensor, dict[str, Any]]:
    """a, g [B, C, *] (or [B, *] with one slope): PReLU(x) = max(0, x) + w min(0, x), so the slopes' per-example
    gradient is sum_* G_i min(0, a_i), per channel (dim 1) or summed (one shared slope)."""
    neg = g * a.to(g.dtype).clamp(max=0)
    if m.num_parameters == 1:
        return _affine_norms(neg.reshape(a.shape[0], -1).sum(1, keepdim=True), None)
    return _affine_norms(neg.reshape(a.shape[0], a.shape[1], -1).sum(2), None)


class _InstanceAsGroups:
    """An affine InstanceNorm seen as a GroupNorm with one group per channel (the same statistics: each example's
    and channel's mean and variance over the positions)."""

    def __init__(self, m: nn.modules.instancenorm._InstanceNorm) -> None:
        self.num_groups, self.eps = m.num_features, m.eps


def _instance_check(m: nn.modules.instancenorm._InstanceNorm) -> str | None:
    if m.track_running_stats:
        return ("track_running_stats=True keeps running statistics averaged over each batch, with no noise, and "
                "normalises with them in eval mode; use track_running_stats=False")
    return None


def _instance_norms(m: nn.modules.instancenorm._InstanceNorm, a: Tensor, g: Tensor, mode: Mode
                    ) -> tuple[Tensor, dict[str, Any]]:
    """a, g [B, C, *]: as GroupNorm with C groups (:func:`_group_norms`)."""
    return _group_norms(_InstanceAsGroups(m), a, g, mode)  # type: ignore[arg-type]


class _Conv1dAs2d:
    """An ``nn.Conv1d`` as the ``nn.Conv2d`` of height 1 it equals: inputs [B, C, 1, L], kernel (1, k), the weight
    viewed [C_out, C_in / groups, 1, k]; the Conv2d rule's attributes."""

    def __init__(self, m: nn.Conv1d) -> None:
        self.kernel_size, self.stride, self.dilation = (1, *m.kernel_size), (1, *m.stride), (1, *m.dilation)
        self.padding = m.padding if isinstance(m.padding, str) else (0, *m.padding)
        self.padding_mode, self.groups = m.padding_mode, m.groups
        self._reversed_padding_repeated_twice = [*m._reversed_padding_repeated_twice, 0, 0]
        self.in_channels, self.out_channels = m.in_channels, m.out_channels
        self.weight, self.bias = m.weight.unsqueeze(2), m.bias


def _conv1d_norms(m: nn.Conv1d, a: Tensor, g: Tensor, mode: Mode) -> tuple[Tensor, dict[str, Any]]:
    """a [B, C_in, L], g [B, C_out, L_out]: the Conv2d rule on [B, C, 1, L]."""
    return _conv_norms(_Conv1dAs2d(m), a.unsqueeze(2), g.unsqueeze(2), mode)  # type: ignore[arg-type]


def _conv1d_sums(m: nn.Conv1d, a: Tensor, g: Tensor, f: Tensor, st: dict[str, Any]) -> dict[str, Tensor]:
    got = _conv_sums(_Conv1dAs2d(m), a.unsqueeze(2), g.unsqueeze(2), f, st)  # type: ignore[arg-type]
    return {**got, "weight": got["weight"].reshape(m.weight.shape)}


# --------------------------------------------------------------------------------------- nn.Embedding
def _embedding_check(m: nn.Embedding) -> str | None:
    if m.max_norm is not None:
        return "max_norm renormalises the weight in place during the forward"
    if m.scale_grad_by_freq:
        return "scale_grad_by_freq scales by token counts over the whole batch (it mixes examples)"
    if m.sparse:
        return "sparse gradients"
    return None


def _embedding_norms(m: nn.Embedding, a: Tensor, g: Tensor, mode: Mode) -> tuple[Tensor, dict[str, Any]]:
    """ids a [B, *] (T = prod(*)), g [B, *, d]: ghost norm with (A_i A_i^T)_{ts} = [id_t = id_s];
    positions holding ``padding_idx`` get no gradient, as in ``F.embedding``."""
    b = a.shape[0]
    idx, gg = a.reshape(b, -1), g.reshape(b, -1, m.embedding_dim)
    if m.padding_idx is not None:
        gg = gg * (idx != m.padding_idx).unsqueeze(-1).to(gg.dtype)
    t = idx.shape[1]
    sq = gg.new_empty(b, dtype=_acc(gg.dtype))
    for s in _chunks(b, 2 * t * t):
        same = (idx[s].unsqueeze(2) == idx[s].unsqueeze(1)).to(_acc(gg.dtype))
        sq[s] = (same * _up(torch.bmm(gg[s], gg[s].mT))).sum((1, 2))
    return sq, {"g": gg, "idx": idx}


def _embedding_sums(m: nn.Embedding, a: Tensor, g: Tensor, f: Tensor, st: dict[str, Any]) -> dict[str, Tensor]:
    rows = (st["g"] * f.view(-1, 1, 1)).reshape(-1, m.embedding_dim)
    return {"weight": torch.zeros_like(m.weight).index_add_(0, st["idx"].reshape(-1), rows)}


# ------------------------------------------------------------------------------- nn.MultiheadAttention
def _mha_check(m: nn.MultiheadAttention) -> str | None:
    if m.bias_k is not None:
        return "add_bias_kv=True appends learned key/value rows to every sequence"
    if m.add_zero_attn:
        return "add_zero_attn=True"
    return None


def mha_projections(m: nn.MultiheadAttention, *, packed: bool = False) -> list[tuple[Tensor, Tensor | None]]:
    """(weight, bias) of the query, key, value and output projections (views of the packed ``in_proj_*``); with
    ``packed`` (self-attention, one input) of the packed in-projection and the output projection."""
    if packed:
        return [(m.in_proj_weight, m.in_proj_bias), (m.out_proj.weight, m.out_proj.bias)]
    e, b = m.embed_dim, m.in_proj_bias
    bq, bk, bv = (None, None, None) if b is None else (b[:e], b[e:2 * e], b[2 * e:])
    if m._qkv_same_embed_dim:
        wq, wk, wv = m.in_proj_weight[:e], m.in_proj_weight[e:2 * e], m.in_proj_weight[2 * e:]
    else:
        wq, wk, wv = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
    return [(wq, bq), (wk, bk), (wv, bv), (m.out_proj.weight, m.out_proj.bias)]


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True: not attended) as -inf / 0, a float mask as it is (added to the scores)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def mha_forward(m: nn.MultiheadAttention, record: Callable[[tuple[Tensor, ...], tuple[Tensor, ...]], None],
                query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
    """``nn.MultiheadAttention.forward`` (batched inputs) written out, so that book-keeping sees its linear maps:
    ``record((query, key, value, o), (q, k, v, out))`` gets each projection's input [B, L or S, d] (batch first)
    and output, where o [B, L, E] is the heads' concatenated attention output that ``out_proj`` maps; for
    self-attention (query, key and value the same tensor, one packed weight) ``record((query, o), (qkv, out))``,
    the packed projection [B, L, 3E] as one Linear.
    The same arithmetic as ``F.multi_head_attention_forward``: the scores of q / sqrt(head_dim) and k plus the
    merged masks, softmax and dropout when ``need_weights`` (the weights returned, averaged over heads unless
    asked not to), scaled_dot_product_attention otherwise; ``is_causal`` is the hint that ``attn_mask`` is causal,
    as there."""
    if query.dim() != 3:
        raise UnsupportedModelError(f"nn.MultiheadAttention called on an unbatched query of shape {tuple(query.shape)}"
                                    "; fast clipping needs the batch dimension")
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
    # self-attention: one projection to [q, k, v] (as torch's _in_projection_packed), one Linear
    packed = query is key and key is value and m._qkv_same_embed_dim
    if not m.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if packed:
            key = value = query
    b, n_q, e = query.shape
    n_k, h = key.shape[1], m.num_heads
    hd = e // h
    if packed:
        (w_in, b_in), (wo, bo) = mha_projections(m, packed=True)
        qkv = F.linear(query, w_in, b_in)
        q, k, v = qkv.chunk(3, dim=-1)
    else:
        (wq, bq), (wk, bk), (wv, bv), (wo, bo) = mha_projections(m)
        q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
    mask = _additive(attn_mask, q.dtype)
    if mask is not None:
        mask = mask.view(1, 1, n_q, n_k) if mask.dim() == 2 else mask.view(b, h, n_q, n_k)
    pad = _additive(key_padding_mask, q.dtype)
    if pad is not None:
        pad = pad.view(b, 1, 1, n_k)
        mask = pad if mask is None else mask + pad
    qh, kh, vh = (t.reshape(b, -1, h, hd).transpose(1, 2) for t in (q, k, v))
    drop = m.dropout if m.training else 0.0
    weights = None
    if need_weights:
        scores = (qh * math.sqrt(1.0 / hd)) @ kh.mT
        p = (scores if mask is None else scores + mask).softmax(-1)
        if drop > 0:
            p = F.dropout(p, drop)
        weights = p.mean(1) if average_attn_weights else p
        o = p @ vh
    else:
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, dropout_p=drop)
    o = o.transpose(1, 2).reshape(b, n_q, e)
    out = F.linear(o, wo, bo)
    if packed:
        record((query, o), (qkv, out))
    else:
        record((query, key, value, o), (q, k, v, out))
    return (out if m.batch_first else out.transpose(0, 1)), weights


class _HasBias:
    def __init__(self, bias: Tensor | None) -> None:
        self.bias = bias


def _linears_norms(parts: list[tuple[Tensor | None, Tensor, Tensor]], mode: Mode) -> tuple[Tensor, dict[str, Any]]:
    """A module that is several Linear maps (attention's projections, a recurrent layer's input and recurrent
    projections): ``parts`` (bias or None, input [B, T, d_in], output gradient [B, T, d_out]) -> the summed squared
    norms [B] and the state of :func:`_linears_sums` (the parts and each one's Linear state)."""
    sq, states = None, []
    for bias, aj, gj in parts:
        s, st = _linear_norms(_HasBias(bias), aj, gj, mode)  # type: ignore[arg-type]
        states.append(st)
        sq = s if sq is None else sq + s
    assert sq is not None
    return sq, {"parts": parts, "states": states}


def _linears_sums(f: Tensor, st: dict[str, Any]) -> list[dict[str, Tensor]]:
    """Per part of :func:`_linears_norms`: its Linear's clipped sums ({"weight", "bias"})."""
    return [_linear_sums(_HasBias(bias), aj, gj, f, sj)  # type: ignore[arg-type]
            for (bias, aj, gj), sj in zip(st["parts"], st["states"], strict=True)]


def _mha_norms(m: nn.MultiheadAttention, a: tuple[Tensor, ...], g: tuple[Tensor, ...], mode: Mode
               ) -> tuple[Tensor, dict[str, Any]]:
    """The projections as Linear layers (T = the sequence length): a, g tuples of [B, T, d], four (query, key,
    value, output) or two (the packed in-projection of self-attention, the output)."""
    proj = mha_projections(m, packed=len(a) == 2)
    return _linears_norms([(bias, aj, gj) for (_, bias), aj, gj in zip(proj, a, g, strict=True)], mode)


def _mha_sums(m: nn.MultiheadAttention, a: tuple[Tensor, ...], g: tuple[Tensor, ...], f: Tensor,
              st: dict[str, Any]) -> dict[str, Tensor]:
    packed = len(a) == 2
    got = _linears_sums(f, st)
    if packed:
        out = {"in_proj_weight": got[0]["weight"], "out_proj.weight": got[1]["weight"]}
        out.update({"in_proj_bias": got[0]["bias"]} if m.in_proj_bias is not None else {})
        out.update({"out_proj.bias": got[1]["bias"]} if m.out_proj.bias is not None else {})
        return out
    out = {"out_proj.weight": got[3]["weight"]}
    if m._qkv_same_embed_dim:
        out["in_proj_weight"] = torch.cat([got[j]["weight"] for j in range(3)])
    else:
        out.update({f"{c}_proj_weight": got[j]["weight"] for j, c in enumerate("qkv")})
    if m.in_proj_bias is not None:
        out["in_proj_bias"] = torch.cat([got[j]["bias"] for j in range(3)])
    if m.out_proj.bias is not None:
        out["out_proj.bias"] = got[3]["bias"]
    return out


# ---------------------------------------------------------------------------- nn.LSTM, nn.GRU, nn.RNN
def _rnn_check(m: nn.RNNBase) -> str | None:
    if getattr(m, "proj_size", 0):
        return "proj_size > 0 (projected LSTM states)"
    return None


def _rnn_cells(m: nn.RNNBase) -> list[str]:
    """The (layer, direction) suffixes of the parameter names, in the order the forward runs them."""
    return [f"_l{k}{'_reverse' if d else ''}" for k in range(m.num_layers) for d in range(2 if m.bidirectional else 1)]


def rnn_forward(m: nn.RNNBase, record: Callable[[tuple[Tensor, ...], tuple[Tensor, ...]], None], input: Tensor,
                hx: Tensor | tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Any]:
    """``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` forward (batched, unpacked inputs) written out, so that book-keeping
    sees each layer's and direction's two linear maps: the input projection ``x_t W_ih^T + b_ih`` for all t at once (one
    Linear over the T steps) and the recurrent one ``h_{t-1} W_hh^T + b_hh``, one output per step (a Linear over
    the T steps once stacked). ``record(a, out)``: per cell, in :func:`_rnn_cells` order, ``a`` gets the cell's
    input [B, T, d_in] and its previous hidden states [B, T, H], ``out`` its input projection [B, T, G H] then
    the T recurrent projections [B, G H]. The gates as in PyTorch's documentation: LSTM i, f, g, o; GRU r, z, n with
    n = tanh(W_in x + b_in + r (W_hn h + b_hn)); RNN one, through tanh or relu. Dropout between layers as
    ``m.dropout`` in training mode."""
    if not isinstance(input, Tensor) or input.dim() != 3:
        raise UnsupportedModelError(f"{type(m).__name__} needs a batched, unpacked input [B, T, d] or [T, B, d] for "
                                    "fast clipping (a PackedSequence or an unbatched input is not supported)")
    lstm = isinstance(m, nn.LSTM)
    x = input if m.batch_first else input.transpose(0, 1)
    b, t_len = x.shape[:2]
    h_size, dirs = m.hidden_size, 2 if m.bidirectional else 1
    if hx is None:
        h0 = x.new_zeros(m.num_layers * dirs, b, h_size)
        c0 = h0 if lstm else None
    elif lstm:
        h0, c0 = hx  # type: ignore[misc]
    else:
        h0, c0 = hx, None  # type: ignore[assignment]
    a_rec: list[Tensor] = []
    o_rec: list[Tensor] = []
    h_n, c_n = [], []
    layer_in = x
    for k in range(m.num_layers):
        outs = []
        for d in range(dirs):
            sfx = f"_l{k}{'_reverse' if d else ''}"
            w_ih, w_hh = getattr(m, f"weight_ih{sfx}"), getattr(m, f"weight_hh{sfx}")
            b_ih, b_hh = (getattr(m, f"bias_ih{sfx}"), getattr(m, f"bias_hh{sfx}")) if m.bias else (None, None)
            gx = F.linear(layer_in, w_ih, b_ih)  # [B, T, G H]
            h = h0[k * dirs + d]
            c = c0[k * dirs + d] if c0 is not None else None
            steps = range(t_len - 1, -1, -1) if d else range(t_len)
            hs, prev, ghs = [None] * t_len, [], []
            for t in steps:
                prev.append(h)
                gh = F.linear(h, w_hh, b_hh)  # [B, G H]
                ghs.append(gh)
                if lstm:
                    i, f, g, o = (gx[:, t] + gh).chunk(4, dim=1)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h = torch.sigmoid(o) * torch.tanh(c)
                elif not isinstance(m, nn.GRU):  # nn.RNN: h = act(x W_ih^T + b_ih + h W_hh^T + b_hh)
                    h = torch.tanh(gx[:, t] + gh) if m.nonlinearity == "tanh" else torch.relu(gx[:, t] + gh)
                else:
                    xr, xz, xn = gx[:, t].chunk(3, dim=1)
                    hr, hz, hn = gh.chunk(3, dim=1)
                    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                    h = (1 - z) * torch.tanh(xn + r * hn) + z * h
                hs[t] = h
            if d:  # the reverse direction ran t = T-1 .. 0: its records in time order
                prev.reverse()
                ghs.reverse()
            a_rec += [layer_in, torch.stack(prev, 1)]
            o_rec += [gx, *ghs]
            outs.append(torch.stack(hs, 1))  # type: ignore[arg-type]
            h_n.append(h)
            if c is not None:
                c_n.append(c)
        layer_in = torch.cat(outs, 2) if dirs == 2 else outs[0]
        if m.dropout and m.training and k < m.num_layers - 1:
            layer_in = F.dropout(layer_in, m.dropout)
    record(tuple(a_rec), tuple(o_rec))
    out = layer_in if m.batch_first else layer_in.transpose(0, 1)
    hn = torch.stack(h_n)
    return out, ((hn, torch.stack(c_n)) if lstm else hn)


def _rnn_kinds(m: nn.RNNBase) -> list[tuple[str, str]]:
    """(kind, cell suffix) of each Linear map, in the order of :func:`_rnn_norms`' parts."""
    return [(kind, sfx) for sfx in _rnn_cells(m) for kind in ("ih", "hh")]


def _rnn_norms(m: nn.RNNBase, a: tuple[Tensor, ...], g: tuple[Tensor, ...], mode: Mode
               ) -> tuple[Tensor, dict[str, Any]]:
    """Per cell, the input projection (its input, the gradient of gx) and the recurrent one (the previous hidden
    states, the T step gradients stacked [B, T, G H]) as Linear maps over the T steps."""
    t_len = (len(g) // len(_rnn_cells(m))) - 1
    parts = []
    for j, (kind, sfx) in enumerate(_rnn_kinds(m)):
        cell, second = divmod(j, 2)
        at = cell * (t_len + 1)
        grad = torch.stack(g[at + 1:at + 1 + t_len], 1) if second else g[at]
        parts.append((getattr(m, f"bias_{kind}{sfx}") if m.bias else None, a[j], grad))
    return _linears_norms(parts, mode)


def _rnn_sums(m: nn.RNNBase, a: tuple[Tensor, ...], g: tuple[Tensor, ...], f: Tensor, st: dict[str, Any]
              ) -> dict[str, Tensor]:
    out = {}
    for (kind, sfx), got in zip(_rnn_kinds(m), _linears_sums(f, st), strict=True):
        out[f"weight_{kind}{sfx}"] = got["weight"]
        if m.bias:
            out[f"bias_{kind}{sfx}"] = got["bias"]
    return out


RNN_PARAMS = frozenset(f"{w}_{kind}_l{k}{r}" for w in ("weight", "bias") for kind in ("ih", "hh") for k in range(64)
                       for r in ("", "_reverse"))
"""The parameter names of LSTM / GRU / RNN layers (up to 64 layers)."""

MHA_PARAMS = frozenset({"in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                        "out_proj.weight", "out_proj.bias"})
"""An attention module's parameters, its ``out_proj`` child's included (one rule covers both)."""

RULES: dict[type[nn.Module], Rule] = {
    nn.Linear: Rule(frozenset({"weight", "bias"}), _linear_norms, _linear_sums),
    nn.Conv2d: Rule(frozenset({"weight", "bias"}), _conv_norms, _conv_sums, _conv_check),
    nn.GroupNorm: Rule(frozenset({"weight", "bias"}), _group_norms, _affine_sums),
    nn.LayerNorm: Rule(frozenset({"weight", "bias"}), _layer_norms, _affine_sums),
    nn.Embedding: Rule(frozenset({"weight"}), _embedding_norms, _embedding_sums, _embedding_check),
    nn.MultiheadAttention: Rule(MHA_PARAMS, _mha_norms, _mha_sums, _mha_check),
    nn.Conv1d: Rule(frozenset({"weight", "bias"}), _conv1d_norms, _conv1d_sums),
    nn.LSTM: Rule(RNN_PARAMS, _rnn_norms, _rnn_sums, _rnn_check),
    nn.GRU: Rule(RNN_PARAMS, _rnn_norms, _rnn_sums, _rnn_check),
    nn.RNN: Rule(RNN_PARAMS, _rnn_norms, _rnn_sums, _rnn_check),
    nn.PReLU: Rule(frozenset({"weight"}), _prelu_norms, _affine_sums),
    nn.RMSNorm: Rule(frozenset({"weight"}), _rms_norms, _affine_sums),
    **{t: Rule(frozenset({"weight", "bias"}), _instance_norms, _affine_sums, _instance_check)
       for t in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)},
}
"""Rules by exact module type (a subclass may change ``forward``, so it needs its own rule)."""

WRITTEN_OUT: dict[type[nn.Module], Callable[..., Any]] = {
    nn.MultiheadAttention: mha_forward, nn.LSTM: rnn_forward, nn.GRU: rnn_forward, nn.RNN: rnn_forward}
"""Modules whose weights are used inside one fused call (no hook sees their linear maps): while the tape is on they
run this forward, ``forward(module, record, *args, **kwargs)``, the same arithmetic written out, which passes the
maps' inputs and outputs to ``record``."""
