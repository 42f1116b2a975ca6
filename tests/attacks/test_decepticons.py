"""Decepticons (mlaudit.attacks.federated.decepticons) on a tiny TinyGPT: exact recovery of every
(token, position) when each token has its own bin, the honest bag-of-tokens baseline, the planted model's
structure, the multiset metric, bad input; and TinyGPT's causal layout."""

from __future__ import annotations

import pytest
import torch

from mlaudit.attacks.federated import Observation, decepticons, plant_decepticon
from mlaudit.attacks.federated.decepticons import decode, mlp_input, pair_recovery, sequences
from mlaudit.errors import ConfigError
from mlaudit.federated import secure_aggregate, user_gradients
from mlaudit.models.gpt import TinyGPT
from mlaudit.query import ParamVector

V, L = 12, 8


def _setup(users: int, seed: int = 0) -> tuple[TinyGPT, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    public = torch.randint(0, V, (400, L), generator=g)
    seqs = torch.randint(0, V, (users, 1, L + 1), generator=g)
    torch.manual_seed(seed)
    return TinyGPT(V, L, d_model=32, heads=2, layers=2), public, seqs


def _observe(model: TinyGPT, seqs: torch.Tensor) -> Observation:
    agg = secure_aggregate(user_gradients(model, seqs[..., :L], seqs[..., 1:]))
    return Observation(grad=ParamVector(agg), users=seqs.shape[0], batch=seqs.shape[1], input_shape=(L,))


def test_tiny_gpt_is_causal_and_returns_vocab_second() -> None:
    model, _, seqs = _setup(1)
    x = seqs[0, :, :L]
    out = model(x)
    assert out.shape == (1, V, L)
    y = x.clone()
    y[0, -1] = (y[0, -1] + 1) % V
    torch.testing.assert_close(model(y)[..., :-1], out[..., :-1])  # earlier positions do not see the last token


def test_one_user_every_token_and_position_comes_back_exactly() -> None:
    model, public, seqs = _setup(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mal = plant_decepticon(model, public, bins=64, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model untouched
    rec = decepticons(mal, _observe(mal, seqs))
    true = seqs[0, :, :L]
    # each (token, position) of the one sequence is alone in its bin unless two share a measurement
    bins_of = torch.searchsorted(-mal.blocks[0].fc1.bias[:64].detach().double(),
                                 (mlp_input(mal, true).double() @ mal.blocks[0].fc1.weight[0].double())
                                 .flatten().detach(), side="left")
    alone = int((torch.bincount(bins_of, minlength=65)[bins_of] == 1).sum())
    assert pair_recovery(true, rec.x) >= alone / L - 1e-9
    assert alone >= L - 2  # 64 bins for 8 tokens: a collision or two at most
    # every pair returned is a true one (the decode check drops mixtures and noise)
    true_pairs = {(int(t), p) for p, t in enumerate(true[0])}
    assert {tuple(map(int, r)) for r in rec.x[:, :2]} <= true_pairs
    assert bool((rec.x[:, 2] == true[0, 0]).all())  # every token tagged with its sequence's first token


def test_the_honest_baseline_is_the_bag_of_tokens() -> None:
    model, public, seqs = _setup(3)
    mal = plant_decepticon(model, public, bins=64)
    rec = decepticons(mal, _observe(mal, seqs))
    assert rec.info["token_set"] == sorted(set(seqs[..., :L].flatten().tolist()))


def test_the_first_attention_tags_every_token_with_its_sequence_first_token() -> None:
    model, public, _ = _setup(1)
    mal = plant_decepticon(model, public, bins=16)
    x = torch.tensor([[3, 5, 7, 1, 1, 2, 9, 0], [4, 5, 7, 1, 1, 2, 9, 0]])
    t, p, first, ok = decode(mal, mlp_input(mal, x).flatten(0, 1))
    assert torch.equal(t, x.flatten()) and torch.equal(p, torch.arange(L).repeat(2)) and bool(ok.all())
    assert torch.equal(first[:, 0], torch.tensor([3] * L + [4] * L))


def test_a_two_token_tag_separates_sequences_that_share_their_first_token() -> None:
    """``tag_tokens=2``: head h attends to position h, so every token from position 1 on carries the first
    two tokens; the token at position 0 sees only the first (its second entry is -1). Two sequences that
    start alike are merged by the one-token tag and kept apart by the two-token one."""
    model, public, _ = _setup(1)
    x = torch.tensor([[3, 5, 7, 1, 1, 2, 9, 0], [3, 6, 7, 1, 1, 2, 9, 0]])
    mal = plant_decepticon(model, public, bins=16, tag_tokens=2)
    t, p, tag, ok = decode(mal, mlp_input(mal, x).flatten(0, 1))
    assert torch.equal(t, x.flatten()) and torch.equal(p, torch.arange(L).repeat(2)) and bool(ok.all())
    assert torch.equal(tag[:, 0], torch.tensor([3] * 2 * L))
    assert torch.equal(tag[:, 1], torch.tensor([-1] + [5] * (L - 1) + [-1] + [6] * (L - 1)))
    rows = torch.cat([t[:, None], p[:, None], tag], 1)
    assert sequences(x, rows) == {"merged": 0.0, "tokens_in_sequence": 1.0, "whole": 1.0}
    one = plant_decepticon(model, public, bins=16)
    t1, p1, tag1, _ = decode(one, mlp_input(one, x).flatten(0, 1))
    assert sequences(x, torch.cat([t1[:, None], p1[:, None], tag1], 1))["merged"] == 1.0
    with pytest.raises(ConfigError, match=r"tag_tokens = 3; allowed 1 <= tag_tokens <= 2"):
        plant_decepticon(model, public, bins=16, tag_tokens=3)


def test_without_the_tag_the_first_block_passes_the_embedding_through_its_attention() -> None:
    model, public, seqs = _setup(1)
    mal = plant_decepticon(model, public, bins=16, tag=False)
    blk = mal.blocks[0]
    assert torch.count_nonzero(blk.proj.weight) == 0 and torch.count_nonzero(blk.proj.bias) == 0
    e = mal.embed(seqs[0, :, :L])
    # the first LayerNorm only rescales e: token and position codes are zero-mean with fixed norms
    ln = blk.ln2(e)
    ratio = ln.norm(dim=-1) / e.norm(dim=-1)
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(ratio.flatten()[0].detach())), rtol=1e-4, atol=0)
    t, p, first, ok = decode(mal, ln.flatten(0, 1))
    assert torch.equal(t, seqs[0, 0, :L]) and torch.equal(p, torch.arange(L)) and bool(ok.all())
    assert bool((first == -1).all())


def test_pair_recovery_counts_a_multiset() -> None:
    true = torch.tensor([[1, 2, 1], [1, 3, 3]])  # pairs (1,0) twice, (2,1), (1,2), (3,1), (3,2)
    assert pair_recovery(true, torch.tensor([[1, 0]])) == pytest.approx(1 / 6)
    assert pair_recovery(true, torch.tensor([[1, 0], [1, 0], [1, 0]])) == pytest.approx(2 / 6)
    assert pair_recovery(true, torch.tensor([[2, 0], [3, 1], [3, 2], [1, 2]])) == pytest.approx(3 / 6)
    assert pair_recovery(true, torch.zeros(0, 2, dtype=torch.long)) == 0.0


def test_sequences_groups_by_first_token_and_counts_merged_sequences() -> None:
    true = torch.tensor([[1, 2, 3], [4, 5, 6], [1, 7, 7]])  # sequences 0 and 2 share their first token
    rec = torch.tensor([[4, 0, 4], [5, 1, 4], [6, 2, 4], [2, 1, 1], [9, 2, 4]])
    out = sequences(true, rec)
    assert out == {"merged": pytest.approx(2 / 3), "tokens_in_sequence": pytest.approx(1 / 3),
                   "whole": pytest.approx(1 / 3)}
    assert sequences(true[1:2], rec[:2])["tokens_in_sequence"] == pytest.approx(2 / 3)


def test_bad_input() -> None:
    model, public, seqs = _setup(1)
    with pytest.raises(ConfigError, match=r"bins = 200; allowed 1 <= bins <= 128"):
        plant_decepticon(model, public, bins=200)
    with pytest.raises(ConfigError, match="TinyGPT"):
        plant_decepticon(torch.nn.Linear(2, 2), public, bins=4)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not planted"):
        decepticons(model, _observe(model, seqs))
    with pytest.raises(ConfigError, match="distinct"):
        plant_decepticon(model, torch.tensor([[0], [1], [0], [1]]), bins=8)


def test_a_gelu_model_is_breached_through_steep_bins() -> None:
    """GELU has no exact zero below a bin's offset; the default scale for GELU makes the bins steep enough
    that every token alone in its bin comes back, where scale 1 recovers fewer."""
    g = torch.Generator().manual_seed(5)
    public = torch.randint(0, V, (400, L), generator=g)
    seqs = torch.randint(0, V, (1, 1, L + 1), generator=g)
    torch.manual_seed(5)
    model = TinyGPT(V, L, d_model=32, heads=2, layers=2, activation="gelu")
    steep = decepticons(mal := plant_decepticon(model, public, bins=64), _observe(mal, seqs))
    flat = decepticons(mal1 := plant_decepticon(model, public, bins=64, scale=1.0), _observe(mal1, seqs))
    true = seqs[0, :, :L]
    fc1 = mal.blocks[0].fc1
    b = torch.searchsorted(-fc1.bias[:64].detach().double(),
                           (mlp_input(mal, true).double() @ fc1.weight[0].detach().double()).flatten())
    alone = int((torch.bincount(b, minlength=65)[b] == 1).sum())
    assert alone >= 2 and pair_recovery(true, steep.x) >= alone / L - 1e-9
    assert pair_recovery(true, steep.x) > pair_recovery(true, flat.x)


def test_tied_embeddings_are_breached_and_hide_only_the_bag_of_tokens() -> None:
    """GPT-2 ties the output head to the token embedding: the planted copy keeps the tie (the head reads the
    token codes), the pairs still come back (the feedback coordinate reaches the loss through the final
    LayerNorm and the second block), and the honest bag of tokens is gone (every row has a gradient)."""
    _, public, seqs = _setup(1)
    torch.manual_seed(0)
    model = TinyGPT(V, L, d_model=32, heads=2, layers=2, tie_embeddings=True)
    assert model.head.weight is model.tok.weight
    mal = plant_decepticon(model, public, bins=64, generator=torch.Generator().manual_seed(1))
    assert mal.head.weight is mal.tok.weight and model.head.weight is model.tok.weight
    obs = _observe(mal, seqs)
    assert "head.weight" not in obs.grad and bool((obs.grad["tok.weight"].abs().sum(1) > 0).all())
    rec = decepticons(mal, obs)
    true = seqs[0, :, :L]
    assert rec.info["token_set"] is None
    assert pair_recovery(true, rec.x) >= 0.6  # measured 0.75, as without the tie (a bin collision or two)
    true_pairs = {(int(t), p) for p, t in enumerate(true[0])}
    assert {tuple(map(int, r)) for r in rec.x[:, :2]} <= true_pairs
