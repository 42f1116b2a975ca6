"""Decepticons (Fowl, Geiping, Reich, Wen, Czaja, Goldblum & Goldstein 2022; seed 002, chapter 4): a
malicious server sends a transformer language model whose *parameters* (not its architecture) make the
aggregated FedSGD update reveal which token stood at which position, through secure aggregation.

What is built here, on :class:`mlaudit.models.gpt.TinyGPT` (ReLU or GELU MLPs):

* **Embeddings** split the residual stream: token codes in the first d/2 coordinates, position codes in
  the next d/4 (position 0's orthogonal to the others), the rest for the sequence tag and one feedback
  coordinate. Every code has zero mean and a fixed norm, so the first LayerNorm only rescales
  e = tok[v] + pos[p] and token and position stay readable from disjoint coordinates.
* **First attention layer** (``tag``, ``tag_tokens`` k): head h < k attends from every position to position h
  and writes a random projection of that token's code into its own share of the tag coordinates, so each
  token carries its sequence's first k tokens (those before it, for a token at a position below k: the
  attention is causal); the other heads write nothing.
* **First MLP layer**: an imprint of ``bins`` bins (Fowl et al. 2022a, as in :mod:`.imprint`): rows
  s * m for a random unit direction m of the token and position coordinates, biases -s * c_i at the
  quantiles of the measurement over the server's public text. The second MLP layer writes the sum of the
  bins along the feedback coordinate u, so every bin of a token gets the same gradient g_t = <u, dL/dx_t>.
* **Recovery**: for a token alone in its bin interval, (dW_i - dW_{i+1}) / (db_i - db_{i+1}) is the MLP's
  input for that token, decoded into (token, position, first k tokens of its sequence) by the largest inner
  products with the known codes; :func:`sequences` groups the rows by their tag.

The honest-but-curious baseline: the rows of the token-embedding gradient that are non-zero give the
*set* of tokens the users typed (no positions, no counts).

Tied embeddings (GPT-2's; ``TinyGPT(tie_embeddings=True)``) need nothing more: the head then reads the
token codes, and the feedback coordinate still reaches the loss through the final LayerNorm and the later
blocks. What they take away is the honest baseline: every row of the shared matrix gets the head's
gradient, so its non-zero rows no longer name the tokens typed (``info['token_set']`` is None). GELU is
handled by steep bins (``scale``). Sequences whose first k tokens agree
still merge; a larger k splits the tag coordinates (d/4 - 1 of them) into k smaller shares.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ...errors import ConfigError
from ...models.gpt import TinyGPT
from .base import Observation, Reconstruction, register_federated
from .imprint import _offsets as imprint_offsets
from .imprint import imprint_candidates, off_observed


@dataclass(frozen=True)
class Layout:
    """The coordinates of the residual stream the malicious parameters use: token codes, position codes,
    the sequence tag (written by the first attention layer) and the one feedback coordinate."""

    tok: slice
    pos: slice
    tag: slice
    feedback: int


def layout(d: int) -> Layout:
    t, p = d // 2, d // 4
    return Layout(slice(0, t), slice(t, t + p), slice(t + p, d - 1), d - 1)


def _codes(n: int, width: int, norm: float, generator: torch.Generator) -> Tensor:
    """n random codes [n, width], each of zero mean and l2 norm ``norm``."""
    c = torch.randn(n, width, generator=generator, dtype=torch.float64)
    c = c - c.mean(1, keepdim=True)
    return norm * c / c.norm(dim=1, keepdim=True)


def plant_decepticon(model: TinyGPT, public_tokens: Tensor, *, bins: int, scale: float | None = None,
                     feedback: float = 1e-2, tag: bool = True, tag_tokens: int = 1,
                     generator: torch.Generator | None = None) -> TinyGPT:
    """A copy of ``model`` with the malicious parameters of the module docstring; ``public_tokens``
    [N, L] (L <= seq_len) the server's public text, on which the bins' quantiles are estimated;
    ``tag``: the first attention layer tags every token with its sequence's first ``tag_tokens`` tokens
    (one head each, so at most the layer's heads; else it is passed through). ``scale`` multiplies the bins' weights and offsets (the same bins fire): None is 1
    for ReLU and, for GELU, steep enough that every public measurement lies 6 units from its offset
    (12 / the smallest gap between distinct public values, at most 1e6), which turns GELU's smooth knee into
    ReLU's: on pydoc characters (benchmarks/decepticons.py) GELU recovers no pair at scale 1 and, with the
    default, within a point of ReLU (8 users x 32 tokens, d_model 128: 65.2% vs 65.5% of pairs)."""
    if not isinstance(model, TinyGPT):
        raise ConfigError(f"plant_decepticon needs a TinyGPT (mlaudit.models.gpt), got {type(model).__name__}")
    d = model.d_model
    width = model.blocks[0].fc1.out_features
    if scale is not None and not scale > 0:
        raise ConfigError(f"decepticon scale = {scale}; allowed scale > 0")
    if not 1 <= bins <= width:
        raise ConfigError(f"decepticon bins = {bins}; allowed 1 <= bins <= {width} (the first MLP layer's width, 4 x "
                          f"d_model = 4 x {d})")
    if d < 8:
        raise ConfigError(f"d_model = {d} is too small to split into token, position and free coordinates; allowed d_model >= 8")
    n_tag = layout(d).tag.stop - layout(d).tag.start
    top = min(model.blocks[0].heads, model.seq_len, n_tag, layout(d).pos.stop - layout(d).pos.start - 1)
    if tag and not 1 <= tag_tokens <= top:
        raise ConfigError(f"decepticon tag_tokens = {tag_tokens}; allowed 1 <= tag_tokens <= {top} (one attention head "
                          f"per tagged token: {model.blocks[0].heads} heads, {n_tag} tag coordinates, seq_len "
                          f"{model.seq_len})")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    lay = layout(d)
    m = copy.deepcopy(model)  # the user's model is left untouched
    blk = m.blocks[0]
    dev = m.tok.weight.device
    with torch.no_grad():
        tok = torch.zeros(model.vocab, d, dtype=torch.float64)
        tok[:, lay.tok] = _codes(model.vocab, lay.tok.stop - lay.tok.start, 1.0, g)
        pos = torch.zeros(model.seq_len, d, dtype=torch.float64)
        pos[:, lay.pos] = _codes(model.seq_len, lay.pos.stop - lay.pos.start, 1.0, g)
        if tag:  # the codes of positions 0..k-1 orthonormal and orthogonal to the others: attention singles each out
            pos[:, lay.pos] = _orthogonal_head(pos[:, lay.pos], tag_tokens)
        m.tok.weight.copy_(tok)
        m.pos.weight.copy_(pos)
        for ln in (blk.ln1, blk.ln2):
            ln.weight.fill_(1.0)
            ln.bias.zero_()
        blk.qkv.weight.zero_()
        blk.qkv.bias.zero_()
        blk.proj.weight.zero_()
        blk.proj.bias.zero_()
        if tag:
            _plant_tag(blk, tok, pos, lay, g, tag_tokens)
        direction = torch.zeros(d, dtype=torch.float64)
        direction[lay.tok.start:lay.pos.stop] = torch.randn(lay.pos.stop, generator=g, dtype=torch.float64)
        direction /= direction.norm()
        h = (mlp_input(m, public_tokens.to(dev)).double().flatten(0, 1) @ direction.to(dev)).cpu()
        if not float(h.max()) > float(h.min()):
            raise ConfigError("the measurement is constant on the public text: give more or more varied public tokens")
        c = _offsets(h, bins)
        if scale is None:  # GELU: the nearest public value lies 6 units past its offset (GELU'(6) = 1 - 1e-8)
            gaps = torch.diff(torch.unique(h))
            scale = 1.0 if model.activation == "relu" else float(min(12.0 / max(float(gaps.min()), 1e-12), 1e6))
        w1 = torch.zeros(width, d, dtype=torch.float64)
        w1[:bins] = scale * direction
        b1 = torch.full((width,), -1.0, dtype=torch.float64)  # unused units stay off (ReLU(-1) = 0, no gradient)
        b1[:bins] = -scale * c
        blk.fc1.weight.copy_(w1)
        blk.fc1.bias.copy_(b1)
        u = torch.zeros(d, dtype=torch.float64)
        u[lay.feedback] = 1.0
        w2 = torch.zeros(d, width, dtype=torch.float64)
        w2[:, :bins] = (feedback / (scale * bins * max(float(h.std()), 1e-12))) * u[:, None]
        blk.fc2.weight.copy_(w2)
        blk.fc2.bias.zero_()
    m.decepticon_bins = bins  # type: ignore[assignment]
    m.decepticon_tag = tag  # type: ignore[assignment]
    m.decepticon_tag_tokens = tag_tokens if tag else 0  # type: ignore[assignment]
    return m


def _orthogonal_head(codes: Tensor, k: int) -> Tensor:
    """Position codes [L, w] with rows 0..k-1 orthonormal (Gram-Schmidt of the zero-mean codes) and every
    later row orthogonal to them, each row still of zero mean and unit norm."""
    c = codes.clone()
    for i in range(c.shape[0]):
        for j in range(min(i, k)):
            c[i] = c[i] - (c[i] @ c[j]) * c[j]
        c[i] = c[i] - c[i].mean()  # stays orthogonal: the earlier rows have zero mean
        c[i] = c[i] / c[i].norm()
    return c


def tag_shares(lay: Layout, k: int) -> list[slice]:
    """The tag coordinates split into k contiguous shares, one per tagged token (the first ones longer)."""
    n = lay.tag.stop - lay.tag.start
    edges = [lay.tag.start + (n * h) // k for h in range(k + 1)]
    return [slice(edges[h], edges[h + 1]) for h in range(k)]


def mlp_input(model: TinyGPT, tokens: Tensor) -> Tensor:
    """What the first block's MLP sees for tokens [B, L]: ln2(e + attention(ln1(e))) [B, L, d]."""
    blk = model.blocks[0]
    seen: list[Tensor] = []
    hook = blk.fc1.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    try:
        with torch.no_grad():
            blk(model.embed(tokens))
    finally:
        hook.remove()
    return seen[0]


def _plant_tag(blk: torch.nn.Module, tok: Tensor, pos: Tensor, lay: Layout, g: torch.Generator, k: int = 1) -> None:
    """Head h < k of the first attention layer attends from every position to position h (query a constant,
    key the position-h code, scaled so the softmax puts all but e^-40 of its weight there) and writes a
    random projection of that token's code into its share of the tag coordinates (:func:`tag_shares`): every
    token of a sequence carries its sequence's first k tokens. A token at a position below h cannot see
    position h (causal attention): that share then holds a mix, which :func:`decode` ignores. The other
    heads' values are zero."""
    d = tok.shape[1]
    dh = d // blk.heads
    std = math.sqrt(2.0 / d)  # LN1's scale: tok and pos codes of unit norm, zero mean, disjoint
    qkv_w = blk.qkv.weight.detach().double().clone()
    qkv_b = blk.qkv.bias.detach().double().clone()
    proj = torch.zeros(d, d, dtype=torch.float64)
    for h, share in enumerate(tag_shares(lay, k)):
        rows = slice(h * dh, (h + 1) * dh)
        wq, bq = torch.zeros(dh, d, dtype=torch.float64), torch.zeros(dh, dtype=torch.float64)
        bq[0] = 1.0
        wk = torch.zeros(dh, d, dtype=torch.float64)
        wk[0] = (40.0 * math.sqrt(dh) * std) * pos[h]  # score 40 at position h, 0 elsewhere (orthogonal codes)
        wv = torch.zeros(dh, d, dtype=torch.float64)
        wv[:, lay.tok] = torch.randn(dh, lay.tok.stop - lay.tok.start, generator=g, dtype=torch.float64) * std
        out = torch.randn(share.stop - share.start, dh, generator=g, dtype=torch.float64) / math.sqrt(dh)
        out -= out.mean(0, keepdim=True)  # each share has zero mean over the residual, as the codes do
        qkv_w[rows], qkv_b[rows] = wq, bq  # q of head h
        qkv_w[d + h * dh:d + (h + 1) * dh] = wk  # k of head h
        qkv_w[2 * d + h * dh:2 * d + (h + 1) * dh] = wv  # v of head h
        proj[share, rows] = out
    blk.qkv.weight.copy_(qkv_w)
    blk.qkv.bias.copy_(qkv_b)
    blk.proj.weight.copy_(proj)


def _offsets(h: Tensor, bins: int) -> Tensor:
    """Offsets [bins] at the quantile levels i / bins of h (level 0 below every value). Text is discrete (a
    frequent token at a position is one value many times), so a quantile that repeats the previous one
    moves up to the next distinct value of h, and an offset on a value moves half-way to the value below."""
    c = imprint_offsets(h, bins, "empirical", float(h.min()) - (float(h.max()) - float(h.min())))
    uniq = torch.unique(h)
    for i in range(1, bins):
        if c[i] <= c[i - 1]:
            j = int(torch.searchsorted(uniq, c[i - 1], right=True))
            if j >= len(uniq):
                raise ConfigError(f"decepticon bins = {bins}: the public text gives only {len(uniq)} distinct "
                                  "measurements; allowed: fewer bins or more public text")
            c[i] = uniq[j]
    # an offset on an observed value leaves those tokens on the knee (ReLU'(0) = 0, GELU'(0) = 1/2)
    return off_observed(c, h)


def _residual(z: Tensor, ref: Tensor) -> Tensor:
    """||z - a ref|| / ||z|| per row for the best scale a (z, ref [m, k]): how far z is from ref's direction."""
    a = (z * ref).sum(1, keepdim=True) / (ref * ref).sum(1, keepdim=True).clamp_min(1e-30)
    return (z - a * ref).norm(dim=1) / z.norm(dim=1).clamp_min(1e-30)


def decode(model: TinyGPT, z: Tensor, *, tol: float = 0.05) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(token [m], position [m], tag [m, k] (the sequence's first k tokens; -1 without a tag, and for share h
    of a token at a position below h, which the causal attention could not fill), valid [m]) of recovered
    first-MLP inputs z [m, d]: the codes with the largest inner product on the token, the position and each
    tag share's coordinates; ``valid`` where each part of z is within relative distance ``tol`` of the decoded
    code's direction. A bin shared by several tokens yields their gradient-weighted mean, and float error in
    an empty bin yields noise: neither lies on a code, so the check drops them instead of counting chance
    matches."""
    lay = layout(model.d_model)
    z = z.to(model.tok.weight)
    tp = slice(lay.tok.start, lay.pos.stop)
    token = (z[:, lay.tok] @ model.tok.weight[:, lay.tok].T).argmax(1)
    position = (z[:, lay.pos] @ model.pos.weight[:, lay.pos].T).argmax(1)
    valid = _residual(z[:, tp], (model.tok.weight[token] + model.pos.weight[position])[:, tp]) <= tol
    k = int(getattr(model, "decepticon_tag_tokens", 1 if getattr(model, "decepticon_tag", False) else 0))
    first = torch.full((len(token), max(k, 1)), -1, dtype=token.dtype, device=token.device)
    vocab = torch.arange(model.vocab, device=z.device)
    for h, share in enumerate(tag_shares(lay, k) if k else []):
        # the code of token v in share h: v at positions 0..h, read at position h (head h attends to itself)
        tags = mlp_input(model, vocab[:, None].expand(-1, h + 1))[:, h, share]  # [V, share]
        zt = z[:, share]
        cos = (zt / zt.norm(dim=1, keepdim=True).clamp_min(1e-30)) @ (tags / tags.norm(dim=1, keepdim=True)).T
        seen = position >= h  # a token before position h cannot see it: its share h holds a mix
        first[:, h] = torch.where(seen, cos.argmax(1), first[:, h])
        valid &= ~seen | (_residual(zt, tags[cos.argmax(1)]) <= tol)
    return token.cpu(), position.cpu(), first.cpu(), valid.cpu()


@register_federated("decepticons")
def decepticons(model: TinyGPT, obs: Observation, *, rel_tol: float = 1e-6, tol: float = 0.05) -> Reconstruction:
    """(token, position, first k tokens of its sequence) read off the first MLP layer's update of the model
    :func:`plant_decepticon` returned: ``x`` [m, 2 + k] (k = ``tag_tokens``, at least 1), one per bin interval
    whose candidate decodes onto the codes (:func:`decode`; a bin holding one token gives it exactly; tag
    entries -1 without the tag or where the token's position is below the entry's),
    ``info['token_set']`` the honest-but-curious bag of tokens (non-zero rows of the token-embedding
    gradient). :func:`sequences` groups the rows into sequences."""
    bins = getattr(model, "decepticon_bins", None)
    if bins is None:
        raise ConfigError("the decepticons attack reads the model plant_decepticon returned; this one was not planted")
    need = ("blocks.0.fc1.weight", "blocks.0.fc1.bias")
    if any(k not in obs.grad for k in need):
        raise ConfigError(f"the observed update lacks {', '.join(k for k in need if k not in obs.grad)}")
    z, where = imprint_candidates(obs.grad["blocks.0.fc1.weight"][:bins], obs.grad["blocks.0.fc1.bias"][:bins],
                                  rel_tol=rel_tol)
    token, position, first, valid = decode(model, z, tol=tol)
    info: dict = {"bins": bins, "nonempty_bins": len(where), "rejected": int((~valid).sum())}
    if "tok.weight" in obs.grad:
        info["token_set"] = bag_of_tokens(model, obs.grad)
    return Reconstruction(torch.cat([token[:, None], position[:, None], first], 1)[valid], None, info)


def bag_of_tokens(model: torch.nn.Module, grad: dict[str, Tensor], *, name: str = "tok.weight") -> list[int] | None:
    """The honest-but-curious baseline: the tokens whose row of the token-embedding gradient
    ``grad[name]`` [V, d] (TinyGPT's ``tok.weight``) is non-zero, i.e. the *set* of tokens the users typed (an
    embedding row gets a gradient only from the positions holding its token; no order, positions or counts).
    None for tied embeddings (``model.tie_embeddings``, or another module holding the same weight, as a tied
    head does): the head's gradient then reaches every row."""
    if getattr(model, "tie_embeddings", False) or tied(model, name):
        return None
    return (grad[name].abs().sum(1) > 0).nonzero()[:, 0].cpu().tolist()


def tied(model: torch.nn.Module, name: str) -> bool:
    """Whether the parameter ``name`` of ``model`` is held by more than one module (a head tied to the token
    embedding)."""
    p = dict(model.named_parameters(remove_duplicate=False)).get(name)
    holders = [m for m in model.modules() if any(q is p for q in m.parameters(recurse=False))]
    return p is not None and len(holders) > 1


def token_recovery(true_tokens: Tensor, tokens: Tensor) -> float:
    """Fraction of the users' token occurrences true_tokens [S, L] recovered, ignoring positions: the
    multiset intersection of the recovered tokens [m] with the true ones, over S * L."""
    tv, tc = torch.unique(true_tokens.flatten().cpu(), return_counts=True)
    if len(tokens) == 0:
        return 0.0
    pv, pc = torch.unique(tokens.cpu(), return_counts=True)
    return float(torch.minimum(tc[torch.isin(tv, pv)], pc[torch.isin(pv, tv)]).sum()) / true_tokens.numel()


def pair_recovery(true_tokens: Tensor, pairs: Tensor) -> float:
    """Fraction of the users' (token, position) occurrences recovered: true_tokens [S, L] (every
    sequence of every user), pairs [m, 2]; each recovered pair counts for at most as many occurrences as
    it has (multiset intersection)."""
    s, n = true_tokens.shape
    true = torch.stack([true_tokens.flatten().cpu(), torch.arange(n).repeat(s)], 1)
    if len(pairs) == 0:
        return 0.0
    key = lambda t: (t[:, 0].long() * 1_000_003 + t[:, 1].long())  # noqa: E731
    tv, tc = torch.unique(key(true), return_counts=True)
    pv, pc = torch.unique(key(pairs[:, :2].cpu()), return_counts=True)
    both = torch.isin(tv, pv)
    matched = torch.minimum(tc[both], pc[torch.isin(pv, tv)]).sum()
    return float(matched) / len(true)


def sequences(true_tokens: Tensor, rec: Tensor) -> dict[str, float]:
    """Sequence-level recovery from rows (token, position, tag of k tokens) [m, 2 + k] of :func:`decepticons`
    for the users' sequences true_tokens [S, L]: the rows grouped by their tag (the first k tokens; a row
    at a position below k carries only the tokens before it and joins every group that starts that way)
    form the recovered sequences. Sequences whose first k tokens equal another's are merged by the tag and
    count as not recovered. Returns the fraction of sequences ``merged``, the mean fraction of each
    sequence's positions recovered with the right token inside its own group (``tokens_in_sequence``), and
    the fraction of sequences recovered whole (``whole``)."""
    s, n = true_tokens.shape
    k = rec.shape[1] - 2
    keys = [tuple(int(v) for v in row[:k]) for row in true_tokens.cpu()]
    counts: dict[tuple[int, ...], int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    rec = rec.cpu()
    fractions, whole, merged = [], 0, 0
    for i in range(s):
        if counts[keys[i]] > 1:
            merged += 1
            fractions.append(0.0)
            continue
        got = {(int(t), int(p)) for t, p in rec[in_group(rec, torch.tensor(keys[i]))][:, :2].tolist()}
        hits = sum((int(t), p) in got for p, t in enumerate(true_tokens[i].tolist()))
        fractions.append(hits / n)
        whole += hits == n
    return {"merged": merged / s, "tokens_in_sequence": sum(fractions) / s, "whole": whole / s}


def in_group(rec: Tensor, first: Tensor) -> Tensor:
    """bool [m]: the rows (token, position, tag of k tokens) [m, 2 + k] that belong to the sequence whose
    first k tokens are ``first`` [k]: every tag entry the row could see (not -1) equals it, and it saw at
    least the first."""
    known = rec[:, 2:] >= 0  # a tag entry a row could see
    return ((rec[:, 2:] == first) | ~known).all(1) & known[:, 0]


def assemble(rec: Tensor, first: Tensor, length: int) -> Tensor:
    """The sequence a server reads for the group of tag ``first`` [k] (:func:`in_group`): int64 [length],
    the token recovered at each position, -1 where none was, -2 where the group holds different tokens at
    that position (sequences merged by a shared tag)."""
    out = torch.full((length,), -1, dtype=torch.int64)
    for t, p in rec[in_group(rec.cpu(), first.cpu())][:, :2].tolist():
        if 0 <= p < length:
            out[p] = t if out[p] in (-1, t) else -2
    return out
