"""Experiment kind ``federated``: how many of the users' inputs a server recovers from one round of
federated learning (issue 20, deliverables 1-4; text, ``attack: decepticons`` and ``text-inversion``: :mod:`.federated_text`).

Protocol, per trial: the global model is the config's model at the trial's initialisation (or, with
``pretrain``, trained by the factory under ``recipe``). The training split is partitioned among
``users`` (:func:`mlaudit.federated.partition`); each user draws ``batch`` inputs of its share and sends
its update (FedSGD: one gradient, all users in one vmap'd call; FedAvg: ``local_epochs`` of SGD through
the one training loop). With ``attack: imprint`` the server is malicious and sends the model behind an
imprint module whose bins sit at quantiles of a measurement on public data (the test split). The server
sees the sum of the updates (``aggregation.secure``; optional per-user clipping and Gaussian noise) or,
without secure aggregation, each update alone, and runs the attack on what it sees. Candidates are
matched one-to-one to the true inputs behind the update (maximal summed PSNR); an input counts as
recovered when its PSNR >= ``psnr_threshold`` dB and as exact when >= :data:`EXACT_DB` dB. Rates carry
95% Clopper-Pearson intervals over all inputs of all trials.

With a ``defence:`` block each user transforms its update before sharing it
(:func:`mlaudit.federated.defend_updates`: Gaussian noise, clipping + noise on the per-client update,
pruning, quantisation; Zhu et al. 2019, "Deep Leakage from Gradients", section 5); the attack runs on
the defended round and, for comparison, on the plain updates of the same round (``metrics.defence``),
with the relative update distortion ||g' - g|| / ||g|| in place of a utility measurement.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..attacks.federated import (
    FEDERATED_ATTACKS,
    ImprintBins,
    Observation,
    ParameterImprint,
    label_accuracy,
    match,
    plant_imprint,
    plant_imprint_parameters,
)
from ..data.base import DataBundle
from ..factory import TrialSpec
from ..federated import (
    RoundUpdates,
    defend_updates,
    distortion,
    fedsgd_aggregate,
    local_batches,
    round_updates,
    secure_aggregate,
)
from ..federated.defences import client_generator, defend_each
from ..federated.training import server_step
from ..federated.updates import local_seed
from ..models.registry import build_model
from ..query import ParamVector, forward_batched, load_model
from ..report.figures import image_rows
from ..report.html import ReportTable
from ..train.loop import init_models
from .base import ExperimentOutput, Stream, register_experiment
from .context import RunContext
from .federated_config import (
    FederatedConfig,
    build_lpips,
    check_federated,
    user_shares,
)
from .federated_text import run_text
from .robustness import rate

EXACT_DB = 80.0
"""PSNR (dB) above which a recovery counts as exact: an RMS error below 1e-4 of the value range."""


@dataclass
class _Outcome:
    """One trial: per true input (in user order) its PSNR, SSIM, and the bins' occupancy (imprint)."""

    psnr: list[Tensor] = field(default_factory=list)
    ssim: list[Tensor] = field(default_factory=list)
    lpips: list[Tensor] = field(default_factory=list)
    labels: list[float] = field(default_factory=list)
    alone: int = 0
    shared: int = 0
    outside: int = 0
    grid: tuple[Tensor, Tensor, Tensor] | None = None
    distortion: Tensor | None = None
    """[U]: each user's ||g' - g|| / ||g|| under the defence (None without one)."""
    seconds: dict[str, float] = field(default_factory=lambda: {"updates": 0.0, "attack": 0.0})
    rounds: list[dict[str, float]] = field(default_factory=list)
    """Several rounds (simulated or Flower): per round the verbatim fraction and the users' shares recovered so far."""
    accuracy: dict[str, float] | None = None
    """Imprint: the test accuracy of the global model and of the planted one the server sent (first round)."""
    planted: dict[str, Any] | None = None
    """``imprint.variant: parameters``: where the first round's plant put the bins (:func:`_where`)."""
    training: list[dict[str, Any]] = field(default_factory=list)
    """Inversion attacks over rounds (simulated or Flower): per round the global model's test accuracy after it,
    its wall time, whether it was attacked and, if so, its recovery."""
    start_accuracy: float | None = None
    """The global model's test accuracy before the first of those rounds."""
    flower_seconds: float | None = None
    """Through Flower: the wall time of the whole Flower run (server and clients started, rounds, shut down)."""
    round_seconds: list[float] = field(default_factory=list)
    """Imprint through Flower: each round's wall time, from sending the parameters to receiving every result."""

    def psnr_all(self) -> Tensor:
        return torch.cat(self.psnr)


def _global_models(config: FederatedConfig, ctx: RunContext, data: DataBundle) -> list[tuple[str, int, nn.Module]]:
    """(trial id, seed, global model on the device): initialised at the trial's seed, or factory-trained."""
    trials = [TrialSpec(f"round-{i:04d}", seed=config.trial_seed(i)) for i in range(config.trials)]
    if config.pretrain:
        records = ctx.train(config.factory_job(data, trials, device=ctx.device))
        return [(r.trial_id, r.seed, load_model(config.model, ctx.out_dir / r.checkpoint, sha256=r.get("sha256"),
                                                data=data).to(ctx.device)) for r in records]

    def build() -> nn.Module:
        return build_model(config.model, input_shape=data.input_shape, num_classes=data.num_classes)

    return [(t.trial_id, t.seed, init_models(build, [t.seed])[0].to(ctx.device)) for t in trials]


def _user_updates(config: FederatedConfig, sent: nn.Module, x: Tensor, y: Tensor, seed: int, device: str,
                  num_classes: int, server_round: int = 1) -> RoundUpdates:
    """Every user's own update of round ``server_round`` (``.updates`` {name: [U, *shape]} in gradient units: FedSGD
    gradient, FedAvg delta / (lr steps); ``.steps``; ``.buffers`` after FedAvg's local training). User u's
    local data order is seeded by :func:`local_seed` of ``seed + u``, as its Flower client's."""
    return round_updates(sent, x, y, protocol=config.protocol, lr=config.local_lr, epochs=config.local_epochs,
                         batch_size=config.local_batch or config.batch, device=device, classes=num_classes,
                         seeds=[local_seed(seed + u, server_round) for u in range(config.users)],
                         train_mode=config.user_mode == "train", chunk=config.chunk)


