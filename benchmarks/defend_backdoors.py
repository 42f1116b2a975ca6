"""Backdoor attacks under the defences (issue 18 validation): a grid of ``defend`` runs, each given config (a
``defend`` config with a backdoor attack) against each defence of :data:`DEFENCES`, with one table of attack
success and clean accuracy without and with the defence, poisons removed against random filtering, DP-SGD's
epsilon and NDT's vote.

    python benchmarks/defend_backdoors.py benchmarks/configs/digits_defend_backdoors_*.yaml --device cpu \\
        --workdir runs/defend_backdoors --name digits_backdoors
    python benchmarks/defend_backdoors.py benchmarks/configs/digits_defend_backdoors_*.yaml --smoke  # seconds a run

Each run is the config with the defence's keys merged over it (``defence``, and what else that defence needs:
``victim`` for DP-SGD, whose victims must not use BatchNorm), named ``<config name>-<defence>``; the attack's
label in the table is the config's name without the prefix all the given configs share. Every run is
validated before the first one starts. The defences: none; spectral signatures, activation clustering, the
outlier method and deep kNN at 10% and 20% of each class; DP-SGD (noise multiplier 1, clip 1); NDT (sigma 0.25,
M = 12 noised models of 8 epochs, no denoiser); and three controls this script registers as filters (not
defences, not part of mlaudit): ``random-control`` (the rate of every class removed uniformly at random, seed 0),
``outlier-target-only`` and ``outlier-except-target`` (the outlier filter's choice of rows in the attack's target
class and random-control's elsewhere, or the reverse). ``--defences`` picks some (comma-separated labels),
``--smoke`` makes every run small (1 victim, 3 epochs, 20 crafting steps) to check a grid, ``--workdir DIR``
keeps the runs and resumes them. Writes benchmarks/results/defend_<name>.{json,md} after every run.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as bench  # noqa: E402
from defend import summary  # noqa: E402

from mlaudit.config import load_yaml  # noqa: E402
from mlaudit.defences import FILTERS, register_filter  # noqa: E402
from mlaudit.defences.base import remove_top  # noqa: E402
from mlaudit.experiments import parse_config  # noqa: E402
from mlaudit.threads import configure_threads  # noqa: E402

CRAFTING = ("label-consistent", "hidden-trigger", "sleeper-agent")
"""The attacks that craft against a model (``steps`` applies; ``--smoke`` shortens it)."""


RANDOM_CONTROL = "random-control"
RANDOM_CONTROL_SEED = 0
SPLIT_CONTROLS = ("outlier-target-only", "outlier-except-target")
_TARGET: list[int] = [0]
"""The running attack's target class (set before each run): the split controls need it."""


def _random_scores(n: int) -> Any:
    import torch

    return torch.rand(n, generator=torch.Generator().manual_seed(RANDOM_CONTROL_SEED), dtype=torch.float64)


def _outlier_scores(features: Any, labels: Any) -> Any:
    """The outlier filter's score: l2 distance of each row's features to its class's mean feature."""
    import torch

    from mlaudit.defences.base import per_class

    f, s = features.double().cpu(), torch.zeros(len(labels), dtype=torch.float64)
    for rows in per_class(labels.cpu()):
        s[rows] = (f[rows] - f[rows].mean(0)).norm(dim=1)
    return s


if RANDOM_CONTROL not in FILTERS.names():
    @register_filter(RANDOM_CONTROL, paper="none: this benchmark's control (rows drawn uniformly at random per class)")
    def random_control(features: Any, labels: Any, *, rate: float) -> Any:
        """The control of the filters: ``rate`` of every class removed uniformly at random (a fixed seed, the
        features unused), so that what removing that much data does to an attack is measured beside what a
        filter's choice of rows does."""
        return remove_top(_random_scores(len(labels)), labels, rate)

    @register_filter(SPLIT_CONTROLS[0], paper="none: this benchmark's control (outlier in the target class only)")
    def outlier_target_only(features: Any, labels: Any, *, rate: float) -> Any:
        """The outlier filter's choice in the attack's target class, random-control's in every other class."""
        s, mine = _random_scores(len(labels)), labels.cpu() == _TARGET[0]
        s[mine] = _outlier_scores(features, labels)[mine]
        return remove_top(s, labels, rate)

    @register_filter(SPLIT_CONTROLS[1], paper="none: this benchmark's control (outlier outside the target class)")
    def outlier_except_target(features: Any, labels: Any, *, rate: float) -> Any:
        """random-control's choice in the attack's target class, the outlier filter's in every other class."""
        s, mine = _outlier_scores(features, labels), labels.cpu() == _TARGET[0]
        s[mine] = _random_scores(len(labels))[mine]
        return remove_top(s, labels, rate)


