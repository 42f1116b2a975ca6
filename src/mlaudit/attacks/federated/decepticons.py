"""Decepticons (Fowl, Geiping, Reich, Wen, Czaja, Goldblum & Goldstein 2022; seed 002, chapter 4): a
malicious server sends a transformer language model whose *parameters* (not its architecture) make the
aggregated FedSGD update reveal which token stood at which position, through secure aggregation.

What is built here, on :class:`mlaudit.models.gpt.TinyGPT` (ReLU MLPs; GPT-2 has GELU):

* **Embeddings** split the residual stream into three subspaces: token codes live in the first d/2
  coordinates, position codes in the next d/4, and the last d/4 are left free. Every code has zero mean and
  a fixed norm, so the first LayerNorm only rescales e = tok[v] + pos[p] by a constant and the token and
  the position stay readable from disjoint coordinates.
* **First block**: the attention's output projection is zeroed (the block passes e through), and the
  first MLP layer becomes an imprint of ``bins`` bins (Fowl et al. 2022a, as in
  :mod:`.imprint`): rows s * m for a random unit direction m of the token and position subspaces, biases
  -s * c_i at the quantiles of <m, LN(e)> over the server's public text. The second MLP layer writes the
  sum of the bins along one direction u of the free subspace, so every bin of a token gets the same
  gradient g_t = <u, dL/dx_t>.
* **Recovery**: for a token alone in its bin interval, (dW_i - dW_{i+1}) / (db_i - db_{i+1}) = LN(e_t),
  which is decoded into (token, position) by the largest inner product with the known codes.

The honest-but-curious baseline: the rows of the token-embedding gradient that are non-zero give the
*set* of tokens the users typed (no positions, no counts).

Not built: the chapter's attention-based tagging that groups recovered tokens into sequences across users
(recovered pairs are matched to the true (token, position) multiset of all users), and its handling of
GELU and of tied embeddings.
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
from .imprint import imprint_candidates


@dataclass(frozen=True)
class Layout:
    """The coordinates of the residual stream the malicious embeddings use."""

    tok: slice
    pos: slice
    free: slice


def layout(d: int) -> Layout:
    t, p = d // 2, d // 4
    return Layout(slice(0, t), slice(t, t + p), slice(t + p, d))


def _codes(n: int, width: int, norm: float, generator: torch.Generator) -> Tensor:
    """n random codes [n, width], each of zero mean and l2 norm ``norm``."""
    c = torch.randn(n, width, generator=generator, dtype=torch.float64)
    c = c - c.mean(1, keepdim=True)
    return norm * c / c.norm(dim=1, keepdim=True)


def plant_decepticon(model: TinyGPT, public_tokens: Tensor, *, bins: int, scale: float = 1.0,
                     feedback: float = 1e-2, generator: torch.Generator | None = None) -> TinyGPT:
    """A copy of ``model`` with the malicious parameters of the module docstring; ``public_tokens``
    [N, L] (L <= seq_len) the server's public text, on which the bins' quantiles are estimated."""
    if not isinstance(model, TinyGPT):
        raise ConfigError(f"plant_decepticon needs a TinyGPT (mlaudit.models.gpt), got {type(model).__name__}")
    d = model.d_model
    width = model.blocks[0].fc1.out_features
    if not 1 <= bins <= width:
        raise ConfigError(f"decepticon bins = {bins}; allowed 1 <= bins <= {width} (the first MLP layer's width, 4 x "
                          f"d_model = 4 x {d})")
    if d < 8:
        raise ConfigError(f"d_model = {d} is too small to split into token, position and free coordinates; allowed d_model >= 8")
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
        m.tok.weight.copy_(tok)
        m.pos.weight.copy_(pos)
        for ln in (blk.ln1, blk.ln2):
            ln.weight.fill_(1.0)
            ln.bias.zero_()
        blk.proj.weight.zero_()
        blk.proj.bias.zero_()
        direction = torch.zeros(d, dtype=torch.float64)
        direction[lay.tok.start:lay.pos.stop] = torch.randn(lay.pos.stop, generator=g, dtype=torch.float64)
        direction /= direction.norm()
        h = (blk.ln2(m.embed(public_tokens.to(dev))).double().flatten(0, 1) @ direction.to(dev)).cpu()
        if not float(h.max()) > float(h.min()):
            raise ConfigError("the measurement is constant on the public text: give more or more varied public tokens")
        c = _offsets(h, bins)
        w1 = torch.zeros(width, d, dtype=torch.float64)
        w1[:bins] = scale * direction
        b1 = torch.full((width,), -1.0, dtype=torch.float64)  # unused units stay off (ReLU(-1) = 0, no gradient)
        b1[:bins] = -scale * c
        blk.fc1.weight.copy_(w1)
        blk.fc1.bias.copy_(b1)
        u = torch.zeros(d, dtype=torch.float64)
        u[lay.free] = 1.0 / math.sqrt(lay.free.stop - lay.free.start)
        w2 = torch.zeros(d, width, dtype=torch.float64)
        w2[:, :bins] = (feedback / (scale * bins * max(float(h.std()), 1e-12))) * u[:, None]
        blk.fc2.weight.copy_(w2)
        blk.fc2.bias.zero_()
    m.decepticon_bins = bins  # type: ignore[assignment]
    return m


def _offsets(h: Tensor, bins: int) -> Tensor:
    """Offsets [bins] at the quantile levels i / bins of h (level 0 below every value). Text is discrete (a
    frequent token at a position is one value many times), so a quantile that repeats the previous one
    moves up to the next distinct value of h."""
    levels = torch.arange(1, bins, dtype=torch.float64) / bins
    c = torch.cat([torch.tensor([float(h.min()) - (float(h.max()) - float(h.min()))], dtype=torch.float64),
                   torch.quantile(h, levels)])
    uniq = torch.unique(h)
    for i in range(1, bins):
        if c[i] <= c[i - 1]:
            j = int(torch.searchsorted(uniq, c[i - 1], right=True))
            if j >= len(uniq):
                raise ConfigError(f"decepticon bins = {bins}: the public text gives only {len(uniq)} distinct "
                                  "measurements; allowed: fewer bins or more public text")
            c[i] = uniq[j]
    return c


def decode(model: TinyGPT, z: Tensor, *, tol: float = 0.05) -> tuple[Tensor, Tensor, Tensor]:
    """(token [m], position [m], valid [m]) of recovered first-MLP inputs z [m, d]: the codes with the
    largest inner product on the token and on the position coordinates; ``valid`` where z is within
    relative distance ``tol`` of LN(tok[token] + pos[position]). A bin shared by several tokens yields
    their gradient-weighted mean, and float error in an empty bin yields noise: neither lies on a code,
    so the check drops them instead of counting chance matches."""
    lay = layout(model.d_model)
    z = z.to(model.tok.weight)
    token = (z[:, lay.tok] @ model.tok.weight[:, lay.tok].T).argmax(1)
    position = (z[:, lay.pos] @ model.pos.weight[:, lay.pos].T).argmax(1)
    with torch.no_grad():
        want = model.blocks[0].ln2(model.tok.weight[token] + model.pos.weight[position])
    valid = (z - want).norm(dim=1) <= tol * want.norm(dim=1)
    return token.cpu(), position.cpu(), valid.cpu()


@register_federated("decepticons")
def decepticons(model: TinyGPT, obs: Observation, *, rel_tol: float = 1e-6, tol: float = 0.05) -> Reconstruction:
    """(token, position) pairs read off the first MLP layer's update of the model
    :func:`plant_decepticon` returned: ``x`` [m, 2], one per bin interval whose candidate decodes onto a
    code (:func:`decode`; a bin holding one token gives it exactly), ``info['token_set']`` the
    honest-but-curious bag of tokens (non-zero rows of the token-embedding gradient)."""
    bins = getattr(model, "decepticon_bins", None)
    if bins is None:
        raise ConfigError("the decepticons attack reads the model plant_decepticon returned; this one was not planted")
    need = ("blocks.0.fc1.weight", "blocks.0.fc1.bias")
    if any(k not in obs.grad for k in need):
        raise ConfigError(f"the observed update lacks {', '.join(k for k in need if k not in obs.grad)}")
    z, where = imprint_candidates(obs.grad["blocks.0.fc1.weight"][:bins], obs.grad["blocks.0.fc1.bias"][:bins],
                                  rel_tol=rel_tol)
    token, position, valid = decode(model, z, tol=tol)
    info: dict = {"bins": bins, "nonempty_bins": len(where), "rejected": int((~valid).sum())}
    token, position = token[valid], position[valid]
    if "tok.weight" in obs.grad:
        info["token_set"] = (obs.grad["tok.weight"].abs().sum(1) > 0).nonzero()[:, 0].cpu().tolist()
    return Reconstruction(torch.stack([token, position], 1), None, info)


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
    pv, pc = torch.unique(key(pairs.cpu()), return_counts=True)
    both = torch.isin(tv, pv)
    matched = torch.minimum(tc[both], pc[torch.isin(pv, tv)]).sum()
    return float(matched) / len(true)
