"""The ``federated`` kind on text: Decepticons (Fowl, Geiping, Reich, Wen, Czaja, Goldblum & Goldstein 2022,
"Decepticons: Corrupted Transformers Breach Privacy in Federated Learning for Language Models"; seed 002,
chapter 4) against the users of one FedSGD round of a GPT-style language model, next to the
honest-but-curious bag of tokens.

Protocol, per trial: the global model is the config's TinyGPT at the trial's initialisation. The training
split (token sequences x [N, L], y [N] the next token) is partitioned among ``users``; each user draws
``batch`` sequences, tokens [U, B, L] with next-token targets cat(tokens[..., 1:], y) [U, B, L]. The
malicious server sends the model with the parameters of
:func:`~mlaudit.attacks.federated.plant_decepticon` (bins at quantiles of a measurement over its public
text, the test split); every user returns its FedSGD gradient (:func:`~mlaudit.federated.user_gradients`,
one vmap over users), and for each n in ``decepticons.user_counts`` the server sees the secure aggregate
of the first n users (:func:`~mlaudit.federated.secure_aggregate`) and reads (token, position, first k
tokens of its sequence) rows off the first MLP layer's update
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
    token_recovery,
)
from ..data.base import DataBundle
from ..federated import defend_updates, distortion, local_batches, secure_aggregate, user_gradients
from ..query import ParamVector
from ..report.html import ReportTable
from ..stats import clopper_pearson
from .base import ExperimentOutput, Stream
from .context import RunContext
from .federated_config import FederatedConfig, user_shares

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
    """One round attacked at every user count: tensors (``tokens`` [U, B, L], ``rows_<n>`` [m, 2 + k] the
    recovered rows from n users' sum, ``inverted_<n>`` [n B, L] the honest inversion's sequences with
    ``text_inversion.run``) and JSON-able meta (bags of tokens, bins, seconds)."""
    o = config.decepticons
    tokens, targets, gen = users_tokens(config, data, index)
    tokens, targets = tokens.to(device), targets.to(device)
    t0 = time.perf_counter()
    sent = plant_decepticon(model, data.test.x.round().long().to(device), bins=o.bins or model.blocks[0].fc1.out_features,
                            scale=config.decepticons_scale, feedback=o.feedback, tag=o.tag, tag_tokens=o.tag_tokens,
                            generator=gen)
    train = config.user_mode == "train"
    seed = config.trial_seed(index, stream=Stream.ATTACK)
    sums = (_flower_sums if config.transport == "flower" else _simulated_sums)(
        config, data, sent, model, tokens, targets, seed, device)
    seconds = {"updates": time.perf_counter() - t0, "attack": 0.0, "inversion": 0.0}
    inv = config.text_inversion
    tensors: dict[str, Tensor] = {"tokens": tokens.cpu()}
    meta: dict[str, Any] = {"bins": sent.decepticon_bins, "bags": {}, "nonempty_bins": {}, "rejected": {}}
    if sums.distortion is not None:
        meta["distortion"] = sums.distortion
    if sums.flower_seconds is not None:
        meta["flower_seconds"] = sums.flower_seconds
    for n in config.user_counts:
        seen, plain = sums.malicious[n], sums.honest[n]
        t0 = time.perf_counter()
        rec = decepticons(sent, Observation(seen, users=n, batch=config.batch, input_shape=data.input_shape,
                                            train_mode=train), tol=o.tol)
        seconds["attack"] += time.perf_counter() - t0
        if sums.unseen is not None:
            tensors[f"plain_rows_{n}"] = decepticons(sent, Observation(
                sums.unseen[n], users=n, batch=config.batch, input_shape=data.input_shape, train_mode=train),
                tol=o.tol).x.cpu()
        tensors[f"rows_{n}"] = rec.x.cpu()
        meta["bags"][str(n)] = bag_of_tokens(model, plain)
        if inv.run:
            t0 = time.perf_counter()
            got = text_inversion(
                model, Observation(plain, users=n, batch=config.batch, input_shape=data.input_shape, train_mode=train),
                steps=inv.steps, lr=inv.lr, distance=inv.distance, l1=0.01 if inv.l1 is None else inv.l1,
                restarts=inv.restarts, temperature=inv.temperature, refine=inv.refine,
                candidates=list(range(data.num_classes)) if inv.candidates == "vocabulary" else None,
                generator=torch.Generator().manual_seed(config.trial_seed(index, stream=Stream.ATTACK) + 2 + n))
            seconds["inversion"] += time.perf_counter() - t0
            tensors[f"inverted_{n}"] = got.x.cpu()
        meta["nonempty_bins"][str(n)] = rec.info["nonempty_bins"]
        meta["rejected"][str(n)] = rec.info["rejected"]
    meta["seconds"] = seconds
    return tensors, meta


@dataclass
class _Sums:
    """What the servers see of one round, per user count n (the first n users): ``malicious[n]`` the secure
    aggregate of the updates on the planted model, ``honest[n]`` on the unmodified one (the honest-but-curious
    baseline), ``unseen[n]`` (with a client defence) the malicious aggregate of the same round's plain updates;
    ``distortion`` each user's ||g' - g|| / ||g|| on the planted model (defence only); ``flower_seconds`` the
    Flower runs' wall time (through Flower)."""

    malicious: dict[int, ParamVector]
    honest: dict[int, ParamVector]
    unseen: dict[int, ParamVector] | None = None
    distortion: list[float] | None = None
    flower_seconds: float | None = None


