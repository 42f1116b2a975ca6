"""Backdoor benchmark (issue 18): victims trained from scratch on CIFAR-10 (JPEG) poisoned by BadNets
(3x3 checkerboard, bottom-right) and blended injection (uniform noise, alpha 0.2) at 1% of the
training set, and by the label-consistent attack (PGD within eps 16/255 on the target class, then a
four-corner 3x3 checkerboard, so the victims' flips keep it); attack success rate and clean accuracy
(mean +- SE over victims), the clean victims' ASR (the baseline) and the models each run trained.
The hidden-trigger attacks (Hidden Trigger Backdoor, Saha et al. 2020; Sleeper Agent, Souri et al.
2022: target-class rows crafted within eps 16/255, an 8x8 noise patch on the test inputs only) run
with ``--methods hidden-trigger,sleeper-agent``.

    python benchmarks/backdoor.py benchmarks/configs/cifar10_backdoor_resnet18.yaml --device cuda
    python benchmarks/backdoor.py benchmarks/configs/cifar10_backdoor_resnet18.yaml --device cuda \\
        --epochs 10 --victims 1 --name reduced                       # a cheaper run
    python benchmarks/backdoor.py --smoke                               # digits, MLP, CPU, ~20 s
    python benchmarks/backdoor.py --smoke --methods hidden-trigger,sleeper-agent --name digits_hidden_trigger
    python benchmarks/backdoor.py --smoke --methods badnets,hidden-trigger --settings scratch,fine-tuned,transfer \
        --name digits_settings                 # victims from scratch, fine-tuned, transfer (classifier only)

``--settings`` trains each method's victims in each setting (``_common.VICTIM_SETTINGS``): from scratch, fine-tuned
from a pretrained model (the config's model trained by mlaudit on the clean training split with the config's recipe,
saved and sha256-pinned in the workdir) or transfer (a re-initialised classifier retrained over that model's frozen
features, ``victim.model.train: head``); the clean-label methods then craft against the pretrained model itself.

Each method is one ``backdoor`` run with its own clean victims (same seeds as its poisoned ones, so
the comparison is paired); the clean-label runs also train their crafting model (the config's model
and recipe). ``--workdir DIR`` keeps the runs and resumes them when invoked again. Writes
benchmarks/results/backdoor_<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as bench  # noqa: E402

from mlaudit.attacks.poisoning import POISONERS  # noqa: E402
from mlaudit.config import load_yaml  # noqa: E402
from mlaudit.experiments import parse_config  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_METHODS = ("badnets", "blended", "label-consistent")
CLEAN_LABEL = ("label-consistent", "hidden-trigger", "sleeper-agent")
"""The methods that poison target-class rows against a crafting model (``--lc-budget``, ``--lc-steps``)."""
SMOKE = HERE.parent / "examples" / "backdoor.yaml"
METHOD_ATTACK: dict[str, dict[str, Any]] = {
    "badnets": {"trigger": {"type": "patch", "size": 3, "location": "bottom-right", "pattern": "checkerboard"}},
    "blended": {"trigger": {"type": "blend", "alpha": 0.2, "pattern": "noise"}},
    "label-consistent": {"eps": 16, "trigger": {"type": "patch", "size": 3, "location": "four-corners",
                                                "pattern": "checkerboard"}},
    "hidden-trigger": {"eps": 16, "trigger": {"type": "patch", "size": 8, "location": "bottom-right", "pattern": "noise"}},
    "sleeper-agent": {"eps": 16, "trigger": {"type": "patch", "size": 8, "location": "bottom-right", "pattern": "noise"}},
}
"""The attack block of each method (Gu et al. 2017; Chen et al. 2017; Turner et al. 2019; Saha et al. 2020
and Souri et al. 2022: eps 16/255 and an 8x8 random patch as in Sleeper Agent's CIFAR-10 setting, here at a
fixed place)."""
SMOKE_ATTACK: dict[str, dict[str, Any]] = {
    "badnets": {"trigger": {"type": "patch", "size": 2, "location": "bottom-right", "pattern": "checkerboard"}},
    "blended": {"trigger": {"type": "blend", "alpha": 0.2, "pattern": "noise"}},
    "label-consistent": {"eps": 64, "steps": 10, "budget": 0.09, "trigger": {"type": "patch", "size": 3}},
    "hidden-trigger": {"eps": 64, "budget": 0.09, "trigger": {"type": "patch", "size": 3}},
    "sleeper-agent": {"eps": 64, "budget": 0.09, "trigger": {"type": "patch", "size": 3}},
}
"""Digits (8x8, 16 grey levels): eps 16 barely moves them, and a 3x3 patch is a seventh of the image."""


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", nargs="?", default=None, help="a backdoor config (its attack is replaced per method)")
    ap.add_argument("--smoke", action="store_true", help="the digits example on the CPU (no config needed)")
    ap.add_argument("--device", default=None, help="default: cuda, or cpu with --smoke")
    ap.add_argument("--name", default=None, help="results file suffix (default: the config file's stem)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated methods")
    ap.add_argument("--budget", type=float, default=None, help="poisoned fraction of the training set (default: config)")
    ap.add_argument("--lc-budget", type=float, default=None,
                    help="the clean-label methods' poisoned fraction (label-consistent, hidden-trigger, "
                         "sleeper-agent: target-class rows only; default: --budget)")
    ap.add_argument("--lc-steps", type=int, default=None,
                    help="crafting steps of the clean-label methods (default: 250)")
    ap.add_argument("--epochs", type=int, default=None, help="epochs of the victim (and crafting) recipe")
    ap.add_argument("--victims", type=int, default=None, help="victims per view (default: the config's)")
    bench.add_executor_args(ap)
    ap.add_argument("--settings", default="scratch",
                    help="comma-separated victim settings: scratch, fine-tuned, transfer (default: scratch)")
    ap.add_argument("--workdir", default=None,
                    help="keep the runs here and resume them when invoked again (default: a temp dir)")
    args = ap.parse_args()
    if (args.config is None) == (not args.smoke):
        ap.error("give a config or --smoke (not both)")
    return args


def base_config(args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_yaml(args.config or SMOKE)
    if cfg.get("kind") != "backdoor":
        raise SystemExit(f"{args.config}: expected kind backdoor, got {cfg.get('kind')!r}")
    if args.epochs is not None:
        r = cfg["recipe"]
        cfg["recipe"] = {"name": r, "epochs": args.epochs} if isinstance(r, str) else {**r, "epochs": args.epochs}
    if args.victims is not None:
        cfg["victims"] = args.victims
    if args.budget is not None:
        cfg["attack"]["budget"] = args.budget
    return cfg


def method_config(cfg: dict[str, Any], method: str, args: argparse.Namespace) -> dict[str, Any]:
    """The config's run of ``method``: its attack block (:data:`METHOD_ATTACK`), validated here."""
    c = copy.deepcopy(cfg)
    c["name"] = f"{cfg.get('name') or 'backdoor'}-{method}"
    if method not in METHOD_ATTACK:
        POISONERS.get(method, family="backdoor")  # ConfigError listing the registered methods
        raise SystemExit(f"no benchmark attack block for method {method!r}; add one to METHOD_ATTACK")
    keep = {k: v for k, v in c["attack"].items() if k in ("budget", "target_class", "source_classes")}
    attack = {**keep, **copy.deepcopy((SMOKE_ATTACK if args.smoke else METHOD_ATTACK)[method]), "method": method}
    if method in CLEAN_LABEL:
        if args.lc_budget is not None:
            attack["budget"] = args.lc_budget
        if args.lc_steps is not None:
            attack["steps"] = args.lc_steps
    c["attack"] = attack
    parse_config(c)  # a bad method config fails before any run
    return c


