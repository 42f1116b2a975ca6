"""Per-step timing probe: K models via loop / CUDA streams / compile (not a committed benchmark)."""
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mlaudit.models import build_model

torch.backends.cudnn.benchmark = True
dev = torch.device("cuda")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import time_step as bench  # noqa: E402

for name, B in [("fastcnn", 512), ("resnet18", 128)]:
    for K in (1, 4, 8, 16):
        ms = [build_model(name, input_shape=(3, 32, 32), num_classes=10).to(dev).to(memory_format=torch.channels_last) for _ in range(K)]
        xs = [torch.randn(B, 3, 32, 32, device=dev).to(memory_format=torch.channels_last) for _ in range(K)]
        y = torch.randint(0, 10, (B,), device=dev)
        streams = [torch.cuda.Stream() for _ in range(K)]
        def loop():
            losses = []
            for m, x in zip(ms, xs):
                with torch.autocast("cuda", torch.bfloat16):
                    losses.append(F.cross_entropy(m(x).float(), y))
            torch.stack(losses).sum().backward()
        def streamed():
            cur = torch.cuda.current_stream()
            losses = []
            for m, x, s in zip(ms, xs, streams):
                s.wait_stream(cur)
                with torch.cuda.stream(s):
                    with torch.autocast("cuda", torch.bfloat16):
                        losses.append(F.cross_entropy(m(x).float(), y))
            for s in streams: cur.wait_stream(s)
            torch.stack(losses).sum().backward()
        tl = bench(loop, 10); ts = bench(streamed, 10)
        print(f"{name} K={K} loop ms/model-step {1000*tl/K:.2f}  streams ms/model-step {1000*ts/K:.2f}", flush=True)
    m = build_model(name, input_shape=(3, 32, 32), num_classes=10).to(dev).to(memory_format=torch.channels_last)
    x = torch.randn(B, 3, 32, 32, device=dev).to(memory_format=torch.channels_last)
    cm = torch.compile(m)
    def comp():
        with torch.autocast("cuda", torch.bfloat16):
            loss = F.cross_entropy(cm(x).float(), y)
        loss.backward()
    t0 = time.time(); comp(); print("compile time", time.time() - t0, flush=True)
    print(f"{name} compiled plain ms/step {1000*bench(comp, 20):.2f}", flush=True)
