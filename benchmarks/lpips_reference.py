"""mlaudit's LPIPS (``mlaudit.attacks.federated.lpips``) next to the ``lpips`` package (Zhang et al. 2018; the
authors' release, 0.1.4) on the same weights and images (issue 20: judge reconstructions by LPIPS).

Both sides use the AlexNet trunk of torchvision's ``alexnet`` with the same random weights (no ImageNet weights
are downloaded here; the package is built with ``pnet_rand=True``), and the LPIPS v0.1 linear layers that the
package ships (``lpips/weights/v0.1/alex.pth``, learned on human judgements). The images are in [0, 1]: for
mlaudit as they are, for the package mapped to [-1, 1] (its input convention). Pairs: an image and a noisy copy
at several noise levels, and two unrelated images, at 32x32 (CIFAR size), 64x64 and 224x224.

Install the reference beside mlaudit (CPU torch needs no CUDA build of torchvision's operators; this script
builds only the AlexNet module, so it stubs the operator registration that fails without them):

    pip install --no-deps --target /tmp/lpv lpips==0.1.4 torchvision==<the one matching your torch>
    PYTHONPATH=/tmp/lpv python benchmarks/lpips_reference.py --name cpu
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mlaudit.attacks.federated.lpips import lpips_alexnet  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def reference():  # noqa: ANN201
    """The package's metric with a random AlexNet trunk, and (trunk state_dict, linear-layer state_dict)."""
    from _common import import_torchvision_models_only

    import_torchvision_models_only()  # AlexNet's module code only
    import lpips
    import torchvision

    ref = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False).eval()
    state = ref.state_dict()
    trunk = {}
    for k, v in state.items():  # net.slice{s}.{i}.weight -> features.{i}.weight (torchvision's AlexNet keys)
        if k.startswith("net.slice"):
            trunk["features." + k.split(".", 2)[2]] = v
    lin = {k: v for k, v in state.items() if k.startswith("lin") and not k.startswith("lins.")}
    return ref, trunk, lin, {"lpips": getattr(lpips, "__version__", "0.1.4"), "torchvision": torchvision.__version__}


def pairs(size: int, n: int, gen: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Smooth random images in [0, 1] [n, 3, size, size] (upsampled noise, so neighbouring pixels correlate as
    in photographs) paired with noisy copies and with unrelated images."""
    def smooth(k: int) -> torch.Tensor:
        base = torch.rand(k, 3, max(2, size // 8), max(2, size // 8), generator=gen)
        return torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)

    x = smooth(n)
    out = {f"noise sd {s}": (x, (x + s * torch.randn(x.shape, generator=gen)).clamp(0, 1)) for s in (0.01, 0.05, 0.2)}
    out["unrelated"] = (x, smooth(n))
    out["identical"] = (x, x.clone())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--sizes", default="32,64,224")
    ap.add_argument("--name", default="cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    ref, trunk, lin, versions = reference()
    ours = lpips_alexnet(trunk, lin).eval()
    gen = torch.Generator().manual_seed(1)
    rows = []
    with torch.no_grad():
        for size in (int(s) for s in args.sizes.split(",")):
            for what, (a, b) in pairs(size, args.examples, gen).items():
                theirs = ref(a * 2 - 1, b * 2 - 1).flatten().double()
                mine = ours(a, b).double()
                diff = (mine - theirs).abs()
                rows.append({"size": size, "pair": what, "lpips_mean": float(theirs.mean()),
                             "lpips_min": float(theirs.min()), "lpips_max": float(theirs.max()),
                             "max_abs_diff": float(diff.max()),
                             "max_rel_diff": float((diff / theirs.abs().clamp_min(1e-12)).max())
                             if bool((theirs > 0).all()) else None})
                print(rows[-1], flush=True)
    meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, **versions,
            "cpu": platform.processor() or platform.machine(), "examples": args.examples,
            "trunk": "torchvision alexnet, random init (torch.manual_seed(0)), no ImageNet weights",
            "linear layers": "lpips 0.1.4 package, weights/v0.1/alex.pth"}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"lpips_reference_{args.name}"
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [f"# LPIPS: mlaudit vs the lpips package ({meta['date']})", "",
             f"torch {meta['torch']}, lpips {meta['lpips']}, torchvision {meta['torchvision']}, CPU; {args.examples} "
             f"image pairs per row; trunk: {meta['trunk']}; linear layers: {meta['linear layers']}.", "",
             "| size | pair | LPIPS (package) mean [min, max] | max abs diff | max rel diff |", "|---|---|---|---:|---:|"]
    for r in rows:
        rel = "-" if r["max_rel_diff"] is None else f"{r['max_rel_diff']:.2e}"
        lines.append(f"| {r['size']} | {r['pair']} | {r['lpips_mean']:.4g} [{r['lpips_min']:.4g}, {r['lpips_max']:.4g}] "
                     f"| {r['max_abs_diff']:.2e} | {rel} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
