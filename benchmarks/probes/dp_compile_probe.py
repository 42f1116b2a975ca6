"""Does ``torch.compile`` of fast clipping's norms-and-sums pay (issue 15 goal 1)? One model, fixed batch.

Times, for ResNet-18-GN and the fast CNN (fp32, CIFAR-10 shapes, random data):
* ``sgd``: the non-private forward + backward of the mean loss on ``--batch`` examples (the ratio's denominator);
* ``bk``: fast clipping's forward + backward to the layer outputs (``fastclip._forward``) then the per-layer norms,
  clip factors and clipped sums (``fastclip._clipped_sums``) on ``slots`` Poisson slots, eagerly;
* ``bk_compiled``: the same with ``_clipped_sums`` under ``torch.compile`` (one graph, no graph break: im2col
  takes F.unfold while compiling); the compile time and the largest relative difference from the eager sums.
The forward cannot be compiled here: book-keeping differentiates with respect to every layer's output, and a
compiled forward hides those inside one autograd node. Noise and the optimizer update are not timed (a few
elementwise kernels). Each shape compiles once (the cost rule reads the batch size), so a training run with
Poisson batches compiles once per slot bucket.

    python benchmarks/probes/dp_compile_probe.py --out /tmp/w/dp_compile.json [--models resnet18,fastcnn]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import sync, time_step  # noqa: E402

from mlaudit.models import build_model  # noqa: E402
from mlaudit.privacy import fastclip as fc  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet18,fastcnn")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--slots", default="256,288")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="dp_compile.json")
    args = ap.parse_args()
    dev = torch.device(args.device)
    out: dict[str, object] = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                              "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                              "batch": args.batch, "steps": args.steps, "models": {}}
    for name in args.models.split(","):
        torch.manual_seed(0)
        m = build_model({"name": name, "norm": "group", "width": args.width}, input_shape=(3, 32, 32),
                        num_classes=10).to(dev)
        layers = fc._plan(m)
        row: dict[str, object] = {}
        x = torch.randn(args.batch, 3, 32, 32, device=dev)
        y = torch.randint(0, 10, (args.batch,), device=dev)

        def sgd() -> None:
            m.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
        row["sgd_ms"] = round(1e3 * time_step(sgd, args.steps), 2)
        compiled = torch.compile(fc._clipped_sums, dynamic=False)
        for slots in map(int, args.slots.split(",")):
            xs = torch.randn(slots, 3, 32, 32, device=dev)
            ys = torch.randint(0, 10, (slots,), device=dev)
            w = (torch.rand(slots, device=dev) < args.batch / slots).float()
            fwd = lambda: fc._forward(m, layers, xs, ys, 0.0, [])  # noqa: E731
            _, ag, _ = fwd()
            eager = fc._clipped_sums(m, layers, ag, w, 1.0, "auto")[0]
            sync()
            t = time.perf_counter()
            got = compiled(m, layers, ag, w, 1.0, "auto")[0]
            sync()
            compile_s = time.perf_counter() - t
            err = max(((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item() for a, b in zip(eager, got))
            r = {"forward_backward_ms": 1e3 * time_step(fwd, args.steps),
                 "sums_eager_ms": 1e3 * time_step(lambda: fc._clipped_sums(m, layers, ag, w, 1.0, "auto"), args.steps),
                 "sums_compiled_ms": 1e3 * time_step(lambda: compiled(m, layers, ag, w, 1.0, "auto"), args.steps),
                 "bk_ms": 1e3 * time_step(lambda: fc._clipped_sums(m, layers, fwd()[1], w, 1.0, "auto"), args.steps),
                 "bk_compiled_ms": 1e3 * time_step(lambda: compiled(m, layers, fwd()[1], w, 1.0, "auto"), args.steps),
                 "compile_s": compile_s, "max_rel_diff": err}
            r = {k: float(f"{v:.3g}") if k == "max_rel_diff" else round(v, 3) for k, v in r.items()}
            r["ratio_eager"] = round(r["bk_ms"] / row["sgd_ms"], 3)
            r["ratio_compiled"] = round(r["bk_compiled_ms"] / row["sgd_ms"], 3)
            row[f"slots_{slots}"] = r
            print(name, slots, r, flush=True)
        print(name, "sgd", row["sgd_ms"], "ms", flush=True)
        out["models"][name] = row  # type: ignore[index]
        json.dump(out, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
