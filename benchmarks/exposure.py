"""The Secret Sharer's exposure (Carlini et al. 2019) of a canary in a small next-character model, vs the
number of times it is inserted and vs random-suffix poison lines (docs/membership.md, "Canary exposure").

    python benchmarks/exposure.py                   # CPU, a few minutes
    python benchmarks/exposure.py --device cuda

Text: the first ``--chars`` characters of CPython's help topics (``pydoc_data/topics.py``, lower-cased);
canary ``the secret number is `` + 5 digits (|R| = 10^5, every candidate scored: exact exposure, at most
log2 10^5 = 16.61 bits); model: mlaudit.models.mlp.CharMLP (16-character context, embedding 32, hidden 256), Adam
lr 0.003, 6 epochs of batches of 256. Each cell: mean ± SE over ``--seeds`` models (each its own secret).
Writes benchmarks/results/exposure_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import environment, write_results  # noqa: E402

from mlaudit.audit.exposure import CanaryFormat, measure_exposure, pydoc_text  # noqa: E402
from mlaudit.stats import MeanSE  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--chars", type=int, default=60_000)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--insertions", type=int, nargs="+", default=[0, 1, 2, 4])
    ap.add_argument("--poisons", type=int, nargs="+", default=[0, 30, 100])
    args = ap.parse_args()
    t0 = time.perf_counter()
    text, fmt = pydoc_text(args.chars), CanaryFormat(length=5)
    rows: list[dict[str, Any]] = []
    cells = [(i, 0) for i in args.insertions] + [(1, p) for p in args.poisons if p]
    for ins, poi in cells:
        runs = [measure_exposure(text, fmt=fmt, insertions=ins, poisons=poi, seed=s, device=args.device,
                                 exact_limit=fmt.space)
                for s in range(args.seeds)]
        row = {"insertions": ins, "poisons": poi, "exposure": MeanSE.of([r.exposure for r in runs]).to_dict(),
               "skewnorm": MeanSE.of([r.skewnorm for r in runs]).to_dict(),
               "test_accuracy": MeanSE.of([r.test_accuracy for r in runs]).to_dict(),
               "runs": [asdict(r) for r in runs]}
        rows.append(row)
        print(ins, poi, row["exposure"], flush=True)
    env = environment()
    out = {"environment": env, "device": args.device, "chars": args.chars, "seeds": args.seeds, "space": fmt.space,
           "prefix": fmt.prefix, "rows": rows, "seconds": time.perf_counter() - t0,
           "torch_threads": torch.get_num_threads()}
    lines = ["# Canary exposure in a small next-character model (the Secret Sharer)", "",
             f"{env['date']}, {args.device}, torch {env['torch']}; {out['seconds']:.0f} s. Text: the first "
             f"{args.chars:,} characters of CPython's help topics; canary `{fmt.prefix}` + 5 digits (|R| = 10^5, "
             f"exact exposure by scoring every candidate, maximum {math.log2(fmt.space):.2f} bits; the skew-normal fit "
             f"uses 20,000 of them); CharMLP (embedding 32, hidden 256), Adam, 6 epochs; mean ± SE "
             f"over {args.seeds} models, each with its own secret.", "",
             "| canary insertions | random-suffix poison lines | exposure (bits, exact) | skew-normal estimate | "
             "next-char test accuracy |", "|---:|---:|---:|---:|---:|"]
    for r in rows:
        e, a, z = r["exposure"], r["test_accuracy"], r["skewnorm"]
        lines.append(f"| {r['insertions']} | {r['poisons']} | {e['mean']:.2f} ± {e['se']:.2f} | "
                     f"{z['mean']:.2f} ± {z['se']:.2f} | {100 * a['mean']:.1f}% |")
    lines += ["", "Random-suffix poison lines are `prefix + r'` with r' uniform over R (a negative control, not "
              "Truth Serum's construction): they flatten the model's prior after the prefix but dilute the canary."]
    dev = "cuda" if args.device.startswith("cuda") else args.device
    write_results(f"exposure_{dev}", out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
