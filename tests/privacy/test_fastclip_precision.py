"""The precision settings the fast-clipping rules read and set (privacy/fastclip_rules.py: tf32_enabled, matmul_tf32,
CONV_NORMS_TF32; privacy/fastclip.py: exact_float32). The flags exist on CPU builds of PyTorch too, so the reading and
restoring logic is checked here; what TF32 does to the numbers is checked on a GPU (tests/gpu)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from mlaudit.privacy.fastclip import exact_float32
from mlaudit.privacy.fastclip_rules import matmul_tf32, tf32_enabled

NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")


@pytest.fixture(autouse=True)
def _restore() -> Iterator[None]:
    """Every test leaves PyTorch's precision flags as it found them (set back through the legacy flags)."""
    conv, mm = tf32_enabled("conv"), tf32_enabled("matmul")
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


@pytest.mark.parametrize("conv,mm", [(True, False), (False, True), (False, False), (True, True)])
def test_flags_set_through_the_legacy_api_are_read(conv: bool, mm: bool) -> None:
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm
    assert tf32_enabled("conv") is conv and tf32_enabled("matmul") is mm


@pytest.mark.skipif(not NEW_API, reason="PyTorch without the fp32_precision API")
def test_flags_set_through_the_new_api_are_read_without_the_mixed_api_error() -> None:
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    with pytest.raises(RuntimeError):  # what reading a legacy flag now does: the reason the rules read the new API
        _ = torch.backends.cuda.matmul.allow_tf32
    assert tf32_enabled("conv") is False and tf32_enabled("matmul") is True
    with exact_float32():  # used to read the legacy flags, and raised here
        assert tf32_enabled("conv") is False and tf32_enabled("matmul") is False
    assert tf32_enabled("conv") is False and tf32_enabled("matmul") is True
    assert torch.backends.cuda.matmul.allow_tf32 is True  # a later legacy read works again


@pytest.mark.skipif(not NEW_API, reason="PyTorch without the fp32_precision API")
def test_a_leaf_set_to_none_inherits_from_its_parent() -> None:
    torch.backends.cudnn.conv.fp32_precision = "none"
    torch.backends.cudnn.fp32_precision = "tf32"
    assert tf32_enabled("conv") is True
    torch.backends.cudnn.fp32_precision = "none"
    assert tf32_enabled("conv") is False  # nothing set at any level: IEEE


@pytest.mark.parametrize("start", [False, True])
@pytest.mark.parametrize("on", [False, True])
def test_matmul_tf32_sets_inside_and_restores_on_exit_and_on_error(start: bool, on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = start
    with matmul_tf32(on):
        assert tf32_enabled("matmul") is on
    assert tf32_enabled("matmul") is start
    with pytest.raises(ValueError), matmul_tf32(on):
        raise ValueError
    assert tf32_enabled("matmul") is start


def test_exact_float32_turns_both_off_and_restores_them() -> None:
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    with exact_float32():
        assert not tf32_enabled("conv") and not tf32_enabled("matmul")
    assert tf32_enabled("conv") and tf32_enabled("matmul")


def test_conv_norms_keep_the_users_setting_unless_forced_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA the conv rule runs its matmuls at the user's float32 matmul setting, or at CONV_NORMS_TF32's when it is
    set; on the CPU it touches no flag. Checked by recording the matmul flag the rule's body sees, with a tensor
    subclass standing in for CUDA."""
    from mlaudit.privacy import fastclip_rules as rules

    seen: list[bool] = []
    monkeypatch.setattr(rules, "_conv_norms_at", lambda m, a, g, mode: seen.append(tf32_enabled("matmul")) or (a, {}))

    class FakeCuda(torch.Tensor):
        @property
        def is_cuda(self) -> bool:  # type: ignore[override]
            return True

    conv = torch.nn.Conv2d(2, 3, 3)
    a, g = torch.zeros(1, 2, 5, 5), torch.zeros(1, 3, 3, 3)
    for user, forced, want in [(False, None, False), (True, None, True), (True, False, False), (False, True, True)]:
        torch.backends.cuda.matmul.allow_tf32 = user
        monkeypatch.setattr(rules, "CONV_NORMS_TF32", forced)
        rules._conv_norms(conv, a, g.as_subclass(FakeCuda), "auto")
        assert seen.pop() is want
        assert tf32_enabled("matmul") is user  # restored
    torch.backends.cuda.matmul.allow_tf32 = False
    monkeypatch.setattr(rules, "CONV_NORMS_TF32", True)
    rules._conv_norms(conv, a, g, "auto")  # a CPU tensor: the user's setting, untouched
    assert seen.pop() is False


@pytest.mark.parametrize("device,recurrent,off", [("cuda", True, True), ("cuda", False, False), ("cpu", True, False)])
def test_native_rnn_turns_cudnn_off_only_for_recurrent_models_on_cuda(device: str, recurrent: bool, off: bool) -> None:
    """cuDNN's recurrent kernels refuse backward in eval mode and fail under vmap (H100, 2026-12-07): the per-example
    path and verify_fast_clip run a recurrent model on CUDA with cuDNN off, restored on exit and on error."""
    from mlaudit.privacy.fastclip import native_rnn

    model = torch.nn.Sequential(torch.nn.LSTM(4, 8) if recurrent else torch.nn.Linear(4, 8))
    assert torch.backends.cudnn.enabled
    with native_rnn(model, torch.device(device)):
        assert torch.backends.cudnn.enabled is not off
    assert torch.backends.cudnn.enabled
    with pytest.raises(ValueError), native_rnn(model, torch.device(device)):
        raise ValueError
    assert torch.backends.cudnn.enabled