def _observations(config: FederatedConfig, sent: nn.Module, x: Tensor, y: Tensor, seed: int, device: str,
                  num_classes: int, gen: torch.Generator, updates: ParamVector | None = None, server_round: int = 1
                  ) -> list[tuple[Observation, slice]]:
    """What the server sees, each with the users it covers: the sum over all users (secure aggregation) or
    every user's own update, in gradient units, each user's update clipped (and the sum noised) as configured.
    ``updates``: the users' (defended) updates, else computed here (round ``server_round``'s: FedAvg's local data
    order); secure FedSGD without them sums ``chunk`` users at a time, never holding every user's gradient."""
    agg, train = config.aggregation, config.user_mode == "train"
    shape = tuple(x.shape[2:])

    def seen(g: ParamVector, sl: slice) -> tuple[Observation, slice]:
        return Observation(g, users=sl.stop - sl.start, batch=config.batch, input_shape=shape, train_mode=train), sl

    if updates is None and config.protocol == "fedsgd" and agg.secure:
        total = fedsgd_aggregate(sent, x, y, clip=agg.clip, noise_multiplier=agg.noise_multiplier, generator=gen,
                                 chunk=config.chunk, train_mode=train)
        return [seen(total, slice(0, config.users))]
    if updates is None:
        updates = _user_updates(config, sent, x, y, seed, device, num_classes, server_round=server_round).updates
    users = [slice(0, config.users)] if agg.secure else [slice(u, u + 1) for u in range(config.users)]
    return [seen(secure_aggregate(ParamVector({n: t[sl] for n, t in updates.items()}), clip=agg.clip,
                                  noise_multiplier=agg.noise_multiplier, generator=gen), sl) for sl in users]


def _options(config: FederatedConfig, y_true: Tensor, mean_probs: Tensor, gen: torch.Generator) -> dict[str, Any]:
    if config.attack == "imprint":
        return {}
    inv = config.inversion
    opts: dict[str, Any] = dict(steps=inv.steps, lr=inv.lr, restarts=inv.restarts, box=config.box,
                                mean_probs=mean_probs, generator=gen,
                                labels=y_true if inv.labels == "known" else None)
    if config.attack == "inverting-gradients":
        opts["tv"] = inv.tv
    else:
        opts["soft_labels"] = inv.soft_labels and inv.labels != "known"
    return opts


def _trial(config: FederatedConfig, data: DataBundle, index: int, seed: int, model: nn.Module, device: str
           ) -> tuple[_Outcome, _Outcome | None]:
    """The trial's outcome under the configured defence and, with a defence, the same round without it
    (same batches, aggregation noise and attack randomness; the baseline's grid is not kept)."""
    parts, gen = user_shares(config, data, index)
    x, y, first_rows = local_batches(data.train, parts, batch=config.batch, generator=gen)
    x, y = x.to(device), y.to(device)
    public = data.test.x.to(device)
    if config.attack != "imprint" and (config.transport == "flower" or config.rounds > 1):
        return _training_rounds(config, data, index, seed, model, parts, (x, y), public, gen, device)
    if config.transport == "flower":
        return _flower_trial(config, data, index, seed, model, parts, x.cpu(), y.cpu(), public, gen)
    if config.rounds > 1:
        return _rounds_trial(config, data, index, seed, model, parts, (x, y, first_rows), public, gen, device)
    sent = _plant(config, model, public, gen) if config.attack == "imprint" else model
    mean_probs = torch.softmax(forward_batched(model, public, device=device), 1).mean(0).cpu()
    out = _Outcome()
    if config.attack == "imprint":
        out.accuracy, out.planted = _accuracy(model, sent, data), _where(sent)
    t0 = time.perf_counter()
    noise = torch.Generator(device=device).manual_seed(config.trial_seed(index, stream=Stream.ATTACK) + 1)
    d = config.defence
    if d.method == "none":
        seen = _observations(config, sent, x, y, seed, device, data.num_classes, noise)
        out.seconds["updates"] = time.perf_counter() - t0
        return _attack(config, data, sent, seen, x, y, mean_probs, gen, out), None
    updates = _user_updates(config, sent, x, y, seed, device, data.num_classes).updates
    dgen = torch.Generator(device=device).manual_seed(config.trial_seed(index, stream=Stream.ATTACK) + 2)
    defended = defend_updates(updates, method=d.method, sigma=d.sigma or 0.0, clip=d.clip, prune=d.prune or 0.0,
                              bits=d.bits or 8, generator=dgen)
    out.distortion = distortion(updates, defended).float().cpu()
    noise_state, gen_state = noise.get_state(), gen.get_state()
    seen = _observations(config, sent, x, y, seed, device, data.num_classes, noise, updates=defended)
    out.seconds["updates"] = time.perf_counter() - t0
    _attack(config, data, sent, seen, x, y, mean_probs, gen, out)
    base = _Outcome()
    noise.set_state(noise_state)
    gen.set_state(gen_state)
    plain = _observations(config, sent, x, y, seed, device, data.num_classes, noise, updates=updates)
    _attack(config, data, sent, plain, x, y, mean_probs, gen, base, grid=False)
    return out, base


def _rounds_trial(config: FederatedConfig, data: DataBundle, index: int, seed: int, model: nn.Module,
                  parts: list[Tensor], first: tuple[Tensor, Tensor, Tensor], public: Tensor, gen: torch.Generator,
                  device: str) -> tuple[_Outcome, _Outcome | None]:
    """Several simulated imprint rounds (Fowl et al. 2022, sec. 4: a malicious server may repeat the attack): round
    1 uses the trial's batches ``first`` (x, y, their training rows [U, B]); each later round every user draws
    ``batch`` fresh examples of its share ``parts[u]``, and the server plants the imprint again (from ``gen``: a
    random-projection measurement is drawn anew, so the bins cut the data differently) and reads that round's
    aggregate alone (without secure aggregation, each user's update alone). User u's local data order in round r is
    :func:`local_seed` of ``seed + u`` and r. With a client defence every user defends each round's update with its
    own noise generator (:func:`client_generator` of ``seed + u``, its stream continuing from round to round, as a
    Flower client's and as in the inversion attacks' rounds), the server reads the defended round, and the same
    round's plain updates are read too, with the same aggregation noise (the second outcome). ``out.rounds``: per
    round the verbatim fraction and the fraction of the users' shares recovered verbatim in some round so far (the
    second outcome's: those of the plain updates)."""
    mean_probs = torch.softmax(forward_batched(model, public, device=device), 1).mean(0).cpu()
    noise = torch.Generator(device=device).manual_seed(config.trial_seed(index, stream=Stream.ATTACK) + 1)
    d = config.defence
    gens = [client_generator(seed + u, device) for u in range(config.users)] if d.method != "none" else None
    out = _Outcome()
    base = _Outcome() if gens is not None else None
    total = sum(len(p) for p in parts)
    got: set[tuple[int, int]] = set()
    got_plain: set[tuple[int, int]] = set()
    dist = []
    for r in range(1, config.rounds + 1):
        if r == 1:
            x, y, rows = first
        else:
            x, y, rows = local_batches(data.train, parts, batch=config.batch, generator=gen)
            x, y = x.to(device), y.to(device)
        t0 = time.perf_counter()
        sent = _plant(config, model, public, gen)
        plain = None
        if gens is None:
            seen = _observations(config, sent, x, y, seed, device, data.num_classes, noise, server_round=r)
        else:
            plain = _user_updates(config, sent, x, y, seed, device, data.num_classes, server_round=r).updates
            shared = defend_each(plain, gens, **d.model_dump(exclude_none=True))
            dist.append(distortion(plain, shared).float().cpu())
            state = noise.get_state()
            seen = _observations(config, sent, x, y, seed, device, data.num_classes, noise, updates=shared)
        out.seconds["updates"] += time.perf_counter() - t0
        if r == 1:
            out.accuracy, out.planted = _accuracy(model, sent, data), _where(sent)
        n0 = len(out.psnr)
        _attack(config, data, sent, seen, x, y, mean_probs, gen, out, grid=r == 1)
        _record_round(config, out, r, n0, rows, got, total)
        if base is not None and plain is not None:  # the same round's plain updates, the same aggregation noise
            after = noise.get_state()
            noise.set_state(state)
            unseen = _observations(config, sent, x, y, seed, device, data.num_classes, noise, updates=plain)
            noise.set_state(after)
            n1 = len(base.psnr)
            _attack(config, data, sent, unseen, x, y, mean_probs, gen, base, grid=False)
            _record_round(config, base, r, n1, rows, got_plain, total)
    if dist:
        out.distortion = torch.cat(dist)
    return out, base


