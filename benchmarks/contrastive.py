"""Carlini & Terzis (ICLR 2022) on a small CLIP-style model: success vs number of poisons for targeted
poisoning and the patch backdoor (the ``contrastive`` experiment kind, docs/contrastive.md).

    python benchmarks/contrastive.py                                    # digits, CPU (about a minute)
    python benchmarks/contrastive.py --dataset cifar10 --device cuda    # CIFAR-10 (JPEG) pack, one GPU
    python benchmarks/contrastive.py --dataset cifar10 --limit 512 --epochs 1 --trials 1   # CPU smoke test

Each point is ``trials`` dual encoders trained from scratch (paired seeds across counts; count 0 = clean
models). Writes benchmarks/results/contrastive_<dataset>_<device>.{json,md} (with --limit: ..._limit<N>).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import cifar10_pack, cpu_name, environment, pct, run_each, write_results  # noqa: E402

CC3M = 3_000_000
"""Training pairs of Conceptual Captions 3M, the paper's main dataset."""
SETTINGS: dict[str, dict[str, Any]] = {
    "digits": {"model": "mlp", "encoder": {"embed_dim": 64, "text_layers": 0}, "epochs": 20, "batch_size": 128,
               "targeted": [1, 2, 4, 8, 16], "backdoor": [1, 2, 4, 8, 16, 32, 64], "trials": {"targeted": 5,
                                                                                               "backdoor": 3}},
    "cifar10": {"model": "fastcnn", "encoder": {"embed_dim": 128, "text_layers": 1, "text_width": 128},
                "epochs": 6, "batch_size": 512, "targeted": [1, 2, 4, 8, 16], "backdoor": [10, 25, 50, 100, 250],
                "trials": {"targeted": 2, "backdoor": 2}},
}


def config(args: argparse.Namespace, method: str) -> dict[str, Any]:
    s = SETTINGS[args.dataset]
    ds: dict[str, Any] = {"name": "digits"} if args.dataset == "digits" else {"name": "cifar10", "root": cifar10_pack()}
    if args.limit:
        ds |= {"limit_train": args.limit, "limit_test": max(64, args.limit // 4)}
    return {"kind": "contrastive", "name": f"contrastive-{method}-{args.dataset}", "dataset": ds, "model": s["model"],
            "encoder": s["encoder"],
            "recipe": {"optimizer": "adam", "lr": 0.002, "weight_decay": 0.0, "epochs": args.epochs or s["epochs"],
                       "batch_size": s["batch_size"], "schedule": "cosine", "augment": "none"},
            "attack": {"method": method, "poisons": s[method], "trials": args.trials or s["trials"][method],
                       "target_class": None if method == "targeted" else 0,
                       "trigger": {"type": "patch", "size": 2 if args.dataset == "digits" else 3,
                                   "location": "bottom-right", "pattern": "checkerboard"}},
            "seed": 0}


def table(results: dict[str, Any]) -> str:
    lines = [f"# Carlini & Terzis (2022) on a small CLIP-style model: {results['dataset']}",
             "", f"{results['environment']['date']}, {results['device']} ({results['cpu'] if results['device'] == 'cpu' else results['environment']['gpu']}), "
             f"torch {results['environment']['torch']}; {results['seconds']:.0f} s in all.", ""]
    for method, r in results["attacks"].items():
        n = r["train_pairs"]
        succ = "x* classified as target" if method == "targeted" else "attack success rate"
        z = all("z_score" in c for c in r["curve"])
        lines += [f"## {method} ({r['trials']} model(s) per row, {n} training pairs, {r['seconds']:.0f} s)", "",
                  f"| poisons | rate | same rate on CC3M (3M pairs) | {succ} | rank of target | "
                  + ("backdoor z-score | " if z else "") + "clean zero-shot acc |",
                  "|---:|---:|---:|---:|---:|" + ("---:|" if z else "") + "---:|"]
        for c in r["curve"]:
            zs = f"{c['z_score']['mean']:.2f} ± {c['z_score']['se']:.2f} | " if z else ""
            lines.append(f"| {c['poisons']} | {100 * c['rate']:.3g}% | {c['rate'] * CC3M:,.0f} | "
                         f"{pct(c['success'])} | {c['target_rank']['mean']:.2f} | {zs}"
                         f"{pct(c['zero_shot_accuracy'])} |")
        lines.append("")
    lines.append("Row 0 = clean models. Settings: " + ", ".join(f"{k}={v}" for k, v in results["settings"].items()))
    if any("z_score" in c for r in results["attacks"].values() for c in r["curve"]):
        lines.append("\nBackdoor z-score (Carlini & Terzis 2022, `mlaudit.contrastive.backdoor_z_score`): the mean pairwise "
                     "cosine similarity of the triggered non-target test images' embeddings minus that of the same images "
                     "clean, over the clean pairs' standard deviation; mean ± SE over the models of a row.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=sorted(SETTINGS), default="digits")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--limit", type=int, default=None, help="keep this many training pairs (quick checks)")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--trials", type=int, default=None)
    ap.add_argument("--attacks", nargs="+", choices=["targeted", "backdoor"], default=["targeted", "backdoor"])
    ap.add_argument("--workdir", default=None, help="keep runs here (a rerun resumes them)")
    ap.add_argument("--tag", default="", help="appended to the results' file name (a partial run beside a full one)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    out: dict[str, Any] = {"dataset": args.dataset, "device": args.device, "cpu": cpu_name(),
                           "environment": {**environment(), "data": args.dataset}, "attacks": {}}
    configs = {method: config(args, method) for method in args.attacks}
    for method, res, seconds in run_each(configs, workdir_path=args.workdir, device=args.device):
        m, c = res["metrics"], configs[method]
        out["attacks"][method] = {"curve": m["curve"], "train_pairs": m["train_pairs"],
                                  "trials": c["attack"]["trials"], "seconds": seconds, "config": c}
        _write(args, out, t0)  # after every method, so a run cut short keeps what it finished


def _write(args: argparse.Namespace, out: dict[str, Any], t0: float) -> None:
    out["seconds"] = time.perf_counter() - t0
    s = SETTINGS[args.dataset]
    out["settings"] = {"model": s["model"], **s["encoder"], "epochs": args.epochs or s["epochs"],
                       "batch_size": s["batch_size"], "limit": args.limit, "torch_threads": torch.get_num_threads()}
    dev = "cuda" if args.device.startswith("cuda") else args.device
    name = f"contrastive_{args.dataset}_{dev}" + (f"_limit{args.limit}" if args.limit else "") + args.tag
    write_results(name, out, table(out))


if __name__ == "__main__":
    main()
