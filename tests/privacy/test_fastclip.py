"""Book-keeping clipping (mlaudit.privacy.fastclip): the same clipped sum as the per-example path for every
layer rule and both norm methods, zero-weight slots, unsupported layers refused by name, and a whole DP
training run with ``clipping: fast`` equal to ``clipping: per-example``."""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from mlaudit.data.registry import DatasetSpec, load_dataset
from mlaudit.errors import ConfigError, UnsupportedModelError
from mlaudit.models.registry import ModelSpec, build_model
from mlaudit.privacy import fastclip_rules
from mlaudit.privacy.dpsgd import DPTraining, clipped_sum, per_example_grads
from mlaudit.privacy.fastclip import check_fast_clip, clipped_grad_sum, fast_clip_supported, verify_fast_clip
from mlaudit.privacy.fastclip_rules import use_ghost, use_ghost_shifted
from mlaudit.train.loop import init_models, train_stack
from mlaudit.train.recipe import resolve_recipe
from mlaudit.train.stacked import StackedModels

CPU = torch.device("cpu")
TOL = {torch.float64: dict(rtol=1e-5, atol=1e-8), torch.float32: dict(rtol=1e-4, atol=1e-5)}


class Attention(nn.Module):
    """Self-attention with nn.Linear projections: [B, T, d] -> [B, T, d]."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.mT / (d // self.heads) ** 0.5).softmax(-1)  # SDPA has no vmap rule on the CPU
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, d))


class TinyViT(nn.Module):
    """[B, 3, 8, 8] -> [B, 5]: 4x4 patches (Conv2d), positions (Embedding), one pre-norm block, mean pool."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.patch, self.pos = nn.Conv2d(3, d, 4, stride=4), nn.Embedding(4, d)
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(d), Attention(d, 2), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.ln, self.head = nn.LayerNorm(d, bias=False), nn.Linear(d, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.patch(x).flatten(2).mT
        h = h + self.pos(torch.arange(h.shape[1], device=x.device).expand(h.shape[0], -1))
        h = h + self.attn(self.ln1(h))
        h = h + self.mlp(self.ln2(h))
        return self.head(self.ln(h).mean(1))


class TextNet(nn.Module):
    """Token ids [B, 6] (floats holding ids; 0 = padding) -> [B, 5]."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.norm, self.head = nn.Embedding(9, 8, padding_idx=0), nn.LayerNorm(8), nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.emb(x.long())).mean(1))


class TextAttention(nn.Module):
    """Token ids [B, 6] (floats; 0 = padding) -> [B, 5] through nn.MultiheadAttention: sequence-first with a causal
    boolean mask and a key padding mask and the averaged weights returned (``need_weights``); or (``cross``) batch
    first, keys and values of another width (kdim = vdim = 6, separate projection weights), a float mask, no bias,
    through scaled_dot_product_attention (``need_weights=False``)."""

    def __init__(self, cross: bool = False) -> None:
        super().__init__()
        self.cross, self.emb = cross, nn.Embedding(9, 8, padding_idx=0)
        self.kv = nn.Linear(8, 6) if cross else None
        self.attn = nn.MultiheadAttention(8, 2, batch_first=cross, bias=not cross, kdim=6 if cross else None,
                                          vdim=6 if cross else None)
        self.head = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        ids = x.long()
        h = self.emb(ids)
        n = ids.shape[1]
        if self.cross:
            assert self.kv is not None
            kv = self.kv(h)
            bias = -torch.arange(n, dtype=h.dtype, device=h.device).float().view(1, n).expand(n, n).to(h.dtype)
            out = self.attn(h, kv, kv, attn_mask=bias, need_weights=False)[0]
        else:
            causal = torch.triu(torch.ones(n, n, dtype=torch.bool, device=h.device), 1)
            pad = (ids == 0) & (torch.arange(n, device=h.device) > 0)  # the first token always attends to itself
            t = h.transpose(0, 1)
            out, weights = self.attn(t, t, t, attn_mask=causal, key_padding_mask=pad)
            assert weights is not None and weights.shape == (len(ids), n, n)
            out = out.transpose(0, 1)
        return self.head(out.mean(1))


class TextEncoder(nn.Module):
    """Token ids [B, 6] -> [B, 5] through nn.TransformerEncoderLayer (pre-norm, no dropout), padding masked."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 8, padding_idx=0)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        ids = x.long()
        pad = (ids == 0) & (torch.arange(ids.shape[1], device=ids.device) > 0)
        return self.head(self.enc(self.emb(ids), src_key_padding_mask=pad).mean(1))


class TextDecoder(nn.Module):
    """Token ids [B, 6] -> [B, 5] through nn.TransformerDecoderLayer (batch first: a sequence-first layer applies its
    LayerNorm and Linear layers to [T, B, d], which their rules refuse by name), causal self-attention, and
    cross-attention to a Linear map of the embeddings as memory."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.mem = nn.Embedding(9, 8), nn.Linear(8, 8)
        self.dec = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        e = self.emb(x.long())
        n = e.shape[1]
        causal = torch.triu(torch.full((n, n), float("-inf"), dtype=e.dtype, device=e.device), 1)
        return self.head(self.dec(e, self.mem(e), tgt_mask=causal).mean(1))


def signal_net() -> nn.Module:
    """[B, 3, 8, 8] read as 3 x 64 samples -> [B, 5]: Conv1d (stride, dilation, groups, 'same' + reflect, no bias),
    an affine InstanceNorm1d, PReLU per channel and shared, RMSNorm over the channels, an affine InstanceNorm2d on a
    2-d view."""

    class Signal(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.n1 = nn.Conv1d(3, 8, 5, stride=2, padding=2), nn.InstanceNorm1d(8, affine=True)
            self.c2 = nn.Conv1d(8, 8, 3, dilation=2, padding="same", padding_mode="reflect", groups=2, bias=False)
            self.c3, self.rms = nn.Conv1d(8, 8, 4, stride=2), nn.RMSNorm(8)
            self.n2, self.head = nn.InstanceNorm2d(8, affine=True), nn.Linear(8, 5)
            self.act1, self.act2 = nn.PReLU(8, init=0.3), nn.PReLU(init=0.2)

        def forward(self, x: Tensor) -> Tensor:
            h = self.act2(self.act1(self.n1(self.c1(x.flatten(2)))))
            h = torch.tanh(self.c3(torch.tanh(self.c2(h))))  # [B, 8, 15]
            h = self.rms(h.transpose(1, 2)).transpose(1, 2)
            h = self.n2(h[..., :15].unflatten(2, (3, 5)))
            return self.head(torch.tanh(h).mean((2, 3)))

    return Signal()


class TextRNN(nn.Module):
    """Token ids [B, 6] -> [B, 5] through a 2-layer bidirectional batch-first LSTM (output at every step, mean), or
    (``gru``) a sequence-first GRU read at its final state."""

    def __init__(self, gru: bool = False, plain: bool = False) -> None:
        super().__init__()
        self.gru, self.emb = gru or plain, nn.Embedding(9, 8, padding_idx=0)
        self.rnn = (nn.RNN(8, 6, nonlinearity="relu") if plain else nn.GRU(8, 6) if gru
                    else nn.LSTM(8, 6, num_layers=2, bidirectional=True, batch_first=True))
        self.head = nn.Linear(6 if self.gru else 12, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.emb(x.long())
        if self.gru:
            _, hn = self.rnn(h.transpose(0, 1))
            return self.head(hn[0])
        out, _ = self.rnn(h)
        return self.head(out.mean(1))


def convnet() -> nn.Module:
    """Strides, 'same' + reflect padding, dilation, grouped and depthwise convs, bias and no bias."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.GroupNorm(4, 16), nn.ReLU(),
        nn.Conv2d(16, 16, 4, dilation=2, padding="same", padding_mode="reflect"), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, groups=16),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5))


