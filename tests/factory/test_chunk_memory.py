"""Chunk sizing (factory.batched.measure_chunk_size) on a fake CUDA memory counter, run on the CPU: the
per-model figure is the larger of one model's and two vmap models' / 2, vmap is measured only when the
chunk may take it, and a failing vmap measurement falls back to one model's figure."""

from __future__ import annotations

import pytest
import torch
from test_batched import bundle, job, seeds  # same folder (rootdir-relative import)

from mlaudit.factory import batched
from mlaudit.models.registry import build_model

MIB = 2**20


class FakeCuda:
    """Peak memory per train_stack call set by the layout it trains with: ``peaks[strategy]`` bytes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, peaks: dict[str, int], free: int) -> None:
        self.peak, self.calls = 0, []
        for name, fn in {"synchronize": lambda *_: None, "empty_cache": lambda *_: None,
                         "memory_allocated": lambda *_: 0, "reset_peak_memory_stats": lambda *_: None,
                         "max_memory_allocated": lambda *_: self.peak,
                         "mem_get_info": lambda *_: (free, 2 * free)}.items():
            monkeypatch.setattr(torch.cuda, name, fn)
        real = batched.train_stack

        def train_stack(models, *args, strategy: str = "auto", **kw):  # type: ignore[no-untyped-def]
            self.calls.append((len(models), strategy))
            if strategy not in peaks:
                raise RuntimeError(f"{strategy} cannot stack this model")
            self.peak = peaks[strategy]
            return real(models, *args, strategy="loop", **kw)

        monkeypatch.setattr(batched, "train_stack", train_stack)


def model_fn() -> torch.nn.Module:
    return build_model({"name": "mlp", "width": 8}, input_shape=tuple(bundle().train.shape), num_classes=10)


@pytest.mark.parametrize("strategy,peaks,want_calls,per_model", [
    ("auto", {"auto": 100 * MIB, "vmap": 600 * MIB}, [(1, "auto"), (2, "vmap")], 300 * MIB),   # vmap needs more
    ("auto", {"auto": 100 * MIB, "vmap": 120 * MIB}, [(1, "auto"), (2, "vmap")], 100 * MIB),   # one model needs more
    ("loop", {"auto": 100 * MIB, "vmap": 600 * MIB}, [(1, "auto")], 100 * MIB),                # never vmap: not measured
    ("auto", {"auto": 100 * MIB}, [(1, "auto"), (2, "vmap")], 100 * MIB),                      # vmap fails: one model
])
def test_chunk_size_takes_the_larger_per_model_figure(monkeypatch: pytest.MonkeyPatch, strategy: str,
                                                      peaks: dict[str, int], want_calls: list, per_model: int) -> None:
    free = 10_000 * MIB
    fake = FakeCuda(monkeypatch, peaks, free)
    j = job(seeds(4), strategy=strategy)
    k = batched.measure_chunk_size(j, torch.device("cpu"), model_fn, bundle(), 0.05)
    assert fake.calls == want_calls
    assert k == int(0.8 * free // per_model)
