"""The ``federated`` kind on text: Decepticons (Fowl, Geiping, Reich, Wen, Czaja, Goldblum & Goldstein 2022,
"Decepticons: Corrupted Transformers Breach Privacy in Federated Learning for Language Models"; seed 002,
chapter 4) against the users of one FedSGD or FedAvg round of a GPT-style language model, next to the
honest-but-curious bag of tokens.

``attack: text-inversion`` runs the honest-but-curious inversion alone, on any causal language model (the user's
own by import string: token ids [B, L] -> next-token logits [B, V, L] through an ``nn.Embedding``): the same round
without planting, the server inverting what it sees of the unmodified model's updates (``inverted_<n>``; with a
client defence also the same round without it, ``plain_inverted_<n>``), metrics per user count with the pairs'
chance level (:func:`_inversion_metrics`), and true sequences next to their closest recovered one.

Protocol, per trial: the global model is the config's TinyGPT at the trial's initialisation. The training
split (token sequences x [N, L], y [N] the next token) is partitioned among ``users``; each user draws
``batch`` sequences, tokens [U, B, L] with next-token targets cat(tokens[..., 1:], y) [U, B, L]. The
malicious server sends the model with the parameters of
:func:`~mlaudit.attacks.federated.plant_decepticon` (bins at quantiles of a measurement over its public
text, the test split); every user returns its update (:func:`~mlaudit.federated.round_updates`: the FedSGD
gradient, one vmap over users, or under FedAvg the weight change of its local SGD steps over lr x steps), and for
each n in ``decepticons.user_counts`` the server sees the secure aggregate of the first n users
(:func:`~mlaudit.federated.secure_aggregate`) or, with ``aggregation.secure: false``, each of their updates
alone, and reads (token, position, first k tokens of its sequence) rows off the first MLP layer's update (each
update's rows pooled)
(:func:`~mlaudit.attacks.federated.decepticons`: for a bin interval holding one token,
(dW_i - dW_{i+1}) / (db_i - db_{i+1}) is that token's MLP input, decoded against the planted codes). The
honest-but-curious baseline reads, from the same users' aggregate on the unmodified model, the non-zero
rows of the token-embedding gradient [V, d] (:func:`~mlaudit.attacks.federated.decepticons.bag_of_tokens`)
and, with ``text_inversion.run``, inverts that aggregate by optimisation
(:func:`~mlaudit.attacks.federated.text_inversion`, TAG / LAMP style): recovered sequences [n B, L].

Metrics per user count, pooled over trials: ``pairs`` (the users' (token, position) occurrences recovered,
:func:`~mlaudit.attacks.federated.decepticons.pair_recovery`, with a 95% Clopper-Pearson interval over
occurrences), ``tokens`` (occurrences recovered ignoring positions), the sequence-level rates of
:func:`~mlaudit.attacks.federated.decepticons.sequences` (``in_sequence``, ``whole``, ``merged``), and the
bag of tokens' recall of the distinct tokens typed, and for the inversion ``inversion`` (its ``pairs`` and
``tokens`` as Decepticons', ``bigrams`` and ``whole`` from :func:`~mlaudit.attacks.federated.text_recovery`).
Each trial's recovered rows are kept
(``ctx.save_cached``), so a resumed run reads them instead of attacking again. The reports show recovered
vs true sequences as text (HTML autoescaped; ``artifacts/decepticons.md`` markdown-escaped).
"""

from __future__ import annotations

import string
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..attacks.federated import Observation, decepticons, plant_decepticon, text_inversion, text_recovery
from ..attacks.federated.decepticons import (
    assemble,
    bag_of_tokens,
    pair_recovery,
    sequences,
    tied,
    token_recovery,
)
from ..attacks.federated.text_inversion import token_embedding
from ..data.base import DataBundle
from ..federated import defend_updates, distortion, local_batches, round_updates, secure_aggregate
from ..federated.updates import local_seed
from ..query import ParamVector
from ..report.html import ReportTable
from ..stats import clopper_pearson
from .base import ExperimentOutput, Stream
from .context import RunContext
from .federated_config import FederatedConfig, user_shares

CHANCE_DRAWS = 5
"""Shuffles of the users' tokens averaged for the inversion's chance level of pairs (:func:`_inversion_metrics`)."""
UNKNOWN, CLASH = "·", "¤"
"""How a sample shows a position the server did not recover, and one where its group holds several tokens."""


def users_tokens(config: FederatedConfig, data: DataBundle, index: int) -> tuple[Tensor, Tensor, torch.Generator]:
    """Trial ``index``'s round: the users' token sequences int64 [U, B, L], their next-token targets [U, B, L]
    (the window shifted by one, the split's label last) and the generator that then plants the attack."""
    parts, gen = user_shares(config, data, index)
    x, y, _ = local_batches(data.train, parts, batch=config.batch, generator=gen)
    tokens = x.round().long()
    return tokens, torch.cat([tokens[..., 1:], y[..., None]], -1), gen


