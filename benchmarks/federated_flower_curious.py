"""An honest-but-curious Flower server (issue 20: Inverting Gradients through Flower, with client defences):
:class:`mlaudit.federated.flower.CuriousStrategy` against :class:`TorchClient` s over gRPC on 127.0.0.1, next to
the same attack on the same users' updates computed in process.

    python benchmarks/federated_flower_curious.py          # digits MLP, CPU (about a minute)

Settings: digits, the zoo's ``mlp`` (width 32) at initialisation, FedSGD (one local step, lr 0.1), ``users``
clients holding one training image each (seeded draw). The server inverts each client's own update (no secure
aggregation; Inverting Gradients, 300 steps, labels recovered from the last layer) and the FedAvg aggregate
(the sum of the users' gradients, what secure aggregation leaves it). Each client applies one defence to the
update it shares (``TorchClient(defence=...)``, in gradient units); the in-process column applies
:func:`mlaudit.federated.defences.defend_updates` with the same options to the same users' gradients (its noise
from another generator). Recovered: PSNR >= 30 dB after the one-to-one match of candidates to true images.
Writes benchmarks/results/federated_flower_curious_digits_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import cpu_environment, cpu_name, write_results  # noqa: E402

from mlaudit.attacks.federated import Observation, inverting_gradients, match  # noqa: E402
from mlaudit.data import load_dataset  # noqa: E402
from mlaudit.federated import secure_aggregate, user_gradients  # noqa: E402
from mlaudit.federated.defences import defend_updates  # noqa: E402
from mlaudit.federated.flower import CuriousStrategy, TorchClient, run_flower_audit  # noqa: E402
from mlaudit.models import build_model  # noqa: E402
from mlaudit.query import ParamVector  # noqa: E402

DEFENCES: dict[str, dict[str, Any] | None] = {
    "none": None, "noise sigma 0.01": {"method": "noise", "sigma": 0.01}, "prune 0.5": {"method": "prune", "prune": 0.5},
    "prune 0.9": {"method": "prune", "prune": 0.9}, "quantise 8 bits": {"method": "quantise", "bits": 8},
    "quantise 2 bits": {"method": "quantise", "bits": 2}}


def score(true: torch.Tensor, candidates: torch.Tensor) -> dict[str, float]:
    m = match(true, candidates.float(), data_range=1.0)
    return {"recovered": int(m.recovered(30.0).sum()), "of": len(true),
            "median_psnr": float(statistics.median(m.psnr.nan_to_num(0.0).tolist()))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--defences", default=",".join(DEFENCES))
    ap.add_argument("--name", default="federated_flower_curious_digits_cpu")
    args = ap.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    data = load_dataset({"name": "digits"})
    g = torch.Generator().manual_seed(args.seed)
    rows = torch.randperm(len(data.train), generator=g)[: args.users]
    xs, ys = data.train.x[rows], data.train.y[rows]
    torch.manual_seed(args.seed)
    model = build_model({"name": "mlp", "width": 32}, input_shape=data.input_shape, num_classes=data.num_classes)
    shape = tuple(data.input_shape)
    options = {"steps": args.steps}
    out = []
    t_all = time.perf_counter()
    for name in args.defences.split(","):
        defence = DEFENCES[name]
        t0 = time.perf_counter()
        strategy = CuriousStrategy(model, shape, lr=0.1, target="both", min_clients=args.users, options=options)
        clients = [TorchClient(strategy.client_model(), xs[u:u + 1], ys[u:u + 1], lr=0.1, seed=u, defence=defence)
                   for u in range(args.users)]
        r = run_flower_audit(strategy, clients, rounds=1).rounds[1]
        flower_s = time.perf_counter() - t0
        assert r.aggregate is not None
        flower = {"clients": score(xs, torch.cat(r.clients_x)), "aggregate": score(xs, r.aggregate.x)}
        # the same users in process: each one's own (defended) gradient, and their sum
        grads = user_gradients(model, xs.view(args.users, 1, *shape), ys.view(args.users, 1))
        if defence is not None:
            grads = defend_updates(grads, generator=torch.Generator().manual_seed(10_000 + args.seed), **defence)
        own = [inverting_gradients(model, Observation(ParamVector({k: v[u] for k, v in grads.items()}), users=1,
                                                      batch=1, input_shape=shape), **options).x
               for u in range(args.users)]
        agg = inverting_gradients(model, Observation(secure_aggregate(grads), users=args.users, batch=1,
                                                     input_shape=shape), **options).x
        simulated = {"clients": score(xs, torch.cat(own)), "aggregate": score(xs, agg)}
        out.append({"defence": name, "options": defence, "flower": flower, "in_process": simulated,
                    "flower_seconds": flower_s})
        print(out[-1], flush=True)
    res = {"environment": cpu_environment(1, data="digits (sklearn, 8x8)"), "cpu": cpu_name(), "settings": vars(args),
           "rows": out, "seconds": time.perf_counter() - t_all}
    write_results(args.name, res, table(res))
    print(table(res))


def table(res: dict[str, Any]) -> str:
    env, st = res["environment"], res["settings"]

    def cell(v: dict[str, float]) -> str:
        return f"{v['recovered']}/{v['of']}, {v['median_psnr']:.1f} dB"

    lines = ["# An honest-but-curious Flower server: Inverting Gradients through Flower, with client defences", "",
             f"{env['date']}, CPU ({res['cpu']}), torch {env['torch']}; digits (8x8), zoo `mlp` width 32 at "
             f"initialisation, FedSGD lr 0.1; {st['users']} clients with one training image each (seed {st['seed']}); "
             f"Inverting Gradients {st['steps']} steps, labels recovered; float32 weights on the wire. Each cell: "
             "images recovered (PSNR >= 30 dB after a one-to-one match) and the median PSNR. Per client: the server "
             "inverts each client's own update (no secure aggregation); aggregate: the FedAvg result (the sum of "
             "the gradients). In process: the same attack on the same users' gradients, defended by "
             "`defend_updates` with the same options.", "",
             "| client defence | Flower, per client | in process, per client | Flower, aggregate | in process, aggregate |",
             "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['defence']} | {cell(r['flower']['clients'])} | {cell(r['in_process']['clients'])} | "
                     f"{cell(r['flower']['aggregate'])} | {cell(r['in_process']['aggregate'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