def zoo(name: str, **kw: object) -> nn.Module:
    return build_model(ModelSpec(name=name, **kw), input_shape=(3, 8, 8), num_classes=5)


MODELS = {
    "convnet": convnet, "signal": signal_net, "vit": TinyViT, "text": TextNet, "text-attention": TextAttention,
    "text-cross-attention": lambda: TextAttention(cross=True), "text-encoder": TextEncoder,
    "text-decoder": TextDecoder,
    "mlp": lambda: zoo("mlp", norm="group", width=32),
    "resnet18": lambda: zoo("resnet18", norm="group", width=8),
    "fastcnn": lambda: zoo("fastcnn", norm="group", width=8),
}


def batch(name: str, dtype: torch.dtype, b: int = 7) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = (torch.randint(0, 9, (b, 6), generator=g).to(dtype) if name.startswith("text")
         else torch.randn(b, 3, 8, 8, generator=g, dtype=dtype) * 3)
    w = torch.ones(b, dtype=torch.float32)
    w[[i for i in (2, 5) if i < b]] = 0.0
    return x, torch.randint(0, 5, (b,), generator=g), w


def reference(model: nn.Module, x: Tensor, y: Tensor, w: Tensor, clip: float, ls: float) -> tuple[list[Tensor], Tensor]:
    """clipped_sum(per_example_grads(...)) of dpsgd for one model (loop layout)."""
    stack = StackedModels.from_modules([model], CPU, strategy="loop")
    ((g, losses),) = per_example_grads(stack, x[None], y[None], label_smoothing=ls)
    return [s[0] for s in clipped_sum(g, w[None].to(x.dtype), clip)], losses[0]


