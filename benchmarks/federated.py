"""Federated-learning benchmark (issue 20): inputs a server recovers from one FedSGD round on CIFAR-10 (JPEG).

1. Robbing the Fed (Fowl et al., ICLR 2022): a ResNet-18 behind an imprint module, users x batch images
   summed by secure aggregation, for each number of bins; the fraction recovered exactly (PSNR >= 80 dB)
   and at PSNR >= 30 dB, next to the fraction of inputs alone in their bin and the fraction expected when
   the bins split the measurement's distribution evenly, (1 - 1/k)^(n - 1) for n inputs and k bins.
2. Inverting Gradients (Geiping et al., NeurIPS 2020): one user, one image, a ResNet-18 at initialisation;
   PSNR and SSIM of the optimised image, label recovery (iDLG), seconds per image.

    python benchmarks/federated.py --device cuda --workdir runs/bench-federated
    python benchmarks/federated.py --device cuda --users 1,16,64 --batch 16,64,256 --bins 256,1024 --ig-images 8
    python benchmarks/federated.py --smoke --device cpu          # seconds: digits, mlp, a tiny grid
    python benchmarks/federated.py --device cuda --skip-ig --users 8 --batch 64 --bins 512 \
        --defences "noise sigma=1e-4; prune prune=0.9; quantise bits=4; agg clip=1,noise_multiplier=0.1"

Every cell is one ``federated`` run of ``benchmarks/configs/cifar10_federated_{imprint,ig}_resnet18.yaml``
with users, batch and bins (or the steps and images) replaced; ``--workdir`` keeps the runs so a call cut
short by a time limit resumes. ``--smoke`` swaps in digits, the zoo's mlp, 16-64 bins and 50 inversion
steps (checks the script on a CPU; its numbers mean little). Writes benchmarks/results/federated_<name>.{json,md}.

3. Defences (``--defences``, issue 20 deliverable 5): the imprint cell ``--defence-cell users,batch,bins`` (default
   the first of --users, --batch, --bins) again under each defence, ``;``-separated, each ``method key=value,...``:
   a client-side defence of the kind's ``defence`` block (``noise sigma``, ``clip-noise clip,sigma``, ``prune
   prune``, ``quantise bits``: the kind also runs the attack on the same round without it), or ``agg`` for the
   aggregation's own per-user clipping and noise (``agg clip=1,noise_multiplier=0.1``: DP-FedSGD's Gaussian noise
   on the clipped sum; compare with the cell without it).

Caveats to state with the numbers: the data is the JPEG pack; the models are at initialisation (the attacks
do not need training; Fowl et al. and Geiping et al. also report trained models); the public data that places
the bins is the test split, drawn from the users' distribution (the paper's setting; a shifted public set
places the bins worse); one round, one trial per cell (the fractions' intervals are over inputs).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HERE, cifar10_pack, cumulative_cost, environment, resume_run, workdir, write_results  # noqa: E402

from mlaudit.config import load_yaml  # noqa: E402

IMPRINT = HERE / "configs" / "cifar10_federated_imprint_resnet18.yaml"
INVERSION = HERE / "configs" / "cifar10_federated_ig_resnet18.yaml"
SMOKE = {"dataset": "digits", "model": "mlp"}


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--users", default="1,8,64", help="comma-separated numbers of users aggregated")
    ap.add_argument("--batch", default="8,32,128", help="comma-separated images per user")
    ap.add_argument("--bins", default="256,1024", help="comma-separated imprint bins")
    ap.add_argument("--chunk", type=int, default=8, help="users' gradients per vmap call")
    ap.add_argument("--ig-steps", type=int, default=None, help="Inverting Gradients steps (default: the config's)")
    ap.add_argument("--ig-images", type=int, default=None, help="images inverted, one trial each (default: config's)")
    ap.add_argument("--defences", default="", help="';'-separated 'method key=value,...' (module docstring, item 3)")
    ap.add_argument("--defence-cell", default=None, help="users,batch,bins of the defended imprint cell")
    ap.add_argument("--skip-imprint", action="store_true")
    ap.add_argument("--skip-ig", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="digits, mlp, users 1,4 x batch 4,8, bins 16,64, 50 steps")
    ap.add_argument("--name", default=None, help="results file suffix (default: cifar10_resnet18, or smoke)")
    ap.add_argument("--workdir", default=None, help="keep the runs here and resume them when invoked again")
    args = ap.parse_args()
    if args.smoke:
        args.users, args.batch, args.bins = "1,4", "4,8", "16,64"
        args.ig_steps, args.ig_images = args.ig_steps or 50, args.ig_images or 2
    return args


def config(path: Path, args: argparse.Namespace, **change: Any) -> dict[str, Any]:
    cfg = load_yaml(path)
    if args.smoke:
        cfg.update(SMOKE)
    elif cfg["dataset"].get("name") == "cifar10":
        cfg["dataset"] = {**cfg["dataset"], "root": cifar10_pack()}
    cfg.update(change)
    return cfg


def parse_defences(text: str) -> list[tuple[str, dict[str, float]]]:
    """``"noise sigma=1e-3; agg clip=1,noise_multiplier=0.1"`` -> [("noise", {"sigma": 1e-3}), ("agg", {...})]."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(";"))):
        method, _, rest = item.partition(" ")
        opts = {}
        for kv in filter(None, (t.strip() for t in rest.split(","))):
            key, _, value = kv.partition("=")
            opts[key.strip()] = int(value) if key.strip() == "bits" else float(value)
        out.append((method, opts))
    return out