DEFENCES: dict[str, dict[str, Any]] = {
    "none": {"defence": "none"},
    **{f"{m}@{r}": {"defence": {"method": m, "rate": float(r)}}
       for m in ("spectral", "activation-clustering", "outlier", "knn", RANDOM_CONTROL) for r in ("0.1", "0.2")},
    **{f"{m}@0.2": {"defence": {"method": m, "rate": 0.2}} for m in SPLIT_CONTROLS},
    "dp-sgd": {"defence": {"method": "dp-sgd", "dp": {"noise_multiplier": 1.0, "clip": 1.0}},
               "victim": {"model": {"name": "mlp", "norm": "none"}}},
    "ndt": {"defence": {"method": "ndt", "sigma": 0.25, "models": 12, "n0": 1, "alpha": 0.001, "denoiser": "none",
                        "recipe": {"name": "fast", "epochs": 8}}},
}
"""Label -> the keys merged over each config: the CPU defences of docs/defend.md (DP-SGD as in
digits_defend_dp_badnets.yaml at noise 1, epsilon 5.5; NDT as in digits_defend_ndt_badnets.yaml) and the controls."""


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("configs", nargs="+", help="defend configs with a backdoor attack (their defence is replaced)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--name", default=None, help="results file suffix (default: the first config's stem)")
    ap.add_argument("--defences", default=None, help=f"comma-separated labels of {', '.join(DEFENCES)} (default: all)")
    ap.add_argument("--victims", type=int, default=None, help="victims per poisoned set (default: the base's)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: $MLAUDIT_THREADS, else "
                    "1 on a machine of at most 2 cores, as the CLI)")
    ap.add_argument("--smoke", action="store_true", help="1 victim, 3 epochs, 20 crafting steps: check the grid")
    bench.add_executor_args(ap)
    ap.add_argument("--workdir", default=None, help="keep the runs here and resume them (default: a temp dir)")
    return ap.parse_args()


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``b`` over ``a``, mappings merged key by key."""
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _pick(names: list[str], wanted: str | None, what: str) -> list[str]:
    if wanted is None:
        return names
    got = [x.strip() for x in wanted.split(",") if x.strip()]
    unknown = [x for x in got if x not in names]
    if unknown:
        raise SystemExit(f"unknown {what} {', '.join(unknown)}; the grid has {', '.join(names)}")
    return got


def _epochs(recipe: Any, epochs: int) -> dict[str, Any]:
    return {"name": recipe, "epochs": epochs} if isinstance(recipe, str) else {**recipe, "epochs": epochs}


def _labels(names: list[str]) -> list[str]:
    """Each config's name without the prefix (up to a '-') that all of them share."""
    if len(names) < 2:
        return names
    prefix = os.path.commonprefix(names)
    prefix = prefix[: prefix.rfind("-") + 1]
    return [n[len(prefix):] or n for n in names]


