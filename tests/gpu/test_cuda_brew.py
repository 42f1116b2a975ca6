"""GPU checks of targeted-poison crafting (``pytest -m gpu`` on a CUDA machine; skipped elsewhere):
the CUDA-only layout options (channels-last models and poisons, timed cuDNN algorithms) leave the
crafted objective unchanged up to float error, and hand the crafting models back in their own format."""

from __future__ import annotations

import pytest
import torch

from mlaudit.attacks.poisoning.brew import BrewInputs, BrewOptions, brew
from mlaudit.data.augment import AugmentSpec
from mlaudit.models import build_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_channels_last_and_cudnn_benchmark_do_not_change_the_crafting() -> None:
    torch.manual_seed(0)
    model = build_model("resnet18", input_shape=(3, 32, 32), num_classes=10).cuda().eval()
    x_poison, x_target = torch.rand(16, 3, 32, 32, device="cuda"), torch.rand(1, 3, 32, 32, device="cuda")
    inputs = BrewInputs(models=[model], x_target=x_target, adv_class=3, x_poison=x_poison,
                        y_poison=torch.full((16,), 5, device="cuda"))
    base = dict(eps=16 / 255, steps=5, restarts=1, augment=AugmentSpec(crop_pad=4, flip=True), seed=0)
    fast = brew("gradient-matching", inputs, BrewOptions(**base, channels_last=True, cudnn_benchmark=True))
    plain = brew("gradient-matching", inputs, BrewOptions(**base, channels_last=False, cudnn_benchmark=False))
    assert fast.history[0] == pytest.approx(plain.history[0], abs=1e-3)  # same start, same objective
    assert fast.objective == pytest.approx(plain.objective, abs=2e-2)  # 5 signed steps apart at most by rounding
    assert all(p.is_contiguous() for p in model.parameters())  # the caller's format is restored


def test_a_channels_last_crafting_model_stays_channels_last() -> None:
    model = build_model("fastcnn", input_shape=(3, 32, 32), num_classes=10).cuda().eval()
    model.to(memory_format=torch.channels_last)
    inputs = BrewInputs(models=[model], x_target=torch.rand(1, 3, 32, 32, device="cuda"), adv_class=1,
                        x_poison=torch.rand(8, 3, 32, 32, device="cuda"), y_poison=torch.zeros(8, dtype=torch.long,
                                                                                              device="cuda"))
    brew("gradient-matching", inputs, BrewOptions(eps=8 / 255, steps=2, restarts=1))
    convs = [p for p in model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