def expected_alone(n: int, k: int) -> float:
    """P(an input is alone in its bin) when n inputs fall into k equally likely bins independently."""
    return (1 - 1 / k) ** (n - 1)


def main() -> None:
    args = parse_args()
    name = args.name or ("smoke" if args.smoke else "cifar10_resnet18")
    out: dict[str, Any] = {"imprint": [], "inversion": None}
    with workdir(args.workdir) as tmp:
        if not args.skip_imprint:
            for k in _ints(args.bins):
                for u in _ints(args.users):
                    for b in _ints(args.batch):
                        cfg = config(IMPRINT, args, users=u, batch=b, chunk=args.chunk, name=f"imprint-u{u}-b{b}-k{k}")
                        cfg["imprint"] = {**cfg.get("imprint", {}), "bins": k}
                        run = tmp / f"imprint-u{u}-b{b}-k{k}"
                        res = resume_run(cfg, run, args.device, tmp / "runs.db")
                        m = res.results["metrics"]
                        out["imprint"].append({"users": u, "batch": b, "bins": k, "metrics": m,
                                               "expected_alone": expected_alone(u * b, k),
                                               "cost": res.results["cost"], "cumulative_cost": cumulative_cost(run)})
                        print(f"bins {k} users {u} batch {b}: recovered {m['recovered']['k']}/{m['recovered']['n']}, "
                              f"exact {m['exact']['k']}, alone {m['imprint']['inputs_alone_in_a_bin']}", flush=True)
                        report(args, name, out)
        defences = parse_defences(args.defences)
        if defences:
            u, b, k = _ints(args.defence_cell) if args.defence_cell else (
                _ints(args.users)[0], _ints(args.batch)[0], _ints(args.bins)[0])
            out["defences"] = []
            for method, opts in defences:
                tag = method + "".join(f"-{key}{v:g}" for key, v in opts.items())
                cfg = config(IMPRINT, args, users=u, batch=b, chunk=args.chunk, name=f"imprint-u{u}-b{b}-k{k}-{tag}")
                cfg["imprint"] = {**cfg.get("imprint", {}), "bins": k}
                if method == "agg":
                    cfg["aggregation"] = {**cfg.get("aggregation", {}), **opts}
                else:
                    cfg["defence"] = {"method": method, **opts}
                run = tmp / f"imprint-u{u}-b{b}-k{k}-{tag}"
                res = resume_run(cfg, run, args.device, tmp / "runs.db")
                m = res.results["metrics"]
                out["defences"].append({"method": method, "options": opts, "users": u, "batch": b, "bins": k,
                                        "metrics": m, "cost": res.results["cost"],
                                        "cumulative_cost": cumulative_cost(run)})
                print(f"defence {tag}: recovered {m['recovered']['k']}/{m['recovered']['n']}, exact {m['exact']['k']}",
                      flush=True)
                report(args, name, out)
        if not args.skip_ig:
            inv = load_yaml(INVERSION)["inversion"]
            cfg = config(INVERSION, args, inversion={**inv, **({"steps": args.ig_steps} if args.ig_steps else {})},
                         **({"trials": args.ig_images} if args.ig_images else {}))
            run = tmp / "inverting-gradients"
            res = resume_run(cfg, run, args.device, tmp / "runs.db")
            out["inversion"] = {"config": res.results["config"], "metrics": res.results["metrics"],
                                "trials": res.results["trials"], "cost": res.results["cost"],
                                "cumulative_cost": cumulative_cost(run)}
            report(args, name, out)


