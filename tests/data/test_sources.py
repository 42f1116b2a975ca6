"""Tests of the data sources on tiny fixtures generated in tmp_path (no downloads, no network)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from mlaudit.data import load_dataset
from mlaudit.data.sources import cifar10, mnist
from mlaudit.data.sources._util import stratified_split
from mlaudit.errors import ConfigError, DataError

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(autouse=True)
def _data_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep every default root (and the JPEG cache) inside tmp_path."""
    home = tmp_path / "mlaudit-data"
    monkeypatch.setenv("MLAUDIT_DATA", str(home))
    return home


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------- cifar10
def make_cifar(parent: Path, *, n_batch: int = 20, n_test: int = 10, protocol: int = 4, seed: int = 0) -> Path:
    """Write a tiny official-layout CIFAR-10 into parent/cifar-10-batches-py; returns that folder."""
    rng = np.random.default_rng(seed)
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, n in [*((f"data_batch_{i}", n_batch) for i in range(1, 6)), ("test_batch", n_test)]:
        batch = {b"batch_label": name.encode(), b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    meta = {b"label_names": [c.encode() for c in CIFAR_CLASSES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return folder


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_pickle_layout(tmp_path: Path, protocol: int) -> None:
    folder = make_cifar(tmp_path, protocol=protocol)
    b = load_dataset({"name": "cifar10", "root": str(tmp_path)})
    assert (len(b.train), len(b.test), b.input_shape) == (100, 10, (3, 32, 32))
    assert b.train.classes == tuple(CIFAR_CLASSES) and b.meta["format"] == "pickle"
    raw = pickle.loads((folder / "data_batch_2").read_bytes())
    i, c, h, w = 3, 2, 5, 7  # row 3 of batch 2 is train example 23; pixel (c, h, w) is column c*1024 + h*32 + w
    assert b.train.x[20 + i, c, h, w].item() == pytest.approx(raw[b"data"][i, c * 1024 + h * 32 + w] / 255)
    assert b.train.y[20 + i].item() == raw[b"labels"][i]
    same = load_dataset({"name": "cifar10", "root": str(folder)})  # the batches folder itself
    assert same.id == b.id


def test_cifar10_refuses_foreign_globals(tmp_path: Path) -> None:
    folder = make_cifar(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (Path.touch, (marker,))

    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(DataError, match=r"data_batch_3.*not allowed"):
        load_dataset({"name": "cifar10", "root": str(tmp_path)})
    assert not marker.exists()


def test_cifar10_corrupt_files(tmp_path: Path) -> None:
    folder = make_cifar(tmp_path)
    good = (folder / "data_batch_4").read_bytes()
    (folder / "data_batch_4").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="data_batch_4.*truncated or corrupt"):
        load_dataset({"name": "cifar10", "root": str(tmp_path)})
    (folder / "data_batch_4").write_bytes(pickle.dumps({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(DataError, match=r"data_batch_4.*\[N, 3072\]"):
        load_dataset({"name": "cifar10", "root": str(tmp_path)})
    (folder / "data_batch_4").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}))
    with pytest.raises(DataError, match=r"data_batch_4.*0\.\.9"):
        load_dataset({"name": "cifar10", "root": str(tmp_path)})


def test_cifar10_missing_files_message(tmp_path: Path) -> None:
    folder = make_cifar(tmp_path)
    (folder / "test_batch").unlink()
    with pytest.raises(DataError) as info:
        load_dataset({"name": "cifar10", "root": str(tmp_path)})
    msg = str(info.value)
    assert str(folder / "test_batch") in msg and str(folder / "data_batch_1") not in msg.split("Expected")[0]
    assert cifar10.CIFAR10_URL in msg and "download: true" in msg and "make_cifar10.py" in msg


def _tar(src: Path, out: Path, members: dict[str, bytes] | None = None) -> Path:
    with tarfile.open(out, "w:gz") as tar:
        if src.exists():
            tar.add(src, arcname=src.name)
        for name, data in (members or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def test_cifar10_download_and_md5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _tar(make_cifar(tmp_path / "src"), tmp_path / "fake.tar.gz")
    url, digest = archive.as_uri(), md5(archive)
    folder = cifar10.download_cifar10(tmp_path / "a", url=url, md5=digest)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*cifar10.TRAIN_FILES, "test_batch", "batches.meta"])
    assert not (tmp_path / "a" / "cifar-10-python.tar.gz").exists()
    with pytest.raises(DataError, match=f"MD5 mismatch.*expected {'0' * 32}, got {digest}"):
        cifar10.download_cifar10(tmp_path / "b", url=url, md5="0" * 32)
    assert not any((tmp_path / "b").iterdir())  # neither the archive nor a .part file is kept
    monkeypatch.setattr(cifar10, "CIFAR10_URL", url)
    monkeypatch.setattr(cifar10, "CIFAR10_MD5", digest)
    b = load_dataset({"name": "cifar10", "root": str(tmp_path / "c"), "download": True})
    assert len(b.train) == 100 and b.id == load_dataset({"name": "cifar10", "root": str(tmp_path / "src")}).id


@pytest.mark.parametrize("member", ["../evil.txt", "/abs/evil.txt", "ok/../../evil.txt"])
def test_cifar10_download_rejects_traversal(tmp_path: Path, member: str) -> None:
    archive = _tar(tmp_path / "none", tmp_path / "bad.tar.gz", {"fine.txt": b"x", member: b"evil"})
    with pytest.raises(DataError, match="unsafe member path"):
        cifar10.download_cifar10(tmp_path / "dest" / "root", url=archive.as_uri(), md5=md5(archive))
    assert not (tmp_path / "dest" / "evil.txt").exists() and not (tmp_path / "dest" / "root" / "fine.txt").exists()


def make_jpeg_npz(path: Path, n_train: int = 12, n_test: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    arrays: dict[str, np.ndarray] = {"classes": np.array(CIFAR_CLASSES)}
    for split, n in (("train", n_train), ("test", n_test)):
        blobs = []
        for _ in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
            blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
        arrays[f"{split}_jpeg"] = np.concatenate(blobs)
        arrays[f"{split}_offsets"] = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
        arrays[f"{split}_labels"] = (np.arange(n) % 10).astype(np.uint8)
    np.savez(path, **arrays)
    return arrays


def test_cifar10_jpeg_npz_and_cache(tmp_path: Path, _data_home: Path) -> None:
    npz = tmp_path / "pack.npz"
    arrays = make_jpeg_npz(npz)
    b = load_dataset({"name": "cifar10", "root": str(npz)})
    assert (len(b.train), len(b.test), b.input_shape, b.meta["format"]) == (12, 6, (3, 32, 32), "jpeg-npz")
    off = arrays["test_offsets"]
    first = np.asarray(Image.open(io.BytesIO(arrays["test_jpeg"][off[2]:off[3]].tobytes())).convert("RGB"))
    assert torch.equal(b.test.x[2], torch.from_numpy(first.transpose(2, 0, 1).copy()).float() / 255)
    assert b.test.y.tolist() == (np.arange(6) % 10).tolist()
    (cache,) = (_data_home / "cifar10").glob("jpeg-decoded-*.npz")
    np.savez(cache, train=np.zeros((12, 3, 32, 32), np.uint8), test=np.zeros((6, 3, 32, 32), np.uint8))
    cached = load_dataset({"name": "cifar10", "options": {"format": "jpeg-npz", "path": str(npz)}})
    assert cached.train.x.abs().sum() == 0  # the (doctored) cache was used instead of decoding again


def test_cifar10_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"options\.format.*'auto', 'pickle' or 'jpeg-npz'"):
        load_dataset({"name": "cifar10", "options": {"format": "png"}})
    with pytest.raises(ConfigError, match="only used with format jpeg-npz"):
        load_dataset({"name": "cifar10", "options": {"format": "pickle", "path": "x.npz"}})
    np.savez(tmp_path / "other.npz", train_jpeg=np.zeros(3, np.uint8))
    with pytest.raises(DataError, match=r"other\.npz.*missing arrays"):
        load_dataset({"name": "cifar10", "root": str(tmp_path / "other.npz")})


def _shared_pack() -> Path:
    env = os.environ.get("MLAUDIT_CIFAR10_NPZ")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "cifar10-jpeg.npz"


@pytest.mark.slow
@pytest.mark.skipif(not _shared_pack().is_file(), reason="the shared CIFAR-10 JPEG pack is not available")
def test_cifar10_real_jpeg_pack() -> None:
    b = load_dataset({"name": "cifar10", "root": str(_shared_pack())})
    assert (len(b.train), len(b.test), b.train.x.dtype) == (50000, 10000, torch.float32)
    assert b.train.y.bincount().tolist() == [5000] * 10 and b.test.y.bincount().tolist() == [1000] * 10
    assert 0.0 <= b.train.x.min() and b.train.x.max() <= 1.0 and b.train.classes == tuple(CIFAR_CLASSES)


# ------------------------------------------------------------------------------------------- mnist
def make_mnist(root: Path, *, n_train: int = 6, n_test: int = 4, gz: bool = True) -> None:
    rng = np.random.default_rng(2)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind, arr in (("images-idx3", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
                          ("labels-idx1", rng.integers(0, 10, n).astype(np.uint8))):
            data = mnist.write_idx(arr)
            name = f"{prefix}-{kind}-ubyte"
            if gz and prefix == "train":  # mix gzipped and plain files
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)


def test_mnist_load_and_fashion(tmp_path: Path) -> None:
    make_mnist(tmp_path)
    b = load_dataset({"name": "mnist", "root": str(tmp_path)})
    assert (len(b.train), len(b.test), b.input_shape) == (6, 4, (1, 28, 28))
    raw = mnist.parse_idx((tmp_path / "t10k-images-idx3-ubyte").read_bytes())
    assert torch.equal(b.test.x[:, 0], torch.from_numpy(raw).float() / 255)
    assert b.train.classes == tuple("0123456789")
    f = load_dataset({"name": "mnist", "root": str(tmp_path), "options": {"variant": "fashion"}})
    assert f.train.classes[0] == "T-shirt/top" and f.train.classes[-1] == "Ankle boot"


def test_mnist_errors(tmp_path: Path) -> None:
    make_mnist(tmp_path, gz=False)
    spec = {"name": "mnist", "root": str(tmp_path)}
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    labels.write_bytes(mnist.write_idx(np.zeros(3, np.uint8)))
    with pytest.raises(DataError, match="holds 4 images but .*t10k-labels-idx1-ubyte holds 3 labels"):
        load_dataset(spec)
    labels.write_bytes(b"\x00\x00\x08\x03" + labels.read_bytes()[4:])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: bad IDX magic number 0x00000803"):
        load_dataset(spec)
    labels.write_bytes(mnist.write_idx(np.zeros(4, np.uint8))[:-1])
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: IDX file truncated"):
        load_dataset(spec)
    labels.unlink()
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(mnist.write_idx(np.zeros(4, np.uint8)))[:-6])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: corrupt or truncated gzip"):
        load_dataset(spec)
    with pytest.raises(ConfigError, match=r"options\.variant.*'mnist' or 'fashion'"):
        load_dataset({**spec, "options": {"variant": "kmnist"}})


def test_mnist_missing_and_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError) as info:
        load_dataset({"name": "mnist", "root": str(tmp_path / "none")})
    assert str(tmp_path / "none" / "t10k-images-idx3-ubyte") in str(info.value) and "download: true" in str(info.value)
    with pytest.raises(DataError, match="no download URLs for Fashion-MNIST"):
        load_dataset({"name": "mnist", "root": str(tmp_path / "none"), "download": True,
                      "options": {"variant": "fashion"}})
    mirror = tmp_path / "mirror"
    make_mnist(mirror, gz=False)
    for p in list(mirror.iterdir()):
        p.with_name(p.name + ".gz").write_bytes(gzip.compress(p.read_bytes()))
    monkeypatch.setattr(mnist, "MNIST_URL", mirror.as_uri() + "/")
    monkeypatch.setattr(mnist, "MNIST_MD5", MappingProxyType({p.name: md5(p) for p in mirror.glob("*.gz")}))
    b = load_dataset({"name": "mnist", "download": True})
    assert len(b.train) == 6 and b.meta["root"] == str(Path(os.environ["MLAUDIT_DATA"]) / "mnist")
    monkeypatch.setattr(mnist, "MNIST_MD5", MappingProxyType({k: "f" * 32 for k in mnist.MNIST_MD5}))
    with pytest.raises(DataError, match="MD5 mismatch"):
        load_dataset({"name": "mnist", "root": str(tmp_path / "dl"), "download": True})


