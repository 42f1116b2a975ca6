"""CPython's help topics as character-token sequences (the text of ``pydoc_data/topics.py``, which ships
with every CPython: no download).

The text (:func:`pydoc_text`: the Python language reference's sections in sorted topic order,
lower-cased, whitespace collapsed; about 433,000 characters and 76 distinct ones with CPython 3.11) is
cut into non-overlapping windows of ``length + 1`` characters. Example i is the window's first
``length`` characters as token ids, ``x`` float32 [N, length] (exact integers: the one training loop
takes float inputs, as :func:`mlaudit.audit.exposure.windows` does), and its label ``y`` [N] the
character that follows them (the next-token class). So a sequence model's targets are
``cat(x[:, 1:], y[:, None])`` [N, length] (next-token prediction at every position), and a context
classifier (``mlp`` on the flat window) predicts ``y``. The vocabulary (the class names, one character
each) is every character of the whole text, sorted, whatever ``chars`` keeps. Train and test are a
seeded random split of the windows (``spec.test_fraction`` to test): the ``federated`` kind's
Decepticons attack uses the test split as the server's public text.

Options: ``length`` (tokens per sequence, default 32), ``chars`` (the first ``chars`` characters of the
text, default 400,000; null for all of it). The text depends on the Python version (recorded in ``meta``).
"""

from __future__ import annotations

import re
import sys

import torch
from pydantic import BaseModel, ConfigDict, Field

from ...errors import ConfigError
from ..base import DataBundle, TensorDataset
from ..registry import DatasetSpec, register_source
from ._util import parse_options


def pydoc_text(chars: int | None = None) -> str:
    """Text that ships with CPython: the help topics of ``pydoc_data/topics.py`` (the Python language
    reference's sections), in sorted topic order, lower-cased, runs of whitespace collapsed to one space
    (about 433,000 characters, 76 distinct, with CPython 3.11); the first ``chars`` of it."""
    from pydoc_data.topics import topics

    text = re.sub(r"\s+", " ", " ".join(topics[k] for k in sorted(topics)).lower())
    return text if chars is None else text[:chars]


class PydocTextOptions(BaseModel):
    """``length``: tokens per sequence (x [N, length]); ``chars``: how much of the text (None: all)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    length: int = Field(32, ge=2, le=4096)
    chars: int | None = Field(400_000, ge=1_000, le=10_000_000)


def char_tokens(text: str, vocabulary: str) -> torch.Tensor:
    """Token ids int64 [len(text)] of ``text``'s characters in ``vocabulary`` (each character once, sorted)."""
    index = {c: i for i, c in enumerate(vocabulary)}
    return torch.tensor([index[c] for c in text], dtype=torch.int64)


@register_source("pydoc-text")
def load(spec: DatasetSpec) -> DataBundle:
    """CPython's help topics as (``length`` characters, next character) windows: x float32 [N, length] token
    ids, y int64 [N], classes the 76 characters; a seeded random split."""
    opts = parse_options(PydocTextOptions, spec.options, source="pydoc-text")
    full = pydoc_text()
    vocabulary = "".join(sorted(set(full)))
    text = full if opts.chars is None else full[: opts.chars]
    ids = char_tokens(text, vocabulary)
    n = len(ids) // (opts.length + 1)
    if n < 2:
        raise ConfigError(f"dataset pydoc-text: options.chars = {opts.chars} gives {len(ids)} characters make fewer "
                          f"than 2 windows of options.length + 1 = {opts.length + 1}; allowed: a smaller length or "
                          "more chars")
    windows = ids[: n * (opts.length + 1)].view(n, opts.length + 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(spec.seed))
    n_test = min(n - 1, max(1, round(n * spec.test_fraction)))
    classes = tuple(vocabulary)

    def split(rows: torch.Tensor) -> TensorDataset:
        w = windows[rows.sort().values]
        return TensorDataset(w[:, :-1].float(), w[:, -1].clone(), classes)

    return DataBundle("pydoc-text", split(order[n_test:]), split(order[:n_test]),
                      {"format": "pydoc_data.topics (character tokens)", "python": sys.version.split()[0],
                       "length": opts.length, "chars": len(text), "vocabulary": len(vocabulary),
                       "test_fraction": spec.test_fraction, "seed": spec.seed, "text": True})


__all__ = ["PydocTextOptions", "char_tokens", "load", "pydoc_text"]
