"""Canary exposure (Carlini, Liu, Erlingsson, Kos & Song, "The Secret Sharer: Evaluating and Testing
Unintended Memorization in Neural Networks", USENIX Security 2019) and Truth Serum's poisoning for canary
extraction (Tramèr, Shokri, San Joaquin, Le, Jagielski, Hong & Carlini, "Truth Serum: Poisoning Machine
Learning Models to Reveal Their Secrets", CCS 2022; seed 000, "canary extraction": the game it is scored in).

A canary is ``prefix + r`` with a secret r drawn uniformly from the randomness space R (``length``
characters of ``alphabet``), inserted into a language model's training text. With the log-perplexity of
the secret's characters given what precedes them,

    Px(r) = - sum_i log2 p(r_i | prefix, r_<i)                               (the paper's eq. 1, base 2)

the rank of r is its position among all r' in R sorted by Px (1 = most likely), and

    exposure(r) = log2 |R| - log2 rank(r)                                   (the paper's definition 4)

between 0 and log2 |R| (the model ranks the true secret first). :func:`exact_exposure` enumerates R
(small spaces); :func:`sampled_exposure` estimates the rank from a uniform sample of R, and
:func:`skewnorm_exposure` extrapolates with a skew-normal fit to the sampled Px (the paper's sec. 4.3
"exposure by distribution modelling"), which reaches exposures beyond log2 of the sample size.

Poisoning to reveal a secret (Truth Serum's canary extraction): the adversary knows the prefix and may add
lines to the training text. Truth Serum's construction is not in the seeds, and the paper could not be
reached from here to check it, so two readings are built as an experiment variable (``poison``):

* ``"random"``: ``poisons`` lines ``prefix + r'`` with r' drawn uniformly from R (they flatten the model's
  prior over continuations of the prefix);
* ``"pad"``: ``poisons`` lines ``prefix + pad * length``, the prefix followed by padding that is no
  candidate secret (the analogue of Truth Serum's mislabelled copies: without the canary, the model learns
  that the prefix is followed by something other than any secret, so the one true line stands out).

Reports of the paper (press coverage; the paper itself could not be read here) say its extraction also uses
shadow models to set aside continuations any model of the text finds likely. :func:`measure_exposure` offers
that as ``references=k``: k reference models trained on the same public text and the same poison lines, without
the canary (what the adversary can build), and the *calibrated* score

    c(r) = Px_target(r) - mean_j Px_ref_j(r)                                (lower = more likely than expected)

ranks the candidates for a calibrated exposure log2 |R| - log2 rank_c(r) beside the plain one.

Measured on CPython's help text (docs/membership.md, "Canary exposure"): which of them raises the exposure of
a canary is reported there, with the numbers.

The language model is any next-token classifier over fixed contexts: ``model(x [B, k] float token ids) ->
logits [B, V]`` (default :class:`~mlaudit.models.mlp.CharMLP`), trained by the one training loop on (context, next token)
windows of the text (:func:`windows`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..data.base import TensorDataset
from ..data.sources.pydoc_text import pydoc_text
from ..errors import ConfigError
from ..query import forward_batched


@dataclass(frozen=True)
class Vocabulary:
    """Characters of a corpus: ``chars`` in id order (id 0 is reserved for characters outside it)."""

    chars: str

    @classmethod
    def of(cls, text: str, *, extra: str = "") -> Vocabulary:
        return cls("\0" + "".join(sorted(set(text + extra) - {"\0"})))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> Tensor:
        """long [len(text)]: each character's id (0 for characters outside the vocabulary)."""
        index = {c: i for i, c in enumerate(self.chars)}
        return torch.tensor([index.get(c, 0) for c in text], dtype=torch.long)

    def encode_many(self, texts: Sequence[str]) -> Tensor:
        """long [M, L] for M strings of one length L (one table lookup over their bytes when every character
        is Latin-1, which scoring a million candidates needs; per character otherwise)."""
        lengths = {len(t) for t in texts}
        if len(lengths) != 1:
            raise ConfigError(f"encode_many needs strings of one length, got lengths {sorted(lengths)[:5]}")
        try:
            raw = "".join(texts).encode("latin-1")
        except UnicodeEncodeError:
            return torch.stack([self.encode(t) for t in texts])
        table = torch.zeros(256, dtype=torch.long)
        for i, c in enumerate(self.chars):
            if ord(c) < 256:
                table[ord(c)] = i
        codes = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
        return table[codes].view(len(texts), lengths.pop())


