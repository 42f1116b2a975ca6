"""Upper bounds on what a data source may be asked to produce or read (issue 21): synthetic sizes
are refused with the option and the allowed range, and image-folder zip members that unpack to too
much are refused by their recorded sizes before anything is decompressed."""

from __future__ import annotations

import io
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlaudit.data.registry import load_dataset
from mlaudit.data.sources import image_folder
from mlaudit.errors import ConfigError, DataError


def synthetic(**options: object) -> object:
    return load_dataset({"name": "synthetic", "options": options})


@pytest.mark.parametrize("options, match", [
    ({"n_train": 10_000_001}, r"options.n_train = 10000001: .*1 <= n_train <= 10,000,000"),
    ({"n_train": 0}, r"options.n_train = 0: .*1 <= n_train <= 10,000,000"),
    ({"n_test": 2**40}, r"options.n_test = 1099511627776: .*1 <= n_test <= 10,000,000"),
    ({"num_classes": 100_001}, r"options.num_classes = 100001: .*2 <= num_classes <= 100,000"),
    ({"num_classes": 1}, r"options.num_classes = 1: .*2 <= num_classes <= 100,000"),
    ({"shape": [3, 1000, 1000]}, r"options.shape = \[3, 1000, 1000\]: .*3,000,000 values per example; allowed "
                                 r"prod\(shape\) <= 1,000,000"),
    ({"shape": [10**9]}, r"prod\(shape\) <= 1,000,000"),
    ({"n_train": 3_000_000, "shape": [1000]}, r"options.n_train = 3000000: \(n_train \+ n_test \+ num_classes\) \* "
                                              r"prod\(shape\) = .* = 3,000,260,000 values; allowed <= 2,147,483,648"),
    ({"num_classes": 100_000, "shape": [100_000]}, r"10,076,800,000 values; allowed <= 2,147,483,648"),
    ({"noise": float("inf")}, r"options.noise = inf: Input should be a finite number"),
])
def test_synthetic_sizes_are_bounded(options: dict, match: str) -> None:
    t = time.perf_counter()
    with pytest.raises(ConfigError, match=match):
        synthetic(**options)
    assert time.perf_counter() - t < 1


def test_synthetic_within_bounds_still_loads() -> None:
    b = synthetic(n_train=20, n_test=10, shape=[4], num_classes=100_000)
    assert b.train.x.shape == (20, 4) and b.num_classes == 100_000  # type: ignore[attr-defined]


def png(size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_zip(path: Path, big: dict[str, int], method: int = zipfile.ZIP_DEFLATED) -> Path:
    """A class-folder zip with two small PNGs per class, plus members ``name -> size`` of zero bytes."""
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        for c in ("a", "b"):
            for i in range(2):
                zf.writestr(f"{c}/{i}.png", png())
        for name, size in big.items():
            with zf.open(name, "w", force_zip64=True) as f:
                chunk = bytes(1 << 20)
                for _ in range(size >> 20):
                    f.write(chunk)
                f.write(bytes(size % (1 << 20)))
    return path


@pytest.fixture
def no_decompression(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any zip member is opened for reading (the checks must come first)."""
    real = zipfile.ZipFile.open

    def guarded(self: zipfile.ZipFile, name: object, mode: str = "r", *a: object, **k: object) -> object:
        if mode == "r":
            raise AssertionError(f"zip member {name} was opened before the size checks refused the zip")
        return real(self, name, mode, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(zipfile.ZipFile, "open", guarded)


def load_zip(path: Path) -> object:
    return load_dataset({"name": "image-folder", "root": str(path), "test_fraction": 0.5})


def test_a_member_that_unpacks_to_too_much_is_refused_before_reading(tmp_path: Path, no_decompression: None) -> None:
    z = make_zip(tmp_path / "bomb.zip", {"a/huge.png": 96 << 20})  # 96 MiB of zeros in ~100 kB
    assert z.stat().st_size < 1 << 20
    t = time.perf_counter()
    with pytest.raises(DataError, match=r"image .*bomb.zip:a/huge.png unpacks to 100,663,296 bytes \(96.0 MiB\); "
                                        r"an image file may be at most 64 MiB"):
        load_zip(z)
    assert time.perf_counter() - t < 2


def test_a_2_gib_member_is_refused_by_its_recorded_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        no_decompression: None) -> None:
    """The issue's case (a 2 MB zip with a 2 GiB member): only the central directory is read."""
    z = make_zip(tmp_path / "z.zip", {"b/x.png": 3 << 20})
    real = zipfile.ZipFile._RealGetContents  # type: ignore[attr-defined]

    def claim_2gib(self: zipfile.ZipFile) -> None:  # as the bomb's central directory records it
        real(self)
        self.getinfo("b/x.png").file_size = 2 << 30

    monkeypatch.setattr(zipfile.ZipFile, "_RealGetContents", claim_2gib)
    with pytest.raises(DataError, match=r"z.zip:b/x.png unpacks to 2,147,483,648 bytes \(2,048.0 MiB\)"):
        load_zip(z)


def test_a_high_compression_ratio_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             no_decompression: None) -> None:
    z = make_zip(tmp_path / "r.zip", {"a/flat.bmp": 8 << 20})  # 8 MiB of zeros deflate ~1000x
    with pytest.raises(DataError, match=r"zip member .*r.zip:a/flat.bmp unpacks to 8,388,608 bytes from [\d,]+ "
                                        r"\(ratio \d[\d,]*\); at most 100x is allowed for a member over 1 MiB"):
        load_zip(z)
    z2 = make_zip(tmp_path / "stored.zip", {"a/flat.bmp": 2 << 20}, method=zipfile.ZIP_STORED)
    monkeypatch.undo()
    with pytest.raises(DataError, match=r"cannot decode image .*stored.zip:a/flat.bmp"):  # size fine, not an image
        load_zip(z2)


def test_the_total_of_the_members_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             no_decompression: None) -> None:
    monkeypatch.setattr(image_folder, "MAX_TOTAL_BYTES", 100)
    z = make_zip(tmp_path / "t.zip", {})
    with pytest.raises(DataError, match=r"the 4 images in zip .*t.zip unpack to [\d,]+ bytes .*; at most 100 bytes"):
        load_zip(z)


def test_a_normal_zip_still_loads(tmp_path: Path) -> None:
    b = load_zip(make_zip(tmp_path / "ok.zip", {}))
    assert len(b.train) + len(b.test) == 4  # type: ignore[attr-defined]


def test_an_oversized_file_in_a_folder_is_refused_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    for c in ("a", "b"):
        (tmp_path / "d" / c).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "d" / c / f"{i}.png").write_bytes(png())
    with open(tmp_path / "d" / "a" / "sparse.png", "wb") as f:  # a sparse 1 GiB file: no disk used
        f.truncate(1 << 30)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"read {self}"))
    with pytest.raises(DataError, match=r"sparse.png is 1,073,741,824 bytes \(1,024.0 MiB\); an image file may be "
                                        r"at most 64 MiB"):
        load_dataset({"name": "image-folder", "root": str(tmp_path / "d"), "test_fraction": 0.5})