def _plant(config: FederatedConfig, model: nn.Module, public: Tensor, gen: torch.Generator) -> nn.Module:
    """The model the server sends (bins from ``public``): ``model`` behind the configured imprint module, or
    (``imprint.variant: parameters``) a copy of ``model`` with the bins in its first Linear's rows."""
    im = config.imprint
    if im.variant == "parameters":
        return plant_imprint_parameters(model, public, bins=im.bins, layer=im.layer, next_layer=im.next_layer,
                                        measurement=im.measurement, cdf=im.cdf, feedback=im.feedback,
                                        scale=config.imprint_scale, generator=gen)
    return plant_imprint(model, public, bins=im.bins, measurement=im.measurement, cdf=im.cdf, feedback=im.feedback,
                         scale=config.imprint_scale, generator=gen)


def _where(sent: nn.Module) -> dict[str, Any] | None:
    """Where a parameter-only plant put the bins (the settings' ``imprint_layer``, ``imprint_next_layer``,
    ``imprint_pass_through``); None for the imprint module in front of the model."""
    if not isinstance(sent, ParameterImprint):
        return None
    return {"imprint_layer": sent.layer, "imprint_next_layer": sent.next_layer, "imprint_pass_through": list(sent.convs)}


def _accuracy(model: nn.Module, sent: nn.Module, data: DataBundle) -> dict[str, float]:
    """Test accuracy of the global model and of the planted model the server sends (is the attack noticeable?)."""
    y = data.test.y.cpu()
    clean, planted = (float((forward_batched(m, data.test.x, device=next(m.parameters()).device).argmax(1).cpu() == y)
                            .float().mean()) for m in (model, sent))
    return {"clean": clean, "planted": planted, "change": planted - clean}


def _record_round(config: FederatedConfig, out: _Outcome, r: int, n0: int, rows: Sequence[Tensor],
                  got: set[tuple[int, int]], total: int) -> None:
    """After round ``r``'s attack (its inputs' PSNRs are ``out.psnr[n0:]``, in user order; ``rows[u][b]`` names
    user u's input b within its data): the round's verbatim fraction and the fraction of the users' ``total``
    examples recovered verbatim in some round so far (``got``, updated), appended to ``out.rounds``."""
    ok = (torch.nan_to_num(torch.cat(out.psnr[n0:]), nan=-1.0) >= EXACT_DB).view(config.users, config.batch)
    got |= {(u, int(rows[u][b])) for u, b in ok.nonzero().tolist()}
    out.rounds.append({"round": r, "exact": float(ok.float().mean()), "cumulative_exact": len(got) / total})


