"""Reference only: the plain eager PyTorch loop that the factory is compared against.

One model, torch.optim.SGD (Nesterov), MultiStepLR, bf16 autocast, channels_last, the whole
dataset on the GPU, random crop + flip as batched tensor ops (mlaudit.data.augment). This is what
a careful user writes by hand, and what forest-style tools do per model.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from mlaudit.data.augment import apply_augment, sample_augment_params
from mlaudit.data.base import DataBundle
from mlaudit.models import build_model


def plain_train(data: DataBundle, *, model: str, epochs: int, batch_size: int, lr: float, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    dev = torch.device("cuda")
    m = build_model(model, input_shape=data.input_shape, num_classes=data.num_classes).to(dev)
    m = m.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4, foreach=True)
    x, y = data.train.x.to(dev), data.train.y.to(dev)
    g = torch.Generator(device=dev).manual_seed(seed)
    n = len(y)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(n, device=dev, generator=g)
        aug = sample_augment_params(n, pad=4, flip=True, generator=g)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            xb = apply_augment(x[idx], type(aug)(aug.shift[i:i + batch_size], aug.flip[i:i + batch_size]))
            xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(m(xb).float(), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return {"model": model, "epochs": epochs, "wall_s": round(wall, 3), "s_per_epoch": round(wall / epochs, 3)}
