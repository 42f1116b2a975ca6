"""Where the fast DP-SGD step's time goes (issue 15): ResNet-18-GN and fastcnn-GN at batch 288 slots on
CUDA. Times the non-private forward+backward, the fast clipped sum (auto, all-ghost, all-materialise,
conv materialise grouped vs unfold), and prints the top CUDA kernels of the auto path.

    python benchmarks/probes/dp_fastclip_profile.py
"""
import sys, time
from pathlib import Path
import torch
import torch.nn.functional as F
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from mlaudit.models import build_model
from mlaudit.privacy import fastclip_rules
from mlaudit.privacy.fastclip import clipped_grad_sum

dev = torch.device("cuda")
torch.backends.cudnn.benchmark = True


def timed(fn, n=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - t0) / n


for name in ("resnet18", "fastcnn"):
    torch.manual_seed(0)
    m = build_model({"name": name, "norm": "group"}, input_shape=(3, 32, 32), num_classes=10).to(dev).train()
    x, y = torch.rand(288, 3, 32, 32, device=dev), torch.randint(0, 10, (288,), device=dev)
    w = (torch.rand(288, device=dev) < 0.9).float()

    def plain():
        m.zero_grad(set_to_none=True)
        F.cross_entropy(m(x[:256]), y[:256]).backward()

    res = {"non-private fwd+bwd, 256": timed(plain)}
    for mode in ("auto", "ghost", "materialise"):
        for conv in ("grouped", "unfold"):
            fastclip_rules.CONV_MATERIALISE = conv
            res[f"fast {mode} conv={conv}, 288 slots"] = timed(lambda: clipped_grad_sum(m, x, y, w, clip=1.0, mode=mode))
    print(f"== {name}")
    for k, v in res.items():
        print(f"{k:45s} {v:8.2f} ms")
    fastclip_rules.CONV_MATERIALISE = "grouped"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            clipped_grad_sum(m, x, y, w, clip=1.0)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