def _simulated_sums(config: FederatedConfig, data: DataBundle, sent: nn.Module, model: nn.Module, tokens: Tensor,
                    targets: Tensor, seed: int, device: str) -> _Sums:
    """In process: every user's FedSGD gradient on both models (one vmap each), each user's defence (all users'
    noise from one generator per model, seeded from the trial), and per user count the secure aggregate with the
    configured clipping and noise (one generator, drawn malicious then honest per count; the plain comparison from
    a second generator of the same seed)."""
    train, agg, d = config.user_mode == "train", config.aggregation, config.defence
    malicious = user_gradients(sent, tokens, targets, train_mode=train, chunk=config.chunk)
    honest = user_gradients(model, tokens, targets, train_mode=train, chunk=config.chunk)
    noise = torch.Generator(device=device).manual_seed(seed + 1)
    plain_malicious, plain_noise, dist = malicious, None, None
    if d.method != "none":
        # each user defends its own update (both models' updates: the malicious server's and the honest one's);
        # the same round without the defence is attacked too, with the same aggregation noise, for comparison
        opts = {"method": d.method, "sigma": d.sigma or 0.0, "clip": d.clip, "prune": d.prune or 0.0, "bits": d.bits or 8}
        malicious = defend_updates(malicious, generator=torch.Generator(device=device).manual_seed(seed + 3), **opts)
        honest = defend_updates(honest, generator=torch.Generator(device=device).manual_seed(seed + 4), **opts)
        dist = distortion(plain_malicious, malicious).float().cpu().tolist()
        plain_noise = torch.Generator(device=device).manual_seed(seed + 1)
    out = _Sums({}, {}, {} if plain_noise is not None else None, dist)

    def first(g: ParamVector, n: int, gen: torch.Generator) -> ParamVector:
        return secure_aggregate(ParamVector({k: t[:n] for k, t in g.items()}), clip=agg.clip,
                                noise_multiplier=agg.noise_multiplier, generator=gen)

    for n in config.user_counts:
        out.malicious[n] = first(malicious, n, noise)
        if out.unseen is not None and plain_noise is not None:
            out.unseen[n] = first(plain_malicious, n, plain_noise)
        out.honest[n] = first(honest, n, noise)
    return out


