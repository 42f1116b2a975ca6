"""Per-step timing probe: plain module vs vmapped stack (not a committed benchmark)."""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


from mlaudit.models import build_model
from mlaudit.train.loop import StackedModels, init_models

torch.backends.cudnn.benchmark = True
dev = torch.device("cuda")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import time_step as bench  # noqa: E402

for name, B in [("fastcnn", 512), ("resnet18", 128)]:
    m = build_model(name, input_shape=(3, 32, 32), num_classes=10).to(dev).to(memory_format=torch.channels_last)
    x = torch.randn(B, 3, 32, 32, device=dev).to(memory_format=torch.channels_last); y = torch.randint(0, 10, (B,), device=dev)
    def plain():
        with torch.autocast("cuda", torch.bfloat16):
            loss = F.cross_entropy(m(x).float(), y)
        loss.backward()
    print(name, "plain channels_last bf16 ms/step", 1000 * bench(plain), flush=True)
    m2 = build_model(name, input_shape=(3, 32, 32), num_classes=10).to(dev)
    x2 = torch.randn(B, 3, 32, 32, device=dev)
    def plain_nchw():
        with torch.autocast("cuda", torch.bfloat16):
            loss = F.cross_entropy(m2(x2).float(), y)
        loss.backward()
    print(name, "plain NCHW bf16 ms/step", 1000 * bench(plain_nchw), flush=True)
    for K in (1, 8):
        st = StackedModels.from_modules(init_models(lambda: build_model(name, input_shape=(3, 32, 32), num_classes=10), list(range(K))), dev, strategy="vmap")
        xs = torch.randn(K, B, 3, 32, 32, device=dev); ys = torch.randint(0, 10, (K, B), device=dev)
        pl = st.trainable()
        def step():
            with torch.autocast("cuda", torch.bfloat16):
                lg = st.forward(xs, train=True)
            loss = F.cross_entropy(lg.float().flatten(0, 1), ys.flatten())
            torch.autograd.grad(loss, pl)
        t = bench(step, 10)
        print(name, f"vmap K={K} ms/step", 1000 * t, "ms/model-step", 1000 * t / K, flush=True)
        if K == 8:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                step(); torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)