def _trial(config: FederatedConfig, data: DataBundle, index: int, model: nn.Module, device: str
           ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """One round attacked at every user count: tensors (``tokens`` [U, B, L], ``rows_<n>`` [m, 2 + k] Decepticons'
    recovered rows from what the server sees of the first n users (their sum, or without secure aggregation each
    user's own update, the rows of each read pooled), ``inverted_<n>`` [n B, L] the honest inversion's sequences
    (``attack: text-inversion``, or ``text_inversion.run``; with a client defence and ``attack: text-inversion``
    also ``plain_inverted_<n>``, the same round without it) and JSON-able meta (bags of tokens, bins, seconds)."""
    o = config.decepticons
    tokens, targets, gen = users_tokens(config, data, index)
    tokens, targets = tokens.to(device), targets.to(device)
    t0 = time.perf_counter()
    sent = None if config.attack == "text-inversion" else plant_decepticon(
        model, data.test.x.round().long().to(device), bins=o.bins or model.blocks[0].fc1.out_features,
        scale=config.decepticons_scale, feedback=o.feedback, tag=o.tag, tag_tokens=o.tag_tokens, generator=gen)
    train = config.user_mode == "train"
    seed = config.trial_seed(index, stream=Stream.ATTACK)
    sums = (_flower_sums if config.transport == "flower" else _simulated_sums)(
        config, data, sent, model, tokens, targets, seed, device)
    seconds = {"updates": time.perf_counter() - t0, "attack": 0.0, "inversion": 0.0}
    inv = config.text_inversion
    embedding = token_embedding(model, inv.embedding)[0]
    tensors: dict[str, Tensor] = {"tokens": tokens.cpu()}
    meta: dict[str, Any] = {"bins": None if sent is None else sent.decepticon_bins, "bags": {}, "nonempty_bins": {},
                            "rejected": {}}
    if sums.distortion is not None:
        meta["distortion"] = sums.distortion
    if sums.flower_seconds is not None:
        meta["flower_seconds"] = sums.flower_seconds
    reads: dict[int, Any] = {}  # one read per update seen: without secure aggregation user u's counts for every n > u
    inverted: dict[int, Tensor] = {}

    def read(g: ParamVector, n: int) -> Any:
        assert sent is not None
        if id(g) not in reads:
            reads[id(g)] = decepticons(sent, Observation(g, users=n, batch=config.batch, input_shape=data.input_shape,
                                                         train_mode=train), tol=o.tol)
        return reads[id(g)]

    def invert(g: ParamVector, n: int, key: int) -> Tensor:
        if id(g) not in inverted:
            got = text_inversion(
                model, Observation(g, users=n, batch=config.batch, input_shape=data.input_shape, train_mode=train),
                steps=inv.steps, lr=inv.lr, distance=inv.distance, l1=0.01 if inv.l1 is None else inv.l1,
                restarts=inv.restarts, temperature=inv.temperature, refine=inv.refine, embedding_reg=inv.embedding_reg,
                match_embedding=inv.match_embedding, embedding=inv.embedding,
                candidates=list(range(data.num_classes)) if inv.candidates == "vocabulary" else None,
                generator=torch.Generator().manual_seed(config.trial_seed(index, stream=Stream.ATTACK) + 2 + key))
            inverted[id(g)] = got.x.cpu()
        return inverted[id(g)]

    def inverted_all(updates: list[ParamVector], n: int, each: int) -> Tensor:
        # the secure sum of n users keyed by n, each user's own update by its user index (a defended update and
        # its plain one draw the same randomness)
        return torch.cat([invert(g, each, n if config.aggregation.secure else u) for u, g in enumerate(updates)])

    for n in config.user_counts:
        each = n if config.aggregation.secure else 1  # users behind each update the server reads
        if sent is not None:
            t0 = time.perf_counter()
            recs = [read(g, each) for g in sums.malicious[n]]
            seconds["attack"] += time.perf_counter() - t0
            if sums.unseen is not None:
                tensors[f"plain_rows_{n}"] = torch.cat([decepticons(sent, Observation(
                    g, users=each, batch=config.batch, input_shape=data.input_shape, train_mode=train), tol=o.tol).x.cpu()
                    for g in sums.unseen[n]])
            tensors[f"rows_{n}"] = torch.cat([r.x.cpu() for r in recs])
            meta["nonempty_bins"][str(n)] = sum(r.info["nonempty_bins"] for r in recs)
            meta["rejected"][str(n)] = sum(r.info["rejected"] for r in recs)
        bags = [bag_of_tokens(model, g, name=embedding) for g in sums.honest[n]]
        meta["bags"][str(n)] = None if any(b is None for b in bags) else sorted(set().union(*bags))
        if config.inverts_text:
            t0 = time.perf_counter()
            tensors[f"inverted_{n}"] = inverted_all(sums.honest[n], n, each)
            if sent is None and sums.unseen is not None:
                tensors[f"plain_inverted_{n}"] = inverted_all(sums.unseen[n], n, each)
            seconds["inversion"] += time.perf_counter() - t0
    meta["seconds"] = seconds
    return tensors, meta


@dataclass
class _Sums:
    """What the servers see of one round, per user count n (the first n users): ``malicious[n]`` the updates on the
    planted model the server reads (empty for ``attack: text-inversion``), ``honest[n]`` those on the unmodified
    one (the honest-but-curious attacks), ``unseen[n]`` (with a client defence) the same round's plain updates on the
    attacked model (the planted one; for ``attack: text-inversion`` the unmodified one): each a list of
    [the n users' secure aggregate] or, without secure aggregation, [user 0's update, ..., user n-1's] (the same
    objects for every n); ``distortion`` each user's ||g' - g|| / ||g|| on the planted model (defence only);
    ``flower_seconds`` the Flower runs' wall time (through Flower)."""

    malicious: dict[int, list[ParamVector]]
    honest: dict[int, list[ParamVector]]
    unseen: dict[int, list[ParamVector]] | None = None
    distortion: list[float] | None = None
    flower_seconds: float | None = None


def _seen(config: FederatedConfig, g: ParamVector, gen: torch.Generator, counts: tuple[int, ...] | None = None
          ) -> dict[int, list[ParamVector]]:
    """Per user count n of ``counts`` (None: ``config.user_counts``) what the server reads of the users' updates g
    {name: [U, *shape]}: the secure aggregate of the first n (each update clipped, noise on the sum, drawn from
    ``gen`` for each n in turn) or, without secure aggregation, each of the first n users' updates alone (clipped and
    noised per user, users 0..max n - 1 drawn in order once; the same objects for every n)."""
    agg, counts = config.aggregation, counts or config.user_counts

    def total(sl: slice) -> ParamVector:
        return secure_aggregate(ParamVector({k: t[sl] for k, t in g.items()}), clip=agg.clip,
                                noise_multiplier=agg.noise_multiplier, generator=gen)

    if agg.secure:
        return {n: [total(slice(0, n))] for n in counts}
    each = [total(slice(u, u + 1)) for u in range(max(counts))]
    return {n: each[:n] for n in counts}


def _simulated_sums(config: FederatedConfig, data: DataBundle, sent: nn.Module | None, model: nn.Module, tokens: Tensor,
                    targets: Tensor, seed: int, device: str) -> _Sums:
    """In process: every user's update on both models (:func:`~mlaudit.federated.round_updates`: the FedSGD gradient
    in one vmap, or FedAvg's local SGD steps; user u's data order from seed + u on the planted model and seed + U + u
    on the unmodified one, as its Flower client's), each user's defence (all users' noise from one generator per
    model, seeded from the trial), and what the server sees (:func:`_seen`: per user count the secure aggregate, or
    each user's update, with the configured clipping and noise; under secure aggregation one generator drawn
    malicious then honest per count, without it malicious users then honest users; the plain comparison from a
    second generator of the same seed)."""
    train, d, users = config.user_mode == "train", config.defence, config.users

    def updates(m: nn.Module, first: int) -> ParamVector:
        return round_updates(m, tokens, targets, protocol=config.protocol, lr=config.local_lr,
                             epochs=config.local_epochs, batch_size=config.local_batch or config.batch,
                             seeds=[local_seed(first + u, 1) for u in range(users)], device=device,
                             train_mode=train, chunk=config.chunk).updates

    malicious = None if sent is None else updates(sent, seed)
    honest = updates(model, seed + users)
    noise = torch.Generator(device=device).manual_seed(seed + 1)
    plain, plain_noise, dist = malicious if sent is not None else honest, None, None
    if d.method != "none":
        # each user defends its own update (both models' updates: the malicious server's and the honest one's);
        # the same round without the defence is attacked too, with the same aggregation noise, for comparison
        opts = {"method": d.method, "sigma": d.sigma or 0.0, "clip": d.clip, "prune": d.prune or 0.0, "bits": d.bits or 8}
        if malicious is not None:
            malicious = defend_updates(malicious, generator=torch.Generator(device=device).manual_seed(seed + 3), **opts)
        honest = defend_updates(honest, generator=torch.Generator(device=device).manual_seed(seed + 4), **opts)
        dist = distortion(plain, malicious if malicious is not None else honest).float().cpu().tolist()
        plain_noise = torch.Generator(device=device).manual_seed(seed + 1)
    out = _Sums({}, {}, None, dist)
    if config.aggregation.secure:
        for n in config.user_counts:  # per count: malicious, then honest from one generator
            if malicious is not None:
                out.malicious[n] = _seen(config, malicious, noise, (n,))[n]
            if plain_noise is not None:
                out.unseen = out.unseen or {}
                out.unseen[n] = _seen(config, plain, plain_noise, (n,))[n]
            out.honest[n] = _seen(config, honest, noise, (n,))[n]
        return out
    if malicious is not None:
        out.malicious = _seen(config, malicious, noise)
    out.honest = _seen(config, honest, noise)
    if plain_noise is not None:
        out.unseen = _seen(config, plain, plain_noise)
    return out


def _flower_sums(config: FederatedConfig, data: DataBundle, sent: nn.Module | None, model: nn.Module, tokens: Tensor,
                 targets: Tensor, seed: int, device: str) -> _Sums:
    """Through Flower (``transport: flower``, on the CPU): Flower runs over gRPC on ``flower_host`` of a server
    sending the planted TinyGPT and one sending the unmodified model, each a :class:`CuriousStrategy` that records
    what it sees in gradient units (the malicious parameters travel as parameter values: every client builds the
    TinyGPT from the config's factory and loads the arrays); each client takes one FedSGD step or FedAvg's local
    steps at ``local_lr`` (:func:`~mlaudit.federated.round_updates`, its data order from its seed). Under secure
    aggregation two runs per user count n of n clients (users 0..n-1), each server reading the FedAvg aggregate;
    without it one run per model of the largest count's clients, each server reading every client's update. Client
    u applies the defence with its own generator (seed + u on the planted model, seed + U + u on the unmodified one)
    and keeps its plain update for the comparison; server-side clipping and noise run in the strategy's aggregate
    step (:class:`TrustedAggregator`), its generator shared by the runs in the simulated order (malicious, then
    honest, per count; or malicious clients, then honest clients)."""
    from ..federated.flower import CuriousStrategy, TorchClient, TrustedAggregator, run_flower_audit
    from ..models.registry import build_model

    train, agg, users = config.user_mode == "train", config.aggregation, config.users
    fedavg = config.protocol == "fedavg"
    defence = config.defence.model_dump(exclude_none=True) if config.defence.method != "none" else None
    aggregator = (TrustedAggregator(agg.clip, agg.noise_multiplier, torch.Generator().manual_seed(seed + 1))
                  if agg.clip is not None else None)
    plain_noise = torch.Generator().manual_seed(seed + 1)
    out = _Sums({}, {}, None, None, 0.0)
    x, y = tokens.cpu(), targets.cpu()

    def own() -> nn.Module:  # each client builds the architecture from its own code and loads the server's values
        with torch.random.fork_rng(devices=[]):
            return build_model(config.model, input_shape=data.input_shape, num_classes=data.num_classes)

    def run(server_model: nn.Module, n: int, first_seed: int) -> tuple[list[ParamVector], list[Any]]:
        strategy = CuriousStrategy(server_model, tuple(data.input_shape), lr=config.local_lr,
                                   local_steps=config.local_steps, attack=None,
                                   target="aggregate" if agg.secure else "clients", min_clients=n, train_mode=train,
                                   aggregator=aggregator)
        clients = [TorchClient(own(), x[u], y[u], lr=config.local_lr, seed=first_seed + u, defence=defence,
                               epochs=config.local_epochs if fedavg else None,
                               local_batch=(config.local_batch or config.batch) if fedavg else None,
                               train_mode=train, client_id=u, keep_updates=defence is not None) for u in range(n)]
        audit = run_flower_audit(strategy, clients, rounds=1, host=config.flower_host, allow_remote=config.allow_remote)
        out.flower_seconds = (out.flower_seconds or 0.0) + audit.seconds
        r = audit.rounds[1]
        if agg.secure:
            return [r.observations["aggregate"].grad], clients
        who = [int(m["client_id"]) for m in r.client_metrics]  # each client's own update, in user order
        return [r.observations["clients"][who.index(u)].grad for u in range(n)], clients

    def kept(clients: list[Any], which: int) -> ParamVector:
        return ParamVector({k: torch.stack([c.kept[0][which][k] for c in clients]) for k in clients[0].kept[0][0]})

    counts = config.user_counts if agg.secure else (config.user_counts[-1],)
    for n in counts:
        seen, clients = run(sent, n, seed) if sent is not None else ([], [])
        honest, honest_clients = run(model, n, seed + users)
        if defence is not None:  # the attacked model's plain updates: the planted one's, else the unmodified one's
            plain = kept(clients or honest_clients, 0)
            if n == counts[-1]:  # the distortion over the users of the largest count's run
                out.distortion = distortion(plain, kept(clients or honest_clients, 1)).float().tolist()
        if agg.secure:
            out.malicious[n], out.honest[n] = seen, honest
            if defence is not None:
                out.unseen = out.unseen or {}
                out.unseen[n] = [secure_aggregate(plain, clip=agg.clip, noise_multiplier=agg.noise_multiplier,
                                                  generator=plain_noise)]
        else:  # the same objects for every count (one read per user)
            seen, honest = [g.to(device) for g in seen], [g.to(device) for g in honest]
            out.malicious = {m: seen[:m] for m in config.user_counts} if sent is not None else {}
            out.honest = {m: honest[:m] for m in config.user_counts}
            if defence is not None:  # noise drawn on the CPU, as the strategy's
                each = [g.to(device) for g in _seen(config, plain, plain_noise)[config.user_counts[-1]]]
                out.unseen = {m: each[:m] for m in config.user_counts}
    if agg.secure:
        for part in (out.malicious, out.honest, out.unseen or {}):
            for n in part:
                part[n] = [g.to(device) for g in part[n]]
    return out


def _rate(k: int, n: int) -> dict[str, Any]:
    lo, hi = clopper_pearson(k, n)
    return {"value": k / n if n else float("nan"), "lo": lo, "hi": hi, "k": k, "n": n, "method": "clopper-pearson"}


def _inversion_metrics(n: int, rounds: list[tuple[dict[str, Tensor], dict[str, Any]]], key: str = "inverted"
                       ) -> dict[str, Any] | None:
    """The honest inversion's recovery from what the server sees of n users, pooled over the trials' rounds
    (:func:`~mlaudit.attacks.federated.text_recovery`; ``key`` "plain_inverted": the same rounds without the client
    defence), and the bag of tokens' recall of the distinct tokens typed; None where the inversion did not run.
    ``chance_pairs``: the pairs "recovered" by the users' own tokens put at random positions (every token right, no
    position known; the mean of :data:`CHANCE_DRAWS` shuffles of the pooled tokens): the order-free pair count
    credits a token at position t when any of the n B sequences holds it there, so its chance level grows with n."""
    if not all(f"{key}_{n}" in t for t, _ in rounds):
        return None
    inverted = {"pairs": 0.0, "tokens": 0.0, "bigrams": 0.0, "whole": 0.0}
    occ = sequences_seen = 0
    chance = 0.0
    shuffle = torch.Generator().manual_seed(0)
    for tensors, _ in rounds:
        true = tensors["tokens"][:n].flatten(0, 1)  # [n B, L]
        occ += true.numel()
        sequences_seen += len(true)
        for _ in range(CHANCE_DRAWS):
            guess = true.flatten()[torch.randperm(true.numel(), generator=shuffle)].view_as(true)
            chance += text_recovery(true, guess)["pairs"] * true.numel() / CHANCE_DRAWS
        got = text_recovery(true, tensors[f"{key}_{n}"])
        weight = {"pairs": true.numel(), "tokens": true.numel(), "whole": len(true),
                  "bigrams": len(true) * (true.shape[1] - 1)}
        for k in inverted:
            inverted[k] += got.get(k, 0.0) * weight[k]
    bigrams = sequences_seen * (rounds[0][0]["tokens"].shape[-1] - 1)
    return {"users": n, "occurrences": occ,
            "pairs": _rate(round(inverted["pairs"]), occ), "tokens": _rate(round(inverted["tokens"]), occ),
            "bigrams": inverted["bigrams"] / bigrams if bigrams else None, "whole": inverted["whole"] / sequences_seen,
            "chance_pairs": chance / occ, "bag_of_tokens_recall": _bag_recall(n, rounds)}


def _bag_recall(n: int, rounds: list[tuple[dict[str, Tensor], dict[str, Any]]]) -> float | None:
    """The honest bag of tokens' mean recall of the distinct tokens the first n users typed, over the rounds (None
    when every bag is unavailable: a tied head)."""
    recall = []
    for tensors, meta in rounds:
        bag = meta["bags"][str(n)]
        if bag is not None:
            typed = set(tensors["tokens"][:n].flatten().tolist())
            recall.append(len(typed & set(bag)) / len(typed))
    return sum(recall) / len(recall) if recall else None


def _count_metrics(n: int, rounds: list[tuple[dict[str, Tensor], dict[str, Any]]], rows_key: str = "rows") -> dict[str, Any]:
    """Decepticons' recovery from n users' sum, pooled over the trials' rounds (``rows_key`` "plain_rows": the
    same rounds without the client defence), with the honest inversion's where it ran."""
    pairs = toks = occ = 0
    seq: dict[str, float] = {"tokens_in_sequence": 0.0, "whole": 0.0, "merged": 0.0}
    sequences_seen = 0
    for tensors, _ in rounds:
        true = tensors["tokens"][:n].flatten(0, 1)  # [n B, L]
        rows = tensors[f"{rows_key}_{n}"]
        occ += true.numel()
        pairs += round(pair_recovery(true, rows) * true.numel())
        toks += round(token_recovery(true, rows[:, 0]) * true.numel())
        for key, value in sequences(true, rows).items():
            seq[key] += value * len(true)
        sequences_seen += len(true)
    inv = _inversion_metrics(n, rounds)
    inversion = None if inv is None else {k: inv[k] for k in ("pairs", "tokens", "bigrams", "whole", "chance_pairs")}
    return {"users": n, "occurrences": occ, "pairs": _rate(pairs, occ), "tokens": _rate(toks, occ),
            "inversion": inversion,
            "in_sequence": seq["tokens_in_sequence"] / sequences_seen, "whole": seq["whole"] / sequences_seen,
            "merged": seq["merged"] / sequences_seen,
            "bag_of_tokens_recall": _bag_recall(n, rounds),
            "nonempty_bins": sum(m["nonempty_bins"][str(n)] for _, m in rounds) / len(rounds),
            "rejected": sum(m["rejected"][str(n)] for _, m in rounds) / len(rounds)}


def text_of(tokens: Tensor, vocabulary: tuple[str, ...]) -> str:
    """Token ids [L] as text: each id's class name, :data:`UNKNOWN` for -1, :data:`CLASH` for -2."""
    return "".join(UNKNOWN if t == -1 else CLASH if t == -2 else vocabulary[t] for t in tokens.tolist())


def samples(config: FederatedConfig, tensors: dict[str, Tensor], vocabulary: tuple[str, ...]
            ) -> list[tuple[int, str, str]]:
    """Up to ``decepticons.samples`` (user, true text, recovered text) of a round attacked at the largest user
    count: the recovered text is the group of rows whose tag is the sequence's first k tokens
    (:func:`~mlaudit.attacks.federated.decepticons.assemble`). Empty without a tag (rows carry no sequence)."""
    n = config.user_counts[-1]
    k = config.decepticons.tag_tokens if config.decepticons.tag else 0
    if not k:
        return []
    true = tensors["tokens"][:n]  # [n, B, L]
    rows = tensors[f"rows_{n}"]
    out = []
    for u, b in [(u, b) for u in range(n) for b in range(config.batch)][: config.decepticons.samples]:
        seq = true[u, b]
        out.append((u, text_of(seq, vocabulary), text_of(assemble(rows, seq[:k], len(seq)), vocabulary)))
    return out


def md_escape(text: str) -> str:
    """``text`` safe inside a markdown table cell: every ASCII punctuation character backslash-escaped
    (CommonMark renders it literally; ``|`` no longer splits the cell, ``<`` opens no HTML), other
    non-printable characters as ``\\xNN``."""
    out = []
    for c in text:
        if not c.isprintable():
            out.append(f"\\\\x{ord(c):02x}")
        elif c in string.punctuation:
            out.append("\\" + c)
        else:
            out.append(c)
    return "".join(out)


def run_text(config: FederatedConfig, ctx: RunContext, data: DataBundle,
             models: list[tuple[str, int, nn.Module]]) -> ExperimentOutput:
    """``attack: decepticons`` or ``text-inversion``: every trial's round attacked (or its kept result read back on
    resume), the metrics, tables and reports."""
    rounds: list[tuple[dict[str, Tensor], dict[str, Any]]] = []
    for i, (tid, _, model) in enumerate(models):
        key = (f"{config.attack}-{tid}"
               + ("-inversion" if config.attack == "decepticons" and config.text_inversion.run else "")  # the variant
               + (f"-fedavg{config.local_steps}" if config.protocol == "fedavg" else "")
               + ("" if config.aggregation.secure else "-per-user"))
        kept = ctx.load_cached(key)
        if kept is None:
            with ctx.cost.timed("attack"):
                kept = _trial(config, data, i, model, ctx.device)
            ctx.save_cached(key, *kept)
        rounds.append(kept)
    if config.attack == "text-inversion":
        return _inversion_output(config, ctx, data, models, rounds)
    per = [_count_metrics(n, rounds) for n in config.user_counts]
    top = per[-1]
    model = models[0][2]
    o = config.decepticons
    settings = {"attack": "decepticons", "protocol": config.protocol, "local_steps": config.local_steps,
                "users": config.users, "batch": config.batch,
                "user_counts": list(config.user_counts), "length": data.input_shape[0], "vocabulary": data.num_classes,
                "d_model": model.d_model, "heads": model.blocks[0].heads, "layers": len(model.blocks),
                "activation": model.activation, "tie_embeddings": model.tie_embeddings, "bins": rounds[0][1]["bins"],
                "tag": o.tag, "tag_tokens": o.tag_tokens if o.tag else 0, "tol": o.tol, "trials": config.trials,
                "public_sequences": len(data.test), "secure_aggregation": config.aggregation.secure,
                "model_init": config.model.init, "clip": config.aggregation.clip,
                "noise_multiplier": config.aggregation.noise_multiplier, "transport": config.transport,
                "scale": config.decepticons_scale, "local_lr": config.local_lr,
                "text_inversion": config.text_inversion.model_dump() if config.text_inversion.run else None}
    metrics: dict[str, Any] = {
        "recovered": top["pairs"], "secure_aggregation": config.aggregation.secure, "settings": settings,
        "decepticons": {"per_users": per},
        "seconds": {k: sum(m["seconds"].get(k, 0.0) for _, m in rounds) for k in ("updates", "attack", "inversion")}}
    if config.transport == "flower":
        metrics["seconds"]["flower_runs"] = sum(m.get("flower_seconds", 0.0) for _, m in rounds)
    if config.defence.method != "none":
        metrics["defence"] = _defence(config, rounds, per, [_count_metrics(n, rounds, "plain_rows")
                                                            for n in config.user_counts])
        settings["defence"] = config.defence.method
    shown = samples(config, rounds[0][0], data.train.classes)
    ctx.write_artifact("decepticons.md", lambda f: f.write(markdown(config, data, metrics, shown).encode("utf-8")))
    trials = [{"trial_id": tid, "seed": seed, "sequences": config.users * config.batch,
               "pairs_recovered": pair_recovery(t["tokens"].flatten(0, 1)[: top["users"] * config.batch],
                                                t[f"rows_{top['users']}"])}
              for (tid, seed, _), (t, _) in zip(models, rounds, strict=True)]
    notes = _notes(config, data, settings)
    if "defence" in metrics:
        dm = metrics["defence"]
        notes.append(f"Client-side defence: each user applies {config.defence.method} "
                     f"({', '.join(f'{k} {v}' for k, v in config.defence.model_dump(exclude_none=True).items() if k != 'method')}) "
                     f"to its update before sharing it; from {top['users']} users' sum Decepticons recovers "
                     f"{100 * dm['with']['value']:.1f}% of (token, position) pairs with it and {100 * dm['without']['value']:.1f}% "
                     f"on the same round without it; relative update distortion ||g' - g|| / ||g||: mean "
                     f"{dm['update_distortion']['mean']:.3f}.")
    return ExperimentOutput(metrics=metrics, trials=trials, tables=_tables(metrics, shown), notes=notes)


def _inversion_output(config: FederatedConfig, ctx: RunContext, data: DataBundle,
                      models: list[tuple[str, int, nn.Module]], rounds: list[tuple[dict[str, Tensor], dict[str, Any]]]
                      ) -> ExperimentOutput:
    """``attack: text-inversion``: per user count the inversion's recovery pooled over trials, the defence's
    comparison on the same rounds, closest recovered vs true samples, the reports."""
    per = [_inversion_metrics(n, rounds) for n in config.user_counts]
    assert all(p is not None for p in per)
    top = per[-1]
    model = models[0][2]
    inv = config.text_inversion
    embedding = token_embedding(model, inv.embedding)[0]
    settings = {"attack": "text-inversion", "protocol": config.protocol, "local_steps": config.local_steps,
                "users": config.users, "batch": config.batch, "user_counts": list(config.user_counts),
                "length": data.input_shape[0], "vocabulary": data.num_classes, "model": config.model.name,
                "architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
                "embedding": embedding, "tied_embedding": tied(model, embedding), "trials": config.trials,
                "secure_aggregation": config.aggregation.secure, "model_init": config.model.init,
                "clip": config.aggregation.clip, "noise_multiplier": config.aggregation.noise_multiplier,
                "transport": config.transport, "local_lr": config.local_lr, "text_inversion": inv.model_dump()}
    metrics: dict[str, Any] = {
        "recovered": top["pairs"], "secure_aggregation": config.aggregation.secure, "settings": settings,
        "text_inversion": {"per_users": per},
        "seconds": {k: sum(m["seconds"].get(k, 0.0) for _, m in rounds) for k in ("updates", "inversion")}}
    if config.transport == "flower":
        metrics["seconds"]["flower_runs"] = sum(m.get("flower_seconds", 0.0) for _, m in rounds)
    notes = _inversion_notes(config, data, settings)
    if config.defence.method != "none":
        metrics["defence"] = _defence(config, rounds, per, [_inversion_metrics(n, rounds, "plain_inverted")
                                                            for n in config.user_counts])
        settings["defence"] = config.defence.method
        dm = metrics["defence"]
        notes.append(f"Client-side defence: each user applies {config.defence.method} to its update before sharing it; "
                     f"from what the server sees of {top['users']} users the inversion recovers "
                     f"{100 * dm['with']['value']:.1f}% of (token, position) pairs with it and "
                     f"{100 * dm['without']['value']:.1f}% on the same round without it (the same attack randomness); "
                     f"relative update distortion ||g' - g|| / ||g||: mean {dm['update_distortion']['mean']:.3f}.")
    shown = closest_samples(rounds[0][0], config.user_counts[-1], inv.samples)
    vocabulary = data.train.classes
    shown_text = [(text_of(t, vocabulary), text_of(r, vocabulary), agree) for t, r, agree in shown]
    ctx.write_artifact("text_inversion.md",
                       lambda f: f.write(inversion_markdown(config, data, metrics, shown_text).encode("utf-8")))
    trials = [{"trial_id": tid, "seed": seed, "sequences": config.users * config.batch,
               "pairs_recovered": text_recovery(t["tokens"][: top["users"]].flatten(0, 1),
                                                t[f"inverted_{top['users']}"])["pairs"]}
              for (tid, seed, _), (t, _) in zip(models, rounds, strict=True)]
    tables = [ReportTable("Honest-but-curious text inversion: what the server recovers from the users' updates [95% "
                          "Clopper-Pearson over occurrences]", INVERSION_ONLY_COLUMNS, _inversion_rows(metrics),
                          note=f"{_round_words(settings)}. Whole sequences are recovered in an unknown order: pairs "
                               "(token at its position), tokens (multiset: pooled ROUGE-1 F1), adjacent pairs (pooled "
                               "ROUGE-2 recall) and sequences recovered exactly are pooled over sequences. A pair counts "
                               "when any sequence holds that token at that position, so its chance level (the users' "
                               "own tokens at shuffled positions) grows with the users. The bag of "
                               "tokens is the non-zero rows of the token embedding's gradient (n/a with a tied head).")]
    if shown_text:
        tables.append(ReportTable("True sequences and their closest recovered sequence (largest user count, first "
                                  "trial)", ["true", "closest recovered", "positions agreeing"],
                                  [[t, r, a] for t, r, a in shown_text]))
    return ExperimentOutput(metrics=metrics, trials=trials, tables=tables, notes=notes)


def _defence(config: FederatedConfig, rounds: list[tuple[dict[str, Tensor], dict[str, Any]]],
             per: list[Any], without: list[Any]) -> dict[str, Any]:
    """The client defence's comparison: the pairs recovered with it (``per``, one row per user count) and on the same
    rounds without it (``without``), and the relative update distortion ||g' - g|| / ||g|| over the users."""
    dist = torch.tensor([v for _, m in rounds for v in m["distortion"]], dtype=torch.float64)
    return {**config.defence.model_dump(exclude_none=True), "with": per[-1]["pairs"], "without": without[-1]["pairs"],
            "per_users": [{"users": p["users"], "with": p["pairs"], "without": w["pairs"]}
                          for p, w in zip(per, without, strict=True)],
            "update_distortion": {"mean": float(dist.nanmean()), "max": float(dist.nan_to_num(0.0).max())}}


def closest_samples(tensors: dict[str, Tensor], n: int, count: int) -> list[tuple[Tensor, Tensor, int]]:
    """Up to ``count`` (true sequence [L], the recovered sequence [L] agreeing with it at the most positions, that
    number) of the first n users' sequences in a round; the recovered order across users is unknown, so each true
    sequence is shown with its closest recovered one (one recovered sequence may be closest to several)."""
    true = tensors["tokens"][:n].flatten(0, 1)[:count]
    rec = tensors[f"inverted_{n}"]
    if not len(true) or not len(rec):
        return []
    agree = (true[:, None, :] == rec[None, :, :]).sum(-1)  # [count, m]
    best = agree.argmax(1)
    return [(t, rec[int(b)], int(agree[i, b])) for i, (t, b) in enumerate(zip(true, best, strict=True))]


INVERSION_ONLY_COLUMNS = ["users", "tokens typed", "(token, position) pairs recovered",
                          "pairs by chance (the true tokens shuffled)", "tokens (ROUGE-1)", "bigrams (ROUGE-2)",
                          "whole sequences", "honest bag of tokens (distinct recall)"]


def _inversion_rows(metrics: dict[str, Any]) -> list[list[Any]]:
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    return [[m["users"], m["occurrences"], m["pairs"], pct(m["chance_pairs"]), m["tokens"], pct(m["bigrams"]),
             pct(m["whole"]), pct(m["bag_of_tokens_recall"])] for m in metrics["text_inversion"]["per_users"]]


def inversion_markdown(config: FederatedConfig, data: DataBundle, metrics: dict[str, Any],
                       shown: list[tuple[str, str, int]]) -> str:
    """``attack: text-inversion``'s markdown report: settings, the per-user-count table, the closest samples, every
    text escaped."""
    s = metrics["settings"]
    t = config.text_inversion
    lines = [f"# Honest-but-curious text inversion on {md_escape(data.name)}", "",
             f"{md_escape(s['architecture'])} ({md_escape(config.model.name)}, {s['parameters']} parameters, token "
             f"embedding {md_escape(s['embedding'])}) "
             + ("from model.init" if config.model.init else "at initialisation")
             + f"; {config.users} user(s) x {config.batch} sequence(s) of {s['length']} tokens ({s['vocabulary']} in "
             f"the vocabulary); {md_escape(_round_words(s))}; {t.steps} steps, {md_escape(t.distance)} distance, "
             f"{t.refine} discrete moves, candidates {t.candidates}; {config.trials} trial(s), seed {config.seed}.", "",
             "| " + " | ".join(INVERSION_ONLY_COLUMNS) + " |", "|" + "---:|" * len(INVERSION_ONLY_COLUMNS)]
    lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in _inversion_rows(metrics)]
    if "defence" in metrics:
        d = metrics["defence"]
        lines += ["", f"Client defence {md_escape(config.defence.method)}: pairs recovered with it {_md_cell(d['with'])}, "
                      f"without it on the same round {_md_cell(d['without'])}."]
    if shown:
        lines += ["", "True sequences and their closest recovered sequence:", "",
                  "| true | closest recovered | positions agreeing |", "|---|---|---:|"]
        lines += [f"| {md_escape(a)} | {md_escape(b)} | {k} |" for a, b, k in shown]
    return "\n".join(lines) + "\n"


