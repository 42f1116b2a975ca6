"""export_view / import_view: round trips, content digest, hash and path checks, images against
deltas, atomic writes."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mlaudit.data import export as export_mod
from mlaudit.data.base import TensorDataset
from mlaudit.data.export import export_view, import_view, verify_digest, view_digest
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
                                      if p.is_file() and p.name not in ("manifest.json", "DIGEST")}


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


def _reseal(folder: Path) -> None:
    """Rewrite DIGEST for the folder as it now is, as someone editing the folder could."""
    export_mod._write_digest(folder)


def _edit_manifest(folder: Path, edit, reseal: bool = True) -> None:  # type: ignore[no-untyped-def]
    """Edit manifest.json; by default also rewrite DIGEST so the checks behind the digest are reached."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    if reseal:
        _reseal(folder)


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
    _reseal(folder)
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


# ---- content digest (issue 21) -------------------------------------------------------------------


def _digest_line(folder: Path) -> str:
    return (folder / "DIGEST").read_text().splitlines()[0].split(" ")[1]


def test_digest_covers_every_file_and_is_checkable_with_standard_tools(tmp_path: Path) -> None:
    view = make_view()
    folder = export_view(view, tmp_path / "v", base_id="b")
    lines = (folder / "DIGEST").read_text().splitlines()
    assert lines[0].startswith("mlaudit-view-digest/1 ")
    listed = {line.split("  ", 1)[1]: line.split("  ", 1)[0] for line in lines[1:]}
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {"DIGEST"}
    assert set(listed) == on_disk and "manifest.json" in listed
    assert all(hashlib.sha256((folder / rel).read_bytes()).hexdigest() == h for rel, h in listed.items())
    body = "".join(line + "\n" for line in lines[1:])
    digest = hashlib.sha256(body.encode()).hexdigest()  # = tail -n +2 DIGEST | sha256sum
    assert _digest_line(folder) == digest == view_digest(folder) == verify_digest(folder, f"sha256:{digest}")
    again = export_view(view, tmp_path / "w", base_id="b")
    assert view_digest(again) == digest  # deterministic: the same view exports to the same digest
    assert view_digest(export_view(view, tmp_path / "x", base_id="other")) != digest


def test_untouched_export_round_trips_with_the_kept_digest(tmp_path: Path) -> None:
    view = make_view()
    folder = export_view(view, tmp_path / "v", base_id="b")
    kept = view_digest(folder)
    back = import_view(folder, view.base, base_id="b", expected_digest=kept)
    assert torch.equal(gather_all(back)[0], gather_all(view)[0])
    assert import_view(folder, view.base, base_id="b", expected_digest=kept.upper()).indices.tolist() == [7, 1, 3]


@pytest.mark.parametrize("edit", [
    lambda m: m["relabel"].__setitem__(0, [m["relabel"][0][0], 1]),
    lambda m: m.update(eps=m["eps"] * 2),
    lambda m: m.update(keep=None),
    lambda m: m["meta"].update(method="other"),
])
def test_edited_manifest_is_refused(tmp_path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    view = make_view()
    folder = export_view(view, tmp_path / "v", base_id="b")
    kept = view_digest(folder)
    _edit_manifest(folder, edit, reseal=False)
    with pytest.raises(DataError, match=r"differs from its DIGEST: 'manifest\.json' was modified"):
        import_view(folder, view.base, base_id="b")
    _reseal(folder)  # DIGEST rewritten too: only the digest kept elsewhere catches it
    assert import_view(folder, view.base, base_id="b") is not None
    with pytest.raises(DataError, match=f"content digest {view_digest(folder)} but {kept} was expected"):
        import_view(folder, view.base, base_id="b", expected_digest=kept)


def _png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("rel", ["images/00000003.png", "inserted/00000001.png"])
def test_replaced_png_with_updated_hashes_is_caught_against_the_deltas(tmp_path: Path, rel: str) -> None:
    view = make_view()
    folder = export_view(view, tmp_path / "v", base_id="b")
    png = folder / rel
    from PIL import Image

    with Image.open(png) as im:
        arr = np.asarray(im).copy()
    arr[0, 0, 0] = (int(arr[0, 0, 0]) + 1) % 256  # one pixel, one grey level: a valid, different PNG
    png.write_bytes(_png_bytes(arr))
    with pytest.raises(DataError, match=rf"'{rel}' was modified"):
        import_view(folder, view.base, base_id="b")
    _edit_manifest(folder, lambda m: m["files"].update({rel: hashlib.sha256(png.read_bytes()).hexdigest()}))
    with pytest.raises(DataError, match=rf"{rel} does not hold the image implied by"):
        import_view(folder, view.base, base_id="b")


@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 3, 3)])
def test_replaced_delta_with_updated_hashes_is_caught_against_the_images(tmp_path: Path, shape: tuple) -> None:
    view = make_view(shape)
    folder = export_view(view, tmp_path / "v", base_id="b")
    deltas = np.load(folder / "deltas.npy")
    deltas[1] = -deltas[1]  # still inside the eps ball, but not what the images show
    buf = io.BytesIO()
    np.save(buf, deltas)
    (folder / "deltas.npy").write_bytes(buf.getvalue())
    with pytest.raises(DataError, match=r"'deltas\.npy' was modified"):
        import_view(folder, view.base, base_id="b")
    _edit_manifest(folder, lambda m: m["files"].update({"deltas.npy": hashlib.sha256(buf.getvalue()).hexdigest()}))
    with pytest.raises(DataError, match=r"images/00000001\.(png|npy) does not hold the image implied by base \+ deltas"):
        import_view(folder, view.base, base_id="b")


def test_added_and_removed_files_are_refused(tmp_path: Path) -> None:
    view = make_view()
    folder = export_view(view, tmp_path / "v", base_id="b")
    (folder / "images" / "extra.png").write_bytes((folder / "images" / "00000001.png").read_bytes())
    with pytest.raises(DataError, match=r"'images/extra\.png' was added"):
        import_view(folder, view.base, base_id="b")
    _reseal(folder)  # DIGEST rewritten: the manifest does not list it
    with pytest.raises(DataError, match=r"files the manifest does not list: \['images/extra\.png'\]"):
        import_view(folder, view.base, base_id="b")
    (folder / "images" / "extra.png").unlink()
    _reseal(folder)
    (folder / "inserted" / "00000000.png").unlink()
    with pytest.raises(DataError, match=r"'inserted/00000000\.png' is missing"):
        import_view(folder, view.base, base_id="b")
    (folder / "DIGEST").unlink()
    with pytest.raises(DataError, match="no DIGEST file"):
        import_view(folder, view.base, base_id="b")


def test_links_and_a_tampered_digest_file_are_refused(tmp_path: Path) -> None:
    view = make_view()
    folder = export_view(view, tmp_path / "v", base_id="b")
    (tmp_path / "secret.txt").write_text("x")
    (folder / "link.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(DataError, match="link or special file"):
        import_view(folder, view.base, base_id="b")
    (folder / "link.txt").unlink()
    text = (folder / "DIGEST").read_text()
    (folder / "DIGEST").write_text(text.replace(_digest_line(folder), "0" * 64))
    with pytest.raises(DataError, match="inconsistent"):
        import_view(folder, view.base, base_id="b")
    (folder / "DIGEST").write_text("garbage\n")
    with pytest.raises(DataError, match="DIGEST is malformed"):
        import_view(folder, view.base, base_id="b")
    with pytest.raises(ConfigError, match="expected_digest"):
        import_view(folder, view.base, base_id="b", expected_digest="abc")