@pytest.mark.parametrize("mode", ["auto", "ghost", "materialise"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_equals_the_per_example_path(name: str, dtype: torch.dtype, mode: str) -> None:
    torch.manual_seed(0)
    model = MODELS[name]().to(dtype).train()
    x, y, w = batch(name, dtype)
    want, want_loss = reference(model, x, y, w, 0.5, 0.1)
    got, loss = clipped_grad_sum(model, x, y, w, clip=0.5, label_smoothing=0.1, mode=mode)  # type: ignore[arg-type]
    assert [g.shape for g in got] == [p.shape for p in model.parameters()]
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, **TOL[dtype])
    torch.testing.assert_close(loss, want_loss.float(), **TOL[torch.float32])
    verify_fast_clip(model, x, y)


@pytest.mark.parametrize("setting", [{"CHUNK_ELEMENTS": 1, "KEEP_ELEMENTS": 0}, {"CONV_MATERIALISE": "unfold"},
                                     {"CHUNK_ELEMENTS": 3000, "CONV_MATERIALISE": "unfold"},
                                     {"CONV_SHIFT": False}, {"CONV_SHIFT": False, "CONV_MATERIALISE": "grouped"},
                                     {"CONV_SHIFT": False, "CHUNK_ELEMENTS": 1, "KEEP_ELEMENTS": 0}])
@pytest.mark.parametrize("name", ["convnet", "signal", "vit", "text"])
def test_chunks_unkept_gradients_and_unfold_give_the_same_sums(name: str, setting: dict,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches cut into chunks, materialised gradients too large to keep (the sum is then the weighted
    product), convs materialised by unfold or grouped convolutions instead of shifted windows: the same result."""
    torch.manual_seed(0)
    model = MODELS[name]().double()
    x, y, w = batch(name, torch.float64)
    want, _ = reference(model, x, y, w, 0.5, 0.0)
    for k, v in setting.items():
        monkeypatch.setattr(fastclip_rules, k, v)
    for mode in ("ghost", "materialise"):
        got, _ = clipped_grad_sum(model, x, y, w, clip=0.5, mode=mode)  # type: ignore[arg-type]
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r, **TOL[torch.float64])


def test_zero_weight_slots_contribute_nothing() -> None:
    torch.manual_seed(0)
    model = convnet().double()
    x, y, w = batch("convnet", torch.float64)
    x[w == 0] = 1e6  # a padded slot's gradient would dominate if it leaked
    got, _ = clipped_grad_sum(model, x, y, w, clip=1.0)
    keep = w > 0
    alone, _ = clipped_grad_sum(model, x[keep], y[keep], w[keep], clip=1.0)
    for g, a in zip(got, alone):
        torch.testing.assert_close(g, a, **TOL[torch.float64])
    nothing, _ = clipped_grad_sum(model, x, y, torch.zeros_like(w), clip=1.0)
    assert all(bool((g == 0).all()) for g in nothing)


def test_each_clipped_example_has_norm_at_most_clip() -> None:
    torch.manual_seed(0)
    model = TinyViT().double()
    x, y, _ = batch("vit", torch.float64, b=3)
    for i in range(3):
        got, _ = clipped_grad_sum(model, x[i:i + 1], y[i:i + 1], torch.ones(1), clip=1e-3)
        assert float(torch.sqrt(sum(g.square().sum() for g in got))) == pytest.approx(1e-3, rel=1e-5)


def test_cost_rule() -> None:
    """Ghost iff T^2 (d_in + d_out) < d_in d_out with the per-example gradients kept (else T (d_in + d_out) <
    d_in d_out). ResNet-18 (CIFAR) at batch 256: stages 1-2 materialise, stage 3 (too large to keep), stage 4
    and the head (T = 1) take the ghost norm, as does a ViT-small's MLP (65 tokens); forced modes win."""
    assert not use_ghost(32 * 32, 64 * 9, 64, "auto") and not use_ghost(16 * 16, 128 * 9, 128, "auto")
    assert not use_ghost(8 * 8, 256 * 9, 256, "auto") and use_ghost(8 * 8, 256 * 9, 256, "auto", keep=False)
    assert use_ghost(4 * 4, 512 * 9, 512, "auto") and use_ghost(1, 512, 10, "auto")
    assert use_ghost(65, 384, 1536, "auto", keep=False) and not use_ghost(65, 384, 1536, "auto")
    assert use_ghost(32 * 32, 64 * 9, 64, "ghost") and not use_ghost(1, 512, 10, "materialise")


def test_shifted_cost_rule() -> None:
    """Stride-1 3x3 convs of ResNet-18 (CIFAR, batch 256, padding 1: W_p = W + 2, L = (H + 3) W_p): stages 1-2
    materialise by shifted windows, stages 3-4 (their gradients too large to keep) take the ghost norm."""
    def rule(hw: int, c: int, keep: bool) -> bool:
        return use_ghost_shifted(hw * hw, hw * (hw + 2), (hw + 3) * (hw + 2), c, c, 9, "auto", keep=keep)
    assert not rule(32, 64, True) and not rule(16, 128, True)
    assert rule(8, 256, False) and rule(4, 512, False)
    assert use_ghost_shifted(1024, 1088, 1190, 64, 64, 9, "ghost") and not use_ghost_shifted(16, 24, 42, 512, 512, 9, "materialise")


class Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class Tied(nn.Module):
    """The head reuses the embedding weight through a functional call."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.emb = nn.Linear(5, 5), nn.Embedding(5, 5)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.lin(x), self.emb.weight) + self.emb(x.argmax(1))


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(self.lin(x))


@pytest.mark.parametrize(("model", "match"), [
    (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), r"layer '1' \(BatchNorm1d\) mixes the examples.*GroupNorm"),
    (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False)), "BatchNorm1d"),
    (nn.Sequential(nn.Linear(4, 4), Custom()), r"layer '1' \(Custom\) has trainable parameters but no "
                                               r"fast-clipping rule.*clipping: per-example"),
    (nn.Sequential(nn.Conv3d(4, 4, 3)), r"'0' \(Conv3d\) has trainable parameters but no"),
    (nn.Sequential(nn.InstanceNorm2d(4, affine=True, track_running_stats=True)), r"'0' \(InstanceNorm2d\).*running"),
    (nn.MultiheadAttention(4, 2, add_bias_kv=True), r"the model itself \(MultiheadAttention\).*add_bias_kv"),
    (nn.Sequential(nn.MultiheadAttention(4, 2, add_zero_attn=True)), r"'0' \(MultiheadAttention\).*add_zero_attn"),
    (nn.Sequential(nn.Embedding(4, 4, max_norm=1.0)), "max_norm"),
    (nn.Sequential(nn.Embedding(4, 4, scale_grad_by_freq=True)), "mixes examples"),
])
def test_unsupported_layers_are_named(model: nn.Module, match: str) -> None:
    with pytest.raises(UnsupportedModelError, match=match):
        check_fast_clip(model)
    assert not fast_clip_supported(model)


def test_attention_modules_are_supported() -> None:
    """nn.MultiheadAttention (its out_proj covered by its rule) and the encoder and decoder layers built on it."""
    for m in (nn.MultiheadAttention(8, 2), nn.MultiheadAttention(8, 2, kdim=4, vdim=6, bias=False),
              nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), nn.TransformerDecoderLayer(8, 2, 16)):
        check_fast_clip(m)


MHA_CALLS = {
    "plain": ({}, {}),
    "sequence-first, causal bool mask, padding, weights per head": (
        {}, {"attn_mask": "causal", "key_padding_mask": "pad", "average_attn_weights": False}),
    "batch-first, float mask, no weights (SDPA)": ({"batch_first": True}, {"attn_mask": "float", "need_weights": False}),
    "per-example 3-d mask, is_causal hint": ({"batch_first": True}, {"attn_mask": "causal3", "is_causal": True}),
    "kdim/vdim, no bias, float padding": ({"kdim": 3, "vdim": 5, "bias": False}, {"key_padding_mask": "float-pad"}),
    "dropout in eval mode": ({"dropout": 0.5}, {"key_padding_mask": "pad"}),
    "self-attention (one packed projection), causal mask": ({}, {"attn_mask": "causal", "self": True}),
    "self-attention, batch first, SDPA, padding": ({"batch_first": True},
                                                  {"key_padding_mask": "pad", "need_weights": False, "self": True}),
}


@pytest.mark.parametrize("case", sorted(MHA_CALLS))
def test_the_written_out_attention_is_the_modules_forward(case: str) -> None:
    """fastclip_rules.mha_forward (what the tape runs) returns what nn.MultiheadAttention returns, output and
    weights, and records the four projections' inputs and outputs (batch first)."""
    from mlaudit.privacy.fastclip_rules import mha_forward

    build, call = MHA_CALLS[case]
    torch.manual_seed(0)
    m = nn.MultiheadAttention(8, 2, **build).double().eval()
    kw = dict(call)
    same = kw.pop("self", False)
    b, n_q, n_k, bf = 3, 5 if same else 4, 5, build.get("batch_first", False)
    q = torch.randn(b, n_q, 8, dtype=torch.float64)
    k = torch.randn(b, n_k, build.get("kdim", 8), dtype=torch.float64)
    v = torch.randn(b, n_k, build.get("vdim", 8), dtype=torch.float64)
    if same:
        k = v = q
    masks = {"causal": torch.triu(torch.ones(n_q, n_k, dtype=torch.bool), 1),
             "causal3": torch.triu(torch.ones(n_q, n_k, dtype=torch.bool), 1).repeat(b * 2, 1, 1),
             "float": torch.randn(n_q, n_k, dtype=torch.float64),
             "pad": torch.tensor([[False] * n_k, [False] * 3 + [True] * 2, [False, True] * 2 + [False]]),
             "float-pad": -torch.rand(b, n_k, dtype=torch.float64)}
    for name in ("attn_mask", "key_padding_mask"):
        if name in kw:
            kw[name] = masks[kw[name]]
    args = (q, k, v) if bf else (q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))
    if same:
        args = (args[0],) * 3
    want_out, want_w = m(*args, **kw)
    seen: list[tuple[tuple[Tensor, ...], tuple[Tensor, ...]]] = []
    got_out, got_w = mha_forward(m, lambda a, o: seen.append((a, o)), *args, **kw)
    torch.testing.assert_close(got_out, want_out)
    assert (got_w is None) == (want_w is None)
    if want_w is not None:
        torch.testing.assert_close(got_w, want_w)
    (a, o), = seen
    if same:  # the packed projection [q, k, v] as one Linear
        assert [t.shape for t in a] == [(b, n_q, 8), (b, n_q, 8)] and [t.shape for t in o] == [(b, n_q, 24), (b, n_q, 8)]
        return
    assert [t.shape for t in a] == [(b, n_q, 8), (b, n_k, k.shape[2]), (b, n_k, v.shape[2]), (b, n_q, 8)]
    assert [t.shape for t in o] == [(b, n_q, 8), (b, n_k, 8), (b, n_k, 8), (b, n_q, 8)]


def loop_reference(model: nn.Module, x: Tensor, y: Tensor, w: Tensor, clip: float) -> list[Tensor]:
    """sum_i w_i clip(g_i) by one forward and backward per example (vmap cannot run nn.LSTM / nn.GRU: their
    in-place state updates do not batch)."""
    params = list(model.parameters())
    sums = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        g = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]).float(), y[i:i + 1]), params)
        norm = torch.sqrt(sum(t.double().square().sum() for t in g))
        f = float(w[i]) * min(1.0, clip / (float(norm) + 1e-6))
        sums = [s + f * t for s, t in zip(sums, g)]
    return sums


