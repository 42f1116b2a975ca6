"""A malicious Flower server for auditing a Flower deployment (issue 20, deliverable 6): Robbing the Fed's
imprint attack (Fowl et al., ICLR 2022; seed 002, chapter 3) as a Flower ``Strategy``.

:class:`ImprintStrategy` is Flower's ``FedAvg`` with three changes, all on the server:

1. the global model it starts from carries ``bins`` imprint bins at the quantiles of a measurement on the
   server's public data: with ``variant="module"`` the user's model behind an imprint module
   (:func:`mlaudit.attacks.federated.plant_imprint`); with ``variant="parameters"`` the user's own
   architecture, bins planted in rows of its first ``nn.Linear`` and one shared column of the next
   (:func:`mlaudit.attacks.federated.plant_imprint_parameters`);
2. every round it writes the planted entries into the arrays it sends (it controls the parameters it
   sends), so the attack repeats each round: the whole imprint module, or only the planted rows of W1 and
   b1 and columns of W2;
3. after aggregating, it reads the users' inputs off the *aggregate* alone (``target="aggregate"``, the
   default): with w the imprint parameters sent and w' the FedAvg result, w - w' = lr * sum_u (n_u / N) * g_u
   (FedSGD: one local step per round), and the recovery ratio (dW_i - dW_{i+1}) / (db_i - db_{i+1}) cancels
   every scale, so an input alone in its bin comes back verbatim. The individual client results Flower hands
   ``aggregate_fit`` are then not looked at, which is what secure aggregation would leave the server (with an
   ``aggregator``, a :class:`TrustedAggregator` clips them and noises their sum first, and the server reads
   that sum). ``target="clients"`` is a server without secure aggregation: the same read-out on each client's
   own update w - w_u (with an ``aggregator``: each clipped, noised update), where an input only has to be
   alone in its bin among its own client's inputs; ``"both"`` reads both.

Threat models: ``module``: the server controls the model *definition* (an extra layer in front of the
model), as when clients load the model the server distributes. ``parameters``: clients build a fixed
architecture from their own code and accept only parameter values (``client_model()`` is then a plain copy
of the user's model); this needs a first ``nn.Linear`` on the flattened input followed by ReLU, checked on
the public data. With several local steps (FedAvg: ``TorchClient(epochs=..., local_batch=...)``) the imprint
weights move between steps and recovery is approximate; client defences (``TorchClient(defence=...)``) act on
each client's update before it leaves the client, as for the honest server below.

:class:`TorchClient` is a Flower ``NumPyClient`` over any ``nn.Module`` and local tensors (one
FedSGD step by default), for simulating users; :func:`run_flower_audit` runs a server and its clients
over gRPC on 127.0.0.1 in one process (Flower's legacy ``start_server``/``start_client``; no Ray), and
:func:`run_flower_simulation` runs the same strategy and clients in Flower's simulation engine (a ``ServerApp``
and a ``ClientApp`` through ``flwr.simulation.run_simulation``, the clients in Ray actors; the ``ray`` extra).

    strategy = ImprintStrategy(model, public_x, bins=64, min_clients=3)      # or variant="parameters"
    clients = [TorchClient(strategy.client_model(), x_u, y_u, lr=0.1) for x_u, y_u in users]
    result = run_flower_audit(strategy, clients, rounds=2)
    result.rounds[1].reconstruction.x     # [m, *shape] candidates of round 1

:class:`CuriousStrategy` is the honest-but-curious server of the same deployment: plain ``FedAvg``, the user's
model sent unchanged, and after each round an inversion attack of :data:`mlaudit.attacks.federated.FEDERATED_ATTACKS`
(Inverting Gradients, DLG, ...) on what it received: the aggregate (what secure aggregation leaves it) and/or
every client's own update (a server without secure aggregation). :class:`TorchClient` can apply a client-side
defence (:func:`mlaudit.federated.defences.defend_updates`: noise, clip-noise, prune, quantise) to the update it
shares, so a team measures what their defence leaves an honest server:

    strategy = CuriousStrategy(model, (1, 8, 8), lr=0.1, target="clients", min_clients=3,
                               options={"steps": 2000})
    clients = [TorchClient(strategy.client_model(), x_u, y_u, lr=0.1, defence={"method": "prune", "prune": 0.9})
               for x_u, y_u in users]
    audit = run_flower_audit(strategy, clients, rounds=1)
    audit.rounds[1].clients_x[0]          # candidates for client 0's inputs (client_id order if every client
                                          # reports one, else Flower's result order)

Server-side (central) clipping and noise: ``aggregator=TrustedAggregator(clip, noise_multiplier, generator)`` on
either strategy clips each client's update in gradient units and adds Gaussian noise (to the sum, or with
``CuriousStrategy(target="clients")`` to each update) with :func:`mlaudit.federated.secure_aggregate`, and steps the
global model with :func:`mlaudit.federated.server_step`: the ``federated`` kind's ``aggregation.clip`` /
``noise_multiplier``, the same maths and, with the same seeded generator, the same draws as its simulated rounds.

Requires ``flwr`` (``pip install 'mlaudit[flower]'``).
"""

from __future__ import annotations

import copy
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

try:
    import flwr
    from flwr.client import NumPyClient, start_client
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import ServerConfig, start_server
    from flwr.server.strategy import FedAvg
except ImportError as e:  # pragma: no cover - exercised only without flwr
    raise ImportError("mlaudit.federated.flower needs Flower: pip install 'mlaudit[flower]' (flwr)") from e