IDX_DTYPES = st.sampled_from([np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(IDX_DTYPES, hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5)))
def test_idx_round_trip(arr: np.ndarray) -> None:
    back = mnist.parse_idx(mnist.write_idx(arr))
    assert back.dtype == arr.dtype and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.uint8, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=4)), st.data())
def test_idx_any_truncation_is_an_error(arr: np.ndarray, data: st.DataObject) -> None:
    raw = mnist.write_idx(arr)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(DataError):
        mnist.parse_idx(raw[:cut], source="f")


# ------------------------------------------------------------------------------------------ digits
def test_digits_split_is_stratified_and_deterministic() -> None:
    a, b = load_dataset("digits"), load_dataset({"name": "digits", "seed": 0})
    assert a.id == b.id and a.input_shape == (1, 8, 8) and len(a.train) + len(a.test) == 1797
    assert 0.0 <= a.train.x.min() and a.train.x.max() <= 1.0 and a.train.x.max() == 1.0
    counts = torch.cat([a.train.y, a.test.y]).bincount()
    assert a.test.y.bincount().tolist() == [round(int(n) * 0.2) for n in counts]
    other = load_dataset({"name": "digits", "seed": 1, "test_fraction": 0.5})
    assert other.id != a.id and abs(len(other.test) - 1797 / 2) <= 10
    with pytest.raises(ConfigError, match=r"options\.size.*Allowed options: \(none\)"):
        load_dataset({"name": "digits", "options": {"size": 8}})


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=60), st.floats(0.05, 0.95), st.integers(0, 2**31))
def test_stratified_split_partitions(labels: list[int], frac: float, seed: int) -> None:
    y = np.array(labels)
    tr, te = stratified_split(y, frac, seed)
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(len(y)))
    for c in np.unique(y):  # every class with >= 2 members is in both splits
        n = int((y == c).sum())
        assert (y[te] == c).sum() == (0 if n < 2 else min(max(round(n * frac), 1), n - 1))


