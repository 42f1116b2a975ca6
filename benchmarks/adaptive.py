"""Adaptive vs non-adaptive evaluation of every built-in evasion defence (issue 16, deliverable 2; seed 003's
lesson: defences look robust when the attack ignores them), side by side on one trained model.

Input transformations (:func:`mlaudit.attacks.evasion.adaptive.evaluate_defence`): bit-depth reduction,
JPEG, random resize-and-pad and Gaussian noise (the base classifier of randomized smoothing, on a model
trained with that noise) -- clean accuracy bare and defended, PGD on the bare model, its transfer to the
defence, PGD through the defence ignoring it (non-adaptive), and the adaptive attack (BPDA for the
non-differentiable transforms, EOT for the randomised ones). Feature-space detectors
(:func:`mlaudit.attacks.evasion.detector.evaluate_detector`): Mahalanobis and kNN fitted on clean training
images, PGD (non-adaptive) vs feature collision and the detector-aware attack (adaptive); the figure that
matters is "misclassified and not flagged".

    python benchmarks/adaptive.py --examples 120 --name digits_cpu                     # CPU, digits, fastcnn
    python benchmarks/adaptive.py --dataset cifar10 --device cuda --model airbench --recipe airbench-muon \\
        --eps 8/255 --examples 1000 --name cifar10_airbench_h200

Writes benchmarks/results/adaptive_<name>.{json,md}.
"""

from __future__ import annotations

import argparse
import html
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as bench  # noqa: E402

from mlaudit.attacks.evasion.adaptive import evaluate_defence  # noqa: E402
from mlaudit.attacks.evasion.detector import FeatureDetector, evaluate_detector  # noqa: E402
from mlaudit.data import load_dataset  # noqa: E402
from mlaudit.models import build_model  # noqa: E402
from mlaudit.train import train  # noqa: E402


def _frac(v: str) -> float:
    a, _, b = v.partition("/")
    return float(a) / float(b) if b else float(a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="digits", choices=("digits", "cifar10"))
    ap.add_argument("--model", default="fastcnn")
    ap.add_argument("--recipe", default="fast")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--eps", type=_frac, default=0.2, help="l-inf radius (8/255 accepted)")
    ap.add_argument("--steps", type=int, default=50, help="PGD steps of every attack")
    ap.add_argument("--eot", type=int, default=8, help="EOT draws of the adaptive attack on randomised defences")
    ap.add_argument("--draws", type=int, default=8, help="draws averaged in a randomised defence's accuracy")
    ap.add_argument("--sigma", type=float, default=0.25, help="Gaussian-noise defence (and its noise-trained model)")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--quality", type=int, default=75)
    ap.add_argument("--examples", type=int, default=120)
    ap.add_argument("--fit", type=int, default=5000, help="clean training inputs the detectors are fitted on")
    ap.add_argument("--calibrate", type=int, default=1000, help="clean training inputs setting the 5%% threshold")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="digits_cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if args.dataset == "cifar10":
        data, described = bench.cifar10_jpeg(), "CIFAR-10 (JPEG), shared pack"
    else:
        data, described = load_dataset({"name": "digits"}), "digits (sklearn, 8x8)"
    x, y = data.test.x[: args.examples].to(dev), data.test.y[: args.examples].to(dev)
    side = data.input_shape[-1]

    def fit(recipe: Any) -> tuple[torch.nn.Module, float]:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        m = train(build_model(args.model, input_shape=data.input_shape, num_classes=data.num_classes), data, recipe,
                  seed=0, device=dev).eval().to(dev)
        return m, time.perf_counter() - t0

    t_start = time.perf_counter()
    model, train_s = fit(args.recipe)
    noisy, noisy_s = fit({"name": args.recipe, "noise_sigma": args.sigma})
    print(f"trained {args.model}: {train_s:.1f} s; noise-trained (sigma {args.sigma}): {noisy_s:.1f} s", flush=True)
    defences: list[tuple[str, torch.nn.Module, dict[str, Any]]] = [
        ("bit-depth", model, {"bits": args.bits}),
        ("jpeg", model, {"quality": args.quality}),
        ("resize-pad", model, {"max_size": side + side // 8 + 1}),
        ("noise", noisy, {"sigma": args.sigma}),
    ]
    rows: list[dict[str, Any]] = []
    for transform, m, opts in defences:
        t0 = time.perf_counter()
        r = evaluate_defence(m, x, y, transform=transform, eps=args.eps, steps=args.steps, eot=args.eot,
                             draws=args.draws, **opts)
        r["wall_s"] = round(time.perf_counter() - t0, 2)
        r["model"] = args.model + (f" (noise-trained, sigma {args.sigma})" if m is noisy else "")
        rows.append(r)
        print(f"{transform} {opts}: defended clean {100 * r['clean_defended']:.1f}%, naive {100 * r['robust_naive']:.1f}%"
              f" -> adaptive {100 * r['robust_adaptive']:.1f}% ({r['wall_s']} s)", flush=True)
    perm = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))
    fit_i, cal_i = perm[: args.fit], perm[args.fit: args.fit + args.calibrate]
    xf, yf = data.train.x[fit_i].to(dev), data.train.y[fit_i].to(dev)
    xc = data.train.x[cal_i].to(dev)
    detectors: list[dict[str, Any]] = []
    for method in ("mahalanobis", "knn"):
        t0 = time.perf_counter()
        det = FeatureDetector.fit(model, xf, yf, xc, method=method, fpr=0.05)
        r = evaluate_detector(model, x, y, det, pool_x=xf, pool_y=yf, eps=args.eps, steps=args.steps)
        r["wall_s"] = round(time.perf_counter() - t0, 2)
        detectors.append(r)
        print(f"detector {method}: undetected success PGD {100 * r['pgd']['undetected_success']:.1f}% -> "
              f"detector-aware {100 * r['detector-aware']['undetected_success']:.1f}% ({r['wall_s']} s)", flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "device": args.device,
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "cpu": platform.processor() or platform.machine(), "threads": args.threads, "torch": torch.__version__,
            "dataset": described, "model": args.model, "recipe": args.recipe, "examples": len(x), "eps": args.eps,
            "steps": args.steps, "eot": args.eot, "draws": args.draws, "sigma": args.sigma,
            "detector_fit": args.fit, "detector_calibrate": args.calibrate, "train_s": round(train_s, 2),
            "noisy_train_s": round(noisy_s, 2), "wall_s": round(time.perf_counter() - t_start, 2), "seed": 0}
    out = bench.RESULTS / f"adaptive_{args.name}"
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "defences": rows, "detectors": detectors},
                                                   indent=2) + "\n")
    out.with_suffix(".md").write_text(render(meta, rows, detectors))
    print(f"wrote {out}.json and .md")


