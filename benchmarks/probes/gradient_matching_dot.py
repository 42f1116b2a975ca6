"""Probe: what one gradient-matching step costs on a GPU with the flat inner product of ``ParamVector.dot``
against the old one (a product and a sum per named tensor).

Both objectives that match parameter gradients use it: Inverting Gradients (issue 20; one CIFAR-10-sized
image, ``GradientInversion``, cosine) and Witches' Brew (``GradientMatching``, 1 - cos(g_t, g_p), on a batch
of poisons). Each is timed as forward + backward to its input on a ResNet-18 at initialisation (62
parameter tensors), median of ``--reps`` synchronised calls after warm-up, first with the old per-name
``dot`` patched in, then with the library's. It then runs ``inverting_gradients`` for ``--ig-steps`` steps
both ways (seconds per step, and the objective reached: the two must agree to float tolerance).

    python benchmarks/probes/gradient_matching_dot.py --out gradient_matching_dot.txt
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import median_time, sync  # noqa: E402

from mlaudit.attacks.federated import inverting_gradients  # noqa: E402
from mlaudit.attacks.federated.base import Observation  # noqa: E402
from mlaudit.attacks.federated.objective import GradientInversion  # noqa: E402
from mlaudit.attacks.poisoning.targeted.gradient_matching import GradientMatching  # noqa: E402
from mlaudit.federated import user_gradients  # noqa: E402
from mlaudit.models import build_model  # noqa: E402
from mlaudit.query.params import ParamVector  # noqa: E402

FLAT = ParamVector.dot


def per_name_dot(self: ParamVector, other: Mapping[str, Tensor]) -> Tensor:
    """The old ``ParamVector.dot``: sum over names of (a[k] * b[k]).sum()."""
    return sum((self[k] * other[k]).sum() for k in self)  # type: ignore[return-value]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--poisons", type=int, default=250, help="poisons per Witches' Brew batch")
    ap.add_argument("--ig-steps", type=int, default=200)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model("resnet18", input_shape=(3, 32, 32), num_classes=10).to(dev).eval()
    x1, y1 = torch.rand(1, 3, 32, 32, device=dev), torch.tensor([3], device=dev)
    g = user_gradients(model, x1[None], y1[None])
    obs = Observation(grad=ParamVector({k: v[0] for k, v in g.items()}), users=1, batch=1, input_shape=(3, 32, 32))
    ig = GradientInversion(model, obs, y1, distance="cosine", tv=0.1)
    xp = torch.rand(args.poisons, 3, 32, 32, device=dev)
    gm = GradientMatching(model, torch.rand(1, 3, 32, 32, device=dev), 5,
                          poison_labels=torch.randint(0, 10, (args.poisons,), device=dev))
    idx = torch.arange(args.poisons, device=dev)

    def step(obj: Callable[[Tensor, Tensor], Tensor], x: Tensor) -> Callable[[], object]:
        def run() -> object:
            v = x.clone().requires_grad_(True)
            (gx,) = torch.autograd.grad(obj(v, idx[: len(v)]), v)
            return gx
        return run

    where = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    lines = [f"{where}, torch {torch.__version__}, ResNet-18 at initialisation (62 parameter tensors); medians of "
             f"{args.reps} synchronised calls after 3 warm-ups", ""]
    for label, impl in (("per-name dot (old)", per_name_dot), ("flat dot (library)", FLAT)):
        ParamVector.dot = impl  # type: ignore[method-assign]
        t_ig = median_time(step(ig, x1), args.reps, warmup=3)
        t_gm = median_time(step(gm, xp), args.reps, warmup=3)
        t0 = time.perf_counter()
        rec = inverting_gradients(model, obs, labels=y1, steps=args.ig_steps, tv=0.1,
                                  generator=torch.Generator().manual_seed(0))
        sync()
        per = (time.perf_counter() - t0) / args.ig_steps
        lines.append(f"{label}: Inverting Gradients objective+backward {1000 * t_ig:.2f} ms; Witches' Brew objective+"
                     f"backward ({args.poisons} poisons) {1000 * t_gm:.2f} ms; inverting_gradients {args.ig_steps} "
                     f"steps {1000 * per:.2f} ms/step, objective {rec.info['objective']:.6g}")
    ParamVector.dot = FLAT  # type: ignore[method-assign]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
