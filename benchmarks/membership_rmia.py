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

from mlaudit.attacks.membership import ATTACKS, LabelOracle, Observations, score_all_targets  # noqa: E402
from mlaudit.config import load_yaml  # noqa: E402
from mlaudit.data.registry import load_dataset  # noqa: E402
from mlaudit.errors import ConfigError  # noqa: E402
from mlaudit.experiments import run_experiment  # noqa: E402
from mlaudit.experiments.base import parse_config  # noqa: E402
from mlaudit.experiments.membership import load_pool, pool_indices  # noqa: E402
from mlaudit.query import model_template  # noqa: E402
from mlaudit.stats import fpr_key, roc_metrics  # noqa: E402
from mlaudit.train.checkpoint import load_checkpoint  # noqa: E402
from mlaudit.train.evaluate import stack_from_state_dicts  # noqa: E402

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
                    "base-offline,label-augment,label-boundary", help="the kind's attacks (comma-separated); with "
                    "--targets, the label-only ones among them are not run by the kind but here, on the T targets only "
                    "(their cost is oracle calls on every model queried: on a 256-model pool label-boundary over every "
                    "model would cost draws x (steps + 2) queries of 256 models on the whole pool)")
    ap.add_argument("--no-variants", action="store_true", help="skip the reference-count variants (e.g. a run for the "
                    "label-only rows alone)")
    args = ap.parse_args()
    cfg: dict[str, Any] = {"kind": "membership-inference", "name": f"membership-rmia-{args.name}", "dataset": "digits",
                           "model": "mlp", "recipe": "fast", "pool": {"models": args.models, "keep": 0.5}, "seed": 0}
    if args.config is not None:
        given = yaml.safe_load(Path(args.config).read_text())
        cfg = {k: v for k, v in given.items() if k not in ("attacks", "population", "fpr_targets", "n_boot")}
        cfg["name"] = f"membership-rmia-{args.name}"
        if "--models" in sys.argv:
            cfg["pool"] = {**cfg.get("pool", {}), "models": args.models}
    attacks = args.attacks.split(",")
    # With --targets the label-only attacks are scored below on the T targets alone, from the saved weights.
    label_only = [a for a in attacks if args.targets is not None and ATTACKS.get(a).needs_oracle]
    cfg |= {"attacks": [a for a in attacks if a not in label_only], "population": {"data": "test"},
            "fpr_targets": list(FPRS), "n_boot": args.n_boot, "memorization": False}
    if "attack_options" in cfg:  # a config's options for attacks this run does not select would be refused
        cfg["attack_options"] = {k: v for k, v in cfg["attack_options"].items() if k in cfg["attacks"]}
    if label_only:
        cfg["pool"] = {**cfg.get("pool", {}), "save_models": True}
    what = f"{cfg['dataset'] if isinstance(cfg['dataset'], str) else cfg['dataset']['name']}"
    model = cfg["model"] if isinstance(cfg["model"], str) else cfg["model"].get("name")
    recipe = cfg["recipe"] if isinstance(cfg["recipe"], str) else cfg["recipe"].get("name")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = run_experiment(cfg, out=Path(tmp) / "run", device=args.device, store=Path(tmp) / "runs.db", quiet=True)
        wall = time.perf_counter() - t0
        obs = load_pool(Path(tmp) / "run")  # the logits each model reported while training
        r = res.results
        label_rows = label_only_on_targets(Path(tmp) / "run", obs, label_only, args) if label_only else {}
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
        report(args, cfg, r, obs, table, timings, skipped, wall, what, model, recipe, done, label_rows)

    write(args.no_variants)
    try:  # each variant is written as it finishes: a run cut by a time limit (SIGINT) keeps what it scored
        for label, attack, opts in ([] if args.no_variants else variants(obs.num_models)):
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
    if not args.no_variants:
        write(len(table) + len(skipped) == len(variants(obs.num_models)))