def _flower_sums(config: FederatedConfig, data: DataBundle, sent: nn.Module, model: nn.Module, tokens: Tensor,
                 targets: Tensor, seed: int, device: str) -> _Sums:
    """Through Flower (``transport: flower``, on the CPU): per user count n, two Flower runs of n clients (users
    0..n-1) over gRPC on ``flower_host``, one FedSGD step each at ``local_lr``: a server sending the planted TinyGPT
    and one sending the unmodified model, each a :class:`CuriousStrategy` that records the FedAvg aggregate in
    gradient units (the malicious parameters travel as parameter values: every client builds the TinyGPT from the
    config's factory and loads the arrays). Client u applies the defence with its own generator (seed + u on the
    planted model, seed + U + u on the unmodified one) and keeps its plain update for the comparison; server-side
    clipping and noise run in the strategy's aggregate step (:class:`TrustedAggregator`), its generator shared by
    the runs in the simulated order (malicious, then honest, per count)."""
    from ..federated.flower import CuriousStrategy, TorchClient, TrustedAggregator, run_flower_audit
    from ..models.registry import build_model

    train, agg, users = config.user_mode == "train", config.aggregation, config.users
    defence = config.defence.model_dump(exclude_none=True) if config.defence.method != "none" else None
    aggregator = (TrustedAggregator(agg.clip, agg.noise_multiplier, torch.Generator().manual_seed(seed + 1))
                  if agg.clip is not None else None)
    plain_noise = torch.Generator().manual_seed(seed + 1)
    out = _Sums({}, {}, {} if defence is not None else None, None, 0.0)
    x, y = tokens.cpu(), targets.cpu()

    def own() -> nn.Module:  # each client builds the architecture from its own code and loads the server's values
        with torch.random.fork_rng(devices=[]):
            return build_model(config.model, input_shape=data.input_shape, num_classes=data.num_classes)

    def run(server_model: nn.Module, n: int, first_seed: int) -> tuple[ParamVector, list[Any]]:
        strategy = CuriousStrategy(server_model, tuple(data.input_shape), lr=config.local_lr, attack=None,
                                   target="aggregate", min_clients=n, train_mode=train, aggregator=aggregator)
        clients = [TorchClient(own(), x[u], y[u], lr=config.local_lr, seed=first_seed + u, defence=defence,
                               train_mode=train, client_id=u, keep_updates=defence is not None) for u in range(n)]
        audit = run_flower_audit(strategy, clients, rounds=1, host=config.flower_host, allow_remote=config.allow_remote)
        out.flower_seconds = (out.flower_seconds or 0.0) + audit.seconds
        return audit.rounds[1].observations["aggregate"].grad, clients

    for n in config.user_counts:
        out.malicious[n], clients = run(sent, n, seed)
        if out.unseen is not None:
            plain = ParamVector({k: torch.stack([c.kept[0][0][k] for c in clients]) for k in clients[0].kept[0][0]})
            shared = ParamVector({k: torch.stack([c.kept[0][1][k] for c in clients]) for k in plain})
            out.unseen[n] = secure_aggregate(plain, clip=agg.clip, noise_multiplier=agg.noise_multiplier,
                                             generator=plain_noise)
            if n == config.user_counts[-1]:  # the distortion over the users of the largest count's run
                out.distortion = distortion(plain, shared).float().tolist()
        out.honest[n], _ = run(model, n, seed + users)
    for part in (out.malicious, out.honest, out.unseen or {}):
        for n in part:
            part[n] = part[n].to(device)
    return out


def _rate(k: int, n: int) -> dict[str, Any]:
    lo, hi = clopper_pearson(k, n)
    return {"value": k / n if n else float("nan"), "lo": lo, "hi": hi, "k": k, "n": n, "method": "clopper-pearson"}