def _pct(d: dict[str, Any]) -> str:
    return f"{100 * d['value']:.1f} [{100 * d['lo']:.1f}, {100 * d['hi']:.1f}]"


def report(args: argparse.Namespace, name: str, out: dict[str, Any]) -> None:
    env = environment()
    if args.smoke:
        env["data"] = "digits (smoke run: the numbers mean little)"
    lines = [f"# Federated learning: {name}", "", f"{env['date']}, torch {env['torch']}, GPU {env['gpu']}; data "
             f"{env['data']}; model {'mlp' if args.smoke else 'resnet18'} at initialisation, FedSGD, one round.", ""]
    if out["imprint"]:
        lines += ["## Robbing the Fed: imprint module through secure aggregation", "",
                  "Fractions in % [95% Clopper-Pearson over the inputs]; exact: PSNR >= 80 dB; expected alone: "
                  "(1 - 1/k)^(n - 1).", "",
                  "| bins | users | batch | inputs | recovered (>= 30 dB) | exact | alone in a bin | expected alone | "
                  "updates s | attack s |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c in out["imprint"]:
            m = c["metrics"]
            lines.append(f"| {c['bins']} | {c['users']} | {c['batch']} | {m['recovered']['n']} | {_pct(m['recovered'])} | "
                         f"{_pct(m['exact'])} | {100 * m['imprint']['alone_fraction']:.1f} | "
                         f"{100 * c['expected_alone']:.1f} | {m['seconds']['updates']:.2f} | {m['seconds']['attack']:.3f} |")
        lines.append("")
    if out.get("defences"):
        lines += ["## Defences against the imprint (same cell; client-side ones also measured without)", "",
                  "Recovered: PSNR >= 30 dB, % [95% Clopper-Pearson]; exact: >= 80 dB; distortion: mean ||g' - g|| / ||g|| "
                  "per user; `agg`: the aggregation's per-user clip and Gaussian noise (noise_multiplier * clip) on the sum.",
                  "", "| users x batch, bins | defence | recovered | exact | median PSNR dB | without: recovered | "
                  "without: exact | distortion | updates s | attack s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for c in out["defences"]:
            m = c["metrics"]
            d = m.get("defence")
            spec = c["method"] + " " + ", ".join(f"{k} {v:g}" for k, v in c["options"].items())
            med = m["psnr"].get("median") if m["psnr"] else None
            without = ([_pct(d["without"]["recovered"]), _pct(d["without"]["exact"]),
                        f"{d['update_distortion']['mean']:.3g}"] if d else ["-", "-", "-"])
            cells = [f"{c['users']} x {c['batch']}, {c['bins']}", spec, _pct(m["recovered"]), _pct(m["exact"]),
                     "-" if med is None else f"{med:.1f}", *without, f"{m['seconds']['updates']:.2f}",
                     f"{m['seconds']['attack']:.3f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    inv = out["inversion"]
    if inv is not None:
        m, c = inv["metrics"], inv["config"]
        lines += ["## Inverting Gradients: one image, one user", "",
                  f"{c['trials']} images, {c['inversion']['steps']} steps, tv {c['inversion']['tv']}, labels "
                  f"{c['inversion']['labels']}.", "",
                  "| images | recovered (>= 30 dB) | PSNR median [q1, q3] | SSIM median | labels right | attack s / image |",
                  "|---:|---:|---:|---:|---:|---:|",
                  f"| {m['recovered']['n']} | {_pct(m['recovered'])} | {m['psnr']['median']:.1f} [{m['psnr']['q1']:.1f}, "
                  f"{m['psnr']['q3']:.1f}] | {m['ssim']['median'] if m['ssim'] else float('nan'):.3f} | "
                  f"{100 * (m['label_accuracy'] or 0):.0f}% | {m['seconds']['attack'] / m['recovered']['n']:.1f} |", ""]
    lines.append("Caveats: " + ("a CPU smoke run on digits; " if args.smoke else "the JPEG pack; ") + "models at "
                 "initialisation; public data (bin placement) = the test split; one round per cell.")
    write_results(f"federated_{name}", {"environment": env, **copy.deepcopy(out)}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