def _inversion_notes(config: FederatedConfig, data: DataBundle, s: dict[str, Any]) -> list[str]:
    t = config.text_inversion
    flower = []
    if config.transport == "flower":
        who = ("per user count n a server sending the model to n clients" if config.aggregation.secure
               else f"a server sending the model to {config.user_counts[-1]} clients")
        flower = [f"The round ran through Flower: {who} (each client builds {config.model.name} and loads the "
                  f"server's values) over gRPC on {config.flower_host}, {config.local_steps} local SGD step(s) at lr "
                  f"{config.local_lr:g}, float32 weights on the wire; the server read "
                  + ("the FedAvg aggregate." if config.aggregation.secure else "every client's own update.")]
    return flower + [
        f"Honest-but-curious server (TAG / LAMP-style text inversion): it sends {config.model.name} unmodified "
        + (f"(model.init {config.model.init})" if config.model.init else "at its initialisation")
        + f" to {config.users} users ({config.partition.scheme} partition of {data.name}'s training split, "
        f"{config.batch} sequence(s) of {s['length']} tokens each); {_round_words(s)}, for n in "
        f"{list(config.user_counts)}; it optimises token embeddings whose gradient matches what it sees ({t.steps} "
        f"steps of lr {t.lr:g}, {t.distance} distance, {t.restarts} restart(s)), projects them to tokens (candidates: "
        f"{t.candidates}) and refines them with {t.refine} discrete moves; {config.trials} trial(s)."]