def _p(v: float) -> str:
    return f"{100 * v:.1f}"


def render(meta: dict[str, Any], rows: list[dict[str, Any]], detectors: list[dict[str, Any]]) -> str:
    where = meta["gpu"] or f"CPU ({meta['cpu']}, {meta['threads']} thread)"
    lines = [f"# Evasion defences: non-adaptive vs adaptive evaluation ({meta['date']})", "",
             f"{meta['dataset']}, first {meta['examples']} test examples; {where}, torch {meta['torch']}; model "
             f"`{meta['model']}` trained by mlaudit (recipe `{meta['recipe']}`, seed {meta['seed']}, "
             f"{meta['train_s']} s; its noise-trained twin {meta['noisy_train_s']} s); l-inf eps "
             f"{meta['eps']:.4g}, PGD-{meta['steps']} (one random start) in every column; randomised defences: EOT "
             f"over {meta['eot']} draws in the adaptive attack, accuracies averaged over {meta['draws']} draws. "
             f"Whole benchmark {meta['wall_s']} s. Accuracy in %.", "",
             "| defence | model | clean, bare | clean, defended | PGD on the bare model | transfer to the defence "
             "| PGD through the defence (non-adaptive) | adaptive | wall s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        opts = ", ".join(f"{k} {v}" for k, v in r["options"].items())
        how = "BPDA" if r["bpda"] else (f"EOT {r['eot']}" if r["eot"] > 1 else "PGD")
        lines.append(f"| {r['transform']} ({html.escape(opts)}) | {html.escape(r['model'])} | "
                     f"{_p(r['clean_undefended'])} | {_p(r['clean_defended'])} | {_p(r['robust_undefended'])} | "
                     f"{_p(r['robust_transfer'])} | {_p(r['robust_naive'])} | **{_p(r['robust_adaptive'])}** ({how}) "
                     f"| {r['wall_s']} |")
    lines += ["", f"Feature-space detectors in the penultimate layer (fitted on {meta['detector_fit']} clean training "
              f"images, threshold flagging 5% of {meta['detector_calibrate']} others). Fractions of the test examples "
              "in %: misclassified / flagged / **misclassified and not flagged** (the attack's success against the "
              "defended system).", "",
              "| detector | clean flagged | PGD (non-adaptive) | feature collision (adaptive) | detector-aware (adaptive) "
              "| wall s |", "|---|---:|---|---|---|---:|"]
    for d in detectors:
        cells = [f"{_p(d[k]['misclassified'])} / {_p(d[k]['flagged'])} / **{_p(d[k]['undetected_success'])}**"
                 for k in ("pgd", "feature-collision", "detector-aware")]
        lines.append(f"| {d['method']} | {_p(d['clean_flagged'])} | " + " | ".join(cells) + f" | {d['wall_s']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