def _count_metrics(n: int, rounds: list[tuple[dict[str, Tensor], dict[str, Any]]], rows_key: str = "rows") -> dict[str, Any]:
    """The attack's recovery from n users' sum, pooled over the trials' rounds (``rows_key`` "plain_rows": the
    same rounds without the client defence)."""
    pairs = toks = occ = 0
    seq: dict[str, float] = {"tokens_in_sequence": 0.0, "whole": 0.0, "merged": 0.0}
    bag_recall: list[float] = []
    sequences_seen = 0
    inverted = {"pairs": 0.0, "tokens": 0.0, "bigrams": 0.0, "whole": 0.0}
    for tensors, meta in rounds:
        true = tensors["tokens"][:n].flatten(0, 1)  # [n B, L]
        rows = tensors[f"{rows_key}_{n}"]
        occ += true.numel()
        pairs += round(pair_recovery(true, rows) * true.numel())
        toks += round(token_recovery(true, rows[:, 0]) * true.numel())
        for key, value in sequences(true, rows).items():
            seq[key] += value * len(true)
        sequences_seen += len(true)
        if f"inverted_{n}" in tensors:
            got = text_recovery(true, tensors[f"inverted_{n}"])
            weight = {"pairs": true.numel(), "tokens": true.numel(), "whole": len(true),
                      "bigrams": len(true) * (true.shape[1] - 1)}
            for key in inverted:
                inverted[key] += got.get(key, 0.0) * weight[key]
        bag = meta["bags"][str(n)]
        if bag is not None:
            typed = set(true.flatten().tolist())
            bag_recall.append(len(typed & set(bag)) / len(typed))
    inversion = None
    if all(f"inverted_{n}" in t for t, _ in rounds):
        bigrams = sequences_seen * (rounds[0][0]["tokens"].shape[-1] - 1)
        inversion = {"pairs": _rate(round(inverted["pairs"]), occ), "tokens": _rate(round(inverted["tokens"]), occ),
                     "bigrams": inverted["bigrams"] / bigrams if bigrams else None,
                     "whole": inverted["whole"] / sequences_seen}
    return {"users": n, "occurrences": occ, "pairs": _rate(pairs, occ), "tokens": _rate(toks, occ),
            "inversion": inversion,
            "in_sequence": seq["tokens_in_sequence"] / sequences_seen, "whole": seq["whole"] / sequences_seen,
            "merged": seq["merged"] / sequences_seen,
            "bag_of_tokens_recall": sum(bag_recall) / len(bag_recall) if bag_recall else None,
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


def run_decepticons(config: FederatedConfig, ctx: RunContext, data: DataBundle,
                    models: list[tuple[str, int, nn.Module]]) -> ExperimentOutput:
    """Every trial's round attacked (or its kept result read back on resume), the metrics, tables and reports."""
    rounds: list[tuple[dict[str, Tensor], dict[str, Any]]] = []
    for i, (tid, _, model) in enumerate(models):
        key = f"decepticons-{tid}" + ("-inversion" if config.text_inversion.run else "")
        kept = ctx.load_cached(key)
        if kept is None:
            with ctx.cost.timed("attack"):
                kept = _trial(config, data, i, model, ctx.device)
            ctx.save_cached(key, *kept)
        rounds.append(kept)
    per = [_count_metrics(n, rounds) for n in config.user_counts]
    top = per[-1]
    model = models[0][2]
    o = config.decepticons
    settings = {"attack": "decepticons", "protocol": "fedsgd", "users": config.users, "batch": config.batch,
                "user_counts": list(config.user_counts), "length": data.input_shape[0], "vocabulary": data.num_classes,
                "d_model": model.d_model, "heads": model.blocks[0].heads, "layers": len(model.blocks),
                "activation": model.activation, "tie_embeddings": model.tie_embeddings, "bins": rounds[0][1]["bins"],
                "tag": o.tag, "tag_tokens": o.tag_tokens if o.tag else 0, "tol": o.tol, "trials": config.trials,
                "public_sequences": len(data.test), "secure_aggregation": True, "clip": config.aggregation.clip,
                "noise_multiplier": config.aggregation.noise_multiplier, "transport": config.transport,
                "scale": config.decepticons_scale, "local_lr": config.local_lr,
                "text_inversion": config.text_inversion.model_dump() if config.text_inversion.run else None}
    metrics: dict[str, Any] = {
        "recovered": top["pairs"], "secure_aggregation": True, "settings": settings,
        "decepticons": {"per_users": per},
        "seconds": {k: sum(m["seconds"].get(k, 0.0) for _, m in rounds) for k in ("updates", "attack", "inversion")}}
    if config.transport == "flower":
        metrics["seconds"]["flower_runs"] = sum(m.get("flower_seconds", 0.0) for _, m in rounds)
    if config.defence.method != "none":
        without = [_count_metrics(n, rounds, "plain_rows") for n in config.user_counts]
        dist = torch.tensor([v for _, m in rounds for v in m["distortion"]], dtype=torch.float64)
        metrics["defence"] = {**config.defence.model_dump(exclude_none=True), "with": top["pairs"],
                              "without": without[-1]["pairs"],
                              "per_users": [{"users": w["users"], "with": p["pairs"], "without": w["pairs"]}
                                            for p, w in zip(per, without, strict=True)],
                              "update_distortion": {"mean": float(dist.nanmean()),
                                                    "max": float(dist.nan_to_num(0.0).max())}}
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
    tables = [ReportTable("Decepticons: what the server reads off the users' summed update [95% Clopper-Pearson "
                          "over occurrences]", columns(metrics), _rows(metrics),
                          note="one FedSGD round; the server sees the sum of the first n users' gradients. In its "
                               "sequence: the mean fraction of a sequence's positions recovered with the right token "
                               "in the group of its own tag; sequences sharing their first k tokens are merged and "
                               "count 0. The bag of tokens is the honest-but-curious server's (the unmodified model's "
                               "token-embedding gradient): which tokens occur, no positions or counts."
                               + (" The honest inversion (TAG / LAMP style, on the unmodified model's sum of the same "
                                  "users) recovers whole sequences in an unknown order: its pairs, tokens (multiset: "
                                  "pooled ROUGE-1 F1), adjacent pairs (pooled ROUGE-2 recall) and sequences recovered "
                                  "exactly are pooled over sequences." if _inverted(metrics) else ""))]
    if shown:
        tables.append(ReportTable("Recovered vs true sequences (largest user count, first trial)",
                                  ["user", "true", "recovered"], [[u, t, r] for u, t, r in shown],
                                  note=f"{UNKNOWN} a position not recovered, {CLASH} several tokens at one position "
                                       "(sequences merged by the tag)"))
    return tables


def markdown(config: FederatedConfig, data: DataBundle, metrics: dict[str, Any], shown: list[tuple[int, str, str]]
             ) -> str:
    """The run's markdown report: settings, the per-user-count table and the samples, every text escaped."""
    s = metrics["settings"]

    def cell(v: Any) -> str:
        if isinstance(v, dict):
            return f"{100 * v['value']:.1f}% [{100 * v['lo']:.1f}, {100 * v['hi']:.1f}]"
        return str(v)  # counts and percentages written here

    lines = [f"# Decepticons on {md_escape(data.name)}", "",
             f"TinyGPT (d\\_model {s['d_model']}, {s['layers']} layers, {s['heads']} heads, {s['activation']}) at "
             f"initialisation; {s['bins']} bins, a tag of {s['tag_tokens']} token(s); {config.users} user(s) x "
             f"{config.batch} sequence(s) of {s['length']} tokens ({s['vocabulary']} in the vocabulary); one FedSGD "
             f"round, the server sees the sum of the first n users' gradients; {config.trials} trial(s), seed "
             f"{config.seed}.", "",
             "| " + " | ".join(columns(metrics)) + " |", "|" + "---:|" * len(columns(metrics))]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in _rows(metrics)]
    if shown:
        lines += ["", f"Recovered vs true sequences ({md_escape(UNKNOWN)} not recovered, {md_escape(CLASH)} several "
                      "tokens at one position):", "", "| user | true | recovered |", "|---:|---|---|"]
        lines += [f"| {u} | {md_escape(t)} | {md_escape(r)} |" for u, t, r in shown]
    return "\n".join(lines) + "\n"


