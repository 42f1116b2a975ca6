"""GPU checks of targeted-poison crafting (``pytest -m gpu`` on a CUDA machine; skipped elsewhere):
the CUDA-only layout settings (channels-last models and poisons, timed cuDNN algorithms) leave the
crafted objective unchanged up to float error, and hand the crafting models back in their own format."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mlaudit.attacks.poisoning import POISONERS, PoisonTask, Target
from mlaudit.data.augment import AugmentSpec
from mlaudit.data.base import TensorDataset
from mlaudit.models import build_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
GM = POISONERS.get("gradient-matching", family="targeted")


def _task(model: torch.nn.Module, n: int, label: int, **settings: object) -> PoisonTask:
    """``n`` random 3x32x32 poisons of class ``label`` (all of the split), one random target to class ``label``."""
    train = TensorDataset(torch.rand(n, 3, 32, 32), torch.full((n,), label), tuple(str(c) for c in range(10)))
    return PoisonTask(train=train, num_classes=10, eps=16 / 255, target=Target(torch.rand(1, 3, 32, 32, device="cuda"),
                      (label + 1) % 10, label), models=[model], settings={"restarts": 1, **settings},
                      augment=AugmentSpec(crop_pad=4, flip=True), device="cuda")


def test_channels_last_and_cudnn_benchmark_do_not_change_the_crafting() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", input_shape=(3, 32, 32), num_classes=10).cuda().eval()
    task = _task(model, 16, 5, steps=5)
    fast = GM(dataclasses.replace(task, settings={"steps": 5, "restarts": 1, "channels_last": True,
                                                  "cudnn_benchmark": True}))
    plain = GM(task)
    assert fast.info["history"][0] == pytest.approx(plain.info["history"][0], abs=1e-3)  # same start, same objective
    assert fast.info["objective"] == pytest.approx(plain.info["objective"], abs=2e-2)  # 5 signed steps apart at most
    assert all(p.is_contiguous() for p in model.parameters())  # the caller's format is restored


def test_a_channels_last_crafting_model_stays_channels_last() -> None:
    model = build_model("fastcnn", input_shape=(3, 32, 32), num_classes=10).cuda().eval()
    model.to(memory_format=torch.channels_last)
    GM(_task(model, 8, 0, steps=2, channels_last=True))
    convs = [p for p in model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
