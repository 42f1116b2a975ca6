"""Probe (issue 16): where mlaudit's PGD spends its time on a GPU next to torchattacks' PGD.

Trains one ``airbench`` model (``airbench-muon``) on CIFAR-10 (JPEG), then times PGD-10 l-inf on
``--examples`` test images with both libraries (warm-up call first, CUDA-synchronised), and prints the
top operators of a ``torch.profiler`` trace of each (self CPU and CUDA time), plus how many
device-to-host synchronisations each made (``cudaStreamSynchronize``/``cudaMemcpy`` DtoH calls).

    python benchmarks/probes/pgd_profile.py --examples 1000 --out pgd_profile.txt
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torchattacks
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import cifar10_jpeg  # noqa: E402

from mlaudit.attacks.evasion import pgd  # noqa: E402
from mlaudit.models import build_model  # noqa: E402
from mlaudit.train import train  # noqa: E402


def timed(fn, x, y, reps: int = 3) -> float:  # noqa: ANN001
    fn(x, y)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(x, y)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=1000)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    data = cifar10_jpeg()
    model = train(build_model("airbench", input_shape=data.input_shape, num_classes=10), data, "airbench-muon",
                  seed=0, device="cuda").eval().cuda()
    x, y = data.test.x[: args.examples].cuda(), data.test.y[: args.examples].cuda()
    eps = 8 / 255
    ours = lambda xx, yy: pgd(model, xx, yy, eps=eps, steps=10, step_size=eps / 4)  # noqa: E731
    ta = torchattacks.PGD(model, eps=eps, alpha=eps / 4, steps=10, random_start=True)
    lines = [f"ours {timed(ours, x, y):.4f} s, torchattacks {timed(ta, x, y):.4f} s per PGD-10 call on {len(x)} images"]
    for name, fn in (("mlaudit", ours), ("torchattacks", ta)):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn(x, y)
            torch.cuda.synchronize()
        lines.append(f"\n== {name}: by self CPU time")
        lines.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        lines.append(f"\n== {name}: by self CUDA time")
        lines.append(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
