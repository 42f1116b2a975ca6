"""Cross-check of mlaudit's DP-auditing estimators against google-deepmind's jax_privacy (issue 19):
the same counts through both, side by side.

    python3 -m venv /tmp/jp && /tmp/jp/bin/pip install jax_privacy      # its own environment (jax)
    python benchmarks/audit_cross_check.py --jax-python /tmp/jp/bin/python

Three estimators, on a seeded grid of counts (false positives fp of n_neg, false negatives fn of n_pos; or
v correct of r guesses on m canaries), at significance 0.05 and several deltas:

* Clopper-Pearson epsilon (Jagielski et al. 2020): ``mlaudit.stats.eps_lower_bound(fp, fn, n_neg, n_pos,
  delta, alpha)`` vs ``CanaryScoreAuditor.epsilon_clopper_pearson(significance, delta, one_sided=False,
  threshold_strategy=Explicit(0.5))`` on 0/1 scores that realise the counts at threshold 0.5;
* Gaussian DP (Nasr et al. 2023): ``eps_from_mu(mu_lower_bound(...))`` vs
  ``CanaryScoreAuditor.epsilon_from_gdp(significance, delta)``; jax_privacy corrects for all of its
  thresholds (Bonferroni over the 2 n Clopper-Pearson bounds), so mlaudit is given alpha = significance /
  n with n the threshold count jax_privacy reports for those scores;
* one run (Steinke, Nasr & Jagielski 2023): ``mlaudit.audit.one_run.epsilon_lower_bound(m, r, v, delta,
  confidence)`` vs jax_privacy's ``_epsilon_one_run(0, m, r, v, significance, delta)`` (its per-guess-count
  bound, the function its public ``epsilon_one_run`` maximises over thresholds);
* f-DP in one run (Mahloujifar et al. 2025), the claim read as the Gaussian mechanism calibrated to (eps,
  delta): ``mlaudit.audit.one_run.fdp_epsilon_lower_bound`` vs jax_privacy's ``_epsilon_one_run_fdp``.

Writes benchmarks/results/audit_cross_check.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import environment, write_results  # noqa: E402

from mlaudit.audit.gdp import eps_from_mu, mu_lower_bound  # noqa: E402
from mlaudit.audit.one_run import epsilon_lower_bound as one_run_bound  # noqa: E402
from mlaudit.audit.one_run import fdp_epsilon_lower_bound  # noqa: E402
from mlaudit.stats import eps_lower_bound  # noqa: E402

THEIRS = r'''
import json, sys
import numpy as np
import jax_privacy
from jax_privacy import auditing as A

cases = json.loads(sys.stdin.read())
out = []
for c in cases:
    if c["kind"] in ("one-run", "one-run f-DP"):
        fn = A._epsilon_one_run if c["kind"] == "one-run" else A._epsilon_one_run_fdp
        out.append({"eps": float(fn(0.0, c["m"], c["r"], c["v"], c["significance"], c["delta"]))})
        continue
    fp, fn, n_neg, n_pos = c["fp"], c["fn"], c["n_neg"], c["n_pos"]
    ins = np.r_[np.ones(n_pos - fn), np.zeros(fn)]   # an in-canary scored 1 is found (threshold 0.5)
    outs = np.r_[np.ones(fp), np.zeros(n_neg - fp)]  # an out-canary scored 1 is a false positive
    aud = A.CanaryScoreAuditor(ins, outs)
    if c["kind"] == "clopper-pearson":
        eps = aud.epsilon_clopper_pearson(c["significance"], c["delta"], one_sided=False,
                                          threshold_strategy=A.Explicit(0.5))
        out.append({"eps": float(eps)})
    else:
        out.append({"eps": float(aud.epsilon_from_gdp(c["significance"], c["delta"])),
                    "thresholds": int(len(aud._fn_counts))})
print(json.dumps({"version": jax_privacy.__version__, "results": out}))
'''


def grid(seed: int, n: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    cases: list[dict[str, Any]] = []
    for _ in range(n):
        n_neg, n_pos = (int(v) for v in rng.integers(20, 2000, size=2))
        fp, fn = int(rng.integers(0, n_neg // 3 + 1)), int(rng.integers(0, n_pos // 3 + 1))
        delta = float(rng.choice([0.0, 1e-5, 1e-3]))
        cases.append({"kind": "clopper-pearson", "fp": fp, "fn": fn, "n_neg": n_neg, "n_pos": n_pos,
                      "delta": delta, "significance": 0.05})
        cases.append({"kind": "gdp", "fp": fp, "fn": fn, "n_neg": n_neg, "n_pos": n_pos,
                      "delta": max(delta, 1e-5), "significance": 0.05})
        m = int(rng.integers(100, 40_000))  # 2 m delta <= 1 (mlaudit refuses larger: the p-value is not monotone)
        r = int(rng.integers(10, min(m, 2000) + 1))
        v = int(rng.integers(r // 2, r + 1))
        cases.append({"kind": "one-run", "m": m, "r": r, "v": v, "delta": float(rng.choice([0.0, 1e-5])),
                      "significance": 0.05})
        cases.append({"kind": "one-run f-DP", "m": m, "r": r, "v": v, "delta": float(rng.choice([1e-6, 1e-5])),
                      "significance": 0.05})
    return cases


def ours(c: dict[str, Any], theirs: dict[str, Any]) -> float:
    if c["kind"] == "one-run":
        return one_run_bound(m=c["m"], r=c["r"], v=c["v"], delta=c["delta"], confidence=1 - c["significance"])
    if c["kind"] == "one-run f-DP":
        return fdp_epsilon_lower_bound(m=c["m"], r=c["r"], v=c["v"], delta=c["delta"], confidence=1 - c["significance"])
    if c["kind"] == "clopper-pearson":
        return eps_lower_bound(c["fp"], c["fn"], c["n_neg"], c["n_pos"], delta=c["delta"], alpha=c["significance"])
    mu = mu_lower_bound(c["fp"], c["fn"], c["n_neg"], c["n_pos"], alpha=c["significance"] / theirs["thresholds"])
    return eps_from_mu(mu, c["delta"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jax-python", required=True, help="a Python with jax_privacy installed")
    ap.add_argument("--cases", type=int, default=200, help="count draws (three estimators each)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    cases = grid(0, args.cases)
    proc = subprocess.run([args.jax_python, "-c", THEIRS], input=json.dumps(cases), capture_output=True, text=True,
                          check=True)
    got = json.loads(proc.stdout)
    rows = []
    for c, t in zip(cases, got["results"], strict=True):
        mine = ours(c, t)
        rows.append({**c, "mlaudit": mine, "jax_privacy": t["eps"], "abs_diff": abs(mine - t["eps"])})
    summary: dict[str, Any] = {}
    for kind in ("clopper-pearson", "gdp", "one-run", "one-run f-DP"):
        sel = [r for r in rows if r["kind"] == kind]
        d = np.array([r["abs_diff"] for r in sel])
        summary[kind] = {"cases": len(sel), "nonzero_bounds": sum(r["jax_privacy"] > 0 for r in sel),
                         "max_abs_diff": float(d.max()), "median_abs_diff": float(np.median(d)),
                         "max_bound": float(max(r["jax_privacy"] for r in sel))}
    env = environment()
    out = {"environment": env, "jax_privacy": got["version"], "summary": summary, "rows": rows,
           "seconds": time.perf_counter() - t0}
    lines = ["# DP-auditing estimators: mlaudit vs jax_privacy", "",
             f"{env['date']}, CPU, jax_privacy {got['version']}; {len(cases)} seeded count draws, significance 0.05 "
             "(see the script's docstring for how each estimator is called on each side).", "",
             "| estimator | cases | bounds > 0 | largest bound | max abs difference | median abs difference |",
             "|---|---:|---:|---:|---:|---:|"]
    for kind, s in summary.items():
        lines.append(f"| {kind} | {s['cases']} | {s['nonzero_bounds']} | {s['max_bound']:.4f} | "
                     f"{s['max_abs_diff']:.2e} | {s['median_abs_diff']:.2e} |")
    write_results("audit_cross_check", out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