@dataclass(frozen=True)
class CanaryFormat:
    """A canary ``prefix + r`` with r of ``length`` characters of ``alphabet`` (|R| = len(alphabet)^length)."""

    prefix: str = "the secret number is "
    alphabet: str = "0123456789"
    length: int = 6

    def __post_init__(self) -> None:
        if self.length < 1 or len(self.alphabet) < 2 or len(set(self.alphabet)) != len(self.alphabet):
            raise ConfigError(f"canary: length = {self.length}, alphabet = {self.alphabet!r}; allowed length >= 1 and "
                              "an alphabet of at least 2 distinct characters")

    @property
    def space(self) -> int:
        return len(self.alphabet) ** self.length

    def secret(self, index: int) -> str:
        """The secret with mixed-radix index ``index`` in [0, |R|) (the first character most significant)."""
        out, b = [], len(self.alphabet)
        for _ in range(self.length):
            index, d = divmod(index, b)
            out.append(self.alphabet[d])
        return "".join(reversed(out))

    def draw(self, n: int, generator: torch.Generator) -> list[str]:
        """n secrets drawn uniformly from R (with replacement)."""
        idx = torch.randint(len(self.alphabet), (n, self.length), generator=generator)
        return ["".join(self.alphabet[int(i)] for i in row) for row in idx]

    def all(self, limit: int = 1_000_000) -> list[str]:
        """Every secret of R in index order (refused beyond ``limit`` candidates: sample instead)."""
        if self.space > limit:
            raise ConfigError(f"canary space |R| = {self.space} exceeds {limit}; use sampled or skew-normal exposure")
        out = [""]
        for _ in range(self.length):  # mixed radix, the first character most significant
            out = [p + c for p in out for c in self.alphabet]
        return out


def windows(ids: Tensor, context: int, classes: Sequence[str] | None = None) -> TensorDataset:
    """The (context, next token) pairs of a token stream ids [T]: x float [T - k, k] (token ids; the one
    training loop takes float inputs), y [T - k] the token that follows each window."""
    if len(ids) <= context:
        raise ConfigError(f"text of {len(ids)} tokens is too short for a context of {context}")
    x = ids.unfold(0, context, 1)[:-1].float()
    y = ids[context:].clone()
    names = tuple(classes) if classes is not None else tuple(str(i) for i in range(int(ids.max()) + 1))
    return TensorDataset(x, y, names)


def log_perplexity(model: nn.Module, vocab: Vocabulary, fmt: CanaryFormat, secrets: Sequence[str], *, context: int,
                   batch_size: int = 4096, device: str | torch.device | None = None) -> Tensor:
    """Px(r) float64 [M] for each secret r: -sum_i log2 p(r_i | the k characters before it) under ``model``
    (eval mode, no gradient), the context starting inside ``fmt.prefix`` (padded with id 0 on the left
    when the prefix is shorter than k)."""
    if not secrets:
        return torch.zeros(0, dtype=torch.float64)
    lengths = {len(s) for s in secrets}
    if lengths != {fmt.length}:
        raise ConfigError(f"secrets of lengths {sorted(lengths)}; the canary format has length {fmt.length}")
    full = torch.cat([vocab.encode(fmt.prefix).expand(len(secrets), -1), vocab.encode_many(secrets)], 1)  # [M, P + L]
    pad = torch.zeros(len(secrets), context, dtype=torch.long)
    seq = torch.cat([pad, full], 1)
    start = context + len(fmt.prefix)  # position of the secret's first character in seq
    total = torch.zeros(len(secrets), dtype=torch.float64)
    for i in range(fmt.length):
        ctx = seq[:, start + i - context: start + i].float()
        logp = torch.log_softmax(forward_batched(model, ctx, batch_size=batch_size, device=device).double(), 1)
        total -= logp.gather(1, seq[:, start + i: start + i + 1]).squeeze(1).cpu() / math.log(2)
    return total


def exact_exposure(px_secret: float, px_all: Tensor) -> float:
    """log2 |R| - log2 rank with rank = 1 + #{r' in R: Px(r') < Px(r)} over the whole space px_all [|R|]
    (which includes r itself; ties go to the secret)."""
    rank = 1 + int((px_all < px_secret).sum())
    return math.log2(len(px_all)) - math.log2(rank)


def sampled_exposure(px_secret: float, px_sample: Tensor, space: int) -> float:
    """The rank estimated from a uniform sample px_sample [n] of R (without the secret):
    rank ~ 1 + (|R| - 1) * #{Px(r') < Px(r)} / n. When no sampled candidate is more likely, the sample
    only says the rank is below about |R| / (n + 1): the estimate saturates at log2(n + 1) bits (exact,
    rank 1, when the sample is the whole rest of R)."""
    below = int((px_sample < px_secret).sum())
    n = len(px_sample)
    rank = 1 + (space - 1) * below / n if below else max(1.0, space / (n + 1))
    return math.log2(space) - math.log2(rank)


