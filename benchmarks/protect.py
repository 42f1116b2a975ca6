"""Radiya-Dixit, Hong, Carlini & Tramèr (ICLR 2022), "Data Poisoning Won't Save You From Facial
Recognition", on the ``protect`` experiment kind (docs/protect.md): protection rate of Fawkes- and
LowKey-style cloaks against the extractor they attacked, against oblivious trainers (another seed; a
later, wider extractor trained longer) and against an adaptive trainer, with the clean accuracy of each.

    python benchmarks/protect.py                                    # digits, CPU (a few minutes)
    python benchmarks/protect.py --dataset cifar10 --device cuda    # CIFAR-10 (JPEG) classes as identities
    python benchmarks/protect.py --dataset cifar10 --limit 1000 --epochs 1 --steps 2 --users 2   # CPU smoke

Classes stand in for identities (no face dataset ships with a package here); half of them are public
(the extractors' training data), the others are recognised by a logistic-regression classifier on the
extractor's features. Writes benchmarks/results/protect_<dataset>_<device>.{json,md}.
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

SETTINGS: dict[str, dict[str, Any]] = {
    "digits": {"model": "fastcnn", "recipe": {"name": "fast", "epochs": 8},
               "later": {"model": {"name": "fastcnn", "width": 64}, "recipe": {"name": "fast", "epochs": 16}},
               "eps": 32, "steps": 100, "users": 5},
    "cifar10": {"model": "resnet18", "recipe": {"name": "airbench", "epochs": 10},
                "later": {"model": "resnet18", "recipe": {"name": "airbench", "epochs": 20}},
                "eps": 8, "steps": 100, "users": 5,
                # the default probe (batch 64, 30 epochs: ~12k steps on 25k photos, x4 trainers per user) took ~90 s
                # per user on the H200, launch-bound; batch 512 at lr 0.1 is the same convex fit in 8x fewer steps
                "probe": {"name": "custom", "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True,
                          "weight_decay": 5e-4, "epochs": 30, "batch_size": 512, "schedule": "triangular",
                          "warmup_fraction": 0.2, "augment": "none"}},
}
PAPER = ("Radiya-Dixit et al. 2022 (FaceScrub, a linear classifier on the features of a face extractor): Fawkes "
         "and LowKey protect well against the extractor they attacked, but an oblivious trainer with a newer extractor "
         "and an adaptive trainer (robust training on cloaked public photos) recognise most users again; see the paper "
         "for its exact rates, which are not transcribed here.")


def config(args: argparse.Namespace, method: str) -> dict[str, Any]:
    s = SETTINGS[args.dataset]
    ds: dict[str, Any] = {"name": "digits"} if args.dataset == "digits" else {"name": "cifar10", "root": cifar10_pack()}
    if args.limit:
        ds |= {"limit_train": args.limit, "limit_test": max(100, args.limit // 5)}
    recipe = dict(s["recipe"], **({"epochs": args.epochs} if args.epochs else {}))
    later = {**s["later"], "recipe": dict(s["later"]["recipe"], **({"epochs": 2 * args.epochs} if args.epochs else {}))}
    return {"kind": "protect", "name": f"protect-{method}-{args.dataset}", "dataset": ds, "model": s["model"],
            "recipe": recipe, "attack": {"method": method, "eps": args.eps or s["eps"], "steps": args.steps or s["steps"]},
            "users": args.users or s["users"],
            "trainers": [{"name": "attacked", "strategy": "attacked"}, {"name": "oblivious", "strategy": "oblivious"},
                         {"name": "later", "strategy": "oblivious", **later},
                         {"name": "adaptive", "strategy": "adaptive"}],
            **({"probe": s["probe"]} if "probe" in s else {}), "seed": 0}


def table(results: dict[str, Any]) -> str:
    env = results["environment"]
    where = results["cpu"] if results["device"] == "cpu" else env["gpu"]
    lines = [f"# Protective perturbations vs face-recognition trainers: {results['dataset']}", "",
             f"{env['date']}, {results['device']} ({where}), torch {env['torch']}; {results['seconds']:.0f} s in all. "
             "Classes stand in for identities: half are public (the extractors' training data), the other half are "
             "recognised by logistic regression on standardised penultimate features. Protection: the fraction of a "
             "protected user's clean test photos not recognised; baseline: the same without any cloak; mean ± SE "
             "over the protected users.", ""]
    for method, r in results["attacks"].items():
        c = r["config"]
        lines += [f"## {method} (eps {c['attack']['eps']}/255, {c['attack']['steps']} steps; {r['users']} users; "
                  f"{r['models_trained']} extractors trained; {r['seconds']:.0f} s)", "",
                  "| trainer | strategy | extractor | protection | baseline error | clean accuracy |",
                  "|---|---|---|---:|---:|---:|"]
        for name, t in r["trainers"].items():
            lines.append(f"| {name} | {t['strategy']} | {t['model']} | {pct(t['protection'])} | "
                         f"{pct(t['baseline_error'])} | {pct(t['clean_accuracy'])} |")
        lines.append("")
    lines += ["Trainers: attacked = the extractor the cloak was crafted against; oblivious = same architecture and "
              "recipe, another seed; later = the `later` extractor of the settings below (trained independently, "
              "after the users cloaked); adaptive = trained on the public photos plus their cloaked copies.", "",
              PAPER, "", "Settings: " + ", ".join(f"{k}={v}" for k, v in results["settings"].items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=sorted(SETTINGS), default="digits")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", nargs="+", choices=["fawkes", "lowkey"], default=["fawkes", "lowkey"])
    ap.add_argument("--eps", type=float, default=None, help="l-inf budget in pixel levels of 255")
    ap.add_argument("--users", type=int, default=None)
    ap.add_argument("--limit", type=int, default=None, help="keep this many training images (smoke tests)")
    ap.add_argument("--steps", type=int, default=None, help="cloak optimisation steps")
    ap.add_argument("--epochs", type=int, default=None, help="extractor epochs (the later one: twice as many)")
    ap.add_argument("--workdir", default=None, help="keep runs here (a rerun resumes them)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    out: dict[str, Any] = {"dataset": args.dataset, "device": args.device, "cpu": cpu_name(),
                           "environment": {**environment(), "data": args.dataset}, "attacks": {}}
    configs = {method: config(args, method) for method in args.methods}
    for method, res, seconds in run_each(configs, workdir_path=args.workdir, device=args.device):
        m = res["metrics"]
        out["attacks"][method] = {"trainers": m["trainers"], "users": m["users"],
                                  "recognised_identities": m["recognised_identities"],
                                  "feature_shift": m["feature_shift"], "models_trained": res["cost"]["models_trained"],
                                  "seconds": seconds, "config": configs[method]}
        _write(args, out, t0)  # after every method, so a run cut short keeps what it finished


def _write(args: argparse.Namespace, out: dict[str, Any], t0: float) -> None:
    out["seconds"] = time.perf_counter() - t0
    s = SETTINGS[args.dataset]
    out["settings"] = {"model": s["model"], "recipe": s["recipe"], "later": s["later"], "epochs_override": args.epochs,
                       "steps": args.steps or s["steps"], "limit": args.limit, "torch_threads": torch.get_num_threads()}
    dev = "cuda" if args.device.startswith("cuda") else args.device
    suffix = f"_limit{args.limit}" if args.limit else ""
    write_results(f"protect_{args.dataset}_{dev}{suffix}", out, table(out))


if __name__ == "__main__":
    main()