def _flower_trial(config: FederatedConfig, data: DataBundle, index: int, seed: int, model: nn.Module,
                  parts: list[Tensor], x: Tensor, y: Tensor, public: Tensor, gen: torch.Generator
                  ) -> tuple[_Outcome, _Outcome | None]:
    """The imprint round(s) through Flower (``transport: flower``, on the CPU): the malicious ImprintStrategy plants
    the imprint (same bins as the simulated path) and reads each FedAvg aggregate (``aggregation.secure``) or, without
    secure aggregation, each client's own update (``target="clients"``); one TorchClient per user computes
    its update with the simulated rounds' code (FedSGD: one gradient; FedAvg: :func:`round_updates`, user u's data
    order from :func:`local_seed` of ``seed + u`` as in the simulated round), applies the defence and keeps its plain
    and defended update; server-side ``aggregation.clip`` / ``noise_multiplier`` run in the strategy's aggregate step
    (:class:`TrustedAggregator`: :func:`secure_aggregate` and :func:`server_step`, the noise generator seeded as the
    simulated round's). One round: on the users' batches x [U, B, *shape] of the simulated path. Several: each user
    draws ``batch`` of its share ``parts[u]`` every round (``out.rounds``: per round, and the shares' cumulative
    verbatim recovery). With a defence, the second outcome is the attack on the same round's plain updates."""
    from ..federated.flower import ImprintStrategy, TorchClient, TrustedAggregator, run_flower_audit

    im, agg = config.imprint, config.aggregation
    noise_seed = config.trial_seed(index, stream=Stream.ATTACK) + 1  # the simulated round's aggregation noise
    aggregator = (TrustedAggregator(agg.clip, agg.noise_multiplier, torch.Generator().manual_seed(noise_seed))
                  if agg.clip is not None else None)
    strategy = ImprintStrategy(model, public.cpu(), bins=im.bins, variant=im.variant, layer=im.layer,
                               next_layer=im.next_layer, measurement=im.measurement, cdf=im.cdf, feedback=im.feedback,
                               scale=config.imprint_scale, min_clients=config.users, generator=gen,
                               aggregator=aggregator, lr=config.local_lr, local_steps=config.local_steps,
                               target="aggregate" if agg.secure else "clients")
    several = config.rounds > 1
    shares = [(data.train.x[p].cpu(), data.train.y[p].cpu()) for p in parts] if several else list(zip(x, y))
    fedavg = config.protocol == "fedavg"
    defence = config.defence.model_dump(exclude_none=True) if config.defence.method != "none" else None
    # one round: the trial seed, as the simulated round's local seeds; several rounds: the batch draws of config.seed
    base_seed = config.seed if several else seed

    def own_model() -> nn.Module:  # variant parameters: each client builds the architecture from its own code
        if im.variant == "module":
            return strategy.client_model()
        with torch.random.fork_rng(devices=[]):
            return build_model(config.model, input_shape=data.input_shape, num_classes=data.num_classes)

    clients = [TorchClient(own_model(), xs, ys, lr=config.local_lr, batch=config.batch if several else None,
                           seed=base_seed + u, defence=defence, epochs=config.local_epochs if fedavg else None,
                           local_batch=(config.local_batch or config.batch) if fedavg else None,
                           train_mode=config.user_mode == "train", classes=data.num_classes, client_id=u,
                           keep_updates=defence is not None) for u, (xs, ys) in enumerate(shares)]
    audit = run_flower_audit(strategy, clients, rounds=config.rounds, host=config.flower_host,
                             allow_remote=config.allow_remote)
    out = _Outcome(accuracy=_accuracy(model, strategy.malicious, data), planted=_where(strategy.malicious),
                   flower_seconds=audit.seconds)
    out.seconds["updates"] = audit.seconds
    base = _Outcome() if defence is not None else None
    mean_probs = torch.softmax(forward_batched(model, public, device="cpu"), 1).mean(0)
    seen: set[tuple[int, int]] = set()
    seen_plain: set[tuple[int, int]] = set()
    dist: list[Tensor] = []
    total = sum(len(p) for p in parts)
    for r in sorted(audit.rounds):
        rr = audit.rounds[r]
        out.round_seconds.append(rr.seconds)
        if several:
            rows = [c.drawn[r - 1] for c in clients]
            x = torch.stack([xs[i] for (xs, _), i in zip(shares, rows, strict=True)])
            y = torch.stack([ys[i] for (_, ys), i in zip(shares, rows, strict=True)])
        n0 = len(out.psnr)
        state = gen.get_state()
        if agg.secure:
            views = [(rr.observation, slice(0, config.users))]
        else:  # each client's own update, in user order
            who = [int(m["client_id"]) for m in rr.client_metrics]
            views = [(rr.client_observations[who.index(u)], slice(u, u + 1)) for u in range(config.users)]
        _attack(config, data, strategy.malicious, views, x, y, mean_probs, gen, out, grid=r == 1)
        if base is not None:  # the same round's plain updates, the same server noise and attack randomness
            kept = [c.kept[r - 1] for c in clients]
            plain = ParamVector({n: torch.stack([k[0][n] for k in kept]) for n in kept[0][0]})
            shared = ParamVector({n: torch.stack([k[1][n] for k in kept]) for n in kept[0][0]})
            dist.append(distortion(plain, shared).float())
            replay = torch.Generator()
            if rr.noise_state is not None:
                replay.set_state(rr.noise_state)
            gen.set_state(state)
            n1 = len(base.psnr)
            _attack(config, data, strategy.malicious,
                    _observations(config, strategy.malicious, x, y, seed, "cpu", data.num_classes, replay,
                                  updates=plain), x, y, mean_probs, gen, base, grid=False)
            if several:
                _record_round(config, base, r, n1, rows, seen_plain, total)
        if several:
            _record_round(config, out, r, n0, rows, seen, total)
    if dist:
        out.distortion = torch.cat(dist)
    return out, base


@dataclass
class _Round:
    """One training round as the server saw it (simulated or through Flower): the global model it sent (None
    when the round is not attacked), the users' inputs x [U, B, *shape] and labels [U, B], what the server saw
    (``seen``) and, with a defence, the same round's plain updates (``plain``, for the comparison), each user's
    update distortion [U] (defence only), the round's wall time, and the global model's test accuracy after it."""

    round: int
    sent: nn.Module | None
    x: Tensor
    y: Tensor
    seen: list[tuple[Observation, slice]]
    plain: list[tuple[Observation, slice]] | None
    distortion: Tensor | None
    seconds: float
    accuracy: float


def _test_accuracy(model: nn.Module, data: DataBundle) -> float:
    """The model's accuracy on the test split (argmax of its logits, eval mode)."""
    device = next(model.parameters()).device
    return float((forward_batched(model, data.test.x, device=device).argmax(1).cpu() == data.test.y.cpu()).float().mean())


def _training_rounds(config: FederatedConfig, data: DataBundle, index: int, seed: int, model: nn.Module,
                     parts: list[Tensor], first: tuple[Tensor, Tensor], public: Tensor, gen: torch.Generator,
                     device: str) -> tuple[_Outcome, _Outcome | None]:
    """An honest-but-curious server (Inverting Gradients, DLG) over ``config.rounds`` rounds of FedSGD or FedAvg
    that train the global model, simulated (:func:`_simulated_rounds`) or through Flower (:func:`_flower_rounds`),
    the attack on each round of ``attack_rounds``. Round 1 uses the trial's batches ``first``; every later round's
    batches (``batch`` of each user's share ``parts[u]``) are drawn from ``gen`` before any round runs, so both
    transports see the same inputs and the attacks the same randomness. With a defence the attack also runs on
    the same rounds' plain updates (the second outcome)."""
    batches = [first] + [local_batches(data.train, parts, batch=config.batch, generator=gen)[:2]
                         for _ in range(2, config.rounds + 1)]
    attacked = set(config.attack_rounds or range(1, config.rounds + 1))
    out = _Outcome(start_accuracy=_test_accuracy(model, data))
    base = _Outcome() if config.defence.method != "none" else None
    rounds: Iterator[_Round] | list[_Round]
    if config.transport == "flower":
        rounds, out.flower_seconds = _flower_rounds(config, data, index, seed, model, batches, attacked)
        where = "cpu"
    else:
        rounds, where = _simulated_rounds(config, data, index, seed, model, batches, attacked, device), device
    dist = []
    for rnd in rounds:
        out.seconds["updates"] += rnd.seconds
        if rnd.distortion is not None:
            dist.append(rnd.distortion.float().cpu())
        row: dict[str, Any] = {"round": rnd.round, "test_accuracy": rnd.accuracy, "seconds": rnd.seconds,
                               "attacked": rnd.sent is not None}
        if rnd.sent is not None:
            n0 = len(out.psnr)
            mean_probs = torch.softmax(forward_batched(rnd.sent, public, device=where), 1).mean(0).cpu()
            x, y = rnd.x.to(where), rnd.y.to(where)
            state = gen.get_state()
            _attack(config, data, rnd.sent, rnd.seen, x, y, mean_probs, gen, out, grid=out.grid is None)
            if base is not None and rnd.plain is not None:
                gen.set_state(state)  # the same attack randomness on the plain updates of the same round
                _attack(config, data, rnd.sent, rnd.plain, x, y, mean_probs, gen, base, grid=False)
            psnr = torch.nan_to_num(torch.cat(out.psnr[n0:]), nan=-1.0)
            row.update(recovered=float((psnr >= config.psnr_threshold).float().mean()),
                       psnr_median=_summary(torch.cat(out.psnr[n0:])).get("median"))
        out.training.append(row)
    if dist:
        out.distortion = torch.cat(dist)
    return out, base