def _rows(metrics: dict[str, Any]) -> list[list[Any]]:
    def pct(v: float | None) -> str:
        return "n/a (tied embeddings)" if v is None else f"{100 * v:.1f}%"

    def inverted(i: dict[str, Any]) -> list[Any]:
        return [i["pairs"], i["tokens"], pct(i["bigrams"]), pct(i["whole"])]

    per = metrics["decepticons"]["per_users"]
    return [[m["users"], m["occurrences"], m["pairs"], m["tokens"], pct(m["in_sequence"]), pct(m["whole"]),
             pct(m["merged"]), pct(m["bag_of_tokens_recall"])] + (inverted(m["inversion"]) if _inverted(metrics) else [])
            for m in per]


def _inverted(metrics: dict[str, Any]) -> bool:
    return all(m.get("inversion") is not None for m in metrics["decepticons"]["per_users"])


COLUMNS = ["users", "tokens typed", "(token, position) pairs recovered", "tokens recovered (any position)",
           "in its sequence", "whole sequences", "merged by the tag", "honest bag of tokens (distinct recall)"]
INVERSION_COLUMNS = ["honest inversion: pairs", "honest inversion: tokens (ROUGE-1)", "honest inversion: bigrams (ROUGE-2)",
                     "honest inversion: whole sequences"]


