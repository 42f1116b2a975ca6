"""Defence benchmark (issue 17, deliverables 4-5): filtering defences and Deep Partition Aggregation against
a poisoning study, each one ``defend`` run.

A config whose defence is a filter is run once per filter and rate of the grid (``--filters`` x ``--rates``,
default spectral signatures, activation clustering and deep kNN at 10% and 20% of each class); a config whose
defence is ``dpa`` (or ``none``) is run as it is. Per run: poisons removed vs the count random filtering at the
same per-class rate removes (expected, and the chance of doing as well at random), the attack success and
clean accuracy of victims trained from scratch without and with the defence (mean ± SE), DPA's ensemble
accuracy, certified accuracy against r poisoned samples and the fraction of attacked inputs certified against
this poison, and the models each run trained.

    python benchmarks/defend.py benchmarks/configs/cifar10_defend_airbench.yaml \\
        benchmarks/configs/cifar10_defend_dpa_airbench.yaml --device cuda --name cifar10_airbench
    python benchmarks/defend.py benchmarks/configs/cifar10_defend_brew_airbench.yaml --device cuda \\
        --filters outlier,spectral --name cifar10_brew_airbench          # next to seed 002 Table 1.4
    python benchmarks/defend.py --smoke                                   # digits, MLP, CPU, seconds
    python benchmarks/defend.py benchmarks/configs/digits_defend_dp_badnets.yaml --device cpu \
        --dp-noise 0.5,1,2,4 --name digits_dp_badnets                      # DP-SGD victims, eps vs the attack
    python benchmarks/defend.py benchmarks/configs/digits_defend_adaptive_brew.yaml --device cpu \
        --filters outlier,spectral --adaptive 1 --name digits_adaptive_brew  # plain vs adaptive brew

``--adaptive W[,W]`` runs every filter run of a gradient-matching config also with the adaptive attack
(``attack.adaptive``: the penalty matched to that filter, weight W), the same scenarios and seeds.

``--workdir DIR`` keeps the runs and resumes them when invoked again. Writes
benchmarks/results/defend_<name>.{json,md}.
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

from mlaudit.attacks.poisoning.targeted import PENALTY_FOR_FILTER  # noqa: E402
from mlaudit.config import load_yaml  # noqa: E402
from mlaudit.defences import FILTERS  # noqa: E402
from mlaudit.experiments import parse_config  # noqa: E402
from mlaudit.stats import MeanSE  # noqa: E402

HERE = Path(__file__).resolve().parent
SMOKE = HERE.parent / "examples" / "defend.yaml"
DEFAULT_FILTERS = ("spectral", "activation-clustering", "knn")
DEFAULT_RATES = (0.1, 0.2)
SEED_002_TABLE_1_4 = ("Seed 002, Table 1.4 (section 1.5.4: Witches' Brew, CIFAR-10, 4% budget = 2000 poisons in one "
                      "class of 5000, eps 16, averaged over 6 randomly seeded poisoning runs; the victim architecture is "
                      "not stated beside the table): filtering 10% / 20% of the poisoned class (500 / 1000 images), "
                      "the outlier method removes 248 / 467 poisons (random: 200 / 400) and 252 / 533 clean images "
                      "(random: 300 / 600).")

SEED_004_TABLE_2 = ("Seed 004, Table 2 (CIFAR-10, from scratch, an ensemble of four models trained on the DDPM-denoised "
                    "noised training set): Witches' Brew white-box, l-inf attack, 65.0% success (92.3% clean) at sigma 0 "
                    "-> 3.0% (71.9%) at sigma 0.25; l2 attack 71.0% (92.2%) -> 10.0% (72.3%).")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("configs", nargs="*", help="defend configs (a filter's is run over the grid, dpa's as it is)")
    ap.add_argument("--smoke", action="store_true", help="examples/defend.yaml on digits, CPU (no config needed)")
    ap.add_argument("--device", default=None, help="default: cuda, or cpu with --smoke")
    ap.add_argument("--name", default=None, help="results file suffix (default: the first config's stem)")
    ap.add_argument("--filters", default=",".join(DEFAULT_FILTERS), help="comma-separated filtering defences")
    ap.add_argument("--rates", default=",".join(map(str, DEFAULT_RATES)), help="comma-separated filtering rates")
    ap.add_argument("--dpa-k", type=int, default=None, help="partitions of the dpa configs (default: theirs)")
    ap.add_argument("--dpa-epochs", type=int, default=None, help="epochs of the partition models (default: theirs)")
    ap.add_argument("--sigmas", default=None, help="comma-separated noise levels of the ndt configs (default: theirs)")
    ap.add_argument("--dp-noise", default=None, help="comma-separated noise multipliers of the dp-sgd configs (default: "
                    "their defence.dp)")
    ap.add_argument("--methods", default=None, help="comma-separated attack methods of the same family, each run in "
                    "place of the configs' own (e.g. gradient-matching,bullseye,poison-frogs)")
    ap.add_argument("--adaptive", default=None, help="comma-separated weights: each filter run of a gradient-matching "
                    "config also with attack.adaptive (the penalty matched to the filter) at each weight")
    ap.add_argument("--epochs", type=int, default=None, help="epochs of the victims' recipe")
    ap.add_argument("--victims", type=int, default=None, help="victims per poisoned set (default: the config's)")
    bench.add_executor_args(ap)
    ap.add_argument("--workdir", default=None,
                    help="keep the runs here and resume them when invoked again (default: a temp dir)")
    args = ap.parse_args()
    if bool(args.configs) == args.smoke:
        ap.error("give config(s) or --smoke (not both)")
    return args


def _with_epochs(recipe: Any, epochs: int) -> Any:
    return {"name": recipe, "epochs": epochs} if isinstance(recipe, str) else {**recipe, "epochs": epochs}


def base_configs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The configs to expand: the given ones, or for ``--smoke`` the example (a short recipe, one victim)
    and its DPA variant (k = 10)."""
    if args.smoke:
        ex = load_yaml(SMOKE)
        ex.update(recipe={"name": "fast", "epochs": 6}, victims=1)
        configs = [ex, {**copy.deepcopy(ex), "name": "defend-smoke-dpa", "defence": {"method": "dpa", "k": 10}}]
    else:
        configs = [load_yaml(p) for p in args.configs]
    for c in configs:
        if c.get("kind") != "defend":
            raise SystemExit(f"expected kind defend, got {c.get('kind')!r}")
        if args.epochs is not None:
            c["recipe"] = _with_epochs(c["recipe"], args.epochs)
        if args.victims is not None:
            c["victims"] = args.victims
    if args.methods:
        configs = [{**copy.deepcopy(c), "name": f"{c.get('name') or 'defend'}-{m}", "attack": {**c["attack"], "method": m}}
                   for c in configs for m in (x.strip() for x in args.methods.split(",") if x.strip())]
    return configs


