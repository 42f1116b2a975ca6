"""Probe (issue 16): do two mlaudit trees give the same adversarial examples? Runs 37 evasion calls (fgsm; pgd l-inf / l2
with ce / dlr / margin, 1 and 3 restarts, targeted, mini-batches, eot 2, no random start, a 0-255 box; apgd, apgd-dlr,
apgd-t, cw, autoattack) on a small MLP with some examples fooled early, on the CPU with one thread, and saves them;
``--compare`` lists the calls whose outputs differ (bitwise) between two saved files.

    git archive <commit> src | tar -x -C /tmp/before
    python benchmarks/probes/evasion_same_results.py --src /tmp/before/src --save /tmp/before.pt
    python benchmarks/probes/evasion_same_results.py --save /tmp/after.pt
    python benchmarks/probes/evasion_same_results.py --compare /tmp/before.pt /tmp/after.pt
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(save: Path) -> None:
    import torch
    from torch import nn

    import mlaudit
    from mlaudit.attacks.evasion import EVASION_ATTACKS, apgd, apgd_targeted, cw_l2, fgsm, pgd

    print(f"mlaudit from {Path(mlaudit.__file__).parents[1]}")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    x = torch.rand(40, 1, 8, 8)
    y = model(x).argmax(1)          # all correct at the start, some fooled along the way
    y[::7] = (y[::7] + 1) % 10      # and some misclassified from the start
    tgt = (y + 3) % 10
    out = {}

    def gen(s: int) -> torch.Generator:
        return torch.Generator().manual_seed(s)

    for norm, eps in (("linf", 0.05), ("l2", 0.5)):
        out[f"fgsm {norm}"] = fgsm(model, x, y, eps=eps, norm=norm)
        out[f"fgsm {norm} margin"] = fgsm(model, x, y, eps=eps, norm=norm, loss="margin")
        for loss in ("ce", "dlr", "margin"):
            for restarts in (1, 3):
                out[f"pgd {norm} {loss} r{restarts}"] = pgd(model, x, y, eps=eps, norm=norm, loss=loss, steps=7,
                                                            restarts=restarts, generator=gen(1))
            out[f"pgd {norm} {loss} targeted"] = pgd(model, x, y, eps=eps, norm=norm, loss=loss, steps=7, target=tgt,
                                                     generator=gen(2))
        out[f"pgd {norm} batch_size 16"] = pgd(model, x, y, eps=eps, norm=norm, steps=5, batch_size=16, generator=gen(3))
        out[f"pgd {norm} eot 2"] = pgd(model, x, y, eps=eps, norm=norm, steps=5, eot=2, generator=gen(4))
        out[f"pgd {norm} no random start"] = pgd(model, x, y, eps=eps, norm=norm, steps=5, random_start=False)
        out[f"apgd {norm}"] = apgd(model, x, y, eps=eps, norm=norm, steps=20)
        out[f"apgd {norm} dlr"] = apgd(model, x, y, eps=eps, norm=norm, steps=20, loss="dlr")
        out[f"apgd-t {norm}"] = apgd_targeted(model, x, y, eps=eps, norm=norm, steps=10)
    out["cw"] = cw_l2(model, x, y, steps=20, search_steps=2)
    out["pgd box 0-255"] = pgd(model, x * 255, y, eps=8.0, box=(0.0, 255.0), steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["autoattack"] = EVASION_ATTACKS.get("autoattack")(model, x[:12], y[:12], eps=0.05, square_queries=50)
    torch.save(out, save)
    print(f"{len(out)} outputs saved to {save}")


def compare(a: Path, b: Path) -> None:
    import torch

    ra, rb = torch.load(a), torch.load(b)
    differ = [k for k in ra if k not in rb or not torch.equal(ra[k], rb[k])]
    print(f"{len(ra)} calls; bitwise different: {differ or 'none'}")
    sys.exit(1 if differ else 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", default=str(ROOT / "src"), help="the tree mlaudit is imported from")
    ap.add_argument("--save", type=Path)
    ap.add_argument("--compare", type=Path, nargs=2)
    args = ap.parse_args()
    if args.compare:
        return compare(*args.compare)
    sys.path.insert(0, args.src)
    run(args.save)


if __name__ == "__main__":
    main()
