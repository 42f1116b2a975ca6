"""Availability-poisoning benchmark (issue 7; seed 002 chapter 2, Table 2.2 setting): victims retrained
from scratch on CIFAR-10 (JPEG) poisoned by untargeted and class-targeted adversarial poisoning
(eps 8/255, 100% of the training set), error-minimizing noise and random noise of the same eps; clean
and poisoned victim test accuracy and the drop (mean +- SE over victims, paired seeds).

    python benchmarks/availability.py benchmarks/configs/cifar10_availability_resnet18.yaml --device cuda
    python benchmarks/availability.py benchmarks/configs/cifar10_availability_resnet18.yaml --device cuda \\
        --steps 50 --epochs 10 --victims 1 --name reduced                     # a reduced run
    python benchmarks/availability.py examples/availability.yaml --device cpu --name digits_smoke   # dry run

The crafting model is trained once (a ``train`` run with the crafting model and recipe) and shared by
the adversarial methods as ``crafting.checkpoint``; each method is then one ``availability-poison``
run (its own clean victims, so every drop is paired). Writes benchmarks/results/availability_<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    add_executor_args,
    cumulative_cost,
    environment,
    executor_kwargs,
    pct_se,
    resume_run,
    workdir,
    write_results,
)

import mlaudit.experiments.availability  # noqa: E402,F401  (registers the kind)
from mlaudit.attacks.poisoning import POISONERS, Needs  # noqa: E402
from mlaudit.config import load_yaml  # noqa: E402

DEFAULT_METHODS = ("adversarial-untargeted", "adversarial-class-targeted", "error-minimizing", "random-noise")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", help="an availability-poison config (its attack.method is replaced per method)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--name", default=None, help="results file suffix (default: the config file's stem)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated methods")
    ap.add_argument("--eps", type=float, default=None, help="l-inf radius in /255 units (default: the config's)")
    ap.add_argument("--steps", type=int, default=None, help="PGD steps of the adversarial methods (default: config)")
    ap.add_argument("--em-steps", type=int, default=20, help="noise steps per min-min round (Huang et al.: 20)")
    ap.add_argument("--em-rounds", type=int, default=None, help="max min-min rounds (default: the method's)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs of the crafting and victim recipes")
    ap.add_argument("--victims", type=int, default=None, help="victims per view (default: the config's)")
    ap.add_argument("--relabel", action=argparse.BooleanOptionalAction, default=None,
                    help="also train victims on relabelled adversarial poisons (default: the config's)")
    add_executor_args(ap)
    ap.add_argument("--workdir", default=None,
                    help="keep the runs here and resume them when invoked again (default: a temp dir)")
    return ap.parse_args()


def with_epochs(recipe: Any, epochs: int | None) -> Any:
    if epochs is None or recipe is None:
        return recipe
    return {"name": recipe, "epochs": epochs} if isinstance(recipe, str) else {**recipe, "epochs": epochs}


def base_config(args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_yaml(args.config)
    if cfg.get("kind") != "availability-poison":
        raise SystemExit(f"{args.config}: expected kind availability-poison, got {cfg.get('kind')!r}")
    cfg["recipe"] = with_epochs(cfg["recipe"], args.epochs)
    for part in ("crafting", "victim"):
        if cfg.get(part, {}).get("recipe") is not None:
            cfg[part]["recipe"] = with_epochs(cfg[part]["recipe"], args.epochs)
    attack = cfg.setdefault("attack", {})
    for key, value in (("eps", args.eps), ("steps", args.steps)):
        if value is not None:
            attack[key] = value
    if args.victims is not None:
        cfg["victims"] = args.victims
    if args.relabel is not None:
        cfg["relabel"] = args.relabel
    return cfg


def train_crafter(cfg: dict[str, Any], tmp: Path, device: str) -> dict[str, Any]:
    """One crafting model trained on the clean data (crafting.model / crafting.recipe or the config's)."""
    crafting = cfg.get("crafting", {})
    train_cfg = {"kind": "train", "name": "availability-crafter", "dataset": cfg["dataset"],
                 "model": crafting.get("model") or cfg["model"], "recipe": crafting.get("recipe") or cfg["recipe"],
                 "trials": 1, "seed": cfg.get("seed", 0), "save_models": True}
    res = resume_run(train_cfg, tmp / "crafter", device, tmp / "runs.db")
    path = tmp / "crafter" / res.results["trials"][0]["checkpoint"]
    return {"checkpoint": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "model": train_cfg["model"], "test_accuracy": res.results["metrics"]["test_accuracy"]["mean"],
            "wall_s": cumulative_cost(tmp / "crafter")["process_wall_s"]}


def method_config(cfg: dict[str, Any], method: str, crafter: dict[str, Any] | None,
                  args: argparse.Namespace) -> dict[str, Any]:
    c = copy.deepcopy(cfg)
    c["name"] = f"{cfg.get('name') or 'availability'}-{method}"
    attack = c["attack"]
    attack["method"] = method
    if method != "adversarial-class-targeted":
        attack.pop("permutation", None)
    attack["options"] = {}
    pretrained = Needs.CRAFTING_MODELS in POISONERS.get(method, family="availability").needs
    crafting = {k: v for k, v in c.get("crafting", {}).items() if k not in ("checkpoint", "sha256", "ensemble")}
    if pretrained and crafter is not None:
        crafting.update(checkpoint=crafter["checkpoint"], sha256=crafter["sha256"], model=crafter["model"])
    if not pretrained:
        crafting.pop("recipe", None)
        c["relabel"] = False
    c["crafting"] = crafting
    if method == "error-minimizing":
        attack["steps"] = args.em_steps
        attack.pop("lr", None)
        if args.em_rounds is not None:
            attack["options"] = {"rounds": args.em_rounds}
    return c


def main() -> None:
    args = parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        POISONERS.get(m, family="availability")  # unknown names fail before any work
    cfg = base_config(args)
    name = args.name or Path(args.config).stem
    runs: dict[str, Any] = {}
    with workdir(args.workdir) as tmp:
        needs = any(Needs.CRAFTING_MODELS in POISONERS.get(m, family="availability").needs for m in methods)
        crafter = train_crafter(cfg, tmp, args.device) if needs else None
        for m in methods:
            c = method_config(cfg, m, crafter, args)
            t1 = time.perf_counter()
            res = resume_run(c, tmp / m, args.device, tmp / "runs.db", **executor_kwargs(args))
            runs[m] = {"config": res.results["config"], "metrics": res.results["metrics"], "cost": res.results["cost"],
                       "process_wall_s": round(time.perf_counter() - t1, 2), "cumulative_cost": cumulative_cost(tmp / m)}
            print(f"{m}: clean {pct_se(runs[m]['metrics']['clean_accuracy'])} %, poisoned "
                  f"{pct_se(runs[m]['metrics']['poisoned_accuracy'])} %", flush=True)
            # written after every method, so a run cut short by a time limit keeps what it finished
            total = (crafter["wall_s"] if crafter else 0.0) + sum(
                r["cumulative_cost"]["process_wall_s"] for r in runs.values())
            report(args, name, runs, crafter, total)


def report(args: argparse.Namespace, name: str, runs: dict[str, Any], crafter: dict[str, Any] | None,
           wall: float) -> None:
    env = environment()
    first = next(iter(runs.values()))["config"]
    if first["dataset"]["name"] != "cifar10":
        env["data"] = f"{first['dataset']['name']} (dry run)"
    rows = []
    for m, r in runs.items():
        mt, a = r["metrics"], r["metrics"]["attack"]
        rows.append(f"| {m} | {a['eps_255']:g} | {100 * a['fraction']:g}% | {a['steps']} | {pct_se(mt['clean_accuracy'])} | "
                    f"{pct_se(mt['poisoned_accuracy'])} | {pct_se(mt['drop'])} | {a['craft_wall_s']:.1f} |\n")
        if "relabelled_accuracy" in mt:
            rows.append(f"| {m}, relabelled | {a['eps_255']:g} | {100 * a['fraction']:g}% | {a['steps']} | "
                        f"{pct_se(mt['clean_accuracy'])} | {pct_se(mt['relabelled_accuracy'])} | {pct_se(mt['relabelled_drop'])} | |\n")
    victim = first["victim"]["model"] or first["model"]
    recipe = first["victim"]["recipe"] or first["recipe"]
    md = (f"# Availability poisoning: {name}\n\n{env['date']}, {next(iter(runs.values()))['cost']['device']}, "
          f"torch {env['torch']}; config `{args.config}`; data {env['data']}; victims {victim['name']} "
          f"({recipe['name']}, {recipe['epochs']} epochs), {first['victims']} per view, trained from scratch.\n\n"
          + (f"Crafting model: {crafter['model'] if isinstance(crafter['model'], str) else crafter['model']['name']}, "
             f"test accuracy {100 * crafter['test_accuracy']:.2f}% ({crafter['wall_s']} s).\n\n" if crafter else "")
          + "| method | eps (/255) | poisoned | steps | clean acc (%) | poisoned acc (%) | drop (pp) | crafting s |\n"
          "|---|---|---|---|---|---|---|---|\n" + "".join(rows)
          + f"\nmean ± SE over victims; drop paired by seed. Whole benchmark {wall:.1f} s (summed over invocations "
          "when resumed). Error-minimizing: steps "
          "are per min-min round.\n")
    write_results(f"availability_{name}", {"environment": env, "crafter": crafter, "runs": runs,
                                           "process_wall_s": round(wall, 2)}, md)



if __name__ == "__main__":
    main()
