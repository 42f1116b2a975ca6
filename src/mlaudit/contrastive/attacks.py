"""The two attacks of Carlini & Terzis, "Poisoning and Backdooring Contrastive Learning", ICLR 2022,
as modifications of a captioned training set (the *modify* move; training and scoring are separate).

* **Targeted poisoning** (sec. 4.1): to make a chosen image x* be zero-shot classified as class t,
  insert p pairs (x*, caption_i) whose captions mention t (here: the caption templates filled with t's
  name, drawn as for clean captions). The inserted pairs are appended after the N clean pairs, at
  indices N .. N + p - 1.
* **Backdoor** (sec. 4.2): a patch trigger is stamped on p training images drawn uniformly (seeded) and
  their captions are replaced by captions of the target class; at test time the trigger on any image
  should pull it towards the target class. The poisoned rows replace clean rows in place.

Both return the poisoned :class:`~mlaudit.contrastive.data.CaptionedData` and a :class:`PoisonRecord`
listing exactly which indices carry a poison and their captions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..attacks.poisoning.backdoor.trigger import Trigger, apply_trigger
from ..errors import ConfigError
from .data import CaptionedData, CaptionSpace


@dataclass(frozen=True)
class PoisonRecord:
    """``indices`` [p] (long) of the poisoned pairs in the poisoned set, their ``captions`` (p strings)
    and ``target`` class; ``inserted`` is True when the pairs were appended (targeted), False when they
    replaced clean pairs (backdoor)."""

    indices: Tensor
    captions: tuple[str, ...]
    target: int
    inserted: bool


def poisons_for_rate(rate: float, n: int) -> int:
    """p = floor(rate x n) (rate a fraction of the n clean pairs)."""
    return int(rate * n + 1e-9)


def targeted_poison(data: CaptionedData, image: Tensor, target: int, space: CaptionSpace, *, poisons: int,
                    seed: int, tokenize: Callable[[list[str]], Tensor] | None = None
                    ) -> tuple[CaptionedData, PoisonRecord]:
    """Append ``poisons`` pairs (``image`` [C, H, W], a caption of class ``target``) to ``data``.

    Returns the poisoned set (N + p pairs; the image label of a poison is ``target``'s id only for
    bookkeeping, training never reads labels) and the record of indices N .. N + p - 1. The poisons' captions
    are tokenized by ``tokenize`` (the one ``data.tokens`` came from; default: the space's tokenizer)."""
    if poisons < 1:
        raise ConfigError(f"targeted poisoning needs at least 1 poison, got {poisons}")
    if tuple(image.shape) != tuple(data.x.shape[1:]):
        raise ConfigError(f"the target image has shape {list(image.shape)}, the data's images {list(data.x.shape[1:])}")
    g = torch.Generator().manual_seed(int(seed))
    caps = space.captions([target] * poisons, generator=g)
    n = len(data)
    x = torch.cat([data.x, image.to(data.x).expand(poisons, *image.shape)])
    y = torch.cat([data.y, torch.full((poisons,), int(target), dtype=data.y.dtype)])
    tokens = torch.cat([data.tokens, (tokenize or space.tokenizer)(caps).to(data.tokens.device)])
    out = CaptionedData(x, [*data.captions, *caps], tokens, y)
    return out, PoisonRecord(torch.arange(n, n + poisons), tuple(caps), int(target), True)


def backdoor_poison(data: CaptionedData, trigger: Trigger, target: int, space: CaptionSpace, *, poisons: int,
                    seed: int, tokenize: Callable[[list[str]], Tensor] | None = None
                    ) -> tuple[CaptionedData, PoisonRecord]:
    """Stamp ``trigger`` on ``poisons`` training images drawn uniformly without replacement (seeded) and
    replace their captions with captions of class ``target``; every other pair is unchanged.

    Returns the poisoned set (N pairs) and the record of the poisoned indices (sorted). The new captions are
    tokenized by ``tokenize`` (the one ``data.tokens`` came from; default: the space's tokenizer)."""
    n = len(data)
    if not 1 <= poisons <= n:
        raise ConfigError(f"a backdoor needs 1 <= poisons <= {n} (the training pairs), got {poisons}")
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(n, generator=g)[:poisons].sort().values
    caps = space.captions([target] * poisons, generator=g)
    x = data.x.clone()
    x[idx.to(x.device)] = apply_trigger(data.x[idx.to(x.device)], trigger)
    captions = list(data.captions)
    for i, c in zip(idx.tolist(), caps, strict=True):
        captions[i] = c
    tokens = data.tokens.clone()
    tokens[idx.to(tokens.device)] = (tokenize or space.tokenizer)(caps).to(tokens.device)
    return CaptionedData(x, captions, tokens, data.y.clone()), PoisonRecord(idx, tuple(caps), int(target), False)