def columns(metrics: dict[str, Any]) -> list[str]:
    """The table's columns: Decepticons' and the bag of tokens', then the honest inversion's when it ran."""
    return COLUMNS + (INVERSION_COLUMNS if _inverted(metrics) else [])


def _tables(metrics: dict[str, Any], shown: list[tuple[int, str, str]]) -> list[ReportTable]:
    tables = [ReportTable("Decepticons: what the server reads off the users' updates [95% Clopper-Pearson "
                          "over occurrences]", columns(metrics), _rows(metrics),
                          note=f"{_round_words(metrics['settings'])}. In its "
                               "sequence: the mean fraction of a sequence's positions recovered with the right token "
                               "in the group of its own tag; sequences sharing their first k tokens are merged and "
                               "count 0. The bag of tokens is the honest-but-curious server's (the unmodified model's "
                               "token-embedding gradient): which tokens occur, no positions or counts."
                               + (" The honest inversion (TAG / LAMP style, on what the server sees of the same "
                                  "users on the unmodified model) recovers whole sequences in an unknown order: its pairs, tokens (multiset: "
                                  "pooled ROUGE-1 F1), adjacent pairs (pooled ROUGE-2 recall) and sequences recovered "
                                  "exactly are pooled over sequences." if _inverted(metrics) else ""))]
    if shown:
        tables.append(ReportTable("Recovered vs true sequences (largest user count, first trial)",
                                  ["user", "true", "recovered"], [[u, t, r] for u, t, r in shown],
                                  note=f"{UNKNOWN} a position not recovered, {CLASH} several tokens at one position "
                                       "(sequences merged by the tag)"))
    return tables


