"""Robbing the Fed through Flower (issue 20, deliverable 6): the malicious ImprintStrategy against
TorchClients over gRPC on 127.0.0.1, FedSGD, the server reading only the FedAvg aggregate.

    python benchmarks/federated_flower.py              # digits MLP, CPU (about a minute)

Per (users, batch, bins): ``rounds`` Flower rounds, each user holding one draw of ``batch`` training
images (the public 600 excluded) for all rounds; per round the fraction of the round's inputs recovered verbatim (PSNR >= 80 dB after the
one-to-one match), above 30 dB, and the fraction alone in its bin (the arithmetic's ceiling); float32
weights on the wire, the imprint planted with scale 1e-3 (and scale 1, to show why). Writes
benchmarks/results/federated_flower_digits_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import cpu_name, environment, write_results  # noqa: E402

from mlaudit.attacks.federated import match  # noqa: E402
from mlaudit.data import load_dataset  # noqa: E402
from mlaudit.federated.flower import ImprintStrategy, TorchClient, run_flower_audit  # noqa: E402
from mlaudit.models import build_model  # noqa: E402


def _setup(data: Any, users: int, per_user: int, bins: int, scale: float, measurement: str, seed: int
           ) -> tuple[ImprintStrategy, torch.Tensor]:
    """The malicious strategy around an MLP at initialisation (the first 600 training images are the
    server's public data) and each user's images: row indices [users, per_user] drawn from the rest."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.arange(600, len(data.train))
    torch.manual_seed(seed)
    model = build_model("mlp", input_shape=data.input_shape, num_classes=data.num_classes)
    strategy = ImprintStrategy(model, data.train.x[:600], bins=bins, min_clients=users, scale=scale,
                               measurement=measurement, generator=torch.Generator().manual_seed(seed))
    return strategy, pool[torch.randperm(len(pool), generator=g)[: users * per_user]].view(users, per_user)


def one(data: Any, users: int, batch: int, bins: int, scale: float, measurement: str, rounds: int,
        seed: int) -> dict[str, Any]:
    x, y = data.train.x, data.train.y
    strategy, draws = _setup(data, users, batch, bins, scale, measurement, seed)
    # one draw per user, kept over the rounds (a user's local batch), so round r re-reveals it
    clients = [TorchClient(strategy.client_model(), x[d], y[d], lr=0.1) for d in draws]
    out = run_flower_audit(strategy, clients, rounds=rounds)
    true = x[draws.flatten()]
    bins_of = strategy.malicious.bin_of(true)
    alone = float((torch.bincount(bins_of + 1, minlength=bins + 1)[bins_of + 1] == 1).float().mean())
    per_round = []
    for r, res in sorted(out.rounds.items()):
        m = match(true, res.reconstruction.x.float(), data_range=1.0)
        per_round.append({"round": r, "candidates": len(res.reconstruction.x),
                          "exact": float(m.recovered(80.0).float().mean()),
                          "psnr30": float(m.recovered(30.0).float().mean())})
    return {"users": users, "batch": batch, "bins": bins, "scale": scale, "measurement": measurement,
            "inputs": users * batch,
            "alone": alone, "rounds": per_round, "seconds": out.seconds}


def rounds_run(data: Any, users: int, local: int, batch: int, bins: int, rounds: int, seed: int) -> dict[str, Any]:
    """Several rounds, each user drawing a fresh batch from its ``local`` images every round: per round the
    fraction of that round's inputs recovered verbatim, and the cumulative fraction of all the users'
    local images recovered verbatim at least once."""
    x, y = data.train.x, data.train.y
    strategy, owned = _setup(data, users, local, bins, 1e-3, "random", seed)
    clients = [TorchClient(strategy.client_model(), x[o], y[o], lr=0.1, batch=batch, seed=seed + u)
               for u, o in enumerate(owned)]
    out = run_flower_audit(strategy, clients, rounds=rounds)
    seen: set[tuple[int, int]] = set()
    per_round = []
    for r, res in sorted(out.rounds.items()):
        who = [(u, int(i)) for u, c in enumerate(clients) for i in c.drawn[r - 1]]
        true = torch.stack([x[owned[u, i]] for u, i in who])
        ok = match(true, res.reconstruction.x.float(), data_range=1.0).recovered(80.0)
        seen |= {w for w, k in zip(who, ok.tolist(), strict=True) if k}
        per_round.append({"round": r, "verbatim": float(ok.float().mean()), "cumulative": len(seen) / (users * local)})
    return {"users": users, "local": local, "batch": batch, "bins": bins, "rounds": per_round, "seconds": out.seconds}


def table(res: dict[str, Any]) -> str:
    env = res["environment"]
    lines = ["# Robbing the Fed through Flower: a malicious ImprintStrategy, FedSGD over gRPC on 127.0.0.1", "",
             f"{env['date']}, CPU ({res['cpu']}), torch {env['torch']}, flwr {res['flwr']}; digits (sklearn 8x8), "
             "MLP at initialisation, lr 0.1, one local step per round; the server reads the FedAvg aggregate only; "
             "float32 weights on the wire. Recovered = matched one-to-one with PSNR >= 80 dB (verbatim) or >= 30 dB.",
             "", "| users x batch | bins | measurement | imprint scale | round | candidates | verbatim | >= 30 dB | alone in a bin | s |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in res["rows"]:
        for r in row["rounds"]:
            lines.append(f"| {row['users']} x {row['batch']} | {row['bins']} | {row['measurement']} | {row['scale']:g} | {r['round']} | "
                         f"{r['candidates']} | {100 * r['exact']:.1f}% | {100 * r['psnr30']:.1f}% | "
                         f"{100 * row['alone']:.1f}% | {row['seconds']:.1f} |")
    lines += ["", "Each user keeps one local batch over the rounds, so every round reveals the same inputs again; "
              "s is the whole Flower run (server, clients, both rounds).", ""]
    m = res["multi"]
    lines += [f"## Several rounds: {m['users']} users, each holding {m['local']} images and drawing {m['batch']} of "
              f"them per round; {m['bins']} bins (random measurement), re-planted every round ({m['seconds']:.1f} s)", "",
              "| round | the round's inputs recovered verbatim | users' local images recovered so far |", "|---:|---:|---:|"]
    lines += [f"| {r['round']} | {100 * r['verbatim']:.1f}% | {100 * r['cumulative']:.1f}% |" for r in m["rounds"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--multi-rounds", type=int, default=8, help="rounds of the several-rounds run")
    args = ap.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    import flwr

    data = load_dataset("digits")
    # digits' brightness takes ~130 distinct values on 600 public images: 256 bins need the random projection
    grid = [(3, 8, 64, 1e-3, "brightness"), (3, 8, 64, 1.0, "brightness"), (10, 8, 64, 1e-3, "brightness"),
            (10, 8, 256, 1e-3, "random"), (10, 32, 256, 1e-3, "random"), (25, 32, 256, 1e-3, "random")]
    t0 = time.perf_counter()
    rows = []
    for users, batch, bins, scale, measurement in grid:
        rows.append(one(data, users, batch, bins, scale, measurement, args.rounds, args.seed))
        print(rows[-1], flush=True)
    multi = rounds_run(data, users=10, local=32, batch=8, bins=256, rounds=args.multi_rounds, seed=args.seed)
    res = {"environment": environment(), "cpu": cpu_name(), "flwr": flwr.__version__, "rows": rows, "multi": multi,
           "seconds": time.perf_counter() - t0, "settings": vars(args)}
    write_results("federated_flower_digits_cpu", res, table(res))
    print(table(res))


if __name__ == "__main__":
    main()
