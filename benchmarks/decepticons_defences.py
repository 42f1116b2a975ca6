"""Client-side defences against Decepticons (issue 20, deliverable 5 on text): the ``federated`` kind with
``attack: decepticons`` and each ``defence:`` in turn, on examples/federated_text.yaml (pydoc text, 8 users x one
sequence of 32 characters, TinyGPT d_model 64 at initialisation, 256 bins, tag of 2 tokens, 3 trials, secure
aggregation). Each run attacks the same rounds with and without the defence (``metrics.defence``).

    python benchmarks/decepticons_defences.py          # CPU, about a minute

Writes benchmarks/results/decepticons_defences_pydoc_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from _common import cpu_environment, cpu_name, write_results  # noqa: E402

from mlaudit.config import load_yaml  # noqa: E402
from mlaudit.experiments import run_experiment  # noqa: E402

DEFENCES: list[dict[str, Any]] = [
    {"method": "noise", "sigma": 1e-4}, {"method": "noise", "sigma": 1e-3}, {"method": "noise", "sigma": 1e-2},
    {"method": "clip-noise", "clip": 1.0, "sigma": 0.01}, {"method": "prune", "prune": 0.5},
    {"method": "prune", "prune": 0.9}, {"method": "quantise", "bits": 8}, {"method": "quantise", "bits": 2}]


def label(d: dict[str, Any]) -> str:
    return d["method"] + " " + ", ".join(f"{k} {v:g}" for k, v in d.items() if k != "method")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="decepticons_defences_pydoc_cpu")
    args = ap.parse_args()
    torch.set_num_threads(2)
    base = load_yaml(HERE.parent / "examples" / "federated_text.yaml")
    rows = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i, d in enumerate(DEFENCES):
            m = run_experiment({**base, "defence": d}, out=Path(tmp) / f"r{i}", device="cpu", store=Path(tmp) / "runs.db",
                               quiet=True).results["metrics"]["defence"]
            rows.append({"defence": label(d), **{k: m[k] for k in ("with", "without", "per_users", "update_distortion")}})
            print(rows[-1]["defence"], rows[-1]["with"]["value"], rows[-1]["without"]["value"], flush=True)
    res = {"environment": cpu_environment(2, data="pydoc-text (CPython help topics, 32-character windows)"),
           "cpu": cpu_name(), "config": base, "rows": rows, "seconds": time.perf_counter() - t_all}
    write_results(args.name, res, table(res))
    print(table(res))


def table(res: dict[str, Any]) -> str:
    def pct(r: dict[str, Any]) -> str:
        return f"{100 * r['value']:.1f}% [{100 * r['lo']:.1f}, {100 * r['hi']:.1f}]"

    counts = [p["users"] for p in res["rows"][0]["per_users"]]
    lines = ["# Client-side defences against Decepticons (the federated kind, text)", "",
             f"{res['environment']['date']}, CPU ({res['cpu']}), torch {res['environment']['torch']}; "
             "examples/federated_text.yaml: pydoc text, 8 users x one sequence of 32 characters, TinyGPT (d_model 64, "
             "2 layers, ReLU) at initialisation, 256 bins, a tag of 2 tokens, secure aggregation, 3 trials. Each user "
             "defends its own update before the secure sum; the same rounds are attacked without the defence. Cells: "
             "(token, position) pairs recovered with the defence [95% Clopper-Pearson], by users summed.", "",
             "| defence | " + " | ".join(f"{n} user{'s' if n > 1 else ''}" for n in counts)
             + " | without the defence (8 users) | update distortion (mean) |",
             "|---|" + "---:|" * (len(counts) + 2)]
    for r in res["rows"]:
        lines.append(f"| {r['defence']} | " + " | ".join(pct(p["with"]) for p in r["per_users"])
                     + f" | {pct(r['without'])} | {r['update_distortion']['mean']:.3g} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