def _notes(config: FederatedConfig, data: DataBundle, s: dict[str, Any]) -> list[str]:
    flower = ([f"The round ran through Flower: per user count n, a server sending the planted TinyGPT and one sending "
               f"the unmodified model (parameter values only; each client builds the TinyGPT from {config.model.name}) "
               f"to n clients over gRPC on {config.flower_host}, one FedSGD step at lr {config.local_lr:g}, float32 "
               f"weights on the wire, bins at scale {s['scale']:g}; each server read the FedAvg aggregate."]
              if config.transport == "flower" else [])
    return flower + [f"Malicious server (Decepticons, Fowl et al. 2022): the TinyGPT sent carries token and position codes in "
            f"its embeddings, a sequence tag of the first {s['tag_tokens']} token(s) in its first attention layer and "
            f"{s['bins']} imprint bins in its first MLP layer, offsets at quantiles over {s['public_sequences']} public "
            f"sequences (the test split); FedSGD round of {config.users} users ({config.partition.scheme} partition of "
            f"{data.name}'s training split, {config.batch} sequence(s) of {s['length']} tokens each); the server sees "
            f"the sum of the first n users' gradients for n in {list(config.user_counts)}.",
            f"Global model: {config.model.name} at initialisation; {config.trials} trial(s). The honest-but-curious "
            "baseline reads the bag of tokens from the unmodified model's aggregate"
            + (f" and inverts it (text_inversion: {config.text_inversion.steps} steps, "
               f"{config.text_inversion.distance} distance, {config.text_inversion.refine} discrete moves, candidates "
               f"{config.text_inversion.candidates})." if config.text_inversion.run else ".")]