@pytest.mark.parametrize("mode", ["auto", "ghost", "materialise"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_recurrent_layers_equal_a_per_example_loop(kind: str, dtype: torch.dtype, mode: str) -> None:
    """nn.LSTM (two bidirectional batch-first layers), nn.GRU and nn.RNN with relu (sequence first, read at the last
    state): the fast clipped sum equals one backward per example, and the written-out forward equals the module's."""
    from mlaudit.privacy.fastclip_rules import rnn_forward

    torch.manual_seed(0)
    gru = kind != "lstm"  # read as the GRU is
    model = TextRNN(gru=kind == "gru", plain=kind == "rnn").to(dtype).train()
    x, y, w = batch("text", dtype)
    got, _ = clipped_grad_sum(model, x, y, w, clip=0.5, mode=mode)  # type: ignore[arg-type]
    for g, r in zip(got, loop_reference(model, x, y, w, 0.5), strict=True):
        torch.testing.assert_close(g, r, **TOL[dtype])
    verify_fast_clip(model, x, y)
    h = model.emb(x.long())
    h = h.transpose(0, 1) if gru else h
    h0 = torch.randn(1 if gru else 4, len(x), 6, dtype=dtype)
    hx = h0 if gru else (h0, torch.randn_like(h0))
    for state in (None, hx):
        want = model.rnn(h, state)
        mine = rnn_forward(model.rnn, lambda a, o: None, h, state)
        torch.testing.assert_close(mine[0], want[0])
        for a, b in zip(mine[1] if not gru else (mine[1],), want[1] if not gru else (want[1],)):
            torch.testing.assert_close(a, b)


def test_a_projected_lstm_and_a_packed_sequence_are_refused() -> None:
    with pytest.raises(UnsupportedModelError, match=r"proj_size"):
        check_fast_clip(nn.Sequential(nn.LSTM(4, 6, proj_size=3)))

    class Packed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.head = nn.GRU(4, 6, batch_first=True), nn.Linear(6, 3)

        def forward(self, x: Tensor) -> Tensor:
            seq = nn.utils.rnn.pack_padded_sequence(x, [x.shape[1]] * len(x), batch_first=True)
            return self.head(self.rnn(seq)[1][0])

    with pytest.raises(UnsupportedModelError, match=r"PackedSequence"):
        clipped_grad_sum(Packed(), torch.randn(3, 5, 4), torch.tensor([0, 1, 2]), torch.ones(3), clip=1.0)


def test_a_sequence_first_transformer_layer_is_refused_by_name() -> None:
    """Its LayerNorm and Linear layers see [T, B, d]: the rules need the batch first (the attention module itself
    takes sequence-first inputs)."""
    class SequenceFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc, self.head = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0), nn.Linear(8, 5)

        def forward(self, x: Tensor) -> Tensor:  # x [B, T, d]
            return self.head(self.enc(x.transpose(0, 1)).mean(0))

    torch.manual_seed(0)
    model = SequenceFirst()
    x, y, w = torch.randn(7, 6, 8), torch.randint(0, 5, (7,)), torch.ones(7)
    with pytest.raises(UnsupportedModelError, match=r"'enc.norm1' \(LayerNorm\) is called on a tensor of shape \(6, 7, 8\)"):
        clipped_grad_sum(model, x, y, w, clip=1.0)


def test_the_tape_restores_the_attention_modules_forward() -> None:
    model = TextEncoder()
    attn = model.enc.self_attn
    x, y, w = batch("text-encoder", torch.float32)
    clipped_grad_sum(model, x, y, w, clip=1.0)
    assert "forward" not in attn.__dict__
    own = attn.forward = functools.partial(nn.MultiheadAttention.forward, attn)  # a forward of the user's own
    clipped_grad_sum(model, x, y, w, clip=1.0)
    assert attn.__dict__["forward"] is own


def test_attention_is_vmapped_without_a_per_example_loop() -> None:
    """The per-example path runs scaled_dot_product_attention's math kernel under vmap: no batching-rule
    fallback (a loop over the examples, with a warning)."""
    import warnings

    torch.manual_seed(0)
    model = MODELS["text-cross-attention"]()
    x, y, w = batch("text-cross-attention", torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reference(model, x, y, w, 0.5, 0.0)


def test_weight_sharing_and_in_place_outputs_are_refused() -> None:
    a = nn.Linear(4, 4)
    shared = nn.Sequential(a, nn.Linear(4, 4))
    shared[1].weight = a.weight
    with pytest.raises(UnsupportedModelError, match="shares parameter 'weight' with layer '0'"):
        check_fast_clip(shared)
    x, y, w = torch.randn(3, 4), torch.tensor([0, 1, 2]), torch.ones(3)
    with pytest.raises(UnsupportedModelError, match="called more than once"):
        clipped_grad_sum(Twice(), x, y, w, clip=1.0)
    inplace = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 3))
    with pytest.raises(UnsupportedModelError, match=r"'0' \(Linear\).*modified in place"):
        clipped_grad_sum(inplace, x, y, w, clip=1.0)


def test_functional_use_of_a_parameter_fails_verification() -> None:
    torch.manual_seed(0)
    model, x, y = Tied(), torch.randn(6, 5), torch.randint(0, 5, (6,))
    check_fast_clip(model)  # structurally fine; only the gradient check sees the F.linear use
    with pytest.raises(UnsupportedModelError, match="'emb.weight'.*used outside its layer's forward"):
        verify_fast_clip(model, x, y)