def expand(cfg: dict[str, Any], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Run label -> config: a filter config over ``--filters`` x ``--rates``, any other as it is (``--dpa-k``
    and ``--dpa-epochs`` applied to dpa). Every config is validated here, before any run."""
    d = cfg["defence"] if isinstance(cfg["defence"], dict) else {"method": cfg["defence"]}
    base = cfg.get("name") or "defend"
    out: dict[str, dict[str, Any]] = {}
    if d["method"] in FILTERS:
        for method in (m.strip() for m in args.filters.split(",") if m.strip()):
            FILTERS.get(method)  # ConfigError listing the registered filters
            for r in (float(x) for x in args.rates.split(",") if x.strip()):
                out[f"{method}@{r:g}"] = {**copy.deepcopy(cfg), "name": f"{base}-{method}-{r:g}",
                                          "defence": {"method": method, "rate": r}}
                for w in (float(x) for x in (args.adaptive or "").split(",") if x.strip()):
                    pen = PENALTY_FOR_FILTER[method]
                    out[f"{method}@{r:g}+adaptive-{pen}{w:g}"] = {
                        **copy.deepcopy(cfg), "name": f"{base}-{method}-{r:g}-adaptive-{pen}{w:g}",
                        "defence": {"method": method, "rate": r},
                        "attack": {**cfg["attack"], "adaptive": {"penalty": pen, "weight": w}}}
    elif d["method"] == "dp-sgd" and args.dp_noise:
        for z in (float(x) for x in args.dp_noise.split(",") if x.strip()):
            dp = {k: v for k, v in (d.get("dp") or {}).items() if k != "epsilon"} | {"noise_multiplier": z}
            out[f"{base}@noise={z:g}"] = {**copy.deepcopy(cfg), "name": f"{base}-noise{z:g}",
                                          "defence": {**d, "dp": dp}}
    elif d["method"] == "ndt" and args.sigmas:
        for sigma in (float(x) for x in args.sigmas.split(",") if x.strip()):
            out[f"{base}@sigma={sigma:g}"] = {**copy.deepcopy(cfg), "name": f"{base}-sigma{sigma:g}",
                                              "defence": {**d, "sigma": sigma}}
    else:
        c = copy.deepcopy(cfg)
        if d["method"] == "dpa":
            c["defence"] = dict(d)
            if args.dpa_k is not None:
                c["defence"]["k"] = args.dpa_k
            if args.dpa_epochs is not None:
                c["defence"]["recipe"] = _with_epochs(d.get("recipe") or c["recipe"], args.dpa_epochs)
        label = d["method"] if d["method"] != "dpa" else f"dpa@k={c['defence'].get('k', 50)}"
        out[label] = c
    if args.methods:  # one grid per attack method: keep their labels (and run folders) apart
        out = {label if label.startswith(base) else f"{base}+{label}": c for label, c in out.items()}
    for c in out.values():
        parse_config(c)
    return out


def main() -> None:
    args = parse_args()
    device = args.device or ("cpu" if args.smoke else "cuda")
    configs: dict[str, dict[str, Any]] = {}
    for cfg in base_configs(args):
        configs |= expand(cfg, args)
    name = args.name or ("digits_smoke" if args.smoke else Path(args.configs[0]).stem.removeprefix("cifar10_defend_"))
    runs: dict[str, Any] = {}
    with bench.workdir(args.workdir) as tmp:
        for label, c in configs.items():
            t0 = time.perf_counter()
            res = bench.resume_run(c, tmp / label.replace("@", "_").replace("=", ""), device, tmp / "runs.db",
                                   **bench.executor_kwargs(args))
            r = res.results
            runs[label] = {"config": r["config"], "metrics": r["metrics"], "cost": r["cost"],
                           "process_wall_s": round(time.perf_counter() - t0, 2),
                           "cumulative_cost": bench.cumulative_cost(tmp / label.replace("@", "_").replace("=", ""))}
            print(f"{label}: {summary(r['metrics'])}", flush=True)
            report(name, runs)  # after every run, so a benchmark cut short keeps what it finished


def summary(m: dict[str, Any]) -> str:
    a = m["attack_success"]
    text = f"attack success {bench.pct_se(a['no_defence'])} %"
    if "defence" in a:
        text += f" -> {bench.pct_se(a['defence'])} %"
    if "removal" in m:
        rm = m["removal"]
        text += f"; removed {rm['poisons_removed']}/{rm['poisons']} poisons (random {rm['random_poisons_removed']:.1f})"
    if "dpa" in m:
        text += f"; certified against this poison {100 * m['dpa']['certified_against_attack']:.1f}%"
    return text


def attack_label(attack: dict[str, Any]) -> str:
    """The attack method, with its adaptive penalty and weight when it has one."""
    a = (attack.get("options") or {}).get("adaptive")
    return attack["method"] if not a else f"{attack['method']} adaptive ({a['penalty']}, weight {a['weight']:g})"


def _pct(v: dict[str, Any] | None) -> str:
    return "-" if v is None else f"{100 * v['value']:.1f} [{100 * v['lo']:.1f}, {100 * v['hi']:.1f}]"


def report(name: str, runs: dict[str, Any]) -> None:
    env = bench.environment()
    first = next(iter(runs.values()))
    cfg = first["config"]
    if cfg["dataset"]["name"] != "cifar10":
        env["data"] = {"digits": "digits (sklearn, 8x8)"}.get(cfg["dataset"]["name"], cfg["dataset"]["name"])
    filters, dpa, ndt, dp = [], [], [], []
    for r in runs.values():
        m, cc = r["metrics"], r["cumulative_cost"]
        a, acc = m["attack_success"], m["clean_accuracy"]
        with_a = bench.pct_se(a["defence"]) if "defence" in a else "-"
        with_acc = bench.pct_se(acc["defence"]) if "defence" in acc else "-"
        if "removal" in m:
            rm = m["removal"]
            p = rm.get("p_value")
            filters.append(f"| {attack_label(r['config']['attack'])} | {m['defence']['method']} | {rm['rate']} | {rm['poisons_removed']} / {rm['poisons']} | "
                           f"{rm['random_poisons_removed']:.1f} | {rm['clean_removed']} | {rm['random_clean_removed']:.1f} | "
                           f"{'-' if p is None else f'{p:.2g}'} | {bench.pct_se(a['no_defence'])} | {with_a} | "
                           f"{bench.pct_se(acc['no_defence'])} | {with_acc} | {cc['models_trained']} | "
                           f"{cc['process_wall_s']:.1f} |\n")
        for set_name, s in (m.get("dpa") or {}).get("per_set", {}).items():
            k = m["dpa"]["k"]
            cert = s["certified_accuracy"]
            shown = [r_ for r_ in (1, 2, 5, 10, k // 4, k // 2) if str(r_) in cert]
            dpa.append(f"| {set_name} | {k} | {_pct(s['ensemble_accuracy'])} | "
                       + " / ".join(f"{100 * cert[str(r_)]['value']:.1f}" for r_ in dict.fromkeys(shown))
                       + f" (r = {', '.join(map(str, dict.fromkeys(shown)))}) | {s['median_certified_radius_correct']} | "
                       f"{bench.pct_se(a['no_defence'])} | {_pct(s['ensemble_attack_success'])} | {s['attack_size']} | "
                       f"{s['partitions_touched']} | {_pct(s['certified_against_attack'])} | "
                       f"{bench.pct_se(s['partition_model_accuracy'])} | {cc['models_trained']} | "
                       f"{cc['process_wall_s']:.1f} |\n")
        if "dp_sgd" in m:
            p = m["dp_sgd"]
            eps = p["epsilon"]
            dp.append(f"| {r['config']['attack']['method']} | {p['noise_multiplier']:g} | {p['clip']:g} | "
                      f"{eps if isinstance(eps, str) or eps is None else format(eps, '.3g')} | {p['delta']:g} | {bench.pct_se(a['no_defence'])} | {with_a} | "
                      f"{bench.pct_se(acc['no_defence'])} | {with_acc} | {cc['models_trained']} | "
                      f"{cc['process_wall_s']:.1f} |\n")
        if "ndt" in m:
            nd = m["ndt"]
            sets = nd["per_set"].values()
            cert = {r_: sum(p["certified_accuracy"][str(r_)]["value"] for p in sets) / len(sets) for r_ in nd["radii"]}
            l2 = [p["poison_l2"] for p in sets if p["poison_l2"] is not None]
            ndt.append(f"| {r['config']['attack']['method']} | {nd['sigma']:g} | {nd['models']} | {len(sets)} | {bench.pct_se(a['no_defence'])} | {with_a} | "
                       f"{bench.pct_se(acc['no_defence'])} | {with_acc} | "
                       f"{bench.pct_se(MeanSE.of([p['model_accuracy']['mean'] for p in sets]).to_dict())} | "
                       + " / ".join(f"{100 * v:.1f}" for v in cert.values())
                       + f" (R = {', '.join(f'{r_:.3g}' for r_ in cert)}) | "
                       f"{'-' if not l2 else f'{min(l2):.1f}-{max(l2):.1f}'} | "
                       f"{100 * nd['certified_against_attack']:.1f} | {cc['models_trained']} | "
                       f"{cc['process_wall_s']:.1f} |\n")
    methods = ", ".join(dict.fromkeys(r["config"]["attack"]["method"] for r in runs.values()))
    recipe = cfg["recipe"]
    md = (f"# Poisoning defences: {name}\n\n{env['date']}, {first['cost']['device']}, torch {env['torch']}; data "
          f"{env['data']}; attack {methods} ({first['metrics']['attack']['family']}), "
          f"{first['metrics']['poisons']} poisons of {first['metrics']['train_size']}; victims {cfg['model']['name']} "
          f"({recipe['name']}, {recipe['epochs']} epochs), {cfg['victims']} per poisoned set without and with the "
          "defence (paired seeds), trained from scratch.\n\n")
    if filters:
        md += ("## Filtering defences\n\n| attack | defence | rate | poisons removed | random (expected) | clean removed | "
               "random clean (expected) | P(random >= removed) | attack success, no defence (%) | with defence (%) | "
               "clean acc, no defence (%) | with defence (%) | models trained | wall s |\n"
               "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n" + "".join(filters)
               + "\nrate: the fraction of each class removed, in the penultimate feature space of the first victim "
               "trained on the poisoned set; random: a filter removing as many rows of each class uniformly at random. "
               f"{SEED_002_TABLE_1_4}\n\n")
    if dpa:
        md += ("## Deep Partition Aggregation\n\n| poisoned set | k | ensemble accuracy (%) | certified accuracy (%) | "
               "median certificate (correct) | attack success, no defence (%) | ensemble (%) | poison size "
               "(insert + remove) | partitions touched | certified against this poison (%) | partition models' "
               "accuracy (%) | models trained | wall s |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
               + "".join(dpa) + "\nCertified accuracy at r: correct and provably unchanged by any r inserted or "
               "removed training samples (Levine & Feizi 2021; a modified sample counts 2). 95% Clopper-Pearson "
               "intervals in brackets.\n")
    if ndt:
        md += ("## Noise, train, classify (seed 004's certified defence)\n\n| attack | sigma | M models | poisoned sets | attack "
               "success, no defence (%) | NDT ensemble (%) | clean acc, no defence (%) | NDT ensemble (%) | one noised "
               "model's accuracy (%) | certified accuracy (%) | poison l2 (all rows) | certified against this poison (%) "
               "| models trained | wall s |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n" + "".join(ndt)
               + "\nmean ± SE over poisoned sets (a targeted attack: one target per scenario). Certified accuracy at R: "
               "correct and provably unchanged by any l2 perturbation of the training inputs of total norm R (CERTIFY "
               "over the M votes, n0 = 1, alpha as configured; the largest certifiable R is bounded by M). "
               f"{SEED_004_TABLE_2}\n")
    if dp:
        md += ("## DP-SGD victims (seed 002, section 1.5.5)\n\n| attack | noise multiplier | clip C | epsilon | delta | "
               "attack success, no defence (%) | DP-SGD victims (%) | clean acc, no defence (%) | DP-SGD victims (%) | "
               "models trained | wall s |\n|---|---|---|---|---|---|---|---|---|---|---|\n" + "".join(dp)
               + "\nepsilon: the RDP accountant's for the steps taken, a guarantee for each training row (a poison of "
               "n rows is a group of n); noise multiplier 0: clipping alone (no guarantee); mean ± SE over victims "
               "(paired seeds), as the rows above.\n")
    total = sum(r["cumulative_cost"]["process_wall_s"] for r in runs.values())
    md += f"\nWhole benchmark {total:.1f} s (summed over invocations when resumed).\n"
    bench.write_results(f"defend_{name}", {"environment": env, "runs": runs, "process_wall_s": round(total, 2)}, md)


if __name__ == "__main__":
    main()