def _simulated_rounds(config: FederatedConfig, data: DataBundle, index: int, seed: int, model: nn.Module,
                      batches: list[tuple[Tensor, Tensor]], attacked: set[int], device: str) -> Iterator[_Round]:
    """The rounds in process: the users' updates (:func:`_user_updates`, user u's local seed that of its Flower
    client), each user's defence with its own noise generator (:func:`client_generator` of ``seed + u``, as its
    Flower client draws), what the server sees (:func:`_observations`: the sum or each update, with the configured
    clipping and noise), and the FedAvg server step on what it saw (:func:`server_step`: the mean update; the
    users' buffers averaged). The global model is a copy of ``model``; each round is yielded after its step."""
    glob = copy.deepcopy(model)
    noise = torch.Generator(device=device).manual_seed(config.trial_seed(index, stream=Stream.ATTACK) + 1)
    d = config.defence
    options = d.model_dump(exclude_none=True)
    gens = [client_generator(seed + u, device) for u in range(config.users)] if d.method != "none" else None
    for r, (x, y) in enumerate(batches, 1):
        x, y = x.to(device), y.to(device)
        t0 = time.perf_counter()
        sent = copy.deepcopy(glob) if r in attacked else None
        res = _user_updates(config, glob, x, y, seed, device, data.num_classes, server_round=r)
        shared, dist = res.updates, None
        if gens is not None:
            shared = defend_each(res.updates, gens, **options)
            dist = distortion(res.updates, shared)
        state = noise.get_state()
        seen = _observations(config, glob, x, y, seed, device, data.num_classes, noise, updates=shared)
        total = seen[0][0].grad
        for obs, _ in seen[1:]:
            total = total + obs.grad
        server_step(glob, total, users=config.users, step=config.local_lr * res.steps, buffers=res.buffers)
        seconds = time.perf_counter() - t0
        plain = None
        if gens is not None and sent is not None:
            after = noise.get_state()
            noise.set_state(state)  # the same aggregation noise on the plain updates
            plain = _observations(config, sent, x, y, seed, device, data.num_classes, noise, updates=res.updates)
            noise.set_state(after)
        yield _Round(r, sent, x, y, seen, plain, dist, seconds, _test_accuracy(glob, data))


def _flower_rounds(config: FederatedConfig, data: DataBundle, index: int, seed: int, model: nn.Module,
                   batches: list[tuple[Tensor, Tensor]], attacked: set[int]) -> tuple[list[_Round], float]:
    """The rounds through Flower (on the CPU): an honest-but-curious :class:`CuriousStrategy` (plain FedAvg; the
    aggregate under secure aggregation, else each client's update) and one :class:`TorchClient` per user over gRPC
    on ``flower_host``. Client u holds its inputs of every round (``schedule``), computes its update with the
    simulated rounds' code (:func:`mlaudit.federated.round_updates`; seed ``seed + u``), applies the defence with
    its own noise generator, and keeps its plain and shared updates for the comparison and the distortion.
    Server-side ``aggregation.clip`` / ``noise_multiplier`` run in the strategy's aggregate step
    (:class:`TrustedAggregator`: :func:`secure_aggregate` on the sum or on each update, :func:`server_step`), its
    noise generator seeded as the simulated rounds'. The strategy only records what it saw (``attack=None``); the
    kind inverts it afterwards with the simulated rounds' attack code. Returns the rounds and the Flower run's wall
    time."""
    from ..federated.flower import CuriousStrategy, TorchClient, TrustedAggregator, run_flower_audit

    users, b, agg = config.users, config.batch, config.aggregation
    fedavg = config.protocol == "fedavg"
    noise_seed = config.trial_seed(index, stream=Stream.ATTACK) + 1  # the simulated rounds' aggregation noise
    aggregator = (TrustedAggregator(agg.clip, agg.noise_multiplier, torch.Generator().manual_seed(noise_seed))
                  if agg.clip is not None else None)
    strategy = CuriousStrategy(copy.deepcopy(model).cpu(), tuple(data.input_shape), lr=config.local_lr,
                               local_steps=config.local_steps, attack=None,
                               target="aggregate" if agg.secure else "clients", min_clients=users,
                               train_mode=config.user_mode == "train", keep_parameters=True, aggregator=aggregator)
    defence = config.defence.model_dump(exclude_none=True) if config.defence.method != "none" else None
    schedule = [torch.arange(r * b, (r + 1) * b) for r in range(len(batches))]
    clients = [TorchClient(strategy.client_model(), torch.cat([x[u] for x, _ in batches]).cpu(),
                           torch.cat([y[u] for _, y in batches]).cpu(), lr=config.local_lr, seed=seed + u,
                           schedule=schedule, defence=defence, epochs=config.local_epochs if fedavg else None,
                           local_batch=(config.local_batch or b) if fedavg else None,
                           train_mode=config.user_mode == "train", classes=data.num_classes, client_id=u,
                           keep_updates=defence is not None) for u in range(users)]
    audit = run_flower_audit(strategy, clients, rounds=config.rounds, host=config.flower_host,
                             allow_remote=config.allow_remote)

    def held(arrays: list[Any]) -> nn.Module:
        m = strategy.client_model()
        m.load_state_dict({k: torch.from_numpy(a.copy()) for k, a in zip(m.state_dict(), arrays, strict=True)})
        return m

    out = []
    for r, (x, y) in enumerate(batches, 1):
        cr = audit.rounds[r]
        sent = held(cr.sent) if r in attacked else None
        if agg.secure:
            seen = [(cr.observations["aggregate"], slice(0, users))]
        else:  # each client's update, in user order (Flower lists them as they arrive)
            who = [int(m["client_id"]) for m in cr.client_metrics]
            seen = [(cr.observations["clients"][who.index(u)], slice(u, u + 1)) for u in range(users)]
        plain = dist = None
        if defence is not None:
            kept = [c.kept[r - 1] for c in clients]
            names = list(kept[0][0])
            stack_plain = ParamVector({n: torch.stack([k[0][n] for k in kept]) for n in names})
            stack_shared = ParamVector({n: torch.stack([k[1][n] for k in kept]) for n in names})
            dist = distortion(stack_plain, stack_shared)
            if sent is not None:  # the same server noise as the round's defended updates
                replay = torch.Generator()
                if cr.noise_state is not None:
                    replay.set_state(cr.noise_state)
                plain = _observations(config, sent, x, y, seed, "cpu", data.num_classes, replay, updates=stack_plain)
        after = held(audit.rounds[r + 1].sent) if r < config.rounds else held(strategy.latest or [])
        out.append(_Round(r, sent, x.cpu(), y.cpu(), seen, plain, dist, cr.seconds, _test_accuracy(after, data)))
    return out, audit.seconds