def main() -> None:
    args = parse_args()
    device = args.device or ("cpu" if args.smoke else "cuda")
    cfg = base_config(args)
    # every method's config is validated before any run (an unknown method lists the valid ones)
    configs = {m: method_config(cfg, m, args) for m in (x.strip() for x in args.methods.split(",")) if m}
    settings = [x.strip() for x in args.settings.split(",") if x.strip()]
    name = args.name or ("digits_smoke" if args.smoke else Path(args.config).stem)
    runs: dict[str, Any] = {}
    with bench.workdir(args.workdir) as tmp:
        if settings != ["scratch"]:
            pre = bench.pretrained_model(cfg, tmp / "pretrained", device=device)
            args.pretrained = {"file": pre[0].name, "sha256": pre[1], "recipe": cfg["recipe"], "model": cfg["model"]}
            configs = {f"{m}/{st}" if len(settings) > 1 else m: {**c, "victim": bench.victim_block(c, st, pre)}
                       for m, c in configs.items() for st in settings}
            for c in configs.values():
                parse_config(c)
        for m, c in configs.items():
            t0 = time.perf_counter()
            res = bench.resume_run(c, tmp / m.replace("/", "-"), device, tmp / "runs.db", **bench.executor_kwargs(args))
            r = res.results
            runs[m] = {"config": r["config"], "metrics": r["metrics"], "cost": r["cost"],
                       "process_wall_s": round(time.perf_counter() - t0, 2),
                       "cumulative_cost": bench.cumulative_cost(tmp / m.replace("/", "-"))}
            mt = r["metrics"]
            print(f"{m}: ASR {bench.pct_se(mt['attack_success_rate'])} % (clean victims "
                  f"{bench.pct_se(mt['baseline_attack_success_rate']) if 'baseline_attack_success_rate' in mt else 'n/a'} %), "
                  f"clean accuracy {bench.pct_se(mt['clean_accuracy'])} %", flush=True)
            report(args, name, runs)  # after every method, so a run cut short keeps what it finished


