"""GPU checks of the Square Attack (``pytest -m gpu`` on a CUDA machine; skipped elsewhere): it runs on
the inputs' device with a CPU or a CUDA generator, stays in the ball and the box, a CUDA generator's
seed reproduces it, and it fools a CNN."""

from __future__ import annotations

import pytest
import torch

from mlaudit.attacks.evasion import run_square
from mlaudit.models import build_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_square_on_cuda_with_either_generator(norm: str, eps: float) -> None:
    torch.manual_seed(0)
    model = build_model("fastcnn", input_shape=(3, 32, 32), num_classes=10).cuda().eval()
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
        assert r.success.float().mean() > 0.5  # an untrained CNN on noise: most flip within 200 queries
        runs.append(r)
    assert torch.equal(runs[1].x_adv, runs[2].x_adv)  # the CUDA generator's seed reproduces the run
