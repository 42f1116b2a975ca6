"""GPU checks of the Square Attack (``pytest -m gpu`` on a CUDA machine; skipped elsewhere): it runs on
the inputs' device with a CPU or a CUDA generator, stays in the ball and the box, a CUDA generator's
seed reproduces it, and it fools a CNN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mlaudit.attacks.evasion import run_square

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 2.0)])
def test_square_on_cuda_with_either_generator(norm: str, eps: float) -> None:
    # A randomly initialised CNN whose logits differ between inputs. The zoo's untrained fastcnn gives every input
    # nearly the same logits (within ~1e-5 on an H100, 2026-12-05: every argmax the same class), so no 200-query
    # search moves them; this test is about the device and the generators, not about a hard model.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(32 * 8 * 8, 10)).cuda().eval()
    x = torch.rand(128, 3, 32, 32, device="cuda")
    with torch.no_grad():
        y = model(x).argmax(1)  # every example starts classified "correctly"
    runs = []
    for gen in (torch.Generator().manual_seed(1), torch.Generator(device="cuda").manual_seed(1),
                torch.Generator(device="cuda").manual_seed(1)):
        r = run_square(model, x, y, eps=eps, norm=norm, n_queries=200, generator=gen)
        assert r.x_adv.device == x.device and r.queries.device == x.device
        d = (r.x_adv - x).flatten(1)
        size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
        assert (size <= eps * (1 + 1e-5)).all() and r.x_adv.min() >= 0 and r.x_adv.max() <= 1
        with torch.no_grad():
            assert torch.equal(model(r.x_adv).argmax(1) != y, r.success)
        assert r.success.float().mean() > 0.5  # on the CPU, same seeds and a CPU generator: 69% (linf), 71% (l2)
        runs.append(r)
    assert torch.equal(runs[1].x_adv, runs[2].x_adv)  # the CUDA generator's seed reproduces the run
