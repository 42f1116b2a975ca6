"""export_view / import_view: round trips, hash and path checks, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mlaudit.data import export as export_mod
from mlaudit.data.base import TensorDataset
from mlaudit.data.export import export_view, import_view
from mlaudit.data.view import DataView
from mlaudit.errors import ConfigError, DataError

CLASSES = ("a", "b", "c")
EPS = 8 / 255


def make_view(shape: tuple[int, ...] = (3, 4, 5), n: int = 10, seed: int = 0) -> DataView:
    g = torch.Generator().manual_seed(seed)
    base = TensorDataset(torch.rand(n, *shape, generator=g), torch.randint(0, 3, (n,), generator=g), CLASSES)
    idx = torch.tensor([7, 1, 3])
    raw = (torch.rand(3, *shape, generator=g) * 2 - 1) * EPS
    delta = (base.x[idx] + raw).clamp(0, 1) - base.x[idx]
    return (DataView.from_delta(base, idx, delta, eps=EPS, meta={"method": "unit", "k": [1, 2]})
            .with_inserted(torch.rand(2, *shape, generator=g), [2, 0])
            .with_labels([2, n + 1], [0, 1])
            .with_keep(torch.tensor([0, 1, 2, 3, 7, n + 1])))


def gather_all(view: DataView) -> tuple[torch.Tensor, torch.Tensor]:
    return view.gather(torch.arange(view.num_total))


@pytest.mark.parametrize("shape", [(3, 4, 5), (1, 4, 4), (2, 3, 3), (6,)])
def test_round_trip_exact_with_npy(tmp_path: Path, shape: tuple[int, ...]) -> None:
    view = make_view(shape)
    folder = export_view(view, tmp_path / "v", base_id="base-1")
    back = import_view(folder, view.base, base_id="base-1")
    x0, y0 = gather_all(view)
    x1, y1 = gather_all(back)
    assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert back.kept_indices().tolist() == view.kept_indices().tolist()
    assert back.eps == pytest.approx(EPS) and back.meta == view.meta
    assert back.base is view.base
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"] == "mlaudit-view/1" and manifest["indices"] == [7, 1, 3]
    assert manifest["relabel"] == [[2, 0], [11, 1]] and [y for _, y in manifest["inserted"]] == [2, 0]
    assert set(manifest["files"]) == {p.relative_to(folder).as_posix() for p in folder.rglob("*")
                                      if p.is_file() and p.name != "manifest.json"}


@pytest.mark.parametrize("channels", [1, 3])
def test_round_trip_png_only_within_quantisation(tmp_path: Path, channels: int) -> None:
    view = make_view((channels, 4, 5))
    folder = export_view(view, tmp_path / "v", base_id="b", exact=False)
    assert not (folder / "deltas.npy").exists() and len(list((folder / "images").glob("*.png"))) == 3
    back = import_view(folder, view.base, base_id="b")
    x0, y0 = gather_all(view)
    x1, y1 = gather_all(back)
    assert torch.equal(y0, y1)
    assert float((x0 - x1).abs().max()) <= 1 / 255 + 1e-6
    assert float(back.delta.abs().max()) <= EPS + 1e-6  # quantisation overshoot projected back into the ball
    assert torch.equal(back.inserted_x, (back.inserted_x * 255).round() / 255)  # read back from 8-bit PNGs
    assert not torch.equal(back.inserted_x, view.inserted_x)


def test_non_image_shapes_are_exact_without_npy_arrays(tmp_path: Path) -> None:
    view = make_view((2, 3, 3))
    folder = export_view(view, tmp_path / "v", base_id="b", exact=False)
    back = import_view(folder, view.base, base_id="b")
    assert torch.allclose(gather_all(back)[0], gather_all(view)[0], atol=1e-6, rtol=0)


def test_identity_view_round_trip(tmp_path: Path) -> None:
    view = DataView.identity(make_view().base)
    back = import_view(export_view(view, tmp_path / "v", base_id="b"), view.base, base_id="b")
    assert back.indices.numel() == 0 and back.keep is None and back.eps is None
    assert torch.equal(gather_all(back)[0], view.base.x)


def test_modified_png_is_detected_and_named(tmp_path: Path) -> None:
    view = make_view()
    folder = export_view(view, tmp_path / "v", base_id="b")
    png = folder / "images" / "00000003.png"
    data = bytearray(png.read_bytes())
    data[len(data) // 2] ^= 0x01
    png.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"images/00000003\.png.*does not match"):
        import_view(folder, view.base, base_id="b")


def test_missing_file_is_named(tmp_path: Path) -> None:
    view = make_view()
    folder = export_view(view, tmp_path / "v", base_id="b")
    (folder / "deltas.npy").unlink()
    with pytest.raises(DataError, match=r"deltas\.npy.*missing"):
        import_view(folder, view.base, base_id="b")
    with pytest.raises(DataError, match="no manifest.json"):
        import_view(tmp_path / "elsewhere", view.base, base_id="b")


def test_wrong_base_is_rejected(tmp_path: Path) -> None:
    view = make_view()
    folder = export_view(view, tmp_path / "v", base_id="cifar10:abc")
    with pytest.raises(DataError, match=r"exported for base 'cifar10:abc' but base_id 'cifar10:xyz'"):
        import_view(folder, view.base, base_id="cifar10:xyz")
    other = make_view(seed=1).base  # same shape and size, different pixels
    with pytest.raises(DataError, match="fingerprint"):
        import_view(folder, other, base_id="cifar10:abc")
    small = make_view(n=12).base
    with pytest.raises(DataError, match="examples of shape"):
        import_view(folder, small, base_id="cifar10:abc")


def _edit_manifest(folder: Path, edit) -> None:  # type: ignore[no-untyped-def]
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("bad", ["../outside.png", "images/../../outside.png", "/etc/passwd", "C:/x.png",
                                 "images\\..\\x.png", ""])
def test_path_traversal_in_manifest_rejected(tmp_path: Path, bad: str) -> None:
    view = make_view()
    folder = export_view(view, tmp_path / "v", base_id="b")
    (tmp_path / "outside.png").write_bytes(b"x")

    def edit(m: dict) -> None:
        m["files"][bad] = "0" * 64
        m["images"][0] = bad

    _edit_manifest(folder, edit)
    with pytest.raises(DataError, match="unsafe path"):
        import_view(folder, view.base, base_id="b")


def test_malformed_manifest_rejected(tmp_path: Path) -> None:
    view = make_view()
    folder = export_view(view, tmp_path / "v", base_id="b")
    _edit_manifest(folder, lambda m: m.update(format="mlaudit-view/99"))
    with pytest.raises(DataError, match="mlaudit-view/99"):
        import_view(folder, view.base, base_id="b")
    _edit_manifest(folder, lambda m: m.update(format="mlaudit-view/1", surprise=1))
    with pytest.raises(DataError, match="malformed"):
        import_view(folder, view.base, base_id="b")
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        import_view(folder, view.base, base_id="b")


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    view = make_view()
    target = tmp_path / "v"
    export_view(view, target, base_id="b")
    with pytest.raises(ConfigError, match="overwrite=True"):
        export_view(view, target, base_id="b")
    ident = DataView.identity(view.base)
    export_view(ident, target, base_id="b2", overwrite=True)
    assert not (target / "images").exists()  # the old contents were replaced, not merged
    assert import_view(target, view.base, base_id="b2").indices.numel() == 0
    (tmp_path / "empty").mkdir()
    export_view(view, tmp_path / "empty", base_id="b")  # an empty folder is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "v"]  # no temporary folders left


def test_non_json_meta_rejected(tmp_path: Path) -> None:
    view = make_view().with_meta(obj=object())
    with pytest.raises(ConfigError, match="JSON"):
        export_view(view, tmp_path / "v", base_id="b")
    assert not (tmp_path / "v").exists()


@pytest.mark.parametrize("existing", [False, True])
def test_failure_mid_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool) -> None:
    view = make_view()
    target = tmp_path / "v"
    if existing:
        export_view(DataView.identity(view.base), target, base_id="old")
    real = export_mod._write_file
    calls = {"n": 0}

    def flaky(root: Path, rel: str, data: bytes) -> str:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full (simulated)")
        return real(root, rel, data)

    monkeypatch.setattr(export_mod, "_write_file", flaky)
    with pytest.raises(OSError, match="simulated"):
        export_view(view, target, base_id="b", overwrite=True)
    assert calls["n"] == 3
    if existing:  # the previous export is untouched
        assert import_view(target, view.base, base_id="old").indices.numel() == 0
        assert [p.name for p in tmp_path.iterdir()] == ["v"]
    else:
        assert not target.exists()
        assert list(tmp_path.iterdir()) == []