def _md_cell(v: Any) -> str:
    """A markdown table cell: a rate with its interval as "x% [lo, hi]", anything else (counts, percentages already
    written) as it is."""
    if isinstance(v, dict):
        return f"{100 * v['value']:.1f}% [{100 * v['lo']:.1f}, {100 * v['hi']:.1f}]"
    return str(v)


def markdown(config: FederatedConfig, data: DataBundle, metrics: dict[str, Any], shown: list[tuple[int, str, str]]
             ) -> str:
    """The run's markdown report: settings, the per-user-count table and the samples, every text escaped."""
    s = metrics["settings"]
    lines = [f"# Decepticons on {md_escape(data.name)}", "",
             f"TinyGPT (d\\_model {s['d_model']}, {s['layers']} layers, {s['heads']} heads, {s['activation']}) at "
             f"initialisation; {s['bins']} bins, a tag of {s['tag_tokens']} token(s); {config.users} user(s) x "
             f"{config.batch} sequence(s) of {s['length']} tokens ({s['vocabulary']} in the vocabulary); "
             f"{md_escape(_round_words(s))}; {config.trials} trial(s), seed {config.seed}.", "",
             "| " + " | ".join(columns(metrics)) + " |", "|" + "---:|" * len(columns(metrics))]
    lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in _rows(metrics)]
    if shown:
        lines += ["", f"Recovered vs true sequences ({md_escape(UNKNOWN)} not recovered, {md_escape(CLASH)} several "
                      "tokens at one position):", "", "| user | true | recovered |", "|---:|---|---|"]
        lines += [f"| {u} | {md_escape(t)} | {md_escape(r)} |" for u, t, r in shown]
    return "\n".join(lines) + "\n"


