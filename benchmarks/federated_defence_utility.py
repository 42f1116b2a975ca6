"""The utility side of the client-side federated defences (issue 20, deliverable 5): test accuracy of a global
model trained by FedSGD with each defence on every user's update (:func:`mlaudit.federated.train_fedsgd`), next
to what the same defence does to the attacks (docs/federated.md, "Measured (CPU digits)", same model).

Digits, zoo ``mlp`` width 32 (the model of the attack table), 8 users x 16 images per round, iid shares, lr 0.5,
300 rounds, mean ± SE over seeds; the distortion is the mean ||g' - g|| / ||g|| of the users' updates.

    python benchmarks/federated_defence_utility.py --seeds 3

CIFAR-10 (JPEG) with a zoo CNN on a GPU (data resident on the device; the users' gradients by vmap there):

    python benchmarks/federated_defence_utility.py --dataset cifar10 --model fastcnn --device cuda --rounds 3000 \
        --lr 0.1 --seeds 2 --name cifar10_fastcnn_h200
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cifar10_jpeg, cpu_environment, environment, write_results  # noqa: E402

from mlaudit.data import load_dataset  # noqa: E402
from mlaudit.federated import train_fedsgd  # noqa: E402
from mlaudit.models import build_model  # noqa: E402
from mlaudit.stats import mean_se  # noqa: E402

DEFENCES: list[tuple[str, dict[str, Any] | None]] = [
    ("none", None),
    ("noise sigma 1e-6", {"method": "noise", "sigma": 1e-6}),
    ("noise sigma 1e-4", {"method": "noise", "sigma": 1e-4}),
    ("noise sigma 1e-3", {"method": "noise", "sigma": 1e-3}),
    ("noise sigma 0.01", {"method": "noise", "sigma": 0.01}),
    ("noise sigma 0.1", {"method": "noise", "sigma": 0.1}),
    ("clip-noise clip 1, sigma 0.1", {"method": "clip-noise", "clip": 1.0, "sigma": 0.1}),
    ("prune 0.5", {"method": "prune", "prune": 0.5}),
    ("prune 0.9", {"method": "prune", "prune": 0.9}),
    ("quantise 2 bits", {"method": "quantise", "bits": 2}),
    ("quantise 8 bits", {"method": "quantise", "bits": 8}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dataset", default="digits", choices=("digits", "cifar10"))
    ap.add_argument("--model", default=None, help="zoo model (default: mlp width 32 on digits, fastcnn on cifar10; "
                    "a model without BatchNorm: FedSGD users send gradients at the shared weights, in eval mode)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", default="", help="comma-separated defence labels to run (default: all)")
    ap.add_argument("--name", default="digits_cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    data = (load_dataset("digits") if args.dataset == "digits" else cifar10_jpeg()).to(dev)
    spec: dict[str, Any] = ({"name": "mlp", "width": 32} if args.model is None and args.dataset == "digits"
                            else {"name": args.model or "fastcnn"})
    if args.dataset == "cifar10" and spec["name"] in ("fastcnn", "resnet18"):
        spec["norm"] = "group"  # no batch statistics: every user's gradient is at the same function of its batch
    chosen = [d for d in DEFENCES if not args.only or d[0] in args.only.split(",")]
    t_all = time.perf_counter()
    rows = []
    for label, defence in chosen:
        acc, dist, mid = [], [], []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            model = build_model(spec, input_shape=tuple(data.train.shape), num_classes=10).to(dev)
            h = train_fedsgd(model, data, users=args.users, batch=args.batch, rounds=args.rounds, lr=args.lr,
                             defence=defence, eval_every=max(1, args.rounds // 3), seed=seed)
            acc.append(h.test_accuracy[-1])
            mid.append(h.test_accuracy[0])
            dist.append(float(np.nanmean(h.distortion)) if not np.isnan(h.distortion).all() else float("nan"))
        mean, se = mean_se(acc)
        rows.append({"defence": label, "options": defence, "test_accuracy": mean, "se": se,
                     "accuracy_at_first_third": float(np.mean(mid)),
                     "distortion": float(np.nanmean(dist)) if not np.isnan(dist).all() else float("nan")})
        print(rows[-1], flush=True)
        # written after every row: a run cut short by a time limit keeps the rows it finished
        _write(args, spec, dev, rows, time.perf_counter() - t_all, len(chosen))


def _write(args: argparse.Namespace, spec: dict[str, Any], dev: torch.device, rows: list[dict[str, Any]],
           wall: float, total: int) -> None:
    if dev.type == "cpu":
        env = cpu_environment(args.threads, data="scikit-learn digits" if args.dataset == "digits" else None)
        where = f"{env['machine']}, {args.threads} torch thread(s)"
    else:
        env = environment() | {"data": "scikit-learn digits"} if args.dataset == "digits" else environment()
        where = str(env["gpu"])
    what = "Digits" if args.dataset == "digits" else env["data"]
    part = "" if len(rows) == total else f" **Partial: {len(rows)} of {total} defences finished.**"
    md = (f"# Federated defences: utility of FedSGD training under each ({args.dataset}, {dev.type})\n\n"
          f"{env['date']}, {where}, torch {env['torch']}; {wall:.0f} s in all. {what}, zoo "
          f"`{spec}`, {args.users} users x {args.batch} images per round (iid shares), FedSGD, lr {args.lr}, "
          f"{args.rounds} rounds, the defence on every user's update; mean ± SE over {args.seeds} seeds.{part}\n\n"
          f"| defence | test accuracy after {args.rounds} rounds (%) | after {max(1, args.rounds // 3)} rounds (%) | "
          "distortion ‖g' − g‖/‖g‖ |\n|---|---:|---:|---:|\n")
    for r in rows:
        md += (f"| {r['defence']} | {100 * r['test_accuracy']:.1f} ± {100 * r['se']:.1f} | "
               f"{100 * r['accuracy_at_first_third']:.1f} | {r['distortion']:.3f} |\n")
    if any(np.isnan(r["distortion"]) for r in rows):
        md += "\nnan distortion: every user's gradient was zero in every evaluation window (nothing left to distort).\n"
    write_results(f"federated_defence_utility_{args.name}", {"environment": env, "settings": vars(args), "rows": rows,
                                                             "wall_s": round(wall, 1), "finished": len(rows) == total},
                  md)


if __name__ == "__main__":
    main()