def skewnorm_exposure(px_secret: float, px_sample: Tensor) -> float:
    """-log2 F(Px(r)) with F the CDF of a skew-normal fitted (maximum likelihood) to the sampled Px
    (the paper's sec. 4.3); not capped by the sample size."""
    from scipy.stats import skewnorm

    a, loc, scale = skewnorm.fit(px_sample.double().numpy())
    logcdf = float(skewnorm.logcdf(px_secret, a, loc=loc, scale=scale))
    return max(0.0, -logcdf / math.log(2))


POISONS = ("random", "pad")


def canary_text(fmt: CanaryFormat, secret: str, *, insertions: int, poisons: int, generator: torch.Generator,
                separator: str = "\n", poison: str = "random", pad: str = "x") -> str:
    """The lines added to the training text: ``insertions`` copies of the canary ``prefix + secret`` and
    ``poisons`` poison lines, shuffled (seeded). ``poison="random"``: ``prefix + r'`` with r' uniform over R;
    ``poison="pad"``: ``prefix + pad * length`` (``pad`` one character outside the alphabet)."""
    if poison not in POISONS:
        raise ConfigError(f"poison = {poison!r}; allowed: {', '.join(POISONS)}")
    if poison == "pad" and (len(pad) != 1 or pad in fmt.alphabet):
        raise ConfigError(f"pad = {pad!r}; allowed: one character outside the canary alphabet {fmt.alphabet!r} "
                          "(a pad inside it would itself be a candidate secret)")
    extra = fmt.draw(poisons, generator) if poison == "random" else [pad * fmt.length] * poisons
    lines = [fmt.prefix + secret] * insertions + [fmt.prefix + r for r in extra]
    order = torch.randperm(len(lines), generator=generator).tolist()
    return "".join(separator + lines[i] for i in order) + separator


def poisoned_texts(text: str, fmt: CanaryFormat, secret: str, *, insertions: int, poisons: int,
                   generator: torch.Generator, poison: str = "random", pad: str = "x") -> tuple[str, str]:
    """(target, reference) training texts: ``text`` plus :func:`canary_text`'s lines, and ``text`` plus the
    same poison lines without the canary (the adversary's reference models: it wrote the poisons but does not
    know the secret). The poison lines are the same in both (drawn from one generator state); their order
    differs."""
    state = generator.get_state()
    target = text + canary_text(fmt, secret, insertions=insertions, poisons=poisons, generator=generator,
                                poison=poison, pad=pad)
    again = torch.Generator().set_state(state)
    reference = text + canary_text(fmt, secret, insertions=0, poisons=poisons, generator=again, poison=poison, pad=pad)
    return target, reference


@dataclass(frozen=True)
class ExposureResult:
    """One trained model's exposure of its canary: ``exposure`` (exact when |R| was enumerated, else the
    skew-normal estimate), ``exact`` (whether it is), ``sampled`` (the rank estimate from the candidates),
    ``poison`` the kind of the ``poisons`` lines, ``px`` = Px(secret), ``rank`` (exact or estimated), ``candidates`` scored, ``test_accuracy`` of the
    model's next-character predictions on held-out text; with ``references`` > 0 reference models,
    ``calibrated`` is the exposure under the calibrated score c(r) (module docstring; exact when ``exact``,
    else the sampled rank estimate) and ``calibrated_rank`` the secret's rank under it."""

    secret: str
    insertions: int
    poisons: int
    poison: str
    exposure: float
    exact: bool
    sampled: float
    skewnorm: float
    px: float
    rank: float
    candidates: int
    test_accuracy: float
    references: int = 0
    calibrated: float | None = None
    calibrated_rank: float | None = None