def report(args: argparse.Namespace, name: str, runs: dict[str, Any]) -> None:
    env = bench.environment()
    first = next(iter(runs.values()))["config"]
    if first["dataset"]["name"] != "cifar10":
        env["data"] = f"{first['dataset']['name']} (smoke run)"
    rows = []
    for m, r in runs.items():
        mt, a, cc = r["metrics"], r["metrics"]["attack"], r["cumulative_cost"]
        base = mt.get("baseline_attack_success_rate")
        v = mt.get("victim") or {"setting": "from scratch", "frozen_parameters": 0, "parameters": 0}
        frozen = f", {v['frozen_parameters']:,} of {v['parameters']:,} frozen" if v["frozen_parameters"] else ""
        rows.append(f"| {m.split('/')[0]} | {v['setting']}{frozen} | {a['trigger_text']} | {'-' if a.get('eps_255') is None else a['eps_255']} | "
                    f"{mt['poisons']} ({100 * mt['poison_rate']:.2f}%) | {bench.pct_se(mt['attack_success_rate'])} | "
                    f"{bench.pct_se(base) if base else '-'} | {bench.pct_se(mt['clean_accuracy'])} | "
                    f"{bench.pct_se(mt['baseline_clean_accuracy']) if 'baseline_clean_accuracy' in mt else '-'} | "
                    f"{cc['models_trained']} | {cc['process_wall_s']:.1f} |\n")
    recipe = first["recipe"]
    total = sum(r["cumulative_cost"]["process_wall_s"] for r in runs.values())
    md = (f"# Backdoor attacks: {name}\n\n{env['date']}, {next(iter(runs.values()))['cost']['device']}, torch "
          f"{env['torch']}; data {env['data']}; victims {first['model']['name']} ({recipe['name']}, "
          f"{recipe['epochs']} epochs), {first['victims']} poisoned + {first['victims']} clean per method (paired seeds), "
          f"victims as in the second column (fine-tuned and transfer: from the pretrained model); target class "
          f"{first['attack']['options']['target_class']}.\n\n"
          "| method | victims | trigger | eps (/255) | poisons | ASR (%) | ASR, clean victims (%) | clean acc (%) | "
          "clean acc, clean victims (%) | models trained | wall s |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|\n" + "".join(rows)
          + "\nASR: triggered test inputs of the source classes (target class left out) classified as the target. "
          "mean ± SE over victims. Models trained include the clean-label methods' crafting model when the victims "
          "train from scratch (fine-tuned and transfer: the crafting model is the pretrained model itself)."
          + (f" Pretrained model: {pre['model']} trained by mlaudit on the clean training split with recipe "
             f"{pre['recipe']} (sha256 {pre['sha256'][:12]}…, not counted in the models or wall s)."
             if (pre := getattr(args, "pretrained", None)) else "") + f" Whole benchmark "
          f"{total:.1f} s (summed over invocations when resumed).\n")
    bench.write_results(f"backdoor_{name}", {"environment": env, "runs": runs, "process_wall_s": round(total, 2),
                                             "pretrained": getattr(args, "pretrained", None)}, md)


if __name__ == "__main__":
    main()
