"""A small GPT-2-style causal transformer language model, built locally (no weight download): token and
learned position embeddings, pre-LayerNorm blocks of causal multi-head self-attention and a two-layer
MLP, a final LayerNorm and an output head, untied by default; ``tie_embeddings=True`` shares the head's
weight with the token embedding, as GPT-2 does (Radford et al. 2019's layout at toy size).

Logits come out as [B, V, L] (the vocabulary second), the layout ``F.cross_entropy`` takes for sequence
targets [B, L], so the FedSGD gradients of :func:`mlaudit.federated.user_gradients` apply unchanged to
next-token prediction with x = tokens[:, :-1], y = tokens[:, 1:].

``activation``: ``relu`` (default here) or ``gelu`` (GPT-2's). The Decepticons attack
(:mod:`mlaudit.attacks.federated.decepticons`) makes its bins steep under GELU, so that GELU acts as
ReLU does (zero below a bin's offset, slope one above).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Block(nn.Module):
    """x + attn(ln1(x)), then + mlp(ln2(.)): causal self-attention with ``heads`` heads, MLP width 4d."""

    def __init__(self, d: int, heads: int, activation: Literal["relu", "gelu"]) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"d_model = {d} must be a multiple of heads = {heads}")
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.act = F.relu if activation == "relu" else F.gelu

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # written out rather than F.scaled_dot_product_attention, which has no vmap rule on the CPU (the
        # FedSGD gradients of all users come from one vmap)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)  # [B, heads, L, L]
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        a = att.masked_fill(~causal, float("-inf")).softmax(-1) @ v  # [B, heads, L, d/heads]
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    """tokens [B, L] (int, L <= ``seq_len``) -> logits [B, V, L]."""

    def __init__(self, vocab: int, seq_len: int, *, d_model: int = 64, heads: int = 4, layers: int = 2,
                 activation: Literal["relu", "gelu"] = "relu", tie_embeddings: bool = False) -> None:
        super().__init__()
        self.vocab, self.seq_len, self.d_model, self.activation = vocab, seq_len, d_model, activation
        self.tie_embeddings = tie_embeddings
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, heads, activation) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        for m in self.modules():  # GPT-2's initialisation: N(0, 0.02), residual projections scaled down
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        for blk in self.blocks:
            nn.init.normal_(blk.proj.weight, std=0.02 / math.sqrt(2 * layers))
            nn.init.normal_(blk.fc2.weight, std=0.02 / math.sqrt(2 * layers))
        if tie_embeddings:  # one parameter: named_parameters() lists it once, as tok.weight
            self.head.weight = self.tok.weight

    def embed(self, tokens: Tensor) -> Tensor:
        """The residual stream's input [B, L, d]: token plus position embedding."""
        return self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.shape[1] > self.seq_len:
            raise ValueError(f"sequence length {tokens.shape[1]} exceeds the model's seq_len = {self.seq_len}")
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x)).transpose(1, 2)


def tiny_gpt(num_classes: int, input_shape: tuple[int, ...], *, d_model: int = 64, heads: int = 4, layers: int = 2,
             activation: Literal["relu", "gelu"] = "relu", tie_embeddings: bool = False) -> TinyGPT:
    """A :class:`TinyGPT` for token data x [N, L] over ``num_classes`` tokens (vocab = num_classes, seq_len =
    L): the factory a config names, ``model: {name: "mlaudit.models.gpt:tiny_gpt", kwargs: {d_model: 128}}``
    (the ``federated`` kind's ``attack: decepticons``); the model registry passes ``num_classes`` and
    ``input_shape`` from the data."""
    if len(input_shape) != 1:
        raise ValueError(f"tiny_gpt takes token sequences x [N, L]; the data's examples have shape {list(input_shape)}")
    return TinyGPT(num_classes, int(input_shape[0]), d_model=d_model, heads=heads, layers=layers,
                   activation=activation, tie_embeddings=tie_embeddings)