from ..attacks.federated.base import FEDERATED_ATTACKS, Observation, Reconstruction
from ..attacks.federated.imprint import Cdf, ImprintBins, Measurement, imprint, plant_imprint
from ..attacks.federated.imprint_parameters import plant_imprint_parameters
from ..errors import ConfigError
from ..query import ParamVector
from .address import check_address
from .aggregate import secure_aggregate
from .defences import client_generator, defend_updates
from .training import server_step
from .updates import local_seed, round_updates, user_gradients

# Flower's wire format is numpy's .npy, whose header numpy parses with ast.literal_eval. On CPython 3.11 two threads
# parsing at once can fail with "SystemError: AST constructor recursion depth mismatch" (a data race in the ast
# module's recursion counter, seen in make test on 3.11.7, 2026-12-06). The clients here are threads of one
# process, so every decode of parameters in this module, and every client's message handling, holds this lock.
_WIRE_LOCK = threading.RLock()


def _to_arrays(parameters: Any) -> list[np.ndarray]:
    """``parameters_to_ndarrays`` under the module's wire lock."""
    with _WIRE_LOCK:
        return parameters_to_ndarrays(parameters)


def _serialised(client: Any) -> Any:
    """``client`` (a Flower ``Client``) with each message handler it implements run under the wire lock: the clients'
    threads then decode, train and encode one at a time (same results; the race above cannot happen)."""
    cls = type(client)

    def locked(f: Any) -> Any:
        def call(self: Any, ins: Any) -> Any:
            with _WIRE_LOCK:
                return f(self, ins)
        return call

    names = [n for n in ("get_properties", "get_parameters", "fit", "evaluate") if n in cls.__dict__]
    client.__class__ = type(cls.__name__, (cls,), {n: locked(cls.__dict__[n]) for n in names})
    return client

Variant = Literal["module", "parameters"]
Target = Literal["aggregate", "clients", "both"]
"""What a server reads: the FedAvg aggregate (what secure aggregation leaves it), each client's own update
(a server without secure aggregation), or both."""


def _arrays(model: nn.Module) -> list[np.ndarray]:
    """The model's state (parameters and buffers) in state_dict order: what goes over the wire."""
    return [t.detach().cpu().numpy().copy() for t in model.state_dict().values()]


def _load(model: nn.Module, arrays: list[np.ndarray]) -> None:
    keys = list(model.state_dict())
    if len(arrays) != len(keys):
        raise ConfigError(f"received {len(arrays)} arrays for a model with {len(keys)} state entries: the client's "
                          "model is not the server's (build it with ImprintStrategy.client_model())")
    model.load_state_dict({k: torch.from_numpy(np.asarray(a).copy()) for k, a in zip(keys, arrays, strict=True)})


def _in_client_order(results: list[Any]) -> list[Any]:
    """Flower's fit results in the clients' order when every client reports a ``client_id`` (a
    :class:`TorchClient` given one does), else as Flower lists them (the order they arrived)."""
    ids = [(r.metrics or {}).get("client_id") for _, r in results]
    if any(i is None for i in ids):
        return list(results)
    return [res for _, res in sorted(zip(ids, results, strict=True), key=lambda t: int(t[0]))]


class TrustedAggregator:
    """Server-side clipping and Gaussian noise of the clients' updates (a trusted aggregator's; the ``federated``
    kind's ``aggregation.clip`` and ``aggregation.noise_multiplier``), run with the kind's own code in a strategy's
    aggregate step: each client's update in gradient units g_u = (w_sent - w_u) / (lr * local_steps) over the
    model's trainable parameters is clipped to l2 norm ``clip`` (all parameters jointly) and N(0, (noise_multiplier
    * clip)^2 I) is added, drawn from ``generator`` (:func:`mlaudit.federated.secure_aggregate`), either once to
    their sum (``per_client=False``: the central noise of a secure aggregator, the kind with ``aggregation.secure``)
    or to each clipped update in client order (``per_client=True``: the kind without secure aggregation). The new
    global parameters are :func:`mlaudit.federated.server_step` on that sum (w - lr * local_steps * sum / U, users
    weighted equally, as in the kind's simulated rounds); the buffers keep FedAvg's average.

    Flower's own wrapper (``DifferentialPrivacyServerSideFixedClipping``) is not used: it clips the weight change
    of every array (buffers and integer counters included) in weight units, draws its noise from numpy's global
    generator, and adds it after the wrapped strategy's ``aggregate_fit``, so a strategy that reads the aggregate
    there would read it without the noise."""

    def __init__(self, clip: float, noise_multiplier: float = 0.0, generator: torch.Generator | None = None) -> None:
        if not clip > 0 or not np.isfinite(clip):
            raise ConfigError(f"TrustedAggregator clip = {clip}; allowed: a finite clip > 0 (the l2 norm each client's "
                              "update is clipped to, in gradient units)")
        if not noise_multiplier >= 0 or not np.isfinite(noise_multiplier):
            raise ConfigError(f"TrustedAggregator noise_multiplier = {noise_multiplier}; allowed: a finite "
                              "noise_multiplier >= 0 (noise std noise_multiplier * clip)")
        self.clip, self.noise_multiplier = float(clip), float(noise_multiplier)
        self.generator = generator if generator is not None else torch.Generator()
        if generator is None:
            self.generator.seed()  # a non-deterministic seed unless the caller passes a seeded generator

    def aggregate(self, model: nn.Module, sent: list[np.ndarray], fedavg: list[np.ndarray], results: list[Any], *,
                  lr: float, local_steps: int, per_client: bool
                  ) -> tuple[list[np.ndarray], ParamVector, list[ParamVector], Tensor]:
        """``model``: the architecture the arrays belong to (state_dict order); ``sent``: the arrays sent this round;
        ``fedavg``: FedAvg's average of the clients' arrays (its buffers are kept); ``results`` in client order.
        Returns (the new global arrays, the sum of the clipped (noised) updates, each client's clipped update
        (noised with ``per_client``), the generator's state before this round's draws)."""
        keys = list(model.state_dict())
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        step = lr * local_steps
        got = [_to_arrays(r.parameters) for r in results]
        updates = ParamVector({n: torch.from_numpy(np.stack([(sent[keys.index(n)].astype(np.float64)
                                                              - g[keys.index(n)].astype(np.float64)) / step
                                                             for g in got])) for n in names})
        state = self.generator.get_state()
        noise = self.noise_multiplier if per_client else 0.0
        each = [secure_aggregate(ParamVector({n: t[u:u + 1] for n, t in updates.items()}), clip=self.clip,
                                 noise_multiplier=noise, generator=self.generator) for u in range(len(got))]
        if per_client:
            total = each[0]
            for e in each[1:]:
                total = total + e
        else:
            total = secure_aggregate(updates, clip=self.clip, noise_multiplier=self.noise_multiplier,
                                     generator=self.generator)
        glob = copy.deepcopy(model).cpu()
        _load(glob, sent)
        server_step(glob, total, users=len(got), step=step)
        new = [a.copy() for a in fedavg]
        state_now = glob.state_dict()
        for n in names:
            i = keys.index(n)
            new[i] = state_now[n].detach().numpy().astype(sent[i].dtype)
        return new, total, each, state


