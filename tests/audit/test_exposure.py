"""Canary exposure (the Secret Sharer, Carlini et al. 2019): the estimators against enumeration, the
log-perplexity against a direct computation, and memorisation of an inserted canary by a small model."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import skewnorm

from mlaudit.audit.exposure import (
    CanaryFormat,
    Vocabulary,
    canary_text,
    exact_exposure,
    log_perplexity,
    measure_exposure,
    poisoned_texts,
    pydoc_text,
    sampled_exposure,
    skewnorm_exposure,
    windows,
)
from mlaudit.errors import ConfigError
from mlaudit.models.mlp import CharMLP


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), size=st.integers(2, 300))
def test_sampled_exposure_over_the_whole_space_equals_enumeration(seed: int, size: int) -> None:
    g = torch.Generator().manual_seed(seed)
    px = torch.randint(0, 20, (size,), generator=g).double()  # ties included
    j = int(torch.randint(size, (1,), generator=g))
    others = torch.cat([px[:j], px[j + 1:]])
    exact = exact_exposure(float(px[j]), px)
    assert sampled_exposure(float(px[j]), others, size) == pytest.approx(exact, abs=1e-9)
    assert 0 <= exact <= math.log2(size) + 1e-12


def test_exposure_bounds_and_skew_normal_extrapolation() -> None:
    px = torch.arange(1024).double()
    assert exact_exposure(0.0, px) == pytest.approx(10.0)  # ranked first among 2^10
    assert exact_exposure(1023.0, px) == pytest.approx(0.0)
    # a skew-normal population: the fitted tail gives the exposure of a point far beyond the sample
    pop = torch.tensor(skewnorm.rvs(4.0, loc=50, scale=10, size=20_000, random_state=0))
    point = 38.0
    truth = -skewnorm.logcdf(point, 4.0, loc=50, scale=10) / math.log(2)
    assert skewnorm_exposure(point, pop) == pytest.approx(truth, rel=0.1)
    assert sampled_exposure(point, pop, 10**9) == pytest.approx(math.log2(20_001), abs=1e-6)  # the sample saturates


def test_log_perplexity_equals_a_direct_chain_rule() -> None:
    torch.manual_seed(0)
    vocab, fmt, k = Vocabulary.of("abc xyz 0123"), CanaryFormat(prefix="ab ", alphabet="0123", length=3), 4

    class Table(torch.nn.Module):  # logits depend on the last two context ids only
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.randn(len(vocab), len(vocab), len(vocab))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            ids = x.long()
            return self.w[ids[:, -2], ids[:, -1]]

    model = Table()
    got = log_perplexity(model, vocab, fmt, ["012", "333"], context=k)
    for s, g in zip(["012", "333"], got):
        seq = [0] * k + vocab.encode(fmt.prefix + s).tolist()
        want = 0.0
        for i in range(3):
            pos = k + len(fmt.prefix) + i
            logits = model.w[seq[pos - 2], seq[pos - 1]]
            want -= float(torch.log_softmax(logits.double(), 0)[seq[pos]]) / math.log(2)
        assert float(g) == pytest.approx(want, rel=1e-9)


def test_windows_and_canary_lines() -> None:
    d = windows(torch.arange(10), 3)
    assert d.x.shape == (7, 3) and d.x.dtype == torch.float32
    assert d.x[0].tolist() == [0, 1, 2] and d.y.tolist() == list(range(3, 10))
    fmt = CanaryFormat(length=4)
    text = canary_text(fmt, "1234", insertions=3, poisons=5, generator=torch.Generator().manual_seed(0))
    lines = [ln for ln in text.split("\n") if ln]
    assert len(lines) == 8 and lines.count(fmt.prefix + "1234") >= 3
    assert all(ln.startswith(fmt.prefix) and len(ln) == len(fmt.prefix) + 4 for ln in lines)
    assert fmt.all()[:3] == ["0000", "0001", "0002"] and len(fmt.all()) == 10_000
    with pytest.raises(ConfigError, match="exceeds"):
        CanaryFormat(length=7).all()
    with pytest.raises(ConfigError, match="alphabet"):
        CanaryFormat(alphabet="1")


def test_pad_poison_lines_and_bad_poison_input() -> None:
    """``poison="pad"``: every poison line is the prefix followed by the pad, never a candidate secret; a pad
    inside the alphabet or an unknown kind is refused with the field and what is allowed."""
    fmt, gen = CanaryFormat(length=4), torch.Generator().manual_seed(0)
    lines = [ln for ln in canary_text(fmt, "1234", insertions=2, poisons=6, generator=gen, poison="pad").split("\n") if ln]
    assert sorted(lines) == sorted([fmt.prefix + "1234"] * 2 + [fmt.prefix + "xxxx"] * 6)
    with pytest.raises(ConfigError, match="pad = '7'.*outside the canary alphabet"):
        canary_text(fmt, "1234", insertions=1, poisons=1, generator=gen, poison="pad", pad="7")
    with pytest.raises(ConfigError, match="poison = 'zeros'; allowed: random, pad"):
        measure_exposure("abc" * 100, fmt=fmt, poisons=1, poison="zeros")
    with pytest.raises(ConfigError, match="references = -1; allowed >= 0"):
        measure_exposure("abc" * 100, fmt=fmt, references=-1)


def test_an_inserted_canary_is_memorised_and_exposed() -> None:
    """A small next-character model on 20,000 characters of CPython's help text: a 3-digit canary inserted
    4 times is ranked near the top of the 1000 candidates; without it, exposure stays low."""
    text, fmt = pydoc_text(20_000), CanaryFormat(length=3)
    recipe = {"name": "custom", "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0, "epochs": 4, "batch_size": 256,
              "schedule": "cosine", "augment": "none", "label_smoothing": 0.0}
    with_it = measure_exposure(text, fmt=fmt, insertions=4, recipe=recipe, model=lambda k, v: CharMLP(context=k, vocab=v, embed=32, hidden=128))
    without = measure_exposure(text, fmt=fmt, insertions=0, recipe=recipe, model=lambda k, v: CharMLP(context=k, vocab=v, embed=32, hidden=128))
    assert with_it.exact and with_it.candidates == 1000 and with_it.secret == without.secret
    assert with_it.exposure > 7 and without.exposure < 5, (with_it, without)
    assert with_it.test_accuracy > 0.3  # it learned the text, not only the canary


@pytest.mark.parametrize("poison", ["random", "pad"])
def test_reference_text_has_the_same_poisons_and_no_canary(poison: str) -> None:
    """The adversary's reference text holds the very poison lines of the target's text (it wrote them) and not
    one copy of the canary; the target's text holds the canary ``insertions`` times."""
    fmt = CanaryFormat(length=4)
    target, ref = poisoned_texts("public text", fmt, "1234", insertions=3, poisons=5,
                                 generator=torch.Generator().manual_seed(7), poison=poison)
    t_lines = [ln for ln in target.split("\n")[1:] if ln]
    r_lines = [ln for ln in ref.split("\n")[1:] if ln]
    assert target.startswith("public text") and ref.startswith("public text")
    assert t_lines.count(fmt.prefix + "1234") == 3 and fmt.prefix + "1234" not in r_lines
    assert sorted(r_lines) == sorted(ln for ln in t_lines if ln != fmt.prefix + "1234") and len(r_lines) == 5


