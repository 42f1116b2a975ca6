"""RMIA and BASE vs LiRA with few and many reference models (issue 19), on one `membership-inference` pool.

Runs the kind once (pool training, every configured attack with its defaults, incl. the label-only
ones), then rescores the saved pool logits (artifacts/logits.pt: pool and population) with RMIA, BASE and
LiRA at 1, 2, 4 and all reference models per example, each through the one ``roc_metrics``.

    python benchmarks/membership_rmia.py --device cpu --models 64 --name digits_cpu
    python benchmarks/membership_rmia.py --device cuda --config benchmarks/configs/cifar10_membership_256_airbench.yaml \
        --attacks loss,shokri,lira-online,lira-offline,rmia-online,rmia-offline,base-online,base-offline,label-augment \
        --name cifar10_airbench_256_h200

Writes benchmarks/results/membership_rmia_<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

from mlaudit.attacks.membership import ATTACKS, Observations, score_all_targets  # noqa: E402
from mlaudit.errors import ConfigError  # noqa: E402
from mlaudit.experiments import run_experiment  # noqa: E402
from mlaudit.experiments.membership import load_pool  # noqa: E402
from mlaudit.stats import fpr_key, roc_metrics  # noqa: E402

FPRS = (0.0, 1e-5, 1e-4, 1e-3, 1e-2)


def cell(m: dict) -> str:
    return f"{100 * m['value']:.2f} [{100 * m['lo']:.2f}, {100 * m['hi']:.2f}]"


def variants(m: int) -> list[tuple[str, str, dict]]:
    """(row label, attack, options): RMIA, BASE and LiRA offline at 1, 2, 4, (64,) all references; online at 2, 4,
    (64,) all; 64 for pools of more than 160 models (64 OUT models among the others for every example needs about
    2 x 64 others plus the spread of a random half)."""
    rows = []
    counts: tuple[int | None, ...] = (1, 2, 4, 64, None) if m > 160 else (1, 2, 4, None)
    for k in counts:
        tag = "all" if k is None else str(k)
        rows.append((f"rmia-offline, {tag} ref", "rmia-offline", {"references": k}))
        rows.append((f"base-offline, {tag} ref", "base-offline", {"references": k}))
        rows.append((f"lira-offline (global var), {tag} ref", "lira-offline", {"references": k, "variance": "global"}))
    for k in tuple(c for c in counts if c != 1):
        tag = "all" if k is None else str(k)
        rows.append((f"rmia-online, {tag} ref", "rmia-online", {"references": k}))
        rows.append((f"base-online, {tag} ref", "base-online", {"references": k}))
        rows.append((f"lira-online (global var), {tag} ref", "lira-online", {"references": k, "variance": "global"}))
    rows.append(("rmia-offline gamma=2, all ref", "rmia-offline", {"gamma": 2.0}))
    rows.append(("rmia-online gamma=2, all ref", "rmia-online", {"gamma": 2.0}))
    rows.append(("lira-online (fixed var), all ref", "lira-online", {"variance": "fixed"}))
    rows.append(("lira-online (per-example var), all ref", "lira-online", {"variance": "per-example"}))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", type=int, default=64)
    ap.add_argument("--name", default="digits_cpu")
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--targets", type=int, default=None, help="score the reference-count variants with only the first "
                    "T models as targets (each against all the others as references) instead of every model: the cost "
                    "of a variant scales with T, the pairs read by the ROC are T x N")
    ap.add_argument("--config", default=None, help="a membership-inference config whose dataset, model, recipe, "
                    "pool, queries and factory are used instead of the digits defaults (e.g. "
                    "benchmarks/configs/cifar10_membership_256_airbench.yaml); --models then overrides its pool size "
                    "only when given")
    ap.add_argument("--attacks", default="loss,lira-online,lira-offline,rmia-online,rmia-offline,base-online,"
                    "base-offline,label-augment,label-boundary", help="the kind's attacks (comma-separated)")
    args = ap.parse_args()
    cfg: dict[str, Any] = {"kind": "membership-inference", "name": f"membership-rmia-{args.name}", "dataset": "digits",
                           "model": "mlp", "recipe": "fast", "pool": {"models": args.models, "keep": 0.5}, "seed": 0}
    if args.config is not None:
        given = yaml.safe_load(Path(args.config).read_text())
        cfg = {k: v for k, v in given.items() if k not in ("attacks", "population", "fpr_targets", "n_boot")}
        cfg["name"] = f"membership-rmia-{args.name}"
        if "--models" in sys.argv:
            cfg["pool"] = {**cfg.get("pool", {}), "models": args.models}
    cfg |= {"attacks": args.attacks.split(","), "population": {"data": "test"}, "fpr_targets": list(FPRS),
            "n_boot": args.n_boot, "memorization": False}
    what = f"{cfg['dataset'] if isinstance(cfg['dataset'], str) else cfg['dataset']['name']}"
    model = cfg["model"] if isinstance(cfg["model"], str) else cfg["model"].get("name")
    recipe = cfg["recipe"] if isinstance(cfg["recipe"], str) else cfg["recipe"].get("name")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = run_experiment(cfg, out=Path(tmp) / "run", device=args.device, store=Path(tmp) / "runs.db", quiet=True)
        wall = time.perf_counter() - t0
        obs = load_pool(Path(tmp) / "run")  # the logits each model reported while training
    r = res.results
    print(f"kind run {wall:.1f} s; cost {r['cost']}", flush=True)
    dev = torch.device(args.device)
    pop = obs.population_logits
    obs = dataclasses.replace(obs, logits=obs.logits.to(dev), labels=obs.labels.to(dev), keep=obs.keep.to(dev),
                              population_logits=pop.to(dev) if pop is not None else None,
                              population_labels=obs.population_labels.to(dev) if pop is not None else None)
    targets = list(range(obs.num_models if args.targets is None else min(args.targets, obs.num_models)))
    keep = obs.keep[targets].flatten().cpu().numpy()
    table: dict[str, dict] = {}
    timings: dict[str, float] = {}
    skipped: dict[str, str] = {}

    def write(done: bool) -> None:
        report(args, cfg, r, obs, table, timings, skipped, wall, what, model, recipe, done)

    try:  # each variant is written as it finishes: a run cut by a time limit (SIGINT) keeps what it scored
        for label, attack, opts in variants(obs.num_models):
            t = time.perf_counter()
            try:
                s = _score(attack, obs, targets, opts)
            except ConfigError as e:  # e.g. too few OUT references for some example: recorded, the sweep goes on
                skipped[label] = str(e)
                print(f"{label}: skipped ({e})", flush=True)
                continue
            table[label] = {"attack": attack, "options": opts,
                            **roc_metrics(s.flatten().cpu().numpy(), keep, fpr_targets=FPRS, n_boot=args.n_boot, seed=0,
                                          device=dev)}
            timings[label] = round(time.perf_counter() - t, 2)
            print(f"{label}: {timings[label]} s", flush=True)
            write(False)
    except KeyboardInterrupt:
        print("interrupted: the results hold the variants scored so far", flush=True)
    write(len(table) + len(skipped) == len(variants(obs.num_models)))


def _score(attack: str, obs: Observations, targets: list[int], opts: dict) -> torch.Tensor:
    """Scores [T, N] of the targets: every model through the attack's all-targets form, else the first T models
    one call each (the registered per-target form)."""
    if len(targets) == obs.num_models:
        return score_all_targets(attack, obs, **opts).double()
    entry = ATTACKS.get(attack)
    return torch.stack([entry(obs, m, **opts) for m in targets]).double()


def report(args: argparse.Namespace, cfg: dict, r: dict, obs: Observations, table: dict, timings: dict,
           skipped: dict, wall: float,
           what: str, model: str, recipe: str, done: bool) -> None:
    head = "| attack | AUC (%) | " + " | ".join(f"TPR@{100 * f:g}% FPR (%)" for f in FPRS) + " |\n"
    sep = "|---" * (2 + len(FPRS)) + "|\n"

    def row(label: str, mt: dict) -> str:
        return f"| {label} | {cell(mt['auc'])} | " + " | ".join(cell(mt["tpr_at_fpr"][fpr_key(f)]) for f in FPRS) + " |\n"

    kind_rows = "".join(row(a, r["metrics"][a]) for a in cfg["attacks"])
    ref_rows = "".join(row(label, mt) for label, mt in table.items())
    env = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, "
           f"{torch.get_num_threads()} torch threads", "torch": torch.__version__, "python": platform.python_version(),
           "device": args.device}
    pool = r["metrics"]["pool"]
    n_t = obs.num_models if args.targets is None else min(args.targets, obs.num_models)
    n_neg = int((~obs.keep[:n_t]).sum())
    who = ("Every model is the target once (leave-one-out)" if n_t == obs.num_models else
           f"In the reference-count table the first {n_t} models are the targets, each scored against the other "
           f"{obs.num_models - 1} as references; the kind's table uses every model as the target once")
    md = (f"# RMIA and BASE vs LiRA with few and many reference models: {what}, {obs.num_models} x {model} "
          f"({args.device})\n\n"
          f"{env['date']}, {env['machine']}, torch {env['torch']}, device {args.device}. Pool: {what} training split "
          f"({obs.num_examples} examples), `{model}`, recipe `{recipe}`, {obs.num_models} models, keep 0.5 (each example "
          f"IN for {pool['in_per_example']}), mean test accuracy {pool['test_accuracy']['mean']:.4f}; population for "
          f"RMIA: the {what} test split ({obs.population_logits.shape[1]} examples, no model trained on them). {who}: "
          f"{n_t * obs.num_examples} (model, example) pairs, {n_neg} "
          f"non-members, so TPR at FPR below {1 / n_neg:.1e} is read at zero false positives. Intervals: 95% "
          f"bootstrap over pairs ({args.n_boot} resamples). Whole kind run {wall:.0f} s.\n\n"
          "## The kind's attacks at their defaults\n\n" + head + sep + kind_rows +
          f"\nDefaults: {r['metrics']['pool']['attack_options']}.\n\n"
          "## Reference models per example (offline: k OUT models; online: k/2 IN + k/2 OUT)\n\n" + head + sep
          + ref_rows + "\nScoring time per variant (s, all its targets, scores and bootstrap on the device): "
          + ", ".join(f"{k}: {v}" for k, v in timings.items()) + "\n"
          + "".join(f"\nSkipped {k}: {v}\n" for k, v in skipped.items())
          + ("" if done else f"\n**Cut by the time limit after {len(table) + len(skipped)} of {len(variants(obs.num_models))} "
             "variants.**\n")
          + f"\nCost of the kind run: {r['cost']}\n")
    write_results(f"membership_rmia_{args.name}", {"environment": env, "config": r["config"],
                                                     "kind_metrics": {a: r["metrics"][a] for a in cfg["attacks"]},
                                                     "pool": pool, "references": table, "scoring_s": timings, "skipped": skipped, "targets": n_t,
                                                     "process_wall_s": round(wall, 1), "cost": r["cost"],
                                                     "complete": done}, md)


if __name__ == "__main__":
    main()