def grid(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """``attack/defence`` -> its defend config, every one validated."""
    raw = [load_yaml(p) for p in args.configs]
    for p, c in zip(args.configs, raw, strict=True):
        if c.get("kind") != "defend":
            raise SystemExit(f"{p}: expected kind defend, got {c.get('kind')!r}")
    names = [c.get("name") or Path(p).stem for p, c in zip(args.configs, raw, strict=True)]
    out = {}
    for a, name, cfg in zip(_labels(names), names, raw, strict=True):
        for d in _pick(list(DEFENCES), args.defences, "defence"):
            c = _merge(cfg, DEFENCES[d])
            c["name"] = f"{name}-{d.replace('@', '-')}"
            if args.victims is not None:
                c["victims"] = args.victims
            if args.smoke:
                c["victims"] = 1
                c["recipe"] = _epochs(c["recipe"], 3)
                if isinstance(c["defence"], dict) and "recipe" in c["defence"]:
                    c["defence"]["recipe"] = _epochs(c["defence"]["recipe"], 3)
                if c["attack"]["method"] in CRAFTING:
                    c["attack"]["steps"] = 20
            parse_config(c)
            out[f"{a}/{d}"] = c
    return out


def main() -> None:
    args = parse_args()
    configure_threads(args.threads)
    configs = grid(args)
    name = args.name or Path(args.configs[0]).stem.replace("_defend_", "_", 1) + ("_smoke" if args.smoke else "")
    runs: dict[str, Any] = {}
    with bench.workdir(args.workdir) as tmp:
        for label, c in configs.items():
            t0 = time.perf_counter()
            _TARGET[0] = int(c["attack"]["target_class"])
            out = tmp / label.replace("/", "__").replace("@", "_")
            r = bench.resume_run(c, out, args.device, tmp / "runs.db", **bench.executor_kwargs(args)).results
            runs[label] = {"config": r["config"], "metrics": r["metrics"], "cost": r["cost"],
                           "process_wall_s": round(time.perf_counter() - t0, 2),
                           "cumulative_cost": bench.cumulative_cost(out)}
            print(f"{label}: {summary(r['metrics'])}", flush=True)
            report(name, args, runs)


def _se(d: dict[str, Any]) -> str:
    """``mean ± se`` in % with one decimal; a single value (an ensemble's) without ±."""
    se = d["se"] if isinstance(d["se"], (int, float)) else float("nan")
    return f"{100 * d['mean']:.1f}" + ("" if se != se else f" ± {100 * se:.1f}")


def _detail(m: dict[str, Any]) -> str:
    if "removal" in m:
        rm = m["removal"]
        p = rm.get("p_value")
        return (f"{rm['poisons_removed']} / {rm['poisons']} ({rm['random_poisons_removed']:.1f}); "
                f"P = {'-' if p is None else format(p, '.2g')}; clean {rm['clean_removed']} "
                f"({rm['random_clean_removed']:.1f})")
    if "dp_sgd" in m:
        eps = m["dp_sgd"]["epsilon"]
        return (f"epsilon {eps if isinstance(eps, str) or eps is None else format(eps, '.3g')} "
                f"(delta {m['dp_sgd']['delta']:g}, C {m['dp_sgd']['clip']:g}, noise {m['dp_sgd']['noise_multiplier']:g})")
    if "ndt" in m:
        nd = m["ndt"]
        s = next(iter(nd["per_set"].values()))
        return (f"sigma {nd['sigma']:g}, M {nd['models']}; one noised model {100 * s['model_accuracy']['mean']:.1f}%; "
                f"certified against this poison {100 * nd['certified_against_attack']:.1f}%")
    return "-"


def report(name: str, args: argparse.Namespace, runs: dict[str, Any]) -> None:
    env = bench.environment()
    env["data"] = "digits (sklearn, 8x8)"
    first = next(iter(runs.values()))
    cfg = first["config"]
    rows, attacks = [], {}
    for label, r in runs.items():
        a_name, d_label = label.split("/")
        m, cc, c = r["metrics"], r["cumulative_cost"], r["config"]
        a, acc = m["attack_success"], m["clean_accuracy"]
        attacks.setdefault(a_name, (c["attack"], m["attack"]))
        victim = (c.get("victim") or {}).get("model") or c["model"]
        rows.append(f"| {a_name} | {d_label} | {_se(a['no_defence'])} | {_se(a['defence']) if 'defence' in a else '-'} | "
                    f"{_se(acc['no_defence'])} | {_se(acc['defence']) if 'defence' in acc else '-'} | {_detail(m)} | "
                    f"{victim['name']} (norm {victim.get('norm')}) | "
                    f"{cc['models_trained']} | {cc['process_wall_s']:.1f} |\n")
    att = "".join(f"* {n}: {a['method']}, {i['poisons']} poisons of {first['metrics']['train_size']} (budget "
                  f"{i['budget']:g}), trigger {i['trigger_text']}"
                  + ("" if a.get("eps") is None else f", eps {a['eps']:g}/255, {a['steps']} crafting steps")
                  + "\n" for n, (a, i) in attacks.items())
    recipe = cfg["recipe"]
    md = (f"# Backdoor attacks under the defences: {name}\n\n{env['date']}, {first['cost']['device']}, torch "
          f"{env['torch']}; data {env['data']}; victims {cfg['model']['name']} ({recipe['name']}, {recipe['epochs']} "
          f"epochs), {cfg['victims']} per poisoned set without and with the defence (paired seeds), trained from "
          f"scratch; seed {cfg['seed']}{' (smoke run)' if args.smoke else ''}.\n\nAttacks (target class 0):\n\n{att}\n"
          "| attack | defence | ASR, no defence (%) | ASR, with (%) | clean acc, no defence (%) | clean acc, with (%) | "
          "poisons removed (random, expected); P(random >= removed); clean removed (random) / epsilon / NDT | "
          "victims | models trained | wall s |\n|---|---|---|---|---|---|---|---|---|---|\n" + "".join(rows)
          + "\nASR: triggered test inputs of classes 1-9 classified as 0, mean ± SE over victims (NDT: the "
          "M-model plurality vote, one value). Filters remove `rate` of every class in the penultimate features of "
          "the first undefended victim; random: a filter removing as many rows of each class uniformly at random. "
          "DP-SGD: the victims (and their undefended twins of that row) are MLPs without BatchNorm. NDT: noise "
          "only (no denoiser), certificates against the poison's l2 norm (none for a poison that relabels). "
          f"{RANDOM_CONTROL}, {SPLIT_CONTROLS[0]} and {SPLIT_CONTROLS[1]} are controls this script registers, not "
          "defences: rate of every class removed uniformly at random (seed 0), and the outlier filter's choice of rows "
          "in the target class only (random elsewhere) or outside it only (random in it).\n\n"
          f"Command: `python benchmarks/defend_backdoors.py {' '.join(args.configs)} --device {args.device}"
          + (" --smoke" if args.smoke else "") + f" --name {name}`\n")
    total = sum(r["cumulative_cost"]["process_wall_s"] for r in runs.values())
    md += f"\nWhole benchmark {total:.1f} s (summed over runs and invocations).\n"
    bench.write_results(f"defend_{name}", {"environment": env, "configs": args.configs, "defences": DEFENCES, "runs": runs,
                                           "process_wall_s": round(total, 2)}, md)


if __name__ == "__main__":
    main()
