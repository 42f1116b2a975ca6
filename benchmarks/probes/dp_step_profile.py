"""Where a whole fast DP-SGD training step goes (issue 15): ResNet-18-GN at batch 256 through the training
loop (``train_stack``, loop layout, ``clipping: fast``, fp32), one warm-up epoch of ``STEPS`` steps, then one
epoch under ``torch.profiler``. Prints the wall time per step, the CUDA kernel time per step (how busy the
GPU is), and the top operators by self CPU time and by CUDA time: the part of the step outside the clipped
sum (sampling, uploads, augmentation, noise, optimizer) shows up here.

    python benchmarks/probes/dp_step_profile.py [resnet18|fastcnn] [steps]
"""
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dp_throughput import training_split  # noqa: E402

from mlaudit.models import build_model  # noqa: E402
from mlaudit.train.loop import init_models, resolve_augment, train_stack  # noqa: E402
from mlaudit.train.recipe import resolve_recipe  # noqa: E402

NAME = sys.argv[1] if len(sys.argv) > 1 else "resnet18"
STEPS = int(sys.argv[2]) if len(sys.argv) > 2 else 20
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SYNC = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
ACT = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
# cudnn.benchmark stays off, as in the training loop: Poisson batches change shape every DP step and
# benchmark mode would re-tune the convolutions for each new shape
train, described = training_split(256 * STEPS, synthetic=False)


def step_ms(dp_mode, channels_last, precision="fp32"):
    """Steady-state ms per step (epoch 2 of 2) through the loop, as benchmarks/dp_throughput.py times it."""
    over = {"epochs": 2, "batch_size": 256, "precision": precision, "channels_last": channels_last}
    if dp_mode:
        over["dp"] = {"noise_multiplier": 1.0, "clip": 1.0, "sample_rate": 256 / len(train), "clipping": dp_mode}
    r = resolve_recipe({"name": "fast", **over})
    marks = []

    def on_epoch(_e, _loss):
        SYNC()
        marks.append(time.perf_counter())

    models = init_models(lambda: build_model({"name": NAME, "norm": "group"}, input_shape=(3, 32, 32),
                                             num_classes=10), [0])
    train_stack(models, train, r, seeds=[0], lr=r.resolved_lr(residual=True), device=dev,
                augment=resolve_augment(r, "cifar10", (3, 32, 32)), on_epoch=on_epoch, strategy="loop")
    return 1000 * (marks[1] - marks[0]) / STEPS


for cl in (True, False):
    for mode in (None, "fast"):
        print(f"{NAME} {'dp ' + mode if mode else 'non-private'} fp32 channels_last={cl}: "
              f"{step_ms(mode, cl):.1f} ms/step", flush=True)
if len(sys.argv) > 3 and sys.argv[3] == "time":
    sys.exit(0)
for dp_mode, precision in (("fast", "fp32"), (None, "fp32")):
    over = {"epochs": 1, "batch_size": 256, "precision": precision}
    if dp_mode:
        over["dp"] = {"noise_multiplier": 1.0, "clip": 1.0, "sample_rate": 256 / len(train), "clipping": dp_mode}
    r = resolve_recipe({"name": "fast", **over})
    aug = resolve_augment(r, "cifar10", (3, 32, 32))

    def build():
        return build_model({"name": NAME, "norm": "group"}, input_shape=(3, 32, 32), num_classes=10)

    def run(models):
        return train_stack(models, train, r, seeds=[0], lr=r.resolved_lr(residual=True), device=dev,
                           augment=aug, strategy="loop")

    models = init_models(build, [0])
    run(models)  # warm-up epoch (cudnn autotune, fast-clip verification, allocator)
    SYNC()
    with profile(activities=ACT) as prof:
        t0 = time.perf_counter()
        run(init_models(build, [1]))
        SYNC()
        wall = time.perf_counter() - t0
    ev = prof.key_averages()
    cuda_us = sum(e.self_device_time_total for e in ev)
    label = f"dp {dp_mode}" if dp_mode else "non-private"
    print(f"\n=== {NAME} {label} {precision}: {described}; wall {1000 * wall / STEPS:.1f} ms/step (profiled, incl. "
          f"model init and epoch end), CUDA kernels {cuda_us / 1000 / STEPS:.1f} ms/step", flush=True)
    print(ev.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    print(ev.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=60))
