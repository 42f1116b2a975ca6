"""Every zoo model through the factory's compiled call (`stacked._compiled_call`) under bf16 autocast: one
forward and backward, compiled and eager, from one initialisation: the loss of each and how many parameter
gradients are not finite (fastcnn's bf16 ``amax`` pool had NaN gradients compiled until 2026-12-07).

    python benchmarks/probes/compile_zoo_sweep.py --device cpu            # inductor's C++ backend
    python benchmarks/probes/compile_zoo_sweep.py --device cuda --parallel 10 --out /tmp/w/compile_zoo_sweep.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

NAMES = ("airbench", "convnet6", "fastcnn", "mobilenetv2", "resnet18", "scatter-cnn", "tanhcnn", "vgg11", "mlp",
         "logistic")


def one(name: str, device: str) -> dict:
    import torch
    import torch.nn.functional as F

    from mlaudit.models import build_model
    from mlaudit.train.stacked import _compiled_call

    torch.manual_seed(0)
    dev = torch.device(device)
    vector = name in ("mlp", "logistic")
    spec = {"name": name} if vector else {"name": name, "width": 4 if name == "mobilenetv2" else 8}
    shape = (64,) if vector else (3, 32, 32)
    m = build_model(spec, input_shape=shape, num_classes=10)
    x, y = torch.rand(32, *shape), torch.randint(0, 10, (32,))
    if hasattr(m, "data_init"):
        m.data_init(x)
    m, x, y = m.to(dev), x.to(dev), y.to(dev)
    out: dict = {"model": name, "device": device, "torch": torch.__version__}
    t0 = time.perf_counter()
    for label, fn in (("compiled", _compiled_call()), ("eager", lambda mod, xb: mod(xb))):
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(fn(m, x).float(), y)
        grads = torch.autograd.grad(loss, [p for p in m.parameters() if p.requires_grad])
        out[label] = {"loss": round(loss.item(), 5), "nonfinite_grads": sum(not bool(torch.isfinite(g).all())
                                                                            for g in grads)}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--one", default="")
    ap.add_argument("--out", default="")
    ap.add_argument("--parallel", type=int, default=1, help="models compiled at once (one process each)")
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.one, args.device)))
        return
    rows, pending, running = [], list(NAMES), []  # one process per model (a fresh dynamo cache), --parallel at once
    while pending or running:
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            running.append((name, subprocess.Popen([sys.executable, __file__, "--one", name, "--device", args.device],
                                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)))
        name, proc = running.pop(0)
        text, _ = proc.communicate(timeout=600)
        lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
        rows.append(json.loads(lines[-1][7:]) if lines else {"model": name, "crashed": text[-800:]})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
