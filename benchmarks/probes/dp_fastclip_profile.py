"""Where the fast DP-SGD step's time goes (issue 15): ResNet-18-GN and fastcnn-GN at 288 Poisson slots on
CUDA, channels_last as the training loop runs them. Times the non-private forward+backward (fp32 and bf16
autocast), the fast clipped sum (auto / all-ghost / all-materialise; stride-1 convs by shifted windows or by unfold;
float32 matmuls with and without TF32; fp32 and bf16), and prints the top CUDA kernels of the default path. (The H200 output of 2026-12-02 in
benchmarks/results/dp_fastclip_profile_h200.txt is of an earlier version that also timed a depthwise
one-hot-convolution unfold, since removed: slower and not exact in float32.)

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
CL = torch.channels_last


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
    m = m.to(memory_format=CL)
    x = torch.rand(288, 3, 32, 32, device=dev).contiguous(memory_format=CL)
    y, w = torch.randint(0, 10, (288,), device=dev), (torch.rand(288, device=dev) < 0.9).float()

    def plain(bf16):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            out = m(x[:256])
        F.cross_entropy(out.float(), y[:256]).backward()

    res = {"non-private fwd+bwd, 256, fp32": timed(lambda: plain(False)),
           "non-private fwd+bwd, 256, bf16": timed(lambda: plain(True))}
    rows = [("auto", "shift", False), ("materialise", "shift", False), ("ghost", "shift", False),
            ("auto", "unfold", False), ("auto", "shift", True)]
    for bf16 in (False, True):
        for mode, conv, tf32 in rows:
            fastclip_rules.CONV_SHIFT = conv == "shift"
            torch.backends.cuda.matmul.allow_tf32 = tf32
            res[f"fast {mode} conv={conv} tf32-matmul={tf32} bf16={bf16}, 288 slots"] = timed(
                lambda: clipped_grad_sum(m, x, y, w, clip=1.0, mode=mode, bf16=bf16))
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"== {name}")
    for k, v in res.items():
        print(f"{k:80s} {v:8.2f} ms")
    fastclip_rules.CONV_SHIFT = True
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            clipped_grad_sum(m, x, y, w, clip=1.0)
        torch.cuda.synchronize()
    print("-- top CUDA kernels, 3 calls, auto, shifted windows, fp32")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
