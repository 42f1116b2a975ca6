"""Shifted windows vs unfold for fast clipping on the CPU (issue 15): the clipped sum of ResNet-18-GN and the fast
CNN (width 16, 3x32x32 random data, 64 slots), median of 7 calls after 2 warm-ups, 1 torch thread.

    python benchmarks/probes/dp_shift_cpu.py
"""
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from mlaudit.models import build_model  # noqa: E402
from mlaudit.privacy import fastclip_rules  # noqa: E402
from mlaudit.privacy.fastclip import clipped_grad_sum  # noqa: E402

torch.set_num_threads(1)


def median_ms(fn, n: int = 7) -> float:
    for _ in range(2):
        fn()
    t = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return 1000 * statistics.median(t)


print(f"torch {torch.__version__}, 1 thread, {time.strftime('%Y-%m-%d')}")
for name in ("resnet18", "fastcnn"):
    torch.manual_seed(0)
    m = build_model({"name": name, "norm": "group", "width": 16}, input_shape=(3, 32, 32), num_classes=10).train()
    x, y = torch.rand(64, 3, 32, 32), torch.randint(0, 10, (64,))
    w = (torch.rand(64) < 0.9).float()

    def plain() -> None:
        m.zero_grad(set_to_none=True)
        F.cross_entropy(m(x), y).backward()

    print(f"{name}: non-private fwd+bwd {median_ms(plain):.1f} ms")
    for shift in (True, False):
        fastclip_rules.CONV_SHIFT = shift
        ms = median_ms(lambda: clipped_grad_sum(m, x, y, w, clip=1.0))
        print(f"{name}: fast clipped sum, {'shifted windows' if shift else 'unfold'}: {ms:.1f} ms")