def test_calibrated_exposure_against_reference_models() -> None:
    """With one reference model (same text, no canary): the calibrated score ranks a canary inserted 4 times
    near the top (its rank equals a direct count over the candidates' calibrated scores), and gives a secret
    never inserted no more than a handful of bits."""
    text, fmt = pydoc_text(20_000), CanaryFormat(length=3)
    recipe = {"name": "custom", "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0, "epochs": 4, "batch_size": 256,
              "schedule": "cosine", "augment": "none", "label_smoothing": 0.0}
    small = lambda k, v: CharMLP(context=k, vocab=v, embed=32, hidden=128)  # noqa: E731
    with_it = measure_exposure(text, fmt=fmt, insertions=4, recipe=recipe, model=small, references=1)
    without = measure_exposure(text, fmt=fmt, insertions=0, recipe=recipe, model=small, references=1)
    for r in (with_it, without):
        assert r.references == 1 and r.calibrated is not None and 0.0 <= r.calibrated <= math.log2(1000)
        assert r.calibrated == pytest.approx(math.log2(1000) - math.log2(r.calibrated_rank))
    assert with_it.calibrated > 7 and without.calibrated < 6, (with_it, without)
    plain = measure_exposure(text, fmt=fmt, insertions=4, recipe=recipe, model=small)
    assert plain.calibrated is None and plain.px == pytest.approx(with_it.px)  # the target model is the same


class _BatchDependent(torch.nn.Module):
    """CharMLP whose eval-mode logits are scaled by 0.99 in a batch of one: a stand-in for the ~1e-6 differences
    that batched float sums give the same sequence scored in batches of other sizes."""

    def __init__(self, k: int, v: int) -> None:
        super().__init__()
        self.net = CharMLP(context=k, vocab=v, embed=32, hidden=128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x)
        return z * 0.99 if not self.training and x.shape[0] == 1 else z


def test_the_secret_is_ranked_against_its_own_pool_entry() -> None:
    """With R enumerated, the secret's Px is the one scored with every other candidate: a model whose scores depend
    on the batch does not push a fully memorised secret below its own entry (rank 2, one bit lost)."""
    text, fmt = pydoc_text(20_000), CanaryFormat(length=3)
    recipe = {"name": "custom", "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0, "epochs": 4, "batch_size": 256,
              "schedule": "cosine", "augment": "none", "label_smoothing": 0.0}
    r = measure_exposure(text, fmt=fmt, insertions=4, recipe=recipe, model=_BatchDependent, references=1)
    assert r.rank == 1 and r.exposure == pytest.approx(math.log2(1000)), r
    assert r.calibrated_rank is not None and r.calibrated == pytest.approx(math.log2(1000) - math.log2(r.calibrated_rank))