# --------------------------------------------------------------------------------------- synthetic
def test_synthetic_determinism_and_shapes() -> None:
    a = load_dataset({"name": "synthetic", "seed": 3})
    assert a.id == load_dataset({"name": "synthetic", "seed": 3}).id
    assert a.id != load_dataset({"name": "synthetic", "seed": 4}).id
    assert (len(a.train), len(a.test), a.input_shape, a.num_classes) == (512, 256, (3, 8, 8), 4)
    assert a.train.y.bincount().tolist() == [128] * 4 and 0 <= a.train.x.min() and a.train.x.max() <= 1
    v = load_dataset({"name": "synthetic", "options": {"shape": [5], "n_train": 10, "num_classes": 3}})
    assert v.input_shape == (5,) and not v.is_image and v.train.y.bincount().tolist() == [4, 3, 3]
    with pytest.raises(ConfigError, match=r"options\.shape"):
        load_dataset({"name": "synthetic", "options": {"shape": [3, 8]}})
    with pytest.raises(ConfigError, match=r"options\.n_tran.*Allowed options: n_train"):
        load_dataset({"name": "synthetic", "options": {"n_tran": 3}})


def test_synthetic_is_learnable() -> None:
    from sklearn.linear_model import LogisticRegression

    b = load_dataset({"name": "synthetic", "seed": 0})
    clf = LogisticRegression(max_iter=500).fit(b.train.x.flatten(1).numpy(), b.train.y.numpy())
    assert clf.score(b.test.x.flatten(1).numpy(), b.test.y.numpy()) > 0.9  # chance is 0.25