def label_only_on_targets(run: Path, obs: Observations, attacks: list[str], args: argparse.Namespace) -> dict:
    """The label-only attacks (Choquette-Choo et al. 2021) on the first T models only: a :class:`LabelOracle` over
    their saved weights (sha256 from the run store is not needed here: the files were written by this process in
    its own temporary folder), every attack at its defaults through ``score_all_targets``, each row through the one
    ``roc_metrics`` over the T x N pairs. Returns {attack: metrics + seconds + oracle queries}."""
    config = parse_config(load_yaml(run / "config.yaml"))
    data = load_dataset(config.dataset)
    t_n = min(args.targets, obs.num_models)
    files = {int(p.stem.rsplit("-", 1)[1]): p for p in (run / "artifacts" / "models").glob("*.pt")}
    if sorted(files)[:t_n] != list(range(t_n)):
        raise SystemExit(f"the first {t_n} pool models' weights are not all in {run}/artifacts/models")
    dev = torch.device(args.device)
    stack = stack_from_state_dicts(model_template(config.model, data), [load_checkpoint(files[m]) for m in range(t_n)],
                                   dev)
    x = data.train.x[pool_indices(config, len(data.train))]
    keep = obs.keep[:t_n].cpu()
    out = {}
    for attack in attacks:
        oracle = LabelOracle.from_stacks([stack], x)
        sub = dataclasses.replace(obs, logits=obs.logits[:t_n].cpu(), labels=obs.labels.cpu(), keep=keep,
                                  population_logits=None, population_labels=None, oracle=oracle)
        t = time.perf_counter()
        s = score_all_targets(attack, sub).double()
        secs = time.perf_counter() - t
        out[attack] = {**roc_metrics(s.flatten().numpy(), keep.flatten().numpy(), fpr_targets=FPRS, n_boot=args.n_boot,
                                     seed=0, device=dev), "seconds": round(secs, 2), "oracle_labels": oracle.queries}
        print(f"{attack} on the first {t_n} models: {secs:.1f} s, {oracle.queries} labels", flush=True)
    return out


def _score(attack: str, obs: Observations, targets: list[int], opts: dict) -> torch.Tensor:
    """Scores [T, N] of the targets: every model through the attack's all-targets form, else the first T models
    one call each (the registered per-target form)."""
    if len(targets) == obs.num_models:
        return score_all_targets(attack, obs, **opts).double()
    entry = ATTACKS.get(attack)
    return torch.stack([entry(obs, m, **opts) for m in targets]).double()


def report(args: argparse.Namespace, cfg: dict, r: dict, obs: Observations, table: dict, timings: dict,
           skipped: dict, wall: float,
           what: str, model: str, recipe: str, done: bool, label_rows: dict | None = None) -> None:
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
          f"IN for {pool['in_per_example']}), mean test accuracy {pool['test_accuracy']['mean']:.4f}; "
          + (f"population for RMIA: the {what} test split ({obs.population_logits.shape[1]} examples, no model trained "
             "on them). " if obs.population_logits is not None else "")
          + f"{who}: "
          f"{n_t * obs.num_examples} (model, example) pairs, {n_neg} "
          f"non-members, so TPR at FPR below {1 / n_neg:.1e} is read at zero false positives. Intervals: 95% "
          f"bootstrap over pairs ({args.n_boot} resamples). Whole kind run {wall:.0f} s.\n\n"
          "## The kind's attacks at their defaults\n\n" + head + sep + kind_rows +
          f"\nDefaults: {r['metrics']['pool']['attack_options']}.\n\n"
          + ("" if args.no_variants else "## Reference models per example (offline: k OUT models; online: k/2 IN + "
             "k/2 OUT)\n\n" + head + sep + ref_rows)
          + (_label_section(label_rows, obs, args) if label_rows else "")
          + "\nScoring time per variant (s, all its targets, scores and bootstrap on the device): "
          + ", ".join(f"{k}: {v}" for k, v in timings.items()) + "\n"
          + "".join(f"\nSkipped {k}: {v}\n" for k, v in skipped.items())
          + ("" if done else f"\n**Cut by the time limit after {len(table) + len(skipped)} of {len(variants(obs.num_models))} "
             "variants.**\n")
          + f"\nCost of the kind run: {r['cost']}\n")
    write_results(f"membership_rmia_{args.name}", {"environment": env, "config": r["config"],
                                                     "kind_metrics": {a: r["metrics"][a] for a in cfg["attacks"]},
                                                     "pool": pool, "references": table, "scoring_s": timings, "skipped": skipped, "targets": n_t,
                                                     "label_only": label_rows or {},
                                                     "process_wall_s": round(wall, 1), "cost": r["cost"],
                                                     "complete": done}, md)


def _label_section(rows: dict, obs: Observations, args: argparse.Namespace) -> str:
    head = "| attack | AUC (%) | " + " | ".join(f"TPR@{100 * f:g}% FPR (%)" for f in FPRS) + " | s | labels queried |\n"
    body = "".join(f"| {a} | {cell(m['auc'])} | " + " | ".join(cell(m["tpr_at_fpr"][fpr_key(f)]) for f in FPRS)
                   + f" | {m['seconds']} | {m['oracle_labels']} |\n" for a, m in rows.items())
    t_n = min(args.targets, obs.num_models)
    return (f"\n## Label-only attacks on the first {t_n} models (labels only, at their defaults)\n\n"
            f"A `LabelOracle` over the first {t_n} models' saved weights returns argmax labels only; {t_n} x "
            f"{obs.num_examples} (model, example) pairs. These attacks use no reference model.\n\n"
            + head + "|---" * (4 + len(FPRS)) + "|\n" + body)


if __name__ == "__main__":
    main()
