"""Truth Serum's attribute inference (Tramer et al. 2022) with and without poisoning, on digits whose
inputs carry a random categorical attribute (independent of everything else, so only memorisation can
reveal it); docs/membership.md, "Truth Serum: attribute inference".

    python benchmarks/truth_serum_attribute.py            # CPU, about a minute

Per setting: 100 training rows are the targets; per seed an MLP (width 128, `fast` recipe, 20 epochs) is
trained on the clean set, one on the set plus the poisons, and one on the poisoned set without the targets
(control). Writes benchmarks/results/truth_serum_attribute_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import environment, write_results  # noqa: E402

from mlaudit.attacks.membership.truth_serum import attribute_inference, with_random_attribute  # noqa: E402
from mlaudit.data.registry import load_dataset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    t0 = time.perf_counter()
    d = load_dataset({"name": "digits"})
    rows: list[dict[str, Any]] = []
    for k, copies in [(2, 1), (4, 1), (4, 2), (4, 4), (8, 2)]:
        train = with_random_attribute(d.train, k, seed=0)
        r = attribute_inference(train, start=64, k=k, targets=100, copies=copies, model={"name": "mlp", "width": 128},
                                recipe={"name": "fast", "epochs": 20}, seeds=range(args.seeds), device=args.device)
        rows.append(r)
        print(k, copies, r["without"]["mean"], r["with"]["mean"], r["control"]["mean"], flush=True)
    env = environment()
    out = {"environment": env, "device": args.device, "rows": rows, "seconds": time.perf_counter() - t0,
           "torch_threads": torch.get_num_threads()}
    pct = lambda m: f"{100 * m['mean']:.1f}% ± {100 * m['se']:.1f}"  # noqa: E731
    lines = ["# Truth Serum: attribute inference with and without poisoning (digits + a random attribute)", "",
             f"{env['date']}, {args.device}, torch {env['torch']}; {out['seconds']:.0f} s. scikit-learn's digits "
             "(1438 training rows, 64 pixels) with k one-hot columns appended: a categorical attribute drawn uniformly "
             "and independently of the label and pixels. 100 training rows are the targets; the adversary knows "
             "each target's pixels and label and guesses its attribute as the completion with the highest "
             "log-probability of the label. Poisons: `copies` copies of every completion of every target, each with "
             "one wrong label per target. Control: the poisoned set without the targets. MLP (width 128), `fast` "
             f"recipe, 20 epochs; mean ± SE over {args.seeds} seeds.", "",
             "| k (chance) | copies | poisons | accuracy without poisoning | with poisoning | control (targets out) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['k']} ({100 * r['chance']:.1f}%) | {r['copies']} | {r['poisons']} | {pct(r['without'])} | "
                     f"{pct(r['with'])} | {pct(r['control'])} |")
    write_results("truth_serum_attribute_cpu", out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