_LPIPS: dict[tuple[Any, ...], nn.Module] = {}


def _lpips(config: FederatedConfig, device: torch.device) -> nn.Module | None:
    """The ``lpips`` block's metric on ``device``, built once per run's files and box (None without the block)."""
    if config.lpips is None:
        return None
    key = (config.lpips, config.box, str(device))
    if key not in _LPIPS:
        _LPIPS.clear()  # one metric at a time: AlexNet's trunk is 2.5M parameters
        _LPIPS[key] = build_lpips(config).to(device)
    return _LPIPS[key]


def _attack(config: FederatedConfig, data: DataBundle, sent: nn.Module, seen: list[tuple[Observation, slice]],
            x: Tensor, y: Tensor, mean_probs: Tensor, gen: torch.Generator, out: _Outcome, grid: bool = True
            ) -> _Outcome:
    """The attack on every observation, its candidates matched to the true inputs behind it, into ``out``."""
    width = config.box[1] - config.box[0]
    for obs, sl in seen:
        xt, yt = x[sl].flatten(0, 1), y[sl].flatten()
        t0 = time.perf_counter()
        rec = FEDERATED_ATTACKS.get(config.attack)(sent, obs, **_options(config, yt, mean_probs, gen))
        out.seconds["attack"] += time.perf_counter() - t0
        m = match(xt, rec.x, data_range=width, lpips=_lpips(config, xt.device))
        out.psnr.append(m.psnr)
        if m.ssim is not None:
            out.ssim.append(m.ssim)
        if m.lpips is not None:
            out.lpips.append(m.lpips)
        if rec.labels is not None and (config.attack == "dlg" and config.inversion.soft_labels
                                       or config.inversion.labels == "recovered"):
            out.labels.append(label_accuracy(rec.labels, yt))
        if isinstance(sent, ImprintBins):
            b = sent.bin_of(xt)
            count = torch.bincount(b.clamp(min=0), minlength=sent.bins)[b.clamp(min=0)]
            out.alone += int(((b >= 0) & (count == 1)).sum())
            out.shared += int(((b >= 0) & (count > 1)).sum())
            out.outside += int((b < 0).sum())
        if grid and out.grid is None and config.grid:
            shown = m.candidate[: config.grid]
            got = torch.stack([rec.x[c].cpu() if c >= 0 else torch.zeros_like(xt[0].cpu()) for c in shown.tolist()])
            out.grid = (xt[: config.grid].cpu(), got, m.psnr[: config.grid])
    return out