class SharedPositions(nn.Module):
    """Positions looked up without the batch dimension and broadcast: one output shared by all examples."""

    def __init__(self, t: int = 4) -> None:
        super().__init__()
        self.pos, self.head = nn.Embedding(t, 3), nn.Linear(3, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head((x + self.pos(torch.arange(x.shape[1]))).mean(1))


class Centred(nn.Module):
    """Subtracts the batch mean (a parameter-free layer that mixes examples, like BatchNorm)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.head = nn.Linear(5, 8), nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.lin(x))
        return self.head(h - h.mean(0, keepdim=True))


def test_examples_that_interact_are_caught() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(6, 4, 3), torch.randint(0, 5, (6,))
    with pytest.raises(UnsupportedModelError, match=r"'pos' \(Embedding\) is called on a tensor of shape \(4,\)"):
        clipped_grad_sum(SharedPositions(), x, y, torch.ones(6), clip=1.0)
    with pytest.raises(UnsupportedModelError, match="examples of a batch interact"):
        verify_fast_clip(SharedPositions(6), torch.randn(6, 6, 3), y)  # T = B: only the norm check sees it
    with pytest.raises(UnsupportedModelError, match="examples of a batch interact"):
        verify_fast_clip(Centred(), torch.randn(6, 5), y)
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Linear(8, 5)).train()
    verify_fast_clip(model, torch.randn(6, 5), y)  # dropout: checked in eval mode
    assert model.training


# ------------------------------------------------------------------------------------ the DP-SGD step
@functools.lru_cache(maxsize=1)
def digits():
    return load_dataset(DatasetSpec(name="digits"))


def fit(clipping: str, *, epochs: int = 1, model: dict | None = None, strategy: str = "loop") -> list:
    """Two DP models trained in float64: a whole run is chaotic (a 1e-6 change of the float32 weights
    grows to a few percent after two epochs at lr 0.2, momentum 0.9), so float32 rounding differences
    between the two clipping paths, which vary with the CPU's kernels, would swamp the comparison."""
    b = digits()
    train = dataclasses.replace(b.train, x=b.train.x.double())
    r = resolve_recipe({"name": "custom", "epochs": epochs, "batch_size": 64, "lr": 0.2, "schedule": "constant",
                        "momentum": 0.9, "weight_decay": 5e-4, "augment": "none", "label_smoothing": 0.1,
                        "dp": {"noise_multiplier": 1.0, "clip": 0.5, "clipping": clipping}})
    fn = functools.partial(build_model, ModelSpec(**(model or {"name": "fastcnn", "norm": "group", "width": 8})),
                           input_shape=b.input_shape, num_classes=b.num_classes)
    models = [m.double() for m in init_models(fn, [3, 4])]
    return train_stack(models, train, r, seeds=[3, 4], lr=0.2, device=CPU, strategy=strategy)


def test_dp_training_fast_equals_per_example() -> None:
    """A whole DP run (conv net with GroupNorm and a Linear head, two models in a loop stack, float64):
    the same final weights with the fast and the per-example clipping (same Poisson batches and noise)."""
    fast, slow = fit("fast"), fit("per-example")
    for a, b in zip(fast, slow):
        assert a.steps == b.steps and a.privacy == b.privacy
        for k in a.state_dict:
            assert a.state_dict[k].dtype == torch.float64
            torch.testing.assert_close(a.state_dict[k], b.state_dict[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("broken", [None, "no-clip", "noise-over-batch"])
def test_audit_hooks_take_the_fast_path_with_the_same_result(broken: str | None) -> None:
    """A gradient canary and the broken fixtures act outside the clipped sum: a dp-audit model trained
    with fast clipping equals the per-example one (same Poisson batches, canary draws and noise)."""
    from mlaudit.data.view import DataView
    from mlaudit.train.hooks import DPStepHooks, GradientCanary

    b = digits()
    view = DataView.identity(b.train).with_inserted(torch.zeros(1, *b.train.shape), [0])
    hook = DPStepHooks(gradient_canary=GradientCanary(index=len(b.train), parameter="net.1.weight", coordinate=3),
                       broken=broken)
    r = resolve_recipe({"name": "custom", "epochs": 1, "batch_size": 64, "lr": 0.2, "schedule": "constant",
                        "augment": "none", "dp": {"noise_multiplier": 1.0, "clip": 0.5}})
    fn = functools.partial(build_model, ModelSpec(name="mlp", norm="group", width=16), input_shape=b.input_shape,
                           num_classes=10)
    outs = {c: train_stack(init_models(fn, [1, 2]), b.train,
                           r.model_copy(update={"dp": r.dp.model_copy(update={"clipping": c})}),  # type: ignore[union-attr]
                           seeds=[1, 2], lr=0.2, device=CPU, views=[view, view], hooks=[hook, DPStepHooks(broken=broken)],
                           strategy="loop")
            for c in ("fast", "per-example")}
    for a, s in zip(outs["fast"], outs["per-example"]):
        assert a.privacy == s.privacy
        for k in a.state_dict:  # no-clip sums unclipped gradients: larger values, larger float rounding
            torch.testing.assert_close(a.state_dict[k], s.state_dict[k], rtol=1e-4, atol=1e-4 if broken else 1e-5)
    assert outs["fast"][0].privacy["dp_canary_sampled"] >= 1


def test_dispatch() -> None:
    b = digits()
    pools = [torch.arange(len(b.train))]

    def start(clipping: str, model: nn.Module) -> DPTraining:
        cfg = resolve_recipe({"name": "fast", "dp": {"noise_multiplier": 1.0, "clipping": clipping}}).dp
        return DPTraining.start(cfg, [model], pools, seeds=[0], batch_size=64, epochs=1, default_spe=23, device=CPU)

    conv = build_model(ModelSpec(name="fastcnn", norm="group", width=8), input_shape=b.input_shape, num_classes=10)
    custom = nn.Sequential(nn.Flatten(), nn.Linear(64, 4), Custom(), nn.Linear(4, 10))
    assert start("auto", conv).fast_clip and not start("per-example", conv).fast_clip
    assert not start("auto", custom).fast_clip
    with pytest.raises(UnsupportedModelError, match=r"layer '2' \(Custom\)"):
        start("fast", custom)
    with pytest.raises(ConfigError, match="clipping"):
        resolve_recipe({"name": "fast", "dp": {"noise_multiplier": 1.0, "clipping": "ghost"}})


def test_auto_falls_back_when_verification_fails_and_fast_raises() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (200,), generator=g)
    x = F.one_hot(y, 5).float() + 0.1 * torch.randn(200, 5, generator=g)
    for clipping in ("auto", "fast"):
        torch.manual_seed(0)
        model = Tied()
        cfg = resolve_recipe({"name": "fast", "dp": {"noise_multiplier": 1.0, "clipping": clipping}}).dp
        dp = DPTraining.start(cfg, [model], [torch.arange(200)], seeds=[0], batch_size=64, epochs=1, default_spe=4,
                              device=CPU)
        assert dp.fast_clip  # every layer has a rule: only the first step's check finds the functional use
        stack = StackedModels.from_modules([model], CPU, strategy="loop")
        if clipping == "auto":
            with pytest.warns(UserWarning, match="using per-example clipping"):
                dp.step(stack, lambda i: (x[i], y[i]))
            assert not dp.fast_clip
        else:
            with pytest.raises(UnsupportedModelError, match="used outside its layer's forward"):
                dp.step(stack, lambda i: (x[i], y[i]))


@settings(max_examples=25, deadline=None)
@given(c=st.integers(1, 4), k=st.integers(1, 3), s=st.integers(1, 2), d=st.integers(1, 2), p=st.integers(0, 2),
       hw=st.integers(5, 9), channels_last=st.booleans())
def test_im2col_is_unfold(c: int, k: int, s: int, d: int, p: int, hw: int, channels_last: bool) -> None:
    """fastclip_rules.im2col = F.unfold transposed, in (C, k, k) order; (k, k, C) order is a column permutation."""
    g = torch.Generator().manual_seed(c * 100 + k * 10 + hw)
    a = torch.randn(2, c, hw, hw + 1, generator=g, dtype=torch.float64)
    if channels_last:
        a = a.contiguous(memory_format=torch.channels_last)
    want = F.unfold(a, k, dilation=d, padding=p, stride=s).mT  # [B, T, C k k]
    # both branches: the strided copy, and the F.unfold one taken while torch.compile traces
    for compiling in (False, True):
        with mock.patch.object(torch.compiler, "is_compiling", lambda c=compiling: c):
            got = fastclip_rules.im2col(a, (k, k), (s, s), (d, d), (p, p))
            inner = fastclip_rules.im2col(a, (k, k), (s, s), (d, d), (p, p), channels_inner=True)
            single = fastclip_rules.im2col(a, (k, k), (s, s), (d, d), (p, p), dtype=torch.float32)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(inner, want.view(2, -1, c, k * k).transpose(2, 3).reshape(want.shape), rtol=0,
                                   atol=0)
        assert single.dtype == torch.float32
        torch.testing.assert_close(single, want.float(), rtol=0, atol=0)


@settings(max_examples=30, deadline=None)
@given(c=st.integers(1, 3), o=st.integers(1, 3), kh=st.integers(1, 3), kw=st.integers(1, 3), d=st.integers(1, 2),
       p=st.integers(0, 2), hw=st.integers(3, 7), channels_last=st.booleans())
def test_shifted_windows_equal_unfolded_per_example_gradients(c: int, o: int, kh: int, kw: int, d: int, p: int,
                                                               hw: int, channels_last: bool) -> None:
    """A stride-1 conv's per-example gradients by shifted windows = G_i^T unfold(A_i) (any kernel shape,
    dilation, padding, memory format), and the shifted-window ghost norm = their squared norms."""
    g = torch.Generator().manual_seed(c * 1000 + o * 100 + kh * 10 + kw + hw)
    conv = nn.Conv2d(c, o, (kh, kw), dilation=d, padding=p).double()
    a = torch.randn(3, c, hw, hw + 1, generator=g, dtype=torch.float64)
    if a.shape[2] + 2 * p - d * (kh - 1) < 1 or a.shape[3] + 2 * p - d * (kw - 1) < 1:
        return  # no output pixel
    gout = torch.randn(conv(a).shape, generator=g, dtype=torch.float64)
    if channels_last:
        a, gout = a.contiguous(memory_format=torch.channels_last), gout.contiguous(memory_format=torch.channels_last)
    sh = fastclip_rules._shifted(conv, a, gout, (p, p))
    assert sh is not None
    want = gout.flatten(2) @ F.unfold(a, (kh, kw), dilation=d, padding=p).mT  # [B, O, C kh kw]
    got = sh.per_example(slice(None)).permute(0, 2, 3, 1).reshape(want.shape)
    torch.testing.assert_close(got, want, **TOL[torch.float64])
    torch.testing.assert_close(sh.ghost_sq(slice(None)), want.square().sum((1, 2)), **TOL[torch.float64])


@pytest.mark.parametrize("conv", ["shift", "unfold", "grouped"])
@pytest.mark.parametrize("name", ["convnet", "resnet18", "fastcnn", "vit"])
def test_channels_last_models_and_inputs(name: str, conv: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop runs CUDA models channels_last: shifted windows, the (k_h, k_w, C) unfold and their
    permuted-back sums agree."""
    monkeypatch.setattr(fastclip_rules, "CONV_SHIFT", conv == "shift")
    monkeypatch.setattr(fastclip_rules, "CONV_MATERIALISE", "unfold" if conv == "shift" else conv)
    torch.manual_seed(0)
    model = MODELS[name]().double().train()
    x, y, w = batch(name, torch.float64)
    want, _ = reference(model, x, y, w, 0.5, 0.0)
    model = model.to(memory_format=torch.channels_last)
    for mode in ("auto", "ghost", "materialise"):
        got, _ = clipped_grad_sum(model, x.contiguous(memory_format=torch.channels_last), y, w, clip=0.5, mode=mode)  # type: ignore[arg-type]
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r, **TOL[torch.float64])


@pytest.mark.parametrize("name", ["resnet18", "vit", "text", "text-encoder"])
def test_bf16_autocast_equals_autograd_under_autocast(name: str) -> None:
    """bf16: the unclipped sum is autograd's gradient of the same autocast forward (to bf16 rounding of the
    rules' products), and clipping keeps each example's norm at most C (to that rounding)."""
    torch.manual_seed(0)
    model = MODELS[name]().train()
    x, y, w = batch(name, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    losses = F.cross_entropy(out.float(), y, reduction="none")
    want = torch.autograd.grad((losses * w).sum(), list(model.parameters()))
    got, loss = clipped_grad_sum(model, x, y, w, clip=float("inf"), bf16=True)
    total = torch.cat([t.flatten() for t in want]).norm()
    err = torch.cat([(a - b).flatten() for a, b in zip(got, want)]).norm()
    assert float(err) <= 2e-2 * float(total)
    torch.testing.assert_close(loss, losses.detach(), rtol=1e-3, atol=1e-3)
    one = torch.zeros_like(w)
    one[0] = 1.0
    clipped, _ = clipped_grad_sum(model, x, y, one, clip=1e-3, bf16=True)
    assert float(torch.cat([t.flatten() for t in clipped]).norm()) <= 1e-3 * 1.02


def test_verification_runs_in_exact_float32_and_restores_the_flags() -> None:
    """TF32 (cuDNN's default on CUDA) is off while verify_fast_clip runs the model and as before afterwards."""
    seen: list[tuple[bool, bool]] = []
    model = MODELS["convnet"]()
    model.register_forward_hook(lambda *_: seen.append((torch.backends.cudnn.allow_tf32,
                                                        torch.backends.cuda.matmul.allow_tf32)))
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        x, y, _ = batch("convnet", torch.float32)
        verify_fast_clip(model, x, y)
        assert seen and all(s == (False, False) for s in seen)
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


RNN_USER = '''
import torch
from torch import nn


class RowLSTM(nn.Module):
    """A digit's 8 rows as 8 steps of 8 pixels through an LSTM, read at the last step."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.rnn, self.head = nn.LSTM(8, 16, batch_first=True), nn.Linear(16, num_classes)

    def forward(self, x):
        out, _ = self.rnn(x.flatten(1, 2))
        return self.head(out[:, -1])
'''


def test_a_users_lstm_trains_with_dp_through_the_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A user's LSTM by import string, DP-SGD with dp.clipping auto on the CPU: the factory takes the loop layout
    (vmap cannot run the LSTM) and book-keeping clipping, and the run reports its epsilon."""
    from mlaudit.experiments import run_experiment
    from mlaudit.factory.layout import DP_RECURRENT_REASON

    (tmp_path / "rnn_user.py").write_text(RNN_USER)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = {"kind": "train", "dataset": "digits", "model": "rnn_user:RowLSTM", "trials": 1, "seed": 0,
           "recipe": {"name": "fast", "epochs": 1, "batch_size": 64,
                      "dp": {"epsilon": 8.0, "delta": 1e-5, "clip": 1.0}}}
    res = run_experiment(cfg, out=tmp_path / "out", device="cpu", store=tmp_path / "r.db", quiet=True).results
    for t in res["trials"]:
        assert t["stack_layout"] == "loop" and t["stack_layout_reason"] == DP_RECURRENT_REASON
        assert 7.9 < t["dp_epsilon"] <= 8.0 and math.isfinite(t["test_loss"])


def test_the_report_lists_every_layer_and_every_problem_at_once() -> None:
    from mlaudit.privacy.fastclip import fast_clip_report

    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), Custom(), nn.MultiheadAttention(4, 2), nn.Linear(4, 3))
    rows = fast_clip_report(model)
    assert [(r["layer"], r["type"], r["supported"]) for r in rows] == [
        ("0", "Linear", True), ("1", "BatchNorm1d", False), ("2", "Custom", False), ("3", "MultiheadAttention", True),
        ("4", "Linear", True)]
    assert rows[3]["parameters"] == 4 * 12 + 12 + 16 + 4  # in_proj and the out_proj it covers
    assert "use GroupNorm" in str(rows[1]["error"]) and "no fast-clipping rule" in str(rows[2]["error"])
    with pytest.raises(UnsupportedModelError, match=r"'1' \(BatchNorm1d\)"):  # check_fast_clip: the first one
        check_fast_clip(model)


def _small_conv_net_recorded() -> tuple[nn.Module, Tensor, Tensor, Tensor, list, dict]:
    """A conv net with strided, padded and stride-1 convs, GroupNorm and Linear, 6 examples (2 of weight 0), and
    its book-keeping record: (model, x, y, w, layers, {layer: (a, g)})."""
    from mlaudit.privacy import fastclip

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(6 * 3 * 3, 5))
    x, y, w = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,)), torch.tensor([1.0, 0, 1, 1, 0, 1])
    layers = fastclip._plan(model)
    _, ag, _ = fastclip._forward(model, layers, x, y, 0.0, [])
    return model, x, y, w, layers, ag


def test_clipped_sums_trace_as_one_graph() -> None:
    """torch.compile sees fast clipping's norms, clip factors and sums of a conv net (strided, padded, stride-1
    shifted and unfolded convs, GroupNorm, Linear) as one graph without a break (benchmarks/probes/dp_compile_probe.py
    compiles it); a break would split it and recompile per layer."""
    from mlaudit.privacy import fastclip

    model, x, y, w, layers, ag = _small_conv_net_recorded()
    for shift in (True, False):
        with mock.patch.object(fastclip_rules, "CONV_SHIFT", shift):
            explained = torch._dynamo.explain(fastclip._clipped_sums)(model, layers, ag, w, 1.0, "auto")
        assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
        assert explained.graph_count == 1


def test_tf32_conv_norms_set_around_the_compiled_sums_not_inside(monkeypatch: pytest.MonkeyPatch) -> None:
    """CONV_NORMS_TF32 with the compiled sums: dynamo cannot trace the precision flags, so switching them inside each
    conv's norms broke the graph (the compiled sums fell apart); while compiling the rules leave the precision alone,
    the sums stay one graph, and clipped_grad_sum sets the precision around the whole compiled call. The CUDA check
    is stood in for on the CPU (``on_cuda``); matmul_tf32 only sets a flag there. The trace fails without the
    ``is_compiling`` check."""
    from mlaudit.privacy import fastclip

    model, x, y, w, layers, ag = _small_conv_net_recorded()
    monkeypatch.setattr(fastclip_rules, "on_cuda", lambda t: True)
    monkeypatch.setattr(fastclip_rules, "CONV_NORMS_TF32", True)
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        explained = torch._dynamo.explain(fastclip._clipped_sums)(model, layers, ag, w, 1.0, "auto")
        assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
        assert explained.graph_count == 1
        seen = []
        real = fastclip._compiled_sums()

        def recording(*args: object) -> object:
            seen.append(torch.backends.cuda.matmul.allow_tf32)
            return real(*args)
        monkeypatch.setattr(fastclip, "_compiled_sums", lambda: recording)
        got, _ = clipped_grad_sum(model, x, y, w, clip=1.0, compiled=True)
        assert seen == [True]  # TF32 set around the compiled call
        want, _ = clipped_grad_sum(model, x, y, w, clip=1.0)  # on the CPU the flag changes no arithmetic
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert torch.backends.cuda.matmul.allow_tf32 == before


@pytest.mark.parametrize("record", [False, True], ids=["sums", "record-too"])
def test_compiled_sums_under_bf16_equal_the_eager_bf16_sums(monkeypatch: pytest.MonkeyPatch, record: bool) -> None:
    """``precision: bf16`` with ``compile: true`` (dp_throughput's graph-compile-bf16 row): the compiled norms and sums
    take the bf16 output gradients and inputs of the autocast forward as the eager ones do and return float32 sums
    within bf16 rounding of the eager bf16 sums and of the float32 ones. Not to float rounding: inductor rounds its
    intermediates differently (on this CPU, 2026-12-08, the GroupNorm weight's sum 1.2e-2 of its largest entry
    from the eager bf16 one, the Linear weight's 1.4e-3, the rest equal; the eager bf16 sums 2.7e-3 to 1.7e-2 from
    float32). ``record-too`` (graph-compile-all-bf16): the autocast recording forward compiled as well
    (fastclip.COMPILE_RECORD; its second call, the first being the eager pass). A max-pooling net is no test of
    this: a bf16 rounding flips a pool's argmax and moves a whole gradient (a random fastcnn's eager bf16 sums were
    up to 0.66 of a tensor's largest entry from float32, and its plain non-private gradient 0.58: the model's, not the
    clipping's)."""
    from mlaudit.privacy import fastclip

    monkeypatch.setattr(fastclip, "COMPILE_RECORD", record)
    model, x, y, w, _, _ = _small_conv_net_recorded()
    exact, _ = clipped_grad_sum(model, x, y, w, clip=1.0)
    eager, _ = clipped_grad_sum(model, x, y, w, clip=1.0, bf16=True)
    for _ in range(2 if record else 1):
        compiled, _ = clipped_grad_sum(model, x, y, w, clip=1.0, bf16=True, compiled=True)
    assert (model in fastclip._OUT_SHAPES) is record  # the eager pass recorded the shapes for the compiled one
    for c, e, f in zip(compiled, eager, exact):
        assert c.dtype == e.dtype == torch.float32
        scale = float(f.abs().max())
        torch.testing.assert_close(c, e, rtol=0.0, atol=5e-2 * scale)
        torch.testing.assert_close(c, f, rtol=0.0, atol=5e-2 * scale)
    assert all(not torch.equal(c, f) for c, f in zip(compiled, exact))  # bf16 operands, not a float32 path


def _two_conv_net(act: type[nn.Module] = nn.ReLU) -> nn.Module:
    """[B, 3, 8, 8] -> [B, 5]: conv, GroupNorm, ``act``, strided conv, ReLU, Linear (the compiled-path tests' net)."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), act(), nn.Conv2d(4, 4, 3, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 5))


def test_compiled_dp_steps_equal_eager_ones_and_share_their_graphs() -> None:
    """recipe.compile with book-keeping clipping: DPTraining.step on a compiled LoopStack runs the norms and sums
    through torch.compile (inductor's CPU kernels here) and gives the eager step's loss and private gradients to
    float rounding (the same generators: the same batches and noise), for two models of one architecture, the
    second reusing the first's graph (no recompile), and one dynamic graph serving every batch size after the
    second."""
    from mlaudit.privacy import fastclip
    from mlaudit.train.stacked import LoopStack

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 3, 8, 8, generator=g), torch.randint(0, 5, (96,), generator=g)

    net = _two_conv_net
    torch.manual_seed(0)
    models = [net(), net()]
    cfg = resolve_recipe({"name": "fast", "dp": {"noise_multiplier": 1.0, "clip": 0.5, "clipping": "fast"}}).dp
    steps, real, calls = {}, fastclip._compiled_sums, []
    for compiled in (False, True):
        dp = DPTraining.start(cfg, models, [torch.arange(96)] * 2, seeds=[0, 1], batch_size=16, epochs=1,
                              default_spe=6, device=CPU)
        stack = LoopStack.build(models, CPU, compile=compiled)
        assert stack.compiled is compiled
        with mock.patch.object(fastclip, "_compiled_sums", lambda c=compiled: calls.append(c) or real()):
            steps[compiled] = [dp.step(stack, lambda i: (x[i], y[i])) for _ in range(2)]
    assert calls == [True] * 4  # 2 steps x 2 models took the compiled sums, and only the compiled stack's
    shared = fastclip._compiled_sums()  # one compiled function for every model
    first, other = net(), net()
    for m, check in ((first, False), (other, True)):
        layers = fastclip._plan(m)
        with mock.patch.object(torch._dynamo.config, "error_on_recompile", check):
            _, ag, _ = fastclip._forward(m, layers, x[:24], y[:24], 0.0, [])
            want = fastclip._clipped_sums(m, layers, ag, torch.ones(24), 0.5, "auto")[0]
            for a, b in zip(shared(m, layers, ag, torch.ones(24), 0.5, "auto")[0], want):  # other: no recompile
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # automatic dynamic shapes: a second batch size compiles one graph with a symbolic size, which serves a third
    m, layers = other, fastclip._plan(other)
    for n, check in ((5, False), (11, True), (17, True)):
        with mock.patch.object(torch._dynamo.config, "error_on_recompile", check):
            _, ag, _ = fastclip._forward(m, layers, x[:n], y[:n], 0.0, [])
            want = fastclip._clipped_sums(m, layers, ag, torch.ones(n), 0.5, "auto")[0]
            for a, b in zip(shared(m, layers, ag, torch.ones(n), 0.5, "auto")[0], want):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for (loss_e, grads_e), (loss_c, grads_c) in zip(steps[False], steps[True]):
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads_c, grads_e):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("record", [False, True], ids=["sums", "record-too"])
def test_train_stack_with_compile_trains_dp_models_like_the_eager_loop(monkeypatch: pytest.MonkeyPatch,
                                                                       record: bool) -> None:
    """train_stack with recipe.compile and book-keeping DP, the compiled stack forced on the CPU (the factory compiles
    on CUDA only): the steps draw bucketed slot widths (GRAPH_SLOT_MULTIPLE) and take the compiled sums, and the
    trained weights equal the uncompiled loop's (multiples of 8) to float rounding: the extra slots weigh 0.
    ``record-too``: with fastclip.COMPILE_RECORD the compiled recording pass runs too (after each width's first,
    eager, step), through the loop's own copies of the models."""
    from mlaudit.data.base import TensorDataset
    from mlaudit.privacy import dpsgd, fastclip
    from mlaudit.privacy.mechanism import max_batch
    from mlaudit.train.stacked import LoopStack

    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(64, 3, 6, 6, generator=g), torch.randint(0, 3, (64,), generator=g), ("a", "b", "c"))

    def net() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))

    r = resolve_recipe({"name": "fast", "epochs": 2, "batch_size": 16, "augment": "none", "precision": "fp32",
                        "dp": {"noise_multiplier": 1.0, "clip": 0.5, "clipping": "fast"}})
    widths, calls, draw, real = [], [], dpsgd.DPTraining.draw, fastclip._compiled_sums

    def recording_draw(self: DPTraining, stack: StackedModels, gather: object, *, bucket: int | None = None) -> object:
        b = draw(self, stack, gather, bucket=bucket)  # type: ignore[arg-type]
        widths.append((stack.compiled, b.x.shape[2]))  # type: ignore[attr-defined]
        return b

    monkeypatch.setattr(dpsgd.DPTraining, "draw", recording_draw)
    monkeypatch.setattr(fastclip, "_compiled_sums", lambda: calls.append(1) or real())
    monkeypatch.setattr(fastclip, "COMPILE_RECORD", record)
    real_record, records = fastclip._compiled_probe_forward, []
    monkeypatch.setattr(fastclip, "_compiled_probe_forward", lambda: records.append(1) or real_record())
    outs = []
    for compiled in (False, True):
        if compiled:
            monkeypatch.setattr(StackedModels, "from_modules",
                                staticmethod(lambda models, device, **kw: LoopStack.build(models, device, compile=True)))
        outs.append(train_stack(init_models(net, [0, 1]), data, r.model_copy(update={"compile": compiled}),
                                seeds=[0, 1], lr=0.05, device=CPU, strategy="loop"))
    eager, comp = [w for c, w in widths if not c], [w for c, w in widths if c]
    assert len(eager) == len(comp) and calls  # the same steps; the compiled ones through the compiled sums
    assert bool(records) is record
    assert all(w % 32 == 0 or w == max_batch(16 / 64, 64) for w in comp) and any(w % 32 for w in eager)
    for a, b in zip(*outs):
        for name, t in a.state_dict.items():
            torch.testing.assert_close(b.state_dict[name], t, rtol=1e-4, atol=1e-6)



def test_compiled_record_gives_the_eager_record_and_shares_its_graphs(monkeypatch: pytest.MonkeyPatch) -> None:
    """fastclip.COMPILE_RECORD: the recording forward and its backward to the layer outputs compiled, with zeros added
    to the outputs standing in for them. The first call per model and input shape runs the eager pass; later ones give
    its losses and every layer's (input, output gradient) to float rounding, a frozen parameter stays frozen and no
    hook stays behind; a second model of the architecture reuses the graph; a second batch size compiles one dynamic
    graph that serves a third; DP steps on a compiled LoopStack through it equal the eager steps; a user's model
    whose forward breaks dynamo's graph gives the eager sums; a model with a written-out layer (attention) keeps the
    eager pass."""
    from mlaudit.privacy import fastclip
    from mlaudit.train.stacked import LoopStack

    monkeypatch.setattr(fastclip, "COMPILE_RECORD", True)
    real, calls = fastclip._compiled_probe_forward, []
    monkeypatch.setattr(fastclip, "_compiled_probe_forward", lambda: calls.append(1) or real())
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 5, (64,), generator=g)

    def net() -> nn.Module:
        return _two_conv_net(nn.GELU)

    torch.manual_seed(0)
    first, other = net(), net()
    first[1].bias.requires_grad_(False)  # a frozen parameter: its clipped sum is computed all the same

    def compare(m: nn.Module, n: int, *, recompile_ok: bool) -> None:
        layers = fastclip._plan(m)
        with fastclip._all_require_grad(m):
            want_l, want, _ = fastclip._forward(m, layers, x[:n], y[:n], 0.1, [])
        before = len(calls)
        with mock.patch.object(torch._dynamo.config, "error_on_recompile", not recompile_ok):
            for _ in range(2):  # the eager pass (it records the output shapes) where this is the first call, then
                losses, got = fastclip._record(m, layers, x[:n], y[:n], 0.1, False, True)
        assert len(calls) == before + 1  # ... the compiled one
        torch.testing.assert_close(losses, want_l, rtol=1e-5, atol=1e-6)
        assert got.keys() == want.keys() and len(got) == 4
        for k, (a, gr) in got.items():
            assert not a.requires_grad
            torch.testing.assert_close(a, want[k][0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(gr, want[k][1], rtol=1e-4, atol=1e-7)
        assert [p.requires_grad for p in m.parameters()] == [m is not first or p is not m[1].bias
                                                             for p in m.parameters()]
        assert all(not mod._forward_hooks for mod in m.modules())

    compare(first, 16, recompile_ok=True)
    compare(other, 16, recompile_ok=False)  # the second model: no recompile
    compare(other, 5, recompile_ok=True)  # a second size compiles the dynamic graph ...
    compare(other, 11, recompile_ok=False)  # ... which serves a third

    cfg = resolve_recipe({"name": "fast", "dp": {"noise_multiplier": 1.0, "clip": 0.5, "clipping": "fast"}}).dp
    steps = {}
    for compiled in (False, True):
        models = [net(), net()]
        for m, src in zip(models, (first, other)):
            m.load_state_dict(src.state_dict())
        dp = DPTraining.start(cfg, models, [torch.arange(64)] * 2, seeds=[0, 1], batch_size=16, epochs=1,
                              default_spe=4, device=CPU)
        stack, before = LoopStack.build(models, CPU, compile=compiled), len(calls)
        steps[compiled] = [dp.step(stack, lambda i: (x[i], y[i])) for _ in range(4)]  # widths repeat: compiled pass
        assert (len(calls) > before) is compiled
    for (loss_e, grads_e), (loss_c, grads_c) in zip(steps[False], steps[True]):
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads_c, grads_e):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    class Broken(nn.Module):  # a user's forward that dynamo cannot trace whole: two graphs, the zeros in both
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = _two_conv_net(), nn.Linear(5, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            torch._dynamo.graph_break()
            return self.b(torch.tanh(h))

    torch.manual_seed(1)
    user, w = Broken(), (torch.rand(16, generator=g) < 0.7).float()
    want_sums, want_losses = clipped_grad_sum(user, x[:16], y[:16], w, clip=0.5)
    before = len(calls)
    for _ in range(2):
        got_sums, got_losses = clipped_grad_sum(user, x[:16], y[:16], w, clip=0.5, compiled=True)
    assert len(calls) == before + 1
    torch.testing.assert_close(got_losses, want_losses, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_sums, want_sums):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    class SelfAttention(nn.Module):  # a written-out layer (nn.MultiheadAttention) then a head
        def __init__(self) -> None:
            super().__init__()
            self.mha, self.head = nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.mha(x, x, x, need_weights=False)[0].mean(1))

    attn = SelfAttention()
    layers, xs = fastclip._plan(attn), torch.randn(6, 3, 4, generator=g)
    with fastclip._all_require_grad(attn):
        want_l, _, _ = fastclip._forward(attn, layers, xs, y[:6], 0.0, [])
    before = len(calls)
    for _ in range(2):  # the eager pass each time: no shapes recorded, the compiled pass never asked
        losses, _ = fastclip._record(attn, layers, xs, y[:6], 0.0, False, True)
        torch.testing.assert_close(losses, want_l)
    assert len(calls) == before and attn not in fastclip._OUT_SHAPES
