"""DP auditing benchmark (issue 6): run `dp-audit` configs (mlaudit's correct DP-SGD at claimed
epsilon 1, 4, 8 and a deliberately broken one) with each canary, and record the empirical lower
bounds with their confidence, the models trained and the wall time.

    python benchmarks/dp_audit.py benchmarks/configs/dp_audit_*.yaml --device cuda
    python benchmarks/dp_audit.py benchmarks/configs/dp_audit_*.yaml --device cpu --models-per-side 12 \\
        --set recipe.epochs=2 --name cpu_dryrun                                     # dry run

Every config is run once per canary of ``--canaries`` (default: gradient, crafted, mislabeled; the
score follows the canary: white box for gradient, black box (loss) for the others), with the
config's other fields unchanged. A ``design: one-run`` config (benchmarks/configs/dp_audit_one_run_*.yaml)
keeps its canary and is run once per score of ``--one-run-scores`` (default: loss, gradient).
Writes benchmarks/results/dp_audit[_<name>].{json,md}. ``--run-dir DIR`` keeps each run and the store in DIR;
a call cut short (e.g. by a time limit: use ``timeout -s INT``, so the run records its cost on the way out)
continues with ``--run-dir DIR --resume``, and the reported wall time is then the sum over the calls.

    python benchmarks/dp_audit.py benchmarks/configs/dp_audit_one_run_*.yaml --device cpu --name one_run_cpu

Issue 15's audit of 1000 fast CNNs per side on CIFAR-10 (JPEG) (``--executor process --workers N`` runs the
factory's process workers on the one GPU):

    python benchmarks/dp_audit.py benchmarks/configs/dp_audit_cifar10_fastcnn_*.yaml --canaries gradient \
        --device cuda --name cifar10_fastcnn_h200
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_results  # noqa: E402

from mlaudit.config import apply_overrides, load_yaml  # noqa: E402
from mlaudit.experiments import run_experiment  # noqa: E402

KEYS = ("claimed_epsilon", "epsilon_lower_bound", "confidence", "claim_refuted", "best_possible_lower_bound",
        "fp", "fn", "n_neg", "n_pos", "test_accuracy_of_attack", "accountant_epsilon", "noise_multiplier",
        "sample_rate", "score", "broken", "models", "models_per_side", "delta", "gdp",
        "gdp_best_threshold_all_models", "worst_case_init")
ONE_RUN_KEYS = ("design", "canaries", "runs", "m", "r", "v", "k_pos", "k_neg", "level", "accuracy_of_guesses", "sweep")


def run_one(cfg: dict[str, Any], device: str, executor: str = "local", workers: int | None = None, *,
            run_dir: Path | None = None, resume: bool = False) -> dict[str, Any]:
    """One audit; with ``run_dir`` its run folder and store stay there (one folder per config and variant), so a
    call cut short (a time limit) can be continued with ``resume``: the wall time reported is then the sum over
    the invocations (the run store's cumulative cost), and ``invocations`` says how many."""
    opts = {"workers": workers} if workers else None
    with tempfile.TemporaryDirectory() as tmp:
        base = run_dir if run_dir is not None else Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        out = base / (f"{cfg.get('name', 'audit')}-{cfg.get('canary')}-{cfg.get('score')}" if run_dir else "run")
        t0 = time.perf_counter()
        res = run_experiment(cfg, out=out, device=device, store=base / "runs.db", quiet=True,
                             executor=executor, executor_options=opts, resume=resume)
        wall = time.perf_counter() - t0
    r = res.results
    m = r["metrics"]
    cum = r["cost"].get("cumulative") or {}
    invocations = int(cum.get("invocations", 1))
    return {**{k: m.get(k) for k in KEYS + ONE_RUN_KEYS}, "canary": m["canary"], "canary_score_in": m["canary_score_in"],
            "canary_score_out": m["canary_score_out"], "canary_sampled_steps": m.get("canary_sampled_steps"),
            # this call's wall plus the earlier calls' (their runs' own walls, from the run's cost ledger)
            "wall_s": round(wall + max(0.0, (cum.get("wall_s") or 0.0) - r["cost"]["wall_s"]), 2),
            "invocations": invocations,
            "train_wall_s": cum.get("train_wall_s", r["cost"]["train_wall_s"]) if invocations > 1 else r["cost"]["train_wall_s"],
            "models_per_minute": r["cost"]["models_per_minute"], "device": r["cost"]["device"],
            "peak_gpu_mem_mb": r["cost"]["peak_gpu_mem_mb"], "phases": r["cost"].get("phases"),
            "executor": executor, "workers": workers,
            "stack_layouts": dict(Counter(str(t.get("stack_layout")) for t in r.get("trials") or [])), "config": r["config"]}


def _row(r: dict[str, Any], what: str, counts: str) -> str:
    """One results row: config, DP-SGD, ``what`` (canary, or canaries x runs), score, claim, bound, best
    possible, ``counts`` (cells of its own), accountant eps, models, wall time."""
    acc = r["accountant_epsilon"]
    return (f"| {Path(r['config_file']).stem} | {r['broken'] or 'correct'} | {what} | {r['score']} "
            f"| {r['claimed_epsilon']} | **{r['epsilon_lower_bound']:.3f}** ({r['confidence']:.0%}) "
            f"| {r['best_possible_lower_bound']:.3f} | {counts} | {acc if acc is None else round(acc, 3)} "
            f"| {r['models']} | {r['wall_s']} |\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--canaries", default="gradient,crafted,mislabeled")
    ap.add_argument("--one-run-scores", default="loss,gradient", help="scores run for each design: one-run config")
    ap.add_argument("--models-per-side", type=int, default=None, help="override every config's models_per_side")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="override a config field in every config, e.g. --set recipe.epochs=2 (repeatable)")
    ap.add_argument("--executor", default="local", help="local, process or ray (the factory's executors)")
    ap.add_argument("--workers", type=int, default=None, help="process/ray workers")
    ap.add_argument("--name", default=None, help="results file suffix")
    ap.add_argument("--run-dir", default=None,
                    help="keep each audit's run (and the store) under this folder, so a later call can --resume it")
    ap.add_argument("--resume", action="store_true", help="continue the runs in --run-dir (wall time: all calls)")
    args = ap.parse_args()
    if args.resume and not args.run_dir:
        raise SystemExit("--resume needs --run-dir (the folder of the runs to continue)")
    rows = []
    for path in args.configs:
        base = apply_overrides(load_yaml(path), args.overrides)
        one_run = base.get("design") == "one-run"
        if args.models_per_side is not None and not one_run:
            base["models_per_side"] = args.models_per_side
        variants = ([{"score": sc} for sc in args.one_run_scores.split(",")] if one_run
                    else [{"canary": c, "score": "auto"} for c in args.canaries.split(",")])
        for variant in variants:
            cfg = {**base, **variant}
            print(f"{Path(path).name} {variant} ...", flush=True)
            row = {"config_file": path, **run_one(cfg, args.device, args.executor, args.workers,
                                                  run_dir=Path(args.run_dir) if args.run_dir else None,
                                                  resume=args.resume)}
            print(f"  eps_LB {row['epsilon_lower_bound']:.3f} (claim {row['claimed_epsilon']}, "
                  f"{row['confidence']:.0%}), {row['models']} models, {row['wall_s']} s "
                  f"(training {row['train_wall_s']} s; {row['invocations']} call(s))", flush=True)
            rows.append(row)
    names = sorted({r["config"]["dataset"]["name"] for r in rows})
    env = environment() | {"data": "digits (sklearn, 1438 train / 359 test)" if names == ["digits"] else
                           "; ".join(f"{n}: {d}" for n, d in sorted({r["config"]["dataset"]["name"]: json.dumps(
                               r["config"]["dataset"].get("options") or {}) for r in rows}.items()))}
    dev = rows[0]["device"] if rows else args.device
    md = (f"# DP auditing: empirical epsilon lower bounds\n\n{env['date']}, {dev}, torch {env['torch']}; "
          f"executor {args.executor}" + (f" ({args.workers} workers)" if args.workers else "") + "; "
          f"configs {', '.join(Path(p).name for p in args.configs)}"
          + (f", overrides {args.overrides}" if args.overrides else "") + ".\n")
    game = [r for r in rows if r["design"] != "one-run"]
    one = [r for r in rows if r["design"] == "one-run"]
    if game:
        md += ("\n| config | DP-SGD | canary | score | claimed eps | eps LB (conf.) | best possible | FP / FN (held out) "
               "| accountant eps | models | wall s |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    for r in game:
        md += _row(r, r["canary"]["type"], f"{r['fp']}/{r['n_neg']} , {r['fn']}/{r['n_pos']}")
    if game:
        md += ("\neps LB: Clopper-Pearson lower bound from the held-out halves (threshold chosen on the other halves); "
               "a bound above the claim refutes it. 'best possible' is the bound an error-free attack could show with "
               "these many models. Wall time includes training, scoring and the report.\n")
        resumed = [r for r in game if r.get("invocations", 1) > 1]
        if resumed:
            md += ("Resumed runs (--run-dir/--resume): " + ", ".join(
                f"{Path(r['config_file']).stem} ({r['canary']['type']}) over {r['invocations']} calls"
                for r in resumed) + "; their wall time is the sum over the calls.\n")
    gdp = [r for r in game if r.get("gdp")]
    if gdp:
        md += ("\n## Gaussian-DP estimates (Nasr et al. 2023), from the same held-out counts\n\n"
               "| config | DP-SGD | canary | mu point | mu LB (conf.) | eps from mu LB (delta) | eps LB (above) "
               "| accountant mu (CLT) | eps from accountant mu |\n|---|---|---|---|---|---|---|---|---|\n")
        for r in gdp:
            g = r["gdp"]
            acc_mu = g.get("accountant_mu_clt")
            md += (f"| {Path(r['config_file']).stem} | {r['broken'] or 'correct'} | {r['canary']['type']} "
                   f"| {g['mu_point']:.3f} | **{g['mu_lower']:.3f}** ({g['confidence']:.0%}) "
                   f"| {g['eps_lower_from_mu']:.3f} ({g['delta']:g}) | {r['epsilon_lower_bound']:.3f} "
                   f"| {'-' if acc_mu is None else f'{acc_mu:.3f}'} "
                   f"| {'-' if acc_mu is None else format(g['eps_from_accountant_mu_clt'], '.3f')} |\n")
        best = [r for r in gdp if r.get("gdp_best_threshold_all_models")]
        if best:
            md += ("\nAnnamalai & De Cristofaro's estimator, for comparison with their numbers only (every threshold on "
                   "all models, no held-out half, Clopper-Pearson one-sided at 1 - confidence per rate; not a bound "
                   "at the stated confidence):\n\n| config | canary | init | mu LB | eps from mu LB | FP / FN |\n"
                   "|---|---|---|---|---|---|\n")
            for r in best:
                b, wc = r["gdp_best_threshold_all_models"], r.get("worst_case_init")
                init = f"worst case ({wc['epochs']} epochs, {wc.get('recipe')})" if wc else "seeded random"
                md += (f"| {Path(r['config_file']).stem} | {r['canary']['type']} | {init} | {b['mu_lower']:.3f} "
                       f"| **{b['eps_lower_from_mu']:.3f}** | {b['fp']}/{b['n_neg']} , {b['fn']}/{b['n_pos']} |\n")
        md += ("\nmu LB: max(0, Phi^-1(1 - FPR_hi) - Phi^-1(FNR_hi)) with the Clopper-Pearson upper bounds of the eps "
               "LB; 'eps from mu LB' reads it through the mu-GDP (eps, delta) curve, which assumes a Gaussian "
               "trade-off. Accountant mu: q sqrt(T (e^(1/sigma^2) - 1)), a CLT approximation.\n")
    if one:
        md += ("\n## One-run audits (Steinke, Nasr & Jagielski 2023)\n\n"
               "| config | DP-SGD | canaries x runs | score | claimed eps | eps LB (conf.) | best possible | k+ / k- "
               "| correct / guesses | accountant eps | models | wall s |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
        for r in one:
            md += _row(r, f"{r['canaries']} x {r['runs']}", f"{r['k_pos']} / {r['k_neg']} | {r['v']} / {r['r']}")
        md += ("\nOne-run: each run guesses 'in' for the k+ canaries of lowest score and 'out' for the k- highest; the "
               "bound is the largest over the sweep's (k, k), each at confidence 1 - (1 - confidence) / choices "
               "(Bonferroni). 'best possible' is what all guesses right would show. Wall time includes training, "
               "scoring and the report.\n")
    write_results(f"dp_audit{'_' + args.name if args.name else ''}",
                  {"environment": env, "overrides": args.overrides, "runs": rows}, md)


if __name__ == "__main__":
    main()