def measure_exposure(text: str, *, fmt: CanaryFormat = CanaryFormat(), insertions: int = 1, poisons: int = 0,
                     poison: str = "random", pad: str = "x",
                     context: int = 16, model: Callable[[int, int], nn.Module] | None = None,
                     recipe: str | dict | None = None,
                     seed: int = 0, device: str = "cpu", candidates: int = 20_000, exact_limit: int = 100_000,
                     held_out: float = 0.05, references: int = 0) -> ExposureResult:
    """Train a next-character model on ``text`` (its last ``held_out`` fraction held out) plus the canary
    ``insertions`` times and ``poisons`` poison lines of kind ``poison`` (:func:`canary_text`), with a secret drawn from
    ``seed``; return the canary's exposure. |R| <= ``exact_limit`` is enumerated; otherwise ``candidates``
    secrets are sampled uniformly. The model is ``model(context, vocabulary size)`` (default
    :class:`~mlaudit.models.mlp.CharMLP`, embedding 32, hidden 256), trained by the one training loop under
    ``recipe`` (default: Adam, lr 0.003, 6 epochs of batches of 256). ``references`` > 0 also trains that many
    reference models on the same text and poison lines without the canary (:func:`poisoned_texts`; seeds
    ``seed * 1000 + 1 ..``) and scores the same candidates under the calibrated score."""
    from ..models.mlp import CharMLP
    from ..train.api import train
    from ..train.loop import init_models

    if insertions < 0 or poisons < 0 or references < 0:
        raise ConfigError(f"insertions = {insertions}, poisons = {poisons}, references = {references}; allowed >= 0")
    gen = torch.Generator().manual_seed(seed)
    secret = fmt.draw(1, gen)[0]
    cut = int(len(text) * (1 - held_out))
    train_text, ref_text = poisoned_texts(text[:cut], fmt, secret, insertions=insertions, poisons=poisons,
                                          generator=gen, poison=poison, pad=pad)
    vocab = Vocabulary.of(text, extra=fmt.prefix + fmt.alphabet + pad + "\n")
    names = [repr(c) for c in vocab.chars]
    test = windows(vocab.encode(text[cut:]), context, names)
    r = recipe or {"name": "custom", "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0, "epochs": 6,
                   "batch_size": 256, "schedule": "cosine", "augment": "none", "label_smoothing": 0.0}
    make = model or (lambda k, v: CharMLP(context=k, vocab=v, embed=32, hidden=256))

    def fit(body: str, s: int) -> nn.Module:
        net = init_models(lambda: make(context, len(vocab)), [s])[0]
        return train(net, windows(vocab.encode(body), context, names), r, seed=s, device=device)

    net = fit(train_text, seed)
    refs = [fit(ref_text, seed * 1000 + 1 + j) for j in range(references)]
    acc = float((forward_batched(net, test.x, device=device).argmax(1).cpu() == test.y).float().mean())
    exact = fmt.space <= exact_limit
    pool = fmt.all(exact_limit) if exact else fmt.draw(candidates, torch.Generator().manual_seed(seed + 1))
    # With R enumerated, the secret is one of the pool and its Px is read from the same batched pass as every other
    # candidate's: the same sequence scored in another batch can differ by ~1e-6 (batch-dependent float sums), and
    # its own entry would then rank above or below it at random (rank 1 vs 2 is a whole bit at the top).
    # scored: the candidates scored in one pass; at: the secret's row in it; cands: the pool's rows
    scored, at, cands = (list(pool), pool.index(secret), slice(None)) if exact else ([secret, *pool], 0, slice(1, None))
    px_both = log_perplexity(net, vocab, fmt, scored, context=context, device=device)
    px_pool, px = px_both[cands], float(px_both[at])
    cal = cal_rank = None
    if refs:
        # The calibrated score of every candidate and of the secret (c = Px_target - mean Px_ref).
        mean_ref = torch.stack([log_perplexity(m, vocab, fmt, scored, context=context, device=device)
                                for m in refs]).mean(0)
        c_both = px_both - mean_ref
        c_pool, c_secret = c_both[cands], float(c_both[at])
        if exact:
            cal, cal_rank = exact_exposure(c_secret, c_pool), float(1 + (c_pool < c_secret).sum())
        else:
            cal = sampled_exposure(c_secret, c_pool, fmt.space)
            cal_rank = 2 ** (math.log2(fmt.space) - cal)
    extra = {"references": references, "calibrated": cal, "calibrated_rank": cal_rank}
    if exact:
        others = px_pool[torch.tensor([s != secret for s in pool])]
        exp = exact_exposure(px, px_pool)
        fit_on = others[torch.randperm(len(others), generator=torch.Generator().manual_seed(seed))[:candidates]]
        sampled, skew = sampled_exposure(px, others, fmt.space), skewnorm_exposure(px, fit_on)  # the fit on a sample
        rank = float(1 + (px_pool < px).sum())
        return ExposureResult(secret, insertions, poisons, poison, exp, True, sampled, skew, px, rank, len(pool), acc,
                              **extra)
    sampled, skew = sampled_exposure(px, px_pool, fmt.space), skewnorm_exposure(px, px_pool)
    rank = 2 ** (math.log2(fmt.space) - sampled)
    return ExposureResult(secret, insertions, poisons, poison, skew, False, sampled, skew, px, rank, candidates, acc,
                          **extra)


__all__ = ["CanaryFormat", "ExposureResult", "Vocabulary", "canary_text", "exact_exposure", "log_perplexity",
           "POISONS", "measure_exposure", "poisoned_texts", "pydoc_text", "sampled_exposure", "skewnorm_exposure", "windows"]
