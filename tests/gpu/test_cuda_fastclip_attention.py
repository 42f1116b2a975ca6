"""GPU checks of book-keeping clipping through nn.MultiheadAttention (``pytest -m gpu`` on a CUDA machine; skipped
elsewhere): on CUDA the module's written-out forward (fastclip_rules.mha_forward) runs scaled_dot_product_attention's
fused kernels, the per-example path runs the math kernel under vmap, and the graphed DP step captures the patched
forward. The CPU versions are in tests/privacy/test_fastclip.py."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from mlaudit.data.registry import DatasetSpec, load_dataset
from mlaudit.privacy.dpsgd import clipped_sum, per_example_grads
from mlaudit.privacy.fastclip import clipped_grad_sum, verify_fast_clip
from mlaudit.train import Recipe, init_models, train_stack
from mlaudit.train.stacked import StackedModels

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


class PatchEncoder(nn.Module):
    """[B, 3, 32, 32] -> 16 tokens of 8x8 patches -> two batch-first pre-norm nn.TransformerEncoderLayer -> [B, 10]."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 8, stride=8)
        self.blocks = nn.Sequential(*[nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True,
                                                                 norm_first=True) for _ in range(2)])
        self.head = nn.Linear(dim, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.patch(x).flatten(2).mT).mean(1))


class SeqLSTM(nn.Module):
    """[B, 3, 32, 32] -> 32 steps of 96 features (one image row each) -> a 2-layer batch-first LSTM -> [B, 10]."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.lstm = nn.LSTM(96, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x.permute(0, 2, 1, 3).flatten(2))
        return self.head(out[:, -1])


@pytest.fixture
def exact(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.mark.parametrize("arch", [PatchEncoder, SeqLSTM], ids=["attention", "lstm"])
def test_clipped_sums_on_cuda_equal_the_per_example_path(arch: type[nn.Module], exact: None) -> None:
    """Attention and an LSTM. On an H100 (2026-12-07) the LSTM failed both DP paths on CUDA: the per-example path's
    vmap over cuDNN's recurrent kernel ("Cannot access data pointer of Tensor that doesn't have storage") and
    verify_fast_clip's eval-mode backward ("cudnn RNN backward can only be called in training mode"). Both now run
    the native kernels (fastclip.native_rnn); the LSTM case was written after that run and is not yet run on a GPU."""
    torch.manual_seed(0)
    model = arch().to(CUDA).train()
    g = torch.Generator(device=CUDA).manual_seed(1)
    x = torch.rand(24, 3, 32, 32, device=CUDA, generator=g)
    y = torch.randint(0, 10, (24,), device=CUDA, generator=g)
    w = torch.ones(24, device=CUDA)
    w[::5] = 0.0
    got, _ = clipped_grad_sum(model, x, y, w, clip=0.5)
    stack = StackedModels.from_modules([model], CUDA, strategy="loop")
    ((per, _),) = per_example_grads(stack, x[None], y[None])
    want = [s[0] for s in clipped_sum(per, w[None], 0.5)]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    verify_fast_clip(model, x, y)
    assert torch.backends.cudnn.enabled  # restored


def test_graphed_dp_step_with_attention_trains_the_eager_models(exact: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """As tests/gpu/test_cuda_factory.py's graphed DP test, on the attention model: the patched forward is
    captured and replayed; the same weights as the eager steps (same noise)."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    data = load_dataset(DatasetSpec(name="synthetic", options={"n_train": 256, "n_test": 64, "shape": [3, 32, 32],
                                                               "num_classes": 10}))
    r = Recipe(lr=0.05, momentum=0.9, epochs=3, batch_size=64, schedule="triangular", augment="none",
               precision="fp32", dp={"noise_multiplier": 1.0, "clip": 1.0, "clipping": "fast"})
    outs = [train_stack(init_models(PatchEncoder, [0, 1]), data.train, r.model_copy(update={"cuda_graph": graph}),
                        seeds=[0, 1], lr=0.05, device=CUDA, strategy="loop") for graph in (False, True)]
    assert [o.step_path for o in outs[1]] == ["cuda-graph"] * 2
    for a, b in zip(*outs, strict=True):
        for name, t in a.state_dict.items():
            torch.testing.assert_close(b.state_dict[name].float(), t.float(), rtol=1e-3, atol=1e-4)
