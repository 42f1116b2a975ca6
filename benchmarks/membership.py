"""Membership-inference benchmark (issue 5): run a `membership-inference` config end to end and
record AUC and TPR at 0.001% / 0.1% / 1% FPR per attack with their intervals, plus what the pool
cost (wall time, models per minute, GPU-seconds).

    python benchmarks/membership.py benchmarks/configs/cifar10_membership_64.yaml --device cuda
    python benchmarks/membership.py examples/membership.yaml --device cpu --name digits_smoke   # dry run

Writes benchmarks/results/membership_<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_results  # noqa: E402

from mlaudit.config import load_yaml  # noqa: E402
from mlaudit.experiments import run_experiment  # noqa: E402
from mlaudit.stats import fpr_key  # noqa: E402


def cell(m: dict) -> str:
    return f"{m['value']:.4f} [{m['lo']:.4f}, {m['hi']:.4f}]"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--name", default=None, help="results file suffix (default: the config file's stem)")
    ap.add_argument("--executor", default="local", help="local | process | ray")
    ap.add_argument("--workers", type=int, default=None, help="process executor: workers sharing the device")
    ap.add_argument("--run-dir", default=None,
                    help="keep the run (and its store) in this folder, so a later call can --resume it")
    ap.add_argument("--resume", action="store_true", help="resume the run in --run-dir")
    args = ap.parse_args()
    opts = {"workers": args.workers} if args.workers else {}
    cfg = load_yaml(args.config)
    name = args.name or Path(args.config).stem
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.run_dir) if args.run_dir else Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        res = run_experiment(cfg, out=base / "run", device=args.device, store=base / "runs.db", quiet=True,
                             executor=args.executor, executor_options=opts, resume=args.resume)
        wall = time.perf_counter() - t0
    r = res.results
    attacks = [a for a in cfg["attacks"]]
    rows = "".join(
        f"| {a} | {cell(r['metrics'][a]['auc'])} | {cell(r['metrics'][a]['tpr_at_fpr'][fpr_key(1e-5)])} | "
        f"{cell(r['metrics'][a]['tpr_at_fpr'][fpr_key(1e-3)])} | {cell(r['metrics'][a]['tpr_at_fpr'][fpr_key(1e-2)])} |\n"
        for a in attacks)
    env = environment()
    c = r["cost"]
    md = (f"# Membership inference: {r['name']}\n\n{env['date']}, {c['device']}, torch {env['torch']}; config "
          f"`{args.config}`; {r['config']['pool']['models']} models, keep {r['config']['pool']['keep']}.\n\n"
          "| attack | AUC | TPR@0.001% FPR | TPR@0.1% FPR | TPR@1% FPR |\n|---|---|---|---|---|\n" + rows +
          f"\nPool: {c['models_trained']} models in {c['train_wall_s']} s ({c['models_per_minute']} models/min), "
          f"whole run {wall:.1f} s (executor {args.executor}{f', {args.workers} workers' if args.workers else ''}"
          f"{', resumed' if args.resume else ''}), peak GPU memory {c['peak_gpu_mem_mb']} MiB. Intervals: 95% bootstrap over "
          "(model, example) pairs.\n")
    if c.get("phases"):
        post = wall - c["train_wall_s"]
        md += (f"\nAfter training: {post:.1f} s ({100 * post / wall:.0f}% of the run): "
               + ", ".join(f"{k} {v:.1f} s" for k, v in c["phases"].items())
               + f", the rest (planning, checkpoints, report) {post - sum(c['phases'].values()):.1f} s.\n")
    ts = r["metrics"].get("truth_serum")
    if ts:
        md += (f"\nTruth Serum: {ts['targets']} targets x {ts['copies']} mislabelled copies, {ts['pairs']} (model, target) "
               f"pairs ({ts['members']} members); poisoned pool test accuracy {ts['poisoned_test_accuracy']['mean']:.4f}.\n\n"
               "| attack | AUC before | AUC after | TPR@0.1% before | TPR@0.1% after | TPR@1% before | TPR@1% after |\n"
               "|---|---|---|---|---|---|---|\n")
        for a in attacks:
            b, f = ts[a]["before"], ts[a]["after"]
            md += (f"| {a} | {cell(b['auc'])} | {cell(f['auc'])} | {cell(b['tpr_at_fpr'][fpr_key(1e-3)])} | "
                   f"{cell(f['tpr_at_fpr'][fpr_key(1e-3)])} | {cell(b['tpr_at_fpr'][fpr_key(1e-2)])} | "
                   f"{cell(f['tpr_at_fpr'][fpr_key(1e-2)])} |\n")
    write_results(f"membership_{name}", {"environment": env, "config": r["config"], "metrics": r["metrics"],
                                         "cost": c, "process_wall_s": round(wall, 2),
                                         "executor": args.executor, "workers": args.workers, "resumed": args.resume}, md)


if __name__ == "__main__":
    main()
