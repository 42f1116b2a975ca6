"""A small CLIP-style dual encoder and the symmetric InfoNCE loss (Radford et al. 2021, "Learning
Transferable Visual Models From Natural Language Supervision", Fig. 3).

* image tower: any mlaudit zoo net (``mlp``, ``fastcnn``, ...; :func:`mlaudit.models.build_model`)
  built with an ``embed_dim``-wide head, so its last linear layer is the image projection W_i;
* text tower (:class:`TextEncoder`): token embeddings (+ learned positions), optionally ``layers``
  pre-norm transformer encoder layers with a padding mask, then the mean over non-padding tokens and
  a linear projection W_t to ``embed_dim``;
* a learnable temperature ``logit_scale`` = log(1 / 0.07) at init, its exponential clamped at 100 as in
  CLIP.

The interface is open_clip's: ``encode_image(x)`` [B, C, H, W] -> [B, D], ``encode_text(tokens)``
[B, L] -> [B, D] (both unnormalised unless ``normalize=True``), ``logit_scale`` a scalar parameter
(log of the scale), and ``forward(x, tokens)`` -> (image features [B, D], text features [B, D], both
L2-normalised, scale exp(logit_scale)). Any module with ``encode_image``, ``encode_text`` and
``logit_scale`` (an open_clip ``CLIP`` included) can be trained, attacked and scored here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..imports import accepted_kwargs, resolve_import
from ..models.registry import ModelSpec, build_model

MAX_LOGIT_SCALE = 100.0
"""CLIP clips the temperature-scaled logits' scale exp(logit_scale) at 100 (Radford et al. 2021, sec. 2.5)."""
INIT_LOGIT_SCALE = math.log(1 / 0.07)


class TextEncoder(nn.Module):
    """tokens [B, L] (0 = padding) -> text features [B, embed_dim]: embedding [B, L, W] (+ positions),
    ``layers`` transformer encoder layers (``heads`` heads, padding masked), mean over non-padding
    tokens [B, W], linear projection [B, D]. ``layers = 0`` is a mean-pooled bag of word embeddings."""

    def __init__(self, *, vocab_size: int, context_length: int, embed_dim: int, width: int = 64, layers: int = 1,
                 heads: int = 4) -> None:
        super().__init__()
        self.token = nn.Embedding(vocab_size, width, padding_idx=0)
        self.position = nn.Parameter(torch.zeros(context_length, width)) if layers else None
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=0.0, batch_first=True,
                                       norm_first=True) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        nn.init.normal_(self.token.weight, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        pad = tokens == 0  # [B, L]
        h = self.token(tokens)  # [B, L, W]
        if self.position is not None:
            h = h + self.position[: tokens.shape[1]]
        for blk in self.blocks:
            h = blk(h, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)  # [B, L, 1]
        pooled = (self.norm(h) * keep).sum(1) / keep.sum(1).clamp_min(1.0)  # [B, W]
        return self.proj(pooled)


class DualEncoder(nn.Module):
    """CLIP-style image-text model (module docstring): ``image`` [B, C, H, W] -> [B, D] and ``text``
    [B, L] -> [B, D] towers and the learnable ``logit_scale``."""

    def __init__(self, image: nn.Module, text: nn.Module) -> None:
        super().__init__()
        self.image = image
        self.text = text
        self.logit_scale = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))

    def encode_image(self, x: Tensor, normalize: bool = False) -> Tensor:
        f = self.image(x)
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        f = self.text(tokens)
        return F.normalize(f, dim=-1) if normalize else f

    def forward(self, x: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.encode_image(x, True), self.encode_text(tokens, True), self.logit_scale.exp()


def clip_logit_scale(model: nn.Module) -> None:
    """Clamp ``model.logit_scale`` in place so that exp(logit_scale) <= 100 (CLIP)."""
    with torch.no_grad():
        model.logit_scale.clamp_(max=math.log(MAX_LOGIT_SCALE))


def info_nce(image_features: Tensor, text_features: Tensor, scale: Tensor | float) -> Tensor:
    """The symmetric InfoNCE loss of CLIP (Radford et al. 2021, Fig. 3), a scalar.

    With u_i, v_j the L2-normalised image and text features [B, D] and s = exp(logit_scale), the logits
    are l_ij = s <u_i, v_j> [B, B] and the loss is the mean of the two cross-entropies with the matching
    pair as the class:

        L = 1/2 [ -1/B sum_i log softmax_j(l_ij)|_{j=i} - 1/B sum_j log softmax_i(l_ij)|_{i=j} ].

    Features are normalised here (again, if they already are)."""
    u = F.normalize(image_features.float(), dim=-1)
    v = F.normalize(text_features.float(), dim=-1)
    logits = scale * u @ v.T  # [B, B]
    target = torch.arange(len(u), device=u.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def build_dual_encoder(image: str | dict[str, Any] | ModelSpec, *, input_shape: tuple[int, ...], vocab_size: int,
                       context_length: int, embed_dim: int = 64, text_width: int = 64, text_layers: int = 1,
                       text_heads: int = 4) -> DualEncoder:
    """A fresh (global-RNG) :class:`DualEncoder`: the zoo net (or ``package.module:factory``) ``image``
    with an ``embed_dim``-wide head for images of ``input_shape`` [C, H, W], and a :class:`TextEncoder`."""
    img = build_model(image, input_shape=input_shape, num_classes=embed_dim)
    txt = TextEncoder(vocab_size=vocab_size, context_length=context_length, embed_dim=embed_dim, width=text_width,
                      layers=text_layers, heads=text_heads)
    return DualEncoder(img, txt)


REQUIRED = ("encode_image", "encode_text", "logit_scale")


def check_dual_encoder(model: Any, *, where: str) -> nn.Module:
    """``model`` if it is an ``nn.Module`` with ``encode_image``, ``encode_text`` and ``logit_scale``
    (open_clip's interface), else a ConfigError naming ``where`` and what is missing."""
    missing = [a for a in REQUIRED if not hasattr(model, a)]
    if not isinstance(model, nn.Module) or missing:
        raise ConfigError(f"{where} must build a torch.nn.Module with encode_image(x), encode_text(tokens) and a "
                          f"logit_scale parameter (open_clip's CLIP interface); got {type(model).__name__}"
                          + (f" without {', '.join(missing)}" if missing else ""))
    return model


def build_user_dual_encoder(spec: str, *, input_shape: Sequence[int], vocab_size: int, context_length: int,
                            embed_dim: int, where: str = "encoder.dual") -> nn.Module:
    """Call the user's factory ``package.module:factory`` with those of ``input_shape``, ``vocab_size``,
    ``context_length``, ``embed_dim`` it accepts (keywords), and check the result (:func:`check_dual_encoder`)."""
    factory = resolve_import(spec, what=where)
    if isinstance(factory, nn.Module) or not callable(factory):
        raise ConfigError(f"{where} = {spec!r} is a {type(factory).__name__}, not a factory; name a class or function "
                          "that returns a new dual encoder each call")
    offered = {"input_shape": tuple(input_shape), "vocab_size": vocab_size, "context_length": context_length,
               "embed_dim": embed_dim}
    try:
        model = factory(**accepted_kwargs(factory, offered))
    except Exception as e:  # noqa: BLE001 - the user's constructor
        raise ConfigError(f"{where} = {spec!r} failed to build: {type(e).__name__}: {e}") from None
    return check_dual_encoder(model, where=where)
