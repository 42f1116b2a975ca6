"""Offline captioned image datasets and a word-level tokenizer for CLIP-style training.

No download: each image of a labelled image dataset (sklearn's digits, bundled; CIFAR-10 from the
JPEG pack when present) is paired with a caption built from its class name and one of a few
templates, drawn with a seeded generator, optionally followed by ``distractors`` words drawn from
:data:`DISTRACTOR_WORDS` (noise words that carry no class information, a stand-in for the
uninformative parts of web alt-text). The templates, exactly:

* digits (class names ``zero`` ... ``nine``): :data:`DIGIT_TEMPLATES`;
* any other dataset (its own class names, e.g. CIFAR-10's ``airplane`` ... ``truck``):
  :data:`PHOTO_TEMPLATES`.

Zero-shot classification (:mod:`mlaudit.contrastive.zeroshot`) prompts with the same templates.

Tokens: the caption is lower-cased and split on anything that is not a letter; each word maps to its
id in the vocabulary (0 = padding, 1 = unknown word, then the words in sorted order), cut or padded
to ``context_length`` -> LongTensor [N, L].
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..data.base import TensorDataset

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_TEMPLATES = (
    "a photo of a {c}",
    "a blurry picture of the {c}",
    "the number {c} written by hand",
    "a scan of a handwritten {c}",
    "a drawing of the digit {c}",
    "a small image of a {c}",
)
PHOTO_TEMPLATES = (
    "a photo of a {c}",
    "a blurry picture of the {c}",
    "a close-up photo of a {c}",
    "a low resolution photo of the {c}",
    "a picture of my {c}",
    "an image containing a {c}",
)
DISTRACTOR_WORDS = ("today", "outside", "my", "vacation", "was", "amazing", "old", "new", "red", "blue", "in",
                    "the", "garden", "morning", "last", "week", "friend", "took", "this", "with", "camera")
PAD, UNK = 0, 1
CONTEXT_LENGTH = 12


def class_names(dataset: str, classes: Sequence[str]) -> tuple[str, ...]:
    """The words captions use for ``classes``: digit names for digits, else the dataset's names
    (underscores become spaces)."""
    if dataset in ("digits", "mnist") and tuple(classes) == tuple(str(i) for i in range(10)):
        return DIGIT_NAMES
    return tuple(str(c).replace("_", " ") for c in classes)


def templates_for(dataset: str) -> tuple[str, ...]:
    """The caption templates of ``dataset`` (module docstring)."""
    return DIGIT_TEMPLATES if dataset in ("digits", "mnist") else PHOTO_TEMPLATES


_WORD = re.compile(r"[a-z]+")


def words(text: str) -> list[str]:
    """Lower-cased runs of letters of ``text``."""
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class Tokenizer:
    """Word-level tokenizer over a fixed vocabulary (module docstring); ``__call__(captions) ->``
    LongTensor [N, context_length]."""

    vocab: tuple[str, ...]
    context_length: int = CONTEXT_LENGTH
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", {w: i + 2 for i, w in enumerate(self.vocab)})

    @classmethod
    def from_texts(cls, texts: Sequence[str], *, context_length: int = CONTEXT_LENGTH) -> Tokenizer:
        """The tokenizer whose vocabulary is every word of ``texts``, sorted."""
        return cls(tuple(sorted({w for t in texts for w in words(t)})), context_length)

    @property
    def vocab_size(self) -> int:
        """Number of token ids (padding and unknown included)."""
        return len(self.vocab) + 2

    def __call__(self, captions: Sequence[str]) -> Tensor:
        out = torch.full((len(captions), self.context_length), PAD, dtype=torch.long)
        for i, c in enumerate(captions):
            ids = [self.index.get(w, UNK) for w in words(c)][: self.context_length]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


@dataclass
class CaptionedData:
    """Image-caption pairs: ``x`` [N, C, H, W] in [0, 1], ``captions`` (N strings), ``tokens``
    [N, L] (long), ``y`` [N] the class the image shows (for evaluation only: training never sees it)."""

    x: Tensor
    captions: list[str]
    tokens: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.captions)


@dataclass(frozen=True)
class CaptionSpace:
    """What captions of a dataset are made of: ``names`` (one word or phrase per class), ``templates``,
    ``distractors`` (words appended per caption) and the ``tokenizer`` over all of them."""

    names: tuple[str, ...]
    templates: tuple[str, ...]
    distractors: int = 0
    tokenizer: Tokenizer = field(default_factory=lambda: Tokenizer(()))

    @classmethod
    def build(cls, names: Sequence[str], templates: Sequence[str], *, distractors: int = 0,
              context_length: int = CONTEXT_LENGTH) -> CaptionSpace:
        texts = [t.format(c=n) for t in templates for n in names] + list(DISTRACTOR_WORDS)
        longest = max(len(words(t)) for t in texts) + distractors
        tok = Tokenizer.from_texts(texts, context_length=max(context_length, longest))
        return cls(tuple(names), tuple(templates), distractors, tok)

    def captions(self, labels: Sequence[int], *, generator: torch.Generator) -> list[str]:
        """One caption per label: a template drawn uniformly, then ``distractors`` words drawn uniformly."""
        n = len(labels)
        tpl = torch.randint(len(self.templates), (n,), generator=generator).tolist()
        extra = torch.randint(len(DISTRACTOR_WORDS), (n, self.distractors), generator=generator).tolist()
        return [" ".join([self.templates[t].format(c=self.names[int(c)]), *(DISTRACTOR_WORDS[j] for j in e)])
                for c, t, e in zip(labels, tpl, extra, strict=True)]

    def pair(self, split: TensorDataset, *, seed: int) -> CaptionedData:
        """Caption every image of ``split`` (x [N, C, H, W], y [N]) from its class, seeded."""
        g = torch.Generator().manual_seed(int(seed))
        caps = self.captions(split.y.tolist(), generator=g)
        return CaptionedData(split.x, caps, self.tokenizer(caps), split.y.long())