def test_load_dataset_limits() -> None:
    a = load_dataset({"name": "synthetic", "limit_train": 50, "limit_test": 20, "seed": 5})
    assert (len(a.train), len(a.test), a.meta["limit_train"]) == (50, 20, 50)
    assert a.id == load_dataset({"name": "synthetic", "limit_train": 50, "limit_test": 20, "seed": 5}).id
    d = load_dataset({"name": "digits", "limit_train": 100})
    assert len(d.train) == 100 and len(d.test) == len(load_dataset("digits").test)


# ------------------------------------------------------------------------------------ image-folder
def write_image(path: Path, seed: int, size: tuple[int, int] = (6, 8), fmt: str = "PNG") -> np.ndarray:
    """Write an RGB image of ``size`` (W, H); returns its pixels [H, W, 3]."""
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return arr


def make_flat(root: Path, classes: tuple[str, ...] = ("cat", "ant", "bee"), per_class: int = 5) -> None:
    for k, c in enumerate(classes):
        for i in range(per_class):
            write_image(root / c / f"{i}.png", seed=10 * k + i)
    (root / "README.txt").write_text("ignored")
    (root / ".hidden").mkdir()


def test_image_folder_flat_layout(tmp_path: Path) -> None:
    make_flat(tmp_path / "ds")
    b = load_dataset({"name": "image-folder", "root": str(tmp_path / "ds"), "seed": 1})
    assert b.train.classes == ("ant", "bee", "cat") and b.input_shape == (3, 8, 6)
    assert (len(b.train), len(b.test)) == (12, 3) and b.test.y.sort().values.tolist() == [0, 1, 2]
    x_all = torch.cat([b.train.x, b.test.x]).flatten(1).sum(1).sort().values
    want = sorted(write_image(tmp_path / "tmp.png", seed=s).astype(np.float64).sum() / 255
                  for s in [*range(5), *range(10, 15), *range(20, 25)])
    np.testing.assert_allclose(x_all.numpy(), want, rtol=1e-5)
    grey = load_dataset({"name": "image-folder", "root": str(tmp_path / "ds"), "options": {"mode": "L", "size": 4}})
    assert grey.input_shape == (1, 4, 4) and grey.meta["size"] == [4, 4]