@dataclass
class RoundResult:
    """One round as the malicious server saw it: the aggregate's reconstruction and the users counted."""

    round: int
    clients: int
    examples: int
    observation: Observation | None
    """The aggregate's imprint-layer update (w sent - w aggregated, float64; with variant 'parameters' the
    whole first layer, of which the attack reads the planted rows): what the attack read. With a
    :class:`TrustedAggregator`: the clipped (noised) sum of the clients' updates in gradient units. None with
    ``target="clients"``."""
    reconstruction: Reconstruction | None
    sent: list[np.ndarray] | None = None
    """The arrays the server sent this round (state_dict order of the model on the wire)."""
    noise_state: Tensor | None = None
    """With a :class:`TrustedAggregator`: its generator's state before this round's noise (to replay it)."""
    seconds: float = 0.0
    """Wall time from sending the round's parameters to receiving every client's result (as
    :attr:`CuriousRound.seconds`; the read-out not included)."""
    client_observations: list[Observation] = field(default_factory=list)
    """With ``target="clients"`` or ``"both"``: each client's own imprint-layer update (w sent - w_u, float64; with
    a :class:`TrustedAggregator` its clipped (noised) update in gradient units), in the order of
    :attr:`client_metrics` (``client_id`` order when every client reports one)."""
    client_reconstructions: list[Reconstruction] = field(default_factory=list)
    """The read-out of each of :attr:`client_observations`."""
    client_metrics: list[dict[str, Any]] = field(default_factory=list)
    """Each client's fit metrics, in the order of its results (a :class:`TorchClient` reports its ``client_id``)."""


@dataclass
class FlowerAudit:
    """What :func:`run_flower_audit` returns: per-round results and Flower's ``History``."""

    rounds: dict[int, Any] = field(default_factory=dict)
    """{round: :class:`RoundResult`} (imprint) or {round: :class:`CuriousRound`} (honest-but-curious)."""
    history: Any = None
    seconds: float = 0.0


