"""Honest-but-curious text inversion: an optimisation-based attack on a causal language model's update, in
the manner of TAG (Deng, Wang, Chen, Cui, Zhou & Ding, EMNLP Findings 2021) and LAMP (Balunovic, Dimitrov,
Jovanovic & Vechev, NeurIPS 2022). The server does not touch the model: it optimises continuous token
embeddings until the gradient of the language-model loss on them matches the update it received, projects
each position to the nearest token embedding, then (optionally) refines the token sequences with discrete
moves scored by the same gradient distance.

    rec = text_inversion(model, obs, steps=400, refine=200)   # obs: the (summed) update of n sequences of L tokens
    rec.x          # int64 [n, L]: the recovered sequences (order across users unknown)
    rec.labels     # int64 [n]: the guessed token after each window (the last position's target)

**The variable** is v [n, L + 1, d] in units of the embedding's standard deviation: rows 0..L-1 are the
inputs' token embeddings (times that std, so that N(0, 1) starts sit at the embeddings' scale), row L stands
for the unknown token after the window. **Labels**: next-token prediction trains position t on token t + 1,
which is the input at t + 1 and unknown to the server. Here the label at t is a soft one read off row t + 1
(the soft-embedding-to-logits trick): softmax over the candidate tokens of cos(v[t + 1], E[w]) /
``temperature``, so inputs and labels come from one sequence and stay consistent; with exact embeddings it
is one-hot. (TAG optimises free soft labels as DLG does; a free label per position would not be tied to the
next input.)

**The objective** is mlaudit's one gradient-matching objective (:class:`.objective.GradientInversion`,
``decode`` giving the parametrisation above): ``cosine`` (Geiping et al. 2020; LAMP's "LAMP_Cos"), ``l2`` or
``l2+l1`` (TAG's, with weight ``l1``; LAMP's "LAMP_L1+L2"), over every parameter except the token
embedding, whose lookup the attack replaces (its non-zero rows give the bag of tokens, used to restrict the
candidates, as LAMP does with BERT's embedding gradient). Optimisation is the one crafting engine
(:func:`mlaudit.craft.craft`, Adam with the step-decayed rate, restarts kept by objective).

**The token-embedding gradient in the matching** (``match_embedding``): the embedding's gradient row w is the
sum of dL/de_t over the positions t holding token w, so it tells which positions hold which token, which the
rest of the update does not say directly. A continuous embedding has no token, so the attack gives each input
position soft token weights p_t, the softmax over the candidates of cos(v_t, E_w) / ``temperature`` (the same
weights the labels are read with), and simulates the embedding gradient as sum_t p_t (dL/de_t)^T, [V, d]
(:class:`EmbeddingsIn`'s soft lookup). At exact embeddings p is one-hot up to e^(-(1 - cos) / temperature) and
this is the true gradient, so the discrete moves are scored on the whole update. A tied head's weight is
matched then as well: its gradient is the head's part plus the lookup's.

**Projection and discrete refinement**: each position goes to the candidate token of largest cosine (the
last row to any token of the vocabulary: the next token need not have been typed). ``refine`` random moves
on one sequence at a time, LAMP's swap of two tokens and move of one token to another position, plus
substitution of one position by another candidate token, each kept when it lowers the gradient distance
of the whole batch of projected sequences (scored by the same objective on exact embeddings).

**LAMP's language-model prior and alternation** (Balunovic et al. 2022, sec. 4): with ``prior`` (a callable
tokens int64 [n, L] -> the mean negative log-likelihood per token of each sequence [n] under a language model
the server has, e.g. :func:`next_token_prior` of a next-token model trained on public text; LAMP uses GPT-2's
log-perplexity) every discrete move is scored by the gradient distance plus ``prior_weight`` times the batch's
mean prior NLL (LAMP's alpha_lm), so moves towards fluent text win ties the gradient cannot break. With
``rounds`` R > 1 the continuous and discrete phases alternate: ``steps`` / R engine steps, projection and
``refine`` / R moves, then the next continuous phase starts from the refined tokens' embeddings (LAMP
alternates every few steps; R sets how often here). LAMP's embedding regularisation (sec. 4, the continuous
phase): with ``embedding_reg`` alpha > 0 the continuous objective adds alpha (mean_t ||v_t|| - mean_w ||E_w|| /
s)^2, averaged over the n sequences, with v_t the inputs' rows (t < L) and s the embedding's std, so the
optimised embeddings do not keep growing in length (LAMP's alpha_reg; its value in the paper is not used here,
tune it). The discrete moves are scored without it.

**What a model must expose** (TinyGPT does): ``forward(tokens int64 [B, L]) -> logits [B, V, L]`` (the
vocabulary second, ``F.cross_entropy``'s layout, as the ``federated`` kind's sequence models), computed
through an ``nn.Embedding`` for the tokens; the attack finds it as ``embedding`` (a module name), else
``model.get_input_embeddings()`` (Hugging Face's convention), else ``model.tok`` (TinyGPT's), else the
model's only ``nn.Embedding``. It runs the model on placeholder ids with a forward hook replacing that
module's output by the optimised embeddings (:class:`EmbeddingsIn`): position embeddings, blocks and head
are the model's own. A head tied to the token embedding works (its weight is left out of the matching
with the lookup unless ``match_embedding``), but then the bag of tokens is unavailable and every token is a
candidate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...craft import Free, craft
from ...errors import ConfigError
from ...query import ParamVector
from .base import Observation, Reconstruction, check_observation, register_federated
from .decepticons import bag_of_tokens, pair_recovery, token_recovery
from .objective import DISTANCES, Distance, GradientInversion


def token_embedding(model: nn.Module, embedding: str | None = None) -> tuple[str, nn.Embedding]:
    """(the name of its weight among ``model.named_parameters()``, the module) of the model's token embedding;
    see the module docstring for the order it is looked for in."""
    if embedding is not None:
        mod = dict(model.named_modules()).get(embedding)
        if not isinstance(mod, nn.Embedding):
            raise ConfigError(f"embedding = {embedding!r} is not an nn.Embedding of {type(model).__name__}; allowed: "
                              + ", ".join(n for n, m in model.named_modules() if isinstance(m, nn.Embedding)))
    elif callable(getattr(model, "get_input_embeddings", None)):
        mod = model.get_input_embeddings()
    elif isinstance(getattr(model, "tok", None), nn.Embedding):
        mod = model.tok
    else:
        found = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        if len(found) != 1:
            raise ConfigError(f"{type(model).__name__} has {len(found)} nn.Embedding modules and no get_input_embeddings(); "
                              "name the token embedding with embedding=")
        mod = found[0]
    if not isinstance(mod, nn.Embedding):
        raise ConfigError(f"the token embedding must be an nn.Embedding, got {type(mod).__name__}")
    name = next((n for n, p in model.named_parameters() if p is mod.weight), None)
    if name is None:
        raise ConfigError("the token embedding's weight is not a parameter of the model")
    return name, mod


class EmbeddingsIn(nn.Module):
    """The causal LM ``lm`` fed token embeddings instead of token ids: ``forward(e [n, L, d])`` runs
    ``lm(zeros [n, L])`` with the output of ``embedding`` replaced by ``e`` (a forward hook, removed after the
    call). Its parameters are ``lm``'s under the prefix ``lm.``.

    With ``soft_lookup`` the input is [n, L, d + V]: the embeddings e followed by token weights p (each
    row a distribution over the vocabulary). The hook then returns e + p W - stopgrad(p W), W the
    embedding's weight [V, d]: the value is e, and the gradient reaching W is p^T dL/de, which with one-hot
    p is the embedding gradient of the tokens p picks (row w: the sum of dL/de over the positions holding w),
    so the token embedding's gradient can be matched too, differentiably in e and p."""

    def __init__(self, lm: nn.Module, embedding: nn.Embedding, *, soft_lookup: bool = False) -> None:
        super().__init__()
        self.lm = lm
        self._embedding = (embedding,)  # a tuple: not registered a second time
        self.soft_lookup = soft_lookup

    def forward(self, e: Tensor) -> Tensor:
        d = self._embedding[0].embedding_dim

        def replace(mod: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> Tensor:
            if not self.soft_lookup:
                return e.to(out.dtype)
            soft = e[..., d:].to(out.dtype) @ mod.weight  # mod.weight: the differentiated one under functional_call
            return e[..., :d].to(out.dtype) + (soft - soft.detach())

        hook = self._embedding[0].register_forward_hook(replace)
        try:
            return self.lm(torch.zeros(e.shape[:2], dtype=torch.long, device=e.device))
        finally:
            hook.remove()


def candidate_mask(model: nn.Module, obs: Observation, name: str, candidates: Tensor | list[int] | None
                   ) -> tuple[Tensor, bool]:
    """(bool [V], whether it is the bag of tokens): the tokens the inputs may take: ``candidates`` when given,
    else the bag of tokens read off the update (every token with tied embeddings)."""
    vocab, dev = obs.grad[name].shape[0], obs.grad[name].device
    bag = bag_of_tokens(model, obs.grad, name=name) if candidates is None else None
    ids = candidates if candidates is not None else bag
    mask = torch.zeros(vocab, dtype=torch.bool, device=dev)
    if ids is None:
        return mask.fill_(True), False
    ids = torch.as_tensor(ids, dtype=torch.long, device=dev)
    if len(ids) == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ConfigError(f"candidates must be a non-empty list of token ids in [0, {vocab}); got {ids.tolist()[:8]}")
    mask[ids] = True
    return mask, bag is not None


@register_federated("text-inversion")
def text_inversion(model: nn.Module, obs: Observation, *, steps: int = 400, lr: float = 0.1,
                   distance: Distance = "cosine", l1: float = 0.01, restarts: int = 1, temperature: float = 0.05,
                   candidates: Tensor | list[int] | None = None, refine: int = 0, embedding: str | None = None,
                   optimizer: Literal["adam", "signed-adam"] = "adam",
                   prior: Callable[[Tensor], Tensor] | None = None, prior_weight: float = 0.0, rounds: int = 1,
                   embedding_reg: float = 0.0, match_embedding: bool = False,
                   generator: torch.Generator | None = None) -> Reconstruction:
    """Token sequences [obs.inputs, L] behind ``obs`` (``input_shape`` (L,)): ``steps`` engine steps of ``lr``
    (embedding-std units), ``restarts``, then ``refine`` discrete moves (module docstring). ``candidates``:
    the token ids the inputs may take (None: the bag of tokens from the update); ``l1``: the l1 weight of
    ``distance='l2+l1'``; ``embedding``: the token embedding's module name (None: found); ``prior``,
    ``prior_weight``, ``rounds``: LAMP's language-model prior in the discrete score and its alternation of the
    continuous and discrete phases; ``embedding_reg``: LAMP's embedding-length regulariser of the continuous
    phase (module docstring); ``match_embedding``: match the token embedding's gradient too, through soft token
    weights (module docstring)."""
    check_observation(model, obs)
    if len(obs.input_shape) != 1:
        raise ConfigError(f"text inversion recovers token sequences: input_shape must be (L,), got {obs.input_shape}")
    if distance not in DISTANCES:
        raise ConfigError(f"distance = {distance!r}; allowed: {', '.join(DISTANCES)}")
    if not temperature > 0 or refine < 0:
        raise ConfigError(f"temperature = {temperature}, refine = {refine}; allowed temperature > 0, refine >= 0")
    if rounds < 1 or rounds > max(steps, 1) or prior_weight < 0 or (prior_weight > 0 and prior is None):
        raise ConfigError(f"rounds = {rounds}, prior_weight = {prior_weight}, prior = {prior!r}; allowed 1 <= rounds <= "
                          "steps, prior_weight >= 0, and a prior when prior_weight > 0")
    if not (embedding_reg >= 0 and embedding_reg < float("inf")):
        raise ConfigError(f"embedding_reg = {embedding_reg}; allowed a finite embedding_reg >= 0")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    n, length = obs.inputs, obs.input_shape[0]
    name, emb = token_embedding(model, embedding)
    table = emb.weight.detach()
    scale = float(table.float().std())
    unit = F.normalize(table.float(), dim=1)
    mask, from_bag = candidate_mask(model, obs, name, candidates)
    rows = torch.ones(length + 1, len(mask), dtype=torch.bool, device=mask.device)
    rows[:length] = mask  # the inputs among the candidates; the token after the window any token

    seen = Observation(ParamVector({f"lm.{k}": t for k, t in obs.grad.items()}), users=obs.users, batch=obs.batch,
                       input_shape=(length + 1, table.shape[1]), train_mode=obs.train_mode)
    mean_norm = float(table.float().norm(dim=1).mean()) / scale

    def length_term(v: Tensor) -> Tensor:  # LAMP's, in embedding-std units (v is table / scale at exact embeddings)
        return embedding_reg * (v[:, :length].norm(dim=-1).mean(1) - mean_norm).square().mean()

    def matching(soft: bool, penalty: Callable[[Tensor], Tensor] | None) -> GradientInversion:
        """The gradient distance of the variable v [n, L + 1, d]; ``soft``: the token embedding's gradient too."""

        def decode(v: Tensor) -> tuple[Tensor, Tensor]:
            sim = (F.normalize(v, dim=-1) @ unit.T / temperature).masked_fill(~rows, float("-inf")).softmax(-1)
            x = scale * v[:, :length]
            if soft:  # the inputs' token weights ride along for the soft lookup (EmbeddingsIn)
                x = torch.cat([x, sim[:, :length].to(x.dtype)], -1)
            return x, sim[:, 1:].transpose(1, 2)  # labels [n, V, L], as the logits

        matched = [k for k in seen.grad if soft or k != f"lm.{name}"]
        return GradientInversion(EmbeddingsIn(model, emb, soft_lookup=soft), seen, None, distance=distance, l1=l1,
                                 decode=decode, params=matched, penalty=penalty)

    objective = matching(match_embedding, None)  # also the discrete moves' score
    continuous = matching(match_embedding, length_term) if embedding_reg > 0 else objective
    v0 = torch.zeros(n, length + 1, table.shape[1], device=table.device)
    idx = torch.arange(n, device=table.device)

    def score(t: Tensor) -> float:
        s = float(objective(table[t].float() / scale, idx).detach())
        if prior_weight > 0:
            assert prior is not None
            with torch.no_grad():
                s += prior_weight * float(prior(t[:, :length]).float().mean())
        return s

    init: Tensor | str = "random"
    accepted, first, projections = 0, None, []
    for k in range(rounds):  # LAMP's alternation: a continuous phase, projection, a discrete phase
        res = craft(continuous, v0, constraint=Free(), steps=steps // rounds + (k < steps % rounds), optimizer=optimizer,
                    lr=lr, schedule="step", restarts=restarts if k == 0 else 1, init=init, generator=g)
        first = res if first is None else first
        sim = F.normalize(res.delta.float(), dim=-1) @ unit.T
        tokens = sim.masked_fill(~rows, float("-inf")).argmax(-1)  # [n, L + 1]
        projections.append(score(tokens))
        moves = refine // rounds + (k < refine % rounds)
        tokens, refined, kept = discrete_refine(score, tokens, mask, moves, g, start=projections[-1])
        accepted += kept
        init = table[tokens].float() / scale  # the next continuous phase starts from the refined tokens
    assert first is not None
    return Reconstruction(tokens[:, :length].cpu(), tokens[:, length].cpu(), {
        "objective": res.objective, "start": first.history[0] if first.history else first.objective,
        "restarts": first.restarts, "projected": projections[0], "projections": projections, "refined": refined,
        "accepted_moves": accepted, "refine": refine, "candidates": int(mask.sum()), "bag_of_tokens": from_bag,
        "steps": steps, "lr": lr, "distance": distance, "l1": l1 if distance == "l2+l1" else None,
        "temperature": temperature, "embedding": name, "matched": len(objective.obs.grad),
        "prior_weight": prior_weight if prior is not None else None, "rounds": rounds,
        "embedding_reg": embedding_reg, "match_embedding": match_embedding,
        # the last continuous phase's mean input-row length against the vocabulary's (what embedding_reg pulls together)
        "embedding_norm": float(res.delta[:, :length].float().norm(dim=-1).mean()) * scale,
        "vocabulary_norm": float(table.float().norm(dim=1).mean())})


def next_token_prior(lm: nn.Module, context: int, *, pad: int = 0) -> Callable[[Tensor], Tensor]:
    """LAMP's language-model score from a fixed-context next-token model ``lm`` (float token ids [N, context]
    -> logits [N, V], as :class:`mlaudit.models.mlp.CharMLP` trained on public text by the one training loop):
    tokens int64 [n, L] -> the mean negative log-likelihood (nats) of tokens 1..L-1 of each sequence given the
    ``context`` tokens before each (left-padded with ``pad``) [n]. The model is put in eval mode."""
    lm.eval()

    def nll(tokens: Tensor) -> Tensor:
        n, length = tokens.shape
        if length < 2:
            return torch.zeros(n, device=tokens.device)
        dev = next(lm.parameters()).device
        padded = torch.cat([torch.full((n, context), pad, dtype=torch.long, device=tokens.device), tokens], 1)
        ctx = padded.unfold(1, context, 1)[:, 1:length]  # [n, L - 1, context]: the window before tokens 1..L-1
        with torch.no_grad():
            logp = F.log_softmax(lm(ctx.reshape(-1, context).float().to(dev)).float(), -1)
        got = logp.gather(1, tokens[:, 1:].reshape(-1, 1).to(dev)).view(n, length - 1)
        return (-got.mean(1)).to(tokens.device)

    return nll


def discrete_refine(score: Callable[[Tensor], float], tokens: Tensor, mask: Tensor, moves: int, generator: torch.Generator, *,
                    start: float) -> tuple[Tensor, float, int]:
    """(tokens, their score, moves kept) after ``moves`` random moves on tokens [n, L + 1] (the inputs and the
    token after each window), each changing one sequence: swap two input tokens, move one input token to
    another position (those between shift by one), or substitute one position by a candidate (``mask`` [V];
    the last row by any token); a move is kept when ``score`` (lower is better) goes down."""
    n, width = tokens.shape
    length = width - 1
    allowed = mask.nonzero()[:, 0].cpu()
    best, kept = start, 0

    def rand(hi: int) -> int:
        return int(torch.randint(hi, (1,), generator=generator))

    for _ in range(moves):
        cand, i, kind = tokens.clone(), rand(n), rand(3)
        if kind < 2 and length < 2:
            kind = 2
        if kind == 0:
            p, q = rand(length), rand(length)
            cand[i, p], cand[i, q] = tokens[i, q], tokens[i, p]
        elif kind == 1:
            p, q = rand(length), rand(length)
            seq = tokens[i, :length].tolist()
            seq.insert(q, seq.pop(p))
            cand[i, :length] = torch.tensor(seq, device=tokens.device)
        else:
            p = rand(width)
            cand[i, p] = rand(len(mask)) if p == length else int(allowed[rand(len(allowed))])
        if torch.equal(cand, tokens):
            continue
        s = score(cand)
        if s < best:
            tokens, best, kept = cand, s, kept + 1
    return tokens, best, kept


def text_recovery(true: Tensor, rec: Tensor) -> dict[str, float]:
    """How much of the users' sequences true [S, L] the recovered ones rec [m, L] hold, pooled and order-free
    (the sequences' order across users is unknown): ``tokens`` the token occurrences recovered ignoring
    position (multiset; with m = S it is also the precision and the pooled ROUGE-1 F1), ``pairs`` the
    (token, position) occurrences (as Decepticons' :func:`~.decepticons.pair_recovery`), ``bigrams`` the
    adjacent pairs recovered (multiset over all sequences; pooled ROUGE-2 recall), ``whole`` the sequences
    recovered exactly (each recovered sequence matches one true sequence at most)."""
    true, rec = true.cpu().long(), rec.cpu().long()
    s, length = true.shape
    positions = torch.arange(length).repeat(len(rec))
    pairs = pair_recovery(true, torch.stack([rec.flatten(), positions], 1)) if len(rec) else 0.0
    out = {"tokens": token_recovery(true, rec.flatten()), "pairs": pairs}
    if length > 1:
        code = true.new_tensor(int(max(int(true.max()), int(rec.max()) if len(rec) else 0)) + 1)
        bt = (true[:, :-1] * code + true[:, 1:]).flatten()
        br = (rec[:, :-1] * code + rec[:, 1:]).flatten()
        out["bigrams"] = token_recovery(bt[None], br)
    pool = [tuple(r) for r in rec.tolist()]
    whole = 0
    for seq in map(tuple, true.tolist()):
        if seq in pool:
            pool.remove(seq)
            whole += 1
    out["whole"] = whole / s
    return out
