"""The Secret Sharer's exposure (Carlini et al. 2019) of a canary in a small next-character model, vs the
number of times it is inserted and vs random-suffix poison lines (docs/membership.md, "Canary exposure").

    python benchmarks/exposure.py                   # CPU, a few minutes
    python benchmarks/exposure.py --device cuda
    python benchmarks/exposure.py --chars 200000 --epochs 2 --seeds 6 --insertions 1 --poisons 8 32 128 \
        --kinds random pad --controls --name poison_200k_e2_cpu   # where one insertion is not memorised fully
    python benchmarks/exposure.py --chars 200000 --epochs 2 --seeds 6 --insertions 1 --poisons 16 64 \
        --kinds random pad --controls --references 2 --name calibrated_200k_e2_cpu   # with reference models

Text: the first ``--chars`` characters of CPython's help topics (``pydoc_data/topics.py``, lower-cased);
canary ``the secret number is `` + 5 digits (|R| = 10^5, every candidate scored: exact exposure, at most
log2 10^5 = 16.61 bits); model: mlaudit.models.mlp.CharMLP (16-character context, embedding 32, hidden 256), Adam
lr 0.003, ``--epochs`` (6) epochs of batches of 256. Each cell: mean ± SE over ``--seeds`` models (each its own
secret). Poison lines (``--kinds``): ``random`` = prefix + a uniform r' from R, ``pad`` = prefix + "xxxxx"
(mlaudit.audit.exposure.canary_text); ``--controls`` adds the same poisons with the canary never inserted
(the exposure any secret gets from the poisons alone). ``--references K`` also trains K reference models per
target on the same text and poison lines without the canary and reports the calibrated exposure (the rank
under Px_target - mean Px_ref; mlaudit.audit.exposure.measure_exposure). Writes benchmarks/results/exposure_<name>.{json,md}.
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
from mlaudit.stats import MeanSE, mean_difference  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--chars", type=int, default=60_000)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1 (another "
                    "run's continuation: a seed draws the same secret, text and models in every run)")
    ap.add_argument("--insertions", type=int, nargs="+", default=[0, 1, 2, 4])
    ap.add_argument("--poisons", type=int, nargs="+", default=[0, 30, 100])
    ap.add_argument("--kinds", nargs="+", default=["random"], choices=["random", "pad"])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--controls", action="store_true", help="also each kind at the largest --poisons, 0 insertions")
    ap.add_argument("--references", type=int, default=0, help="reference models per target (calibrated exposure)")
    ap.add_argument("--name", default=None, help="results file suffix (default: the device)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    text, fmt = pydoc_text(args.chars), CanaryFormat(length=5)
    rows: list[dict[str, Any]] = []
    recipe = {"name": "custom", "optimizer": "adam", "lr": 0.003, "weight_decay": 0.0, "epochs": args.epochs,
              "batch_size": 256, "schedule": "cosine", "augment": "none", "label_smoothing": 0.0}
    cells = [(i, 0, "none") for i in args.insertions] + [(1, p, k) for k in args.kinds for p in args.poisons if p]
    if args.controls:
        cells += [(0, 0, "none")] * (0 not in args.insertions) + [(0, max(args.poisons), k) for k in args.kinds]
    for ins, poi, kind in cells:
        runs = [measure_exposure(text, fmt=fmt, insertions=ins, poisons=poi, poison="random" if kind == "none" else kind,
                                 seed=args.first_seed + s, device=args.device, exact_limit=fmt.space, recipe=recipe,
                                 references=args.references)
                for s in range(args.seeds)]
        row = {"insertions": ins, "poisons": poi, "kind": kind, "exposure": MeanSE.of([r.exposure for r in runs]).to_dict(),
               "skewnorm": MeanSE.of([r.skewnorm for r in runs]).to_dict(),
               "test_accuracy": MeanSE.of([r.test_accuracy for r in runs]).to_dict(),
               "calibrated": MeanSE.of([r.calibrated for r in runs]).to_dict() if args.references else None,
               "runs": [asdict(r) for r in runs]}
        rows.append(row)
        print(ins, poi, kind, row["exposure"], flush=True)
    text = f"the first {args.chars:,} characters of CPython's help topics (pydoc_data/topics.py, lower-cased)"
    env = environment() | {"data": text}
    out = {"environment": env, "device": args.device, "chars": args.chars, "seeds": args.seeds, "first_seed": args.first_seed, "space": fmt.space,
           "prefix": fmt.prefix, "epochs": args.epochs, "references": args.references, "recipe": recipe, "rows": rows, "seconds": time.perf_counter() - t0,
           "torch_threads": torch.get_num_threads()}
    lines = ["# Canary exposure in a small next-character model (the Secret Sharer)", "",
             f"{env['date']}, {args.device}, torch {env['torch']}; {out['seconds']:.0f} s. Text: the first "
             f"{args.chars:,} characters of CPython's help topics; canary `{fmt.prefix}` + 5 digits (|R| = 10^5, "
             f"exact exposure by scoring every candidate, maximum {math.log2(fmt.space):.2f} bits; the skew-normal fit "
             f"uses 20,000 of them); CharMLP (embedding 32, hidden 256), Adam, {args.epochs} epochs; mean ± SE "
             f"over {args.seeds} models (seeds {args.first_seed}-{args.first_seed + args.seeds - 1}), each with its own secret"
             + (f"; calibrated: {args.references} reference models per target, trained on the same text and poison "
                "lines without the canary, candidates ranked by Px_target - mean Px_ref" if args.references else "")
             + ".", "",
             "| canary insertions | poison lines | kind | exposure (bits, exact) | skew-normal estimate | "
             + ("calibrated exposure (bits, exact) | " if args.references else "") + "next-char test accuracy |",
             "|---:|---:|---|---:|---:|" + ("---:|" if args.references else "") + "---:|"]
    for r in rows:
        e, a, z, c = r["exposure"], r["test_accuracy"], r["skewnorm"], r["calibrated"]
        cal = f"{c['mean']:.2f} ± {c['se']:.2f} | " if c else ""
        lines.append(f"| {r['insertions']} | {r['poisons']} | {r['kind']} | {e['mean']:.2f} ± {e['se']:.2f} | "
                     f"{z['mean']:.2f} ± {z['se']:.2f} | {cal}{100 * a['mean']:.1f}% |")
    base = {r["insertions"]: r for r in rows if r["poisons"] == 0}
    paired = [(r, base[r["insertions"]]) for r in rows if r["poisons"] and r["insertions"] in base]
    if paired:  # the same seed draws the same secret: each poisoned model has an unpoisoned twin
        lines += ["", "Poisoned minus unpoisoned, paired by seed (the same secret and public text), mean ± SE:", "",
                  "| canary insertions | poison lines | kind | exposure gain (bits) |"
                  + (" calibrated exposure gain (bits) |" if args.references else ""),
                  "|---:|---:|---|---:|" + ("---:|" if args.references else "")]
        for r, b in paired:
            cols = [mean_difference([x["exposure"] for x in r["runs"]], [x["exposure"] for x in b["runs"]])]
            if args.references:
                cols.append(mean_difference([x["calibrated"] for x in r["runs"]], [x["calibrated"] for x in b["runs"]]))
            r["paired_gain"] = cols
            lines.append(f"| {r['insertions']} | {r['poisons']} | {r['kind']} | "
                         + " | ".join(f"{c['mean']:+.2f} ± {c['se']:.2f}" for c in cols) + " |")
    lines += ["", "Poison lines: `random` = `prefix + r'` with r' uniform over R; `pad` = `prefix + xxxxx`. Neither is "
              "checked against Truth Serum's own construction (not in the seeds). Rows with 0 insertions and poisons "
              "are controls: the secret's exposure when it was never in the training text."]
    dev = "cuda" if args.device.startswith("cuda") else args.device
    write_results(f"exposure_{args.name or dev}", out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
