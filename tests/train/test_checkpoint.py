"""Checkpoint writes that fail (full disk, failed write) say so and which folder, not a raw torch error."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

from mlaudit.errors import DataError
from mlaudit.train import checkpoint


def test_full_disk_is_a_data_error_naming_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*_a: object, **_k: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DataError, match=rf"disk holding {tmp_path} is full.*--resume"):
        checkpoint.save_checkpoint({"w": torch.zeros(2)}, tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone, nothing half-written


def test_torch_write_failure_is_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failed(*_a: object, **_k: object) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", failed)
    with pytest.raises(DataError, match="disk full or read-only"):
        checkpoint.save_checkpoint({"w": torch.zeros(2)}, tmp_path / "m.pt")


def test_other_errors_pass_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_a: object, **_k: object) -> None:
        raise RuntimeError("something else")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError, match="something else"):
        checkpoint.save_checkpoint({"w": torch.zeros(2)}, tmp_path / "m.pt")