def _round_words(s: dict[str, Any]) -> str:
    """The round in words, from the run's settings: protocol, local steps, and what the server sees."""
    steps = s.get("local_steps", 1)
    how = ("one FedSGD round" if s["protocol"] == "fedsgd" else
           f"one FedAvg round ({steps} local SGD step{'s' if steps > 1 else ''} per user at lr {s['local_lr']:g})")
    seen = ("the server sees the sum of the first n users' updates (secure aggregation)" if s["secure_aggregation"]
            else "the server sees each of the first n users' updates alone (no secure aggregation) and pools what it "
                 "reads off each")
    return f"{how}; {seen}"


def _notes(config: FederatedConfig, data: DataBundle, s: dict[str, Any]) -> list[str]:
    runs = ("per user count n, a server sending the planted TinyGPT and one sending the unmodified model"
            if config.aggregation.secure else "a server sending the planted TinyGPT and one sending the unmodified "
            f"model, each to {config.user_counts[-1]} clients")
    flower = ([f"The round ran through Flower: {runs} (parameter values only; each client builds the TinyGPT from "
               f"{config.model.name}) over gRPC on {config.flower_host}, {config.local_steps} local SGD step(s) at lr "
               f"{config.local_lr:g}, float32 weights on the wire, bins at scale {s['scale']:g}; each server read "
               + ("the FedAvg aggregate." if config.aggregation.secure else "every client's own update.")]
              if config.transport == "flower" else [])
    return flower + [f"Malicious server (Decepticons, Fowl et al. 2022): the TinyGPT sent carries token and position codes in "
            f"its embeddings, a sequence tag of the first {s['tag_tokens']} token(s) in its first attention layer and "
            f"{s['bins']} imprint bins in its first MLP layer, offsets at quantiles over {s['public_sequences']} public "
            f"sequences (the test split); {config.users} users ({config.partition.scheme} partition of "
            f"{data.name}'s training split, {config.batch} sequence(s) of {s['length']} tokens each); "
            f"{_round_words(s)}, for n in {list(config.user_counts)}.",
            f"Global model: {config.model.name} "
            + (f"from the pretrained weights of model.init {config.model.init}" if config.model.init else "at initialisation")
            + f"; {config.trials} trial(s). The honest-but-curious "
            "baseline reads the bag of tokens from what the server sees of the unmodified model"
            + (f" and inverts it (text_inversion: {config.text_inversion.steps} steps, "
               f"{config.text_inversion.distance} distance, {config.text_inversion.refine} discrete moves, candidates "
               f"{config.text_inversion.candidates})." if config.text_inversion.run else ".")]