class ImprintStrategy(FedAvg):
    """Flower ``FedAvg`` playing Robbing the Fed's malicious server (module docstring).

    ``model``: the user's global model; ``public_x`` [P, *shape]: the server's public inputs (the bins'
    quantiles); ``bins``, ``measurement``, ``cdf``, ``feedback``: :func:`plant_imprint`'s; ``variant``:
    ``module`` (an imprint module in front of the model) or ``parameters`` (the bins in rows of the model's
    own first Linear, :func:`plant_imprint_parameters`, with its ``layer``, ``next_layer``, ``units``);
    ``rel_tol``:
    :func:`imprint`'s; ``min_clients``: clients each round waits for (fit and available); ``aggregator``: a
    :class:`TrustedAggregator` (server-side clipping and noise on the clients' updates; needs the clients' ``lr``
    and ``local_steps``, its clip being in gradient units); ``target``: what the server reads, the FedAvg
    ``aggregate`` (secure aggregation), each client's own update (``clients``: no secure aggregation; with an
    aggregator each update is clipped and noised alone) or ``both``. Other keyword options go to ``FedAvg``
    (``fraction_fit``, ``evaluate_fn``, ...). Reconstructions accumulate in :attr:`rounds` ({round:
    :class:`RoundResult`})."""

    def __init__(self, model: nn.Module, public_x: Tensor, *, bins: int, variant: Variant = "module",
                 layer: str | None = None, next_layer: str | None = None, units: list[int] | None = None,
                 measurement: Measurement = "brightness", cdf: Cdf = "empirical", feedback: float = 1e-2,
                 scale: float = 1e-3, rel_tol: float = 1e-6, min_clients: int = 2,
                 generator: torch.Generator | None = None, aggregator: TrustedAggregator | None = None,
                 lr: float | None = None, local_steps: int = 1, target: Target = "aggregate", **fedavg: Any) -> None:
        if min_clients < 1:
            raise ConfigError(f"min_clients = {min_clients}; allowed min_clients >= 1")
        _check_target("ImprintStrategy", target, aggregator)
        if aggregator is not None and (lr is None or not lr > 0 or local_steps < 1):
            raise ConfigError(f"ImprintStrategy with an aggregator needs the clients' lr > 0 and local_steps >= 1 (its "
                              f"clipping is in gradient units), got lr={lr}, local_steps={local_steps}")
        bins_at = dict(bins=bins, measurement=measurement, cdf=cdf, feedback=feedback, scale=scale, generator=generator)
        user = copy.deepcopy(model).cpu()
        self.malicious: ImprintBins
        if variant == "module":
            named = {k: v for k, v in (("layer", layer), ("next_layer", next_layer), ("units", units)) if v is not None}
            if named:
                raise ConfigError(f"{', '.join(named)} choose(s) the layers of variant='parameters'; with variant='module' "
                                  "the imprint is an extra module in front of the model: drop them")
            self.malicious = plant_imprint(user, public_x.cpu(), **bins_at)
            wire: nn.Module = self.malicious
        elif variant == "parameters":
            self.malicious = plant_imprint_parameters(user, public_x.cpu(), layer=layer, next_layer=next_layer,
                                                      units=units, **bins_at)
            wire = self.malicious.model
        else:
            raise ConfigError(f"ImprintStrategy variant = {variant!r}; allowed: module, parameters")
        self.variant, self._user, self._wire = variant, user, wire
        self.input_shape = tuple(public_x.shape[1:])
        self.rel_tol = rel_tol
        self.aggregator, self.lr, self.local_steps, self.target = aggregator, lr, local_steps, target
        self._keys = list(wire.state_dict())
        self._planted = [(self._keys.index(s.name), s) for s in self.malicious.planted()]
        self._sent: dict[int, list[np.ndarray]] = {}
        self._started: dict[int, float] = {}
        self.rounds: dict[int, RoundResult] = {}
        fedavg.setdefault("fraction_evaluate", 0.0)
        super().__init__(min_fit_clients=min_clients, min_available_clients=min_clients,
                         initial_parameters=ndarrays_to_parameters(_arrays(wire)), **fedavg)

    def client_model(self) -> nn.Module:
        """What a client holds: with variant 'module' a copy of the model the server distributes (the imprint
        module in front of the user's model); with 'parameters' a plain copy of the user's model (the
        clients' own architecture; the server's parameters replace its values every round)."""
        return copy.deepcopy(self.malicious if self.variant == "module" else self._user)

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        arrays = _to_arrays(parameters)
        for i, planted in self._planted:
            arrays[i] = arrays[i].copy()
            planted.write(arrays[i])  # the server re-plants its bins every round
        self._sent[server_round] = arrays
        self._started[server_round] = time.perf_counter()
        return super().configure_fit(server_round, ndarrays_to_parameters(arrays), client_manager)

    def aggregate_fit(self, server_round: int, results: list[Any], failures: list[Any]) -> Any:
        seconds = time.perf_counter() - self._started.pop(server_round, time.perf_counter())
        results = _in_client_order(results)
        params, metrics = super().aggregate_fit(server_round, results, failures)
        sent = self._sent.pop(server_round, None)
        if params is None or sent is None:
            return params, metrics
        new = _to_arrays(params)
        noise_state = None
        keys = [(k, self._keys.index(k)) for k in self.malicious.imprint_keys]

        def weights(got: list[np.ndarray]) -> ParamVector:  # w sent - w received: lr x local steps x the update
            return ParamVector({k: torch.from_numpy(sent[i].astype(np.float64) - got[i].astype(np.float64))
                                for k, i in keys})

        each: list[ParamVector] = []
        if self.aggregator is not None:  # what the server reads: clipped, noised (the sum, or each update), stepped
            assert self.lr is not None
            new, total, clipped, noise_state = self.aggregator.aggregate(
                self._wire, sent, new, [r for _, r in results], lr=self.lr, local_steps=self.local_steps,
                per_client=self.target == "clients")
            params = ndarrays_to_parameters(new)
            delta = ParamVector({k: total[k].double() for k, _ in keys})  # gradient units: the ratio cancels
            each = [ParamVector({k: e[k].double() for k, _ in keys}) for e in clipped]
        else:
            delta = weights(new)
            if self.target != "aggregate":
                each = [weights(_to_arrays(r.parameters)) for _, r in results]
        sizes = [int(r.num_examples) for _, r in results]
        examples = sum(sizes)
        obs = rec = None
        if self.target in ("aggregate", "both"):
            obs = Observation(grad=delta, users=max(len(results), 1), batch=max(examples // max(len(results), 1), 1),
                              input_shape=self.input_shape)
            rec = imprint(self.malicious, obs, rel_tol=self.rel_tol)
        per = [Observation(grad=g, users=1, batch=max(n, 1), input_shape=self.input_shape)
               for g, n in zip(each, sizes, strict=True)] if self.target != "aggregate" else []
        recs = [imprint(self.malicious, o, rel_tol=self.rel_tol) for o in per]
        self.rounds[server_round] = RoundResult(
            server_round, len(results), examples, obs, rec, sent=sent, noise_state=noise_state, seconds=seconds,
            client_observations=per, client_reconstructions=recs,
            client_metrics=[dict(r.metrics or {}) for _, r in results])
        found = len(rec.x) if rec is not None else sum(len(r.x) for r in recs)
        return params, {**metrics, "imprint_candidates": found}



@dataclass
class CuriousRound:
    """One round as the honest-but-curious server saw it: the attack's reconstruction of the aggregate (None
    unless ``target`` asked for it) and of each client's own update (empty unless asked; in the order of
    Flower's results, with the clients' ``num_examples`` in :attr:`client_examples`), and the observations
    the attack read (gradient units, see :class:`CuriousStrategy`)."""

    round: int
    clients: int
    examples: int
    aggregate: Reconstruction | None
    client_reconstructions: list[Reconstruction]
    client_examples: list[int]
    observations: dict[str, Any]
    client_metrics: list[dict[str, Any]] = field(default_factory=list)
    """Each client's fit metrics, in the order of :attr:`client_examples` (a :class:`TorchClient` with a
    ``client_id`` reports it here)."""
    sent: list[np.ndarray] | None = None
    """The parameters the server sent this round (state_dict order), kept with ``keep_parameters=True``."""
    seconds: float = 0.0
    """Wall time from sending the round's parameters to receiving every client's result (the clients' local
    training and the gRPC round trip; the server's attack not included)."""
    noise_state: Tensor | None = None
    """With a :class:`TrustedAggregator`: its generator's state before this round's noise (to replay it)."""

    @property
    def clients_x(self) -> list[Tensor]:
        """Each client's candidates [n_u, *shape]."""
        return [r.x for r in self.client_reconstructions]


class CuriousStrategy(FedAvg):
    """Flower ``FedAvg`` as an honest-but-curious server (module docstring): it sends the user's model unchanged
    and inverts what comes back with the registered federated attack ``attack`` (``options`` its keyword
    options, e.g. ``steps``, ``tv``, ``generator``).

    What it inverts, in gradient units (:class:`~mlaudit.attacks.federated.Observation`): the clients run
    ``local_steps`` SGD steps at ``lr`` (the server configured both), so client u returns
    w_u = w - lr * local_steps * g_u (exactly, for one FedSGD step; g_u their average gradient otherwise), and
    FedAvg's result is w' = sum_u (n_u / N) w_u. ``target="clients"``: each client's own update,
    g_u = (w - w_u) / (lr * local_steps) with ``users = 1`` and ``batch = n_u`` (a server without secure
    aggregation). ``target="aggregate"``: sum_u g_u = U (w - w') / (lr * local_steps) with ``users = U`` and
    ``batch = N / U`` (exact when the clients hold equal batches; FedAvg weights by n_u). ``both``: both. The
    attack runs on a copy of the model holding the parameters that were sent (where the gradients were taken).
    Results accumulate in :attr:`rounds` ({round: :class:`CuriousRound`}).

    ``attack=None``: the server only records what it saw (:attr:`CuriousRound.observations`) and the caller
    inverts it (as the ``federated`` kind does, with the attack code of its simulated rounds);
    ``keep_parameters``: keep each round's sent parameters (:attr:`CuriousRound.sent`); ``train_mode``: the
    clients' forward mode, recorded in the observations. :attr:`latest` holds the last aggregate (the global
    model's state after the last round).

    ``aggregator``: a :class:`TrustedAggregator` clips the clients' updates (and adds noise: once to their sum
    with ``target="aggregate"``, to each update with ``target="clients"``) before the server sees them; the
    observations are then those clipped (noised) updates and the global model steps on their sum."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], *, lr: float, local_steps: int = 1,
                 attack: str | None = "inverting-gradients", options: dict[str, Any] | None = None,
                 target: Target = "aggregate", min_clients: int = 2, train_mode: bool = False,
                 keep_parameters: bool = False, aggregator: TrustedAggregator | None = None, **fedavg: Any) -> None:
        if min_clients < 1:
            raise ConfigError(f"min_clients = {min_clients}; allowed min_clients >= 1")
        if not lr > 0 or local_steps < 1:
            raise ConfigError(f"CuriousStrategy needs the clients' lr > 0 and local_steps >= 1, got lr={lr}, "
                              f"local_steps={local_steps}")
        _check_target("CuriousStrategy", target, aggregator)
        self.aggregator = aggregator
        # an unknown name: ConfigError listing the registered ones
        self.attack = FEDERATED_ATTACKS.get(attack) if attack is not None else None
        self.attack_name, self.options = attack, dict(options or {})
        self.train_mode, self.keep_parameters = train_mode, keep_parameters
        self.latest: list[np.ndarray] | None = None
        self._started: dict[int, float] = {}
        self.model = copy.deepcopy(model).cpu()
        self.input_shape, self.lr, self.local_steps, self.target = tuple(input_shape), lr, local_steps, target
        self._keys = list(self.model.state_dict())
        self._params = [(n, self._keys.index(n), p.dtype) for n, p in self.model.named_parameters()]
        self._sent: dict[int, list[np.ndarray]] = {}
        self.rounds: dict[int, CuriousRound] = {}
        fedavg.setdefault("fraction_evaluate", 0.0)
        super().__init__(min_fit_clients=min_clients, min_available_clients=min_clients,
                         initial_parameters=ndarrays_to_parameters(_arrays(self.model)), **fedavg)

    def client_model(self) -> nn.Module:
        """A copy of the user's model: what the server distributes, unchanged."""
        return copy.deepcopy(self.model)

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        self._sent[server_round] = _to_arrays(parameters)
        self._started[server_round] = time.perf_counter()
        return super().configure_fit(server_round, parameters, client_manager)

    def _grad(self, sent: list[np.ndarray], got: list[np.ndarray], factor: float) -> ParamVector:
        """factor * (sent - got) / (lr * local_steps) per parameter, in the parameter's dtype."""
        scale = factor / (self.lr * self.local_steps)
        return ParamVector({n: (scale * torch.from_numpy(sent[i].astype(np.float64) - got[i].astype(np.float64)))
                            .to(dtype) for n, i, dtype in self._params})

    def aggregate_fit(self, server_round: int, results: list[Any], failures: list[Any]) -> Any:
        seconds = time.perf_counter() - self._started.pop(server_round, time.perf_counter())
        results = _in_client_order(results)
        params, metrics = super().aggregate_fit(server_round, results, failures)
        sent = self._sent.pop(server_round, None)
        if params is None or sent is None or not results:
            return params, metrics
        self.latest = _to_arrays(params)
        trusted: tuple[ParamVector, list[ParamVector]] | None = None
        noise_state = None
        if self.aggregator is not None:  # the server sees the clipped (noised) updates; the model steps on their sum
            self.latest, total, each, noise_state = self.aggregator.aggregate(
                self.model, sent, self.latest, [r for _, r in results], lr=self.lr, local_steps=self.local_steps,
                per_client=self.target == "clients")
            params = ndarrays_to_parameters(self.latest)
            dtypes = {n: dtype for n, _, dtype in self._params}
            trusted = (ParamVector({n: t.to(dtypes[n]) for n, t in total.items()}),
                       [ParamVector({n: t.to(dtypes[n]) for n, t in e.items()}) for e in each])
        at = copy.deepcopy(self.model)
        _load(at, sent)
        sizes = [int(r.num_examples) for _, r in results]
        users, examples = len(results), sum(sizes)
        aggregate, per, obs_all = None, [], {}

        def invert(obs: Observation) -> Reconstruction | None:
            return self.attack(at, obs, **self.options) if self.attack is not None else None

        if self.target in ("aggregate", "both"):
            grad = trusted[0] if trusted is not None else self._grad(sent, self.latest, users)
            obs = Observation(grad=grad, users=users, batch=max(examples // users, 1), input_shape=self.input_shape,
                              train_mode=self.train_mode)
            aggregate, obs_all["aggregate"] = invert(obs), obs
        if self.target in ("clients", "both"):
            obs_all["clients"] = []
            for u, ((_, res), n) in enumerate(zip(results, sizes, strict=True)):
                grad = (trusted[1][u] if trusted is not None
                        else self._grad(sent, _to_arrays(res.parameters), 1.0))
                obs = Observation(grad=grad, users=1, batch=max(n, 1), input_shape=self.input_shape,
                                  train_mode=self.train_mode)
                rec = invert(obs)
                if rec is not None:
                    per.append(rec)
                obs_all["clients"].append(obs)
        self.rounds[server_round] = CuriousRound(
            server_round, users, examples, aggregate, per, sizes, obs_all,
            client_metrics=[dict(r.metrics or {}) for _, r in results], sent=sent if self.keep_parameters else None,
            seconds=seconds, noise_state=noise_state)
        return params, metrics


class TorchClient(NumPyClient):
    """A Flower client over a PyTorch model and its local data x [n, *shape], y [n].

    ``fit`` loads the parameters it receives and takes ``local_steps`` SGD steps at ``lr`` on the mean
    cross-entropy (one step: FedSGD) over all its data, or with ``batch`` over a fresh draw of ``batch``
    examples per round (seeded by ``seed`` and the round count; the rows drawn are kept in
    :attr:`drawn`), returning the new state and the number of examples used. ``dtype`` is what goes back
    over the wire (float32, as a PyTorch model sends). ``schedule``: the rows of x to use in each of the
    client's rounds (``schedule[r - 1]`` in its r-th fit), in place of ``batch``'s draw. ``train_mode``: the
    forward mode of its FedSGD gradients (BatchNorm's batch statistics; the running ones are not updated).

    FedAvg: with ``epochs`` the client instead trains ``epochs`` local epochs of SGD at ``lr`` in minibatches of
    ``local_batch`` (None: all the round's rows) through :func:`mlaudit.federated.round_updates`, the training
    loop of the simulated FedAvg rounds (train mode; its data order seeded by
    :func:`~mlaudit.federated.updates.local_seed` of ``seed`` and the round), and sends its new weights and
    buffers; its update in gradient units is then (w_received - w_trained) / (lr * steps).

    ``defence``: :func:`~mlaudit.federated.defences.defend_updates`'s options (``method`` and its ``sigma``,
    ``clip``, ``prune``, ``bits``), applied to the update the client shares, in gradient units as in the
    ``federated`` kind's ``defence:`` block: g = (w_received - w_trained) / (lr * local_steps) is defended
    and the client returns w_received - lr * local_steps * g' (noise drawn from
    :func:`~mlaudit.federated.defences.client_generator` of ``seed``). ``keep_updates``: keep each round's
    (g, g') in :attr:`kept` (gradient units, {name: [*shape]}). ``client_id``: reported in the fit metrics
    (``{"client_id": ...}``), so a server can tell the clients' results apart."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, *, lr: float = 0.1, local_steps: int = 1,
                 batch: int | None = None, seed: int = 0, dtype: torch.dtype = torch.float32,
                 defence: dict[str, Any] | None = None, epochs: int | None = None, local_batch: int | None = None,
                 schedule: Sequence[Tensor] | None = None, train_mode: bool = False, classes: int | None = None,
                 client_id: int | None = None, keep_updates: bool = False) -> None:
        if len(x) == 0:
            raise ConfigError("a Flower client has no data (x is empty); allowed: at least one example per user")
        if lr <= 0 or local_steps < 1:
            raise ConfigError(f"TorchClient needs lr > 0 and local_steps >= 1, got lr={lr}, local_steps={local_steps}")
        if batch is not None and not 1 <= batch <= len(x):
            raise ConfigError(f"TorchClient batch = {batch}; allowed 1 <= batch <= {len(x)} (the client's examples)")
        if epochs is not None and (epochs < 1 or local_steps != 1):
            raise ConfigError(f"TorchClient epochs = {epochs} (FedAvg local epochs) with local_steps = {local_steps}; "
                              "allowed: epochs >= 1 with local_steps 1 (the steps then follow from epochs and "
                              "local_batch)")
        if local_batch is not None and (epochs is None or local_batch < 1):
            raise ConfigError(f"TorchClient local_batch = {local_batch}; allowed: local_batch >= 1 with epochs")
        if schedule is not None and (batch is not None or any(int(r.min()) < 0 or int(r.max()) >= len(x)
                                                               for r in schedule if len(r))):
            raise ConfigError(f"TorchClient schedule: allowed rows in [0, {len(x)}) of x, without batch")
        self.model, self.x, self.y = model, x, y
        self.lr, self.local_steps, self.batch, self.seed, self.dtype = lr, local_steps, batch, seed, dtype
        self.epochs, self.local_batch, self.train_mode, self.classes = epochs, local_batch, train_mode, classes
        self.schedule = list(schedule) if schedule is not None else None
        self.client_id, self.keep_updates = client_id, keep_updates
        self.drawn: list[Tensor] = []
        self.kept: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = []
        self.defence = dict(defence) if defence else None
        self._noise = client_generator(seed)
        if self.defence is not None:  # bad options fail here, before any round: try them on a zero update
            allowed = {"method", "sigma", "clip", "prune", "bits"}
            if "method" not in self.defence or set(self.defence) - allowed:
                raise ConfigError(f"TorchClient defence = {self.defence}; allowed keys: {', '.join(sorted(allowed))} "
                                  "with 'method' required")
            defend_updates({"w": torch.ones(1, 2)}, generator=torch.Generator(), **self.defence)

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        return _arrays(self.model)

    def _rows(self) -> Tensor:
        r = len(self.drawn)
        if self.schedule is not None:
            if r >= len(self.schedule):
                raise ConfigError(f"TorchClient schedule has {len(self.schedule)} rounds; asked for round {r + 1}")
            return self.schedule[r]
        if self.batch is not None:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + r)
            return torch.randperm(len(self.x), generator=gen)[: self.batch]
        return torch.arange(len(self.x))

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict]:
        _load(self.model, parameters)
        rows = self._rows()
        self.drawn.append(rows)
        x, y = self.x[rows], self.y[rows]
        owned = dict(self.model.named_parameters())
        start = {k: p.detach().clone() for k, p in owned.items()}
        if self.epochs is not None:  # FedAvg: the simulated rounds' local training, this one user
            res = round_updates(self.model, x[None], y[None], protocol="fedavg", lr=self.lr, epochs=self.epochs,
                                batch_size=self.local_batch, seeds=[local_seed(self.seed, len(self.drawn))],
                                device="cpu", classes=self.classes)
            step = self.lr * res.steps
            plain = {k: v[0] for k, v in res.updates.items()}
            buffers = dict(self.model.named_buffers())
            with torch.no_grad():
                for k, b in (res.buffers or {}).items():
                    buffers[k].copy_(b[0])
        else:
            summed: dict[str, Tensor] = {}
            for _ in range(self.local_steps):
                g = user_gradients(self.model, x[None], y[None], train_mode=self.train_mode)
                with torch.no_grad():
                    for k, v in g.items():
                        owned[k].sub_(self.lr * v[0])
                        summed[k] = summed[k] + v[0] if k in summed else v[0].clone()
            step = self.lr * self.local_steps
            # the update in gradient units: the gradients themselves (exact), not (w - w') / step of float32 weights
            plain = {k: summed[k] / self.local_steps if k in summed else torch.zeros_like(p) for k, p in owned.items()}
        shared = plain
        if self.defence is not None:
            defended = defend_updates({k: v[None] for k, v in plain.items()}, generator=self._noise, **self.defence)
            shared = {k: v[0] for k, v in defended.items()}
        if self.defence is not None or self.epochs is not None:
            with torch.no_grad():
                for k, v in shared.items():
                    owned[k].copy_(start[k] - step * v)
        if self.keep_updates:
            self.kept.append((plain, shared))
        out = [t.detach().to(self.dtype).cpu().numpy().copy() if t.is_floating_point() else t.detach().cpu().numpy()
               for t in self.model.state_dict().values()]
        return out, len(rows), ({"client_id": self.client_id} if self.client_id is not None else {})

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[float, int, dict]:
        return 0.0, len(self.x), {}


def _wait_listening(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no Flower server listening on {host}:{port} after {timeout:.0f} s") from None
            time.sleep(0.05)


def _check_run(strategy: ImprintStrategy | CuriousStrategy, clients: list[NumPyClient], rounds: int) -> None:
    """What both runners refuse before anything starts: no rounds, fewer clients than the strategy waits for."""
    if rounds < 1:
        raise ConfigError(f"rounds = {rounds}; allowed rounds >= 1")
    if len(clients) < strategy.min_fit_clients:
        raise ConfigError(f"{len(clients)} clients for a strategy waiting for min_clients = "
                          f"{strategy.min_fit_clients}; allowed: at least that many clients")


def run_flower_audit(strategy: ImprintStrategy | CuriousStrategy, clients: list[NumPyClient], *, rounds: int = 1,
                     host: str = "127.0.0.1", port: int | None = None, allow_remote: bool = False,
                     timeout: float = 300.0) -> FlowerAudit:
    """Run ``strategy`` for ``rounds`` rounds with ``clients`` (each in its own thread, over gRPC to
    ``host``:``port``; a free port when None) and return the per-round reconstructions."""
    check_address(host, allow_remote=allow_remote)
    _check_run(strategy, clients, rounds)
    if port is None:
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    errors: list[BaseException] = []

    def client_thread(c: NumPyClient) -> None:
        try:
            _wait_listening(host, port, timeout)  # a client that dials before the server listens dies
            start_client(server_address=address, client=_serialised(c.to_client()), insecure=True,
                         max_wait_time=timeout)
        except BaseException as e:  # noqa: BLE001 - surfaced after the server returns
            errors.append(e)

    threads = [threading.Thread(target=client_thread, args=(c,), daemon=True) for c in clients]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    history = start_server(server_address=address, config=ServerConfig(num_rounds=rounds, round_timeout=timeout),
                           strategy=strategy)
    for t in threads:
        t.join(timeout=30)
    if errors:
        raise RuntimeError(f"{len(errors)} Flower client(s) failed: {errors[0]!r}") from errors[0]
    return FlowerAudit(dict(strategy.rounds), history, time.perf_counter() - t0)


def run_flower_simulation(strategy: ImprintStrategy | CuriousStrategy, clients: list[NumPyClient], *, rounds: int = 1,
                          num_cpus: int | None = None, client_cpus: float = 1.0) -> FlowerAudit:
    """Run ``strategy`` for ``rounds`` rounds with ``clients`` in Flower's simulation engine: a ``ServerApp`` holding
    the strategy and a ``ClientApp`` whose supernode ``partition-id`` k plays ``clients[k]``, through
    ``flwr.simulation.run_simulation`` on a local Ray cluster of ``num_cpus`` (None: every core), ``client_cpus``
    per client. Returns the per-round results as :func:`run_flower_audit` does (``history`` None: the engine
    returns none).

    The strategy runs in this process, so its reconstructions are read as usual; each client runs on a copy in a
    Ray actor, so what a client keeps (``TorchClient.kept``, ``drawn``) stays there. A client that fails is a
    failure Flower logs, not an exception; a round without results raises RuntimeError here. (Flower 1.42 marks
    ``run_simulation`` deprecated in favour of ``flwr run``, which runs a packaged app from the command line.)"""
    _check_run(strategy, clients, rounds)
    if not client_cpus > 0:
        raise ConfigError(f"client_cpus = {client_cpus}; allowed client_cpus > 0")
    from flwr.client import ClientApp
    from flwr.server import ServerApp, ServerAppComponents
    from flwr.simulation import run_simulation

    def server_fn(context: Any) -> Any:
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds))

    def client_fn(context: Any) -> Any:
        return clients[int(context.node_config["partition-id"])].to_client()  # one process per actor: no wire lock

    cpus = num_cpus or os.cpu_count() or 1
    t0 = time.perf_counter()
    run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
                   num_supernodes=len(clients),
                   backend_config={"client_resources": {"num_cpus": client_cpus},
                                   "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": False}})
    missing = [r for r in range(1, rounds + 1) if r not in strategy.rounds]
    if missing:
        raise RuntimeError(f"Flower's simulation engine returned no aggregate for round(s) {missing}: every client "
                           "failed (see Flower's log above; a client whose model is not the server's fails on load)")
    return FlowerAudit(dict(strategy.rounds), None, time.perf_counter() - t0)


__all__ = ["CuriousRound", "CuriousStrategy", "FlowerAudit", "ImprintStrategy", "RoundResult", "TorchClient",
           "TrustedAggregator", "check_address", "flwr", "run_flower_audit", "run_flower_simulation"]


def _check_target(strategy: str, target: str, aggregator: TrustedAggregator | None) -> None:
    """A strategy's ``target`` (whose updates the attack reads: the aggregate, each client's, or both) is known,
    and an aggregator's noise is not asked to go on both the sum and each update."""
    if target not in ("aggregate", "clients", "both"):
        raise ConfigError(f"{strategy} target = {target!r}; allowed: aggregate, clients, both")
    if aggregator is not None and aggregator.noise_multiplier > 0 and target == "both":
        raise ConfigError(f"{strategy} target = 'both' with an aggregator's noise: the noise goes once on the sum "
                          "(target 'aggregate', a secure aggregator) or on each client's update (target 'clients'); "
                          "allowed: one of those targets, or noise_multiplier 0")