def _summary(values: Tensor) -> dict[str, Any]:
    ok = values[~torch.isnan(values)].double()
    out: dict[str, Any] = {"matched": int(ok.numel()), "n": int(values.numel())}
    if ok.numel():
        q = torch.quantile(ok, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
        out.update(mean=float(ok.mean()), q1=float(q[0]), median=float(q[1]), q3=float(q[2]))
    return out


@register_experiment("federated", config=FederatedConfig, check=check_federated)
def run_federated(config: FederatedConfig, ctx: RunContext) -> ExperimentOutput:
    """Inputs a server recovers from federated updates: Robbing the Fed's imprint module through secure aggregation, Inverting Gradients, DLG; Decepticons and text inversion on text."""
    data = ctx.load_dataset(config.dataset)
    if config.sequence_model:  # token sequences through a language model: federated_text.py
        return run_text(config, ctx, data, _global_models(config, ctx, data))
    outcomes: list[tuple[str, int, _Outcome]] = []
    baselines: list[_Outcome] = []
    for i, (tid, seed, model) in enumerate(_global_models(config, ctx, data)):
        with ctx.cost.timed("attack"):
            got, base = _trial(config, data, i, seed, model, ctx.device)
        outcomes.append((tid, seed, got))
        if base is not None:
            baselines.append(base)
    psnr = torch.cat([o.psnr_all() for _, _, o in outcomes])
    ssim = [s for _, _, o in outcomes for s in o.ssim]
    labels = [v for _, _, o in outcomes for v in o.labels]
    recovered = torch.nan_to_num(psnr, nan=-1.0) >= config.psnr_threshold
    exact = torch.nan_to_num(psnr, nan=-1.0) >= EXACT_DB
    metrics: dict[str, Any] = {
        "recovered": rate(recovered[None]),
        "exact": rate(exact[None]),
        "psnr": _summary(psnr),
        "ssim": _summary(torch.cat(ssim)) if ssim else None,
        "label_accuracy": sum(labels) / len(labels) if labels else None,
        "secure_aggregation": config.aggregation.secure,
        "settings": _settings(config, data, outcomes[0][2].planted),
        "seconds": {k: sum(o.seconds[k] for _, _, o in outcomes) for k in ("updates", "attack")},
    }
    if config.lpips is not None:
        lp = torch.cat([v for _, _, o in outcomes for v in o.lpips])
        metrics["lpips"] = {**_summary(lp), "threshold": config.lpips.threshold,
                            "recovered": rate((torch.nan_to_num(lp, nan=math.inf) <= config.lpips.threshold)[None])}
    if config.attack == "imprint":
        alone = sum(o.alone for _, _, o in outcomes)
        metrics["imprint"] = {"bins": config.imprint.bins, "inputs_alone_in_a_bin": alone,
                              "inputs_sharing_a_bin": sum(o.shared for _, _, o in outcomes),
                              "inputs_below_every_bin": sum(o.outside for _, _, o in outcomes),
                              "alone_fraction": alone / len(psnr)}
        if outcomes[0][2].rounds:
            rows = [dict(r) for r in outcomes[0][2].rounds]
            if baselines and baselines[0].rounds:  # a defence: the same rounds' plain updates
                for row, b in zip(rows, baselines[0].rounds, strict=True):
                    row["without"] = {"exact": b["exact"], "cumulative_exact": b["cumulative_exact"]}
            metrics["imprint"]["rounds"] = rows
        if outcomes[0][2].accuracy is not None:
            metrics["imprint"]["test_accuracy"] = outcomes[0][2].accuracy
        if config.transport == "flower":
            metrics["imprint"]["flower"] = {
                "run_seconds": [o.flower_seconds for _, _, o in outcomes],
                "round_seconds": [s for _, _, o in outcomes for s in o.round_seconds]}
    first = outcomes[0][2]
    if first.training:
        rows = first.training
        metrics["training"] = {"transport": config.transport, "protocol": config.protocol,
                               "local_steps": config.local_steps, "rounds": rows,
                               "test_accuracy_start": first.start_accuracy, "test_accuracy_end": rows[-1]["test_accuracy"],
                               "seconds_per_round": sum(r["seconds"] for r in rows) / len(rows)}
        if first.flower_seconds is not None:
            metrics["training"]["flower_run_seconds"] = first.flower_seconds
    if config.defence.method != "none":
        metrics["defence"] = _defence_metrics(config, [o for _, _, o in outcomes], baselines)
    trials = [{"trial_id": tid, "seed": seed, "inputs": int(o.psnr_all().numel()),
               "recovered": int((torch.nan_to_num(o.psnr_all(), nan=-1.0) >= config.psnr_threshold).sum()),
               "exact": int((torch.nan_to_num(o.psnr_all(), nan=-1.0) >= EXACT_DB).sum()),
               "psnr_median": _summary(o.psnr_all()).get("median"),
               **({"alone_in_bin": o.alone} if config.attack == "imprint" else {})} for tid, seed, o in outcomes]
    return ExperimentOutput(metrics=metrics, trials=trials, tables=_tables(config, metrics),
                            figures=_grid(config, outcomes[0][2]), notes=_notes(config, data, metrics))


def _recovery(config: FederatedConfig, outs: list[_Outcome]) -> dict[str, Any]:
    psnr = torch.nan_to_num(torch.cat([o.psnr_all() for o in outs]), nan=-1.0)
    labels = [v for o in outs for v in o.labels]
    return {"recovered": rate((psnr >= config.psnr_threshold)[None]), "exact": rate((psnr >= EXACT_DB)[None]),
            "psnr": _summary(torch.cat([o.psnr_all() for o in outs])),
            "label_accuracy": sum(labels) / len(labels) if labels else None}


def _defence_metrics(config: FederatedConfig, defended: list[_Outcome], plain: list[_Outcome]) -> dict[str, Any]:
    """The attack with and without the defence (same rounds), and the relative update distortion."""
    dist = torch.cat([o.distortion for o in defended if o.distortion is not None]).double()
    return {**config.defence.model_dump(exclude_none=True), "with": _recovery(config, defended),
            "without": _recovery(config, plain),
            "update_distortion": {"mean": float(dist.nanmean()), "max": float(dist.nan_to_num(0.0).max()),
                                  "users": int(dist.numel())}}


def _settings(config: FederatedConfig, data: DataBundle, planted: dict[str, Any] | None = None) -> dict[str, Any]:
    agg = config.aggregation
    out: dict[str, Any] = {
        "attack": config.attack, "protocol": config.protocol, "users": config.users, "batch": config.batch,
        "inputs_per_update": config.inputs_per_update, "secure_aggregation": agg.secure, "clip": agg.clip,
        "noise_multiplier": agg.noise_multiplier, "psnr_threshold": config.psnr_threshold, "exact_db": EXACT_DB,
        "user_mode": config.user_mode, "partition": config.partition.scheme, "pretrain": config.pretrain,
        "trials": config.trials, "public_inputs": len(data.test), "defence": config.defence.method,
        "transport": config.transport, "rounds": config.rounds}
    if config.attack_rounds is not None:
        out["attack_rounds"] = list(config.attack_rounds)
    if config.protocol == "fedavg":
        out.update(local_epochs=config.local_epochs, local_batch=config.local_batch or config.batch,
                   local_lr=config.local_lr, local_steps=config.local_steps)
    elif config.rounds > 1 or config.transport == "flower":
        out.update(local_lr=config.local_lr)
    if config.attack == "imprint":
        out.update(bins=config.imprint.bins, measurement=config.imprint.measurement, cdf=config.imprint.cdf,
                   imprint_scale=config.imprint_scale, imprint_variant=config.imprint.variant)
        if planted is not None:  # variant parameters: where the first trial's plant put the bins
            out.update(planted)
    else:
        out.update(steps=config.inversion.steps, labels=config.inversion.labels, restarts=config.inversion.restarts)
    return out


def _tables(config: FederatedConfig, m: dict[str, Any]) -> list[ReportTable]:
    p = m["psnr"]
    rows: list[list[Any]] = [
        [f"recovered (PSNR >= {config.psnr_threshold:g} dB)", m["recovered"]],
        [f"exact (PSNR >= {EXACT_DB:g} dB)", m["exact"]],
        ["PSNR of matched candidates, median [q1, q3] dB",
         f"{p['median']:.1f} [{p['q1']:.1f}, {p['q3']:.1f}]" if "median" in p else "no candidates"],
    ]
    if m["ssim"] is not None and "median" in m["ssim"]:
        rows.append(["SSIM of matched candidates, median", f"{m['ssim']['median']:.3f}"])
    if "lpips" in m and "median" in m["lpips"]:
        rows.append([f"perceptually recovered (LPIPS <= {m['lpips']['threshold']:g})", m["lpips"]["recovered"]])
        rows.append(["LPIPS of matched candidates, median (lower is closer)", f"{m['lpips']['median']:.4f}"])
    if m["label_accuracy"] is not None:
        rows.append(["labels recovered (multiset overlap)", f"{100 * m['label_accuracy']:.1f}%"])
    if "imprint" in m:
        im = m["imprint"]
        rows += [["inputs alone in their bin (recoverable)", im["inputs_alone_in_a_bin"]],
                 ["inputs sharing a bin", im["inputs_sharing_a_bin"]],
                 ["inputs below every bin", im["inputs_below_every_bin"]]]
        if "test_accuracy" in im:
            a = im["test_accuracy"]
            rows.append(["test accuracy: global model -> the planted model sent (first trial)",
                         f"{100 * a['clean']:.1f}% -> {100 * a['planted']:.1f}% ({100 * a['change']:+.1f} points)"])
    rows.append(["seconds: users' updates / attack", f"{m['seconds']['updates']:.2f} / {m['seconds']['attack']:.2f}"])
    tables = [ReportTable("Recovery of the users' inputs [95% Clopper-Pearson over inputs]", ["quantity", "value"], rows,
                          note="candidates are matched one-to-one to the true inputs (maximal summed PSNR); an input "
                               "without a candidate counts as not recovered")]
    if "defence" in m:
        tables.append(_defence_table(config, m["defence"]))
    if "training" in m:
        t = m["training"]
        tables.append(ReportTable(
            f"Training rounds ({'Flower' if config.transport == 'flower' else 'simulated'}, {config.protocol}, "
            f"{t['local_steps']} local step(s) per round): the global model and the attack, round by round",
            ["round", "test accuracy after it", f"recovered (PSNR >= {config.psnr_threshold:g} dB)",
             "median PSNR dB", "seconds"],
            [[r["round"], f"{100 * r['test_accuracy']:.1f}%",
              f"{100 * r['recovered']:.1f}%" if r["attacked"] else "not attacked",
              f"{r['psnr_median']:.1f}" if r.get("psnr_median") is not None else "",
              f"{r['seconds']:.3f}"] for r in t["rounds"]],
            note=f"test accuracy before round 1: {100 * t['test_accuracy_start']:.1f}%; seconds: the users' updates "
                 "and the server's FedAvg step (through Flower: from sending the parameters to receiving every "
                 "client's result), not the attack"))
    if "imprint" in m and "rounds" in m["imprint"]:
        plain = config.defence.method != "none"
        tables.append(ReportTable(
            f"Several {'Flower' if config.transport == 'flower' else 'simulated'} rounds ({config.rounds}): each user "
            f"draws {config.batch} of its share every round"
            + (f" and applies the defence {config.defence.method} to each round's update" if plain else ""),
            ["round", "the round's inputs recovered verbatim", "users' shares recovered so far"]
            + (["without the defence: verbatim", "without the defence: shares so far"] if plain else []),
            [[r["round"], f"{100 * r['exact']:.1f}%", f"{100 * r['cumulative_exact']:.1f}%"]
             + ([f"{100 * r['without']['exact']:.1f}%", f"{100 * r['without']['cumulative_exact']:.1f}%"]
                if plain else []) for r in m["imprint"]["rounds"]],
            note="the server re-plants its bins every round and reads each round's "
                 + ("aggregate alone" if config.aggregation.secure else "updates, each user's alone")))
    return tables


def _defence_table(config: FederatedConfig, d: dict[str, Any]) -> ReportTable:
    def med(r: dict[str, Any]) -> str:
        return f"{r['psnr']['median']:.1f}" if "median" in r["psnr"] else "no candidates"

    def lab(r: dict[str, Any]) -> str:
        return "n/a" if r["label_accuracy"] is None else f"{100 * r['label_accuracy']:.1f}%"

    knobs = ", ".join(f"{k} {v:g}" for k, v in d.items() if k in ("sigma", "clip", "prune", "bits"))
    rows = [["without defence", d["without"]["recovered"], med(d["without"]), lab(d["without"])],
            [f"{d['method']} ({knobs})", d["with"]["recovered"], med(d["with"]), lab(d["with"])]]
    u = d["update_distortion"]
    return ReportTable("Client-side defence: the attack with and without it (same rounds)",
                       ["update", f"recovered (PSNR >= {config.psnr_threshold:g} dB)", "median PSNR dB", "labels"],
                       rows, note=f"relative update distortion ||g' - g|| / ||g||: mean {u['mean']:.3f}, max "
                                  f"{u['max']:.3f} over {u['users']} user updates (the kind does not measure the "
                                  "defended model's accuracy)")


def _grid(config: FederatedConfig, o: _Outcome) -> dict[str, Any]:
    if not config.grid or o.grid is None:
        return {}
    xt, got, ps = o.grid
    titles = ["none" if torch.isnan(v) else "exact" if v >= EXACT_DB else f"{float(v):.0f} dB" for v in ps]
    return {f"True inputs (top) and the server's matched reconstructions (bottom), first {len(xt)} inputs of the first "
            "update, PSNR above each (exact: >= 80 dB)": image_rows([("true", xt), ("recovered", got)], titles=titles)}


def _notes(config: FederatedConfig, data: DataBundle, m: dict[str, Any]) -> list[str]:
    s = m["settings"]
    seen = (f"the sum of the {config.users} users' updates (secure aggregation), {s['inputs_per_update']} inputs behind it"
            if config.aggregation.secure else f"each user's update alone ({config.batch} inputs behind each)")
    if config.attack == "imprint":
        im = config.imprint
        where = (f"an imprint module of {im.bins} bins" if im.variant == "module" else
                 f"{im.bins} bins planted in units of its own first Linear layer ({im.layer or 'the first nn.Linear'}; "
                 "parameter values only, no architecture change)")
        who = (f"Malicious server (Robbing the Fed, Fowl et al. 2022): the model sent carries {where} on "
               f"{im.measurement}, offsets at {im.cdf} quantiles of {len(data.test)} public inputs (the test split)")
    else:
        who = (f"Honest-but-curious server ({config.attack}, {config.inversion.steps} steps, labels "
               f"{'optimised jointly' if config.attack == 'dlg' and config.inversion.soft_labels and config.inversion.labels != 'known' else config.inversion.labels})")
    defence = ""
    if config.transport == "flower" and config.attack == "imprint":
        defence = (f" {config.rounds} round(s) ran through Flower: a malicious ImprintStrategy (FedAvg) and "
                   f"{config.users} clients over gRPC on {config.flower_host}, float32 weights on the wire, each client "
                   f"{config.local_steps} local SGD step(s) at lr {config.local_lr:g}; the server read "
                   + ("only the " if config.aggregation.secure else "each client's own ")
                   + ("clipped and noised " if config.aggregation.clip is not None else "")
                   + ("FedAvg aggregate" if config.aggregation.secure else "update (no secure aggregation)")
                   + (" (server-side clipping and noise in the strategy's aggregate step)."
                      if config.aggregation.clip is not None else "."))
    elif config.transport == "flower":
        defence = (f" {config.rounds} round(s) ran through Flower: an honest-but-curious CuriousStrategy (FedAvg) and "
                   f"{config.users} clients over gRPC on {config.flower_host}, float32 weights on the wire, each client "
                   f"{config.local_steps} local SGD step(s) at lr {config.local_lr:g}; the server inverted "
                   f"{'the FedAvg aggregate' if config.aggregation.secure else 'each client result'}, read in gradient "
                   "units (weights sent - weights received) / (lr x steps).")
    elif config.rounds > 1 and config.attack != "imprint":
        defence = (f" {config.rounds} simulated rounds trained the global model (FedAvg server step on what the "
                   f"server saw, {config.local_steps} local SGD step(s) per user at lr {config.local_lr:g}).")
    if config.defence.method != "none":
        defence += (f" Each user applies the defence {config.defence.method} to its update before sharing it; the "
                   "attack also runs on the undefended updates of the same round for comparison.")
    if config.aggregation.clip is not None:
        defence += (f" Each update clipped to l2 norm {config.aggregation.clip:g}, Gaussian noise multiplier "
                   f"{config.aggregation.noise_multiplier:g} on the sum.")
    return [f"{who}; {config.protocol} round of {config.users} users ({config.partition.scheme} partition of "
            f"{data.name}'s training split, {config.batch} inputs each); the server sees {seen}.{defence}",
            f"Global model: {config.model.name} {'trained under the recipe' if config.pretrain else 'at initialisation'}"
            f", users' forward in {config.user_mode} mode; {config.trials} trial(s)."]