def test_image_folder_split_layout_and_zip(tmp_path: Path) -> None:
    root = tmp_path / "wrap" / "data"
    for split, n in (("train", 3), ("test", 2)):
        for k, c in enumerate(("dog", "cow")):
            for i in range(n):
                write_image(root / split / c / "sub" / f"{i}.bmp", seed=k * 7 + i, fmt="BMP")
    b = load_dataset({"name": "image-folder", "root": str(tmp_path / "wrap")})
    assert (len(b.train), len(b.test), b.train.classes, b.meta["layout"]) == (6, 4, ("cow", "dog"), "train-test")
    z = tmp_path / "ds.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in sorted(root.rglob("*.bmp")):
            zf.write(p, p.relative_to(tmp_path / "wrap").as_posix())
        zf.writestr("__MACOSX/data/._junk.png", b"junk")
    zb = load_dataset({"name": "image-folder", "root": str(z)})
    assert zb.id == b.id and zb.meta["format"] == "zip"


def test_image_folder_errors(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    make_flat(root)
    spec = {"name": "image-folder", "root": str(root)}
    (root / "emu").mkdir()
    with pytest.raises(DataError, match=f"class folder {root / 'emu'} holds no images"):
        load_dataset(spec)
    (root / "emu").rmdir()
    write_image(root / "bee" / "big.png", seed=0, size=(7, 8))
    with pytest.raises(DataError, match=r"big\.png is 7x8 \(WxH\) but .*0\.png is 6x8; set options\.size"):
        load_dataset(spec)
    assert load_dataset({**spec, "options": {"size": [8, 6]}}).input_shape == (3, 8, 6)
    (root / "bee" / "big.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot decode image .*bee/big\.png"):
        load_dataset(spec)
    with pytest.raises(ConfigError, match=r"options\.size"):
        load_dataset({**spec, "options": {"size": [0, 4]}})
    write_image(tmp_path / "split" / "train" / "a" / "0.png", seed=0)
    with pytest.raises(DataError, match="no .*test"):
        load_dataset({**spec, "root": str(tmp_path / "split")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_dataset({**spec, "root": str(tmp_path / "empty")})


def test_image_folder_zip_rejects_traversal(tmp_path: Path) -> None:
    z = tmp_path / "evil.zip"
    buf = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buf, format="PNG")
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("a/0.png", buf.getvalue())
        zf.writestr("../b/0.png", buf.getvalue())
    with pytest.raises(DataError, match="unsafe member path '../b/0.png'"):
        load_dataset({"name": "image-folder", "root": str(z)})
