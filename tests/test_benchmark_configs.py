"""Every config under benchmarks/configs/ is a valid experiment config (checked before any GPU time is
spent on it), and the targeted-poison studies that are split by ``first_scenario`` over machine leases
name the scenarios they pool."""

from pathlib import Path

import pytest

from mlaudit.config import apply_overrides, load_yaml
from mlaudit.experiments.base import parse_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "configs").glob("*.yaml"))


def test_there_are_benchmark_configs() -> None:
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_benchmark_config_parses(path: Path) -> None:
    raw = load_yaml(path)
    cfg = parse_config(raw)
    assert cfg.kind == raw["kind"]


@pytest.mark.parametrize("stem", ["cifar10_resnet18_brew_full", "cifar10_convnet6_brew"])
def test_split_studies_cover_scenarios_0_to_3(stem: str) -> None:
    raw = load_yaml(CONFIGS[[p.stem for p in CONFIGS].index(stem)])
    halves = [parse_config(apply_overrides(raw, [f"first_scenario={k}"])) for k in (0, 2)]
    covered = [k + i for h in halves for k, i in [(h.first_scenario, i) for i in range(h.scenarios)]]
    assert covered == [0, 1, 2, 3]


@pytest.mark.parametrize("dataset", ["digits", "cifar10"])
@pytest.mark.parametrize("method", ["fawkes", "lowkey"])
def test_protect_benchmark_configs_parse(dataset: str, method: str, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/protect.py builds valid configs for both datasets (checked before GPU time is spent; the
    CIFAR-10 pack itself is not needed to parse, so a stand-in path is given)."""
    import argparse
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import protect as bench
    finally:
        sys.path.pop(0)
    (tmp_path / "cifar10-jpeg.npz").write_bytes(b"")
    monkeypatch.setattr(bench, "cifar10_pack", lambda: str(tmp_path / "cifar10-jpeg.npz"))
    args = argparse.Namespace(dataset=dataset, eps=None, users=None, limit=None, epochs=None, steps=None)
    cfg = parse_config(bench.config(args, method))
    assert cfg.kind == "protect" and cfg.attack.method == method and len(cfg.trainers) == 4


def test_certify_benchmark_keeps_the_whole_curve_small(tmp_path: Path) -> None:
    """benchmarks/certify.py stores each sigma's whole certified-accuracy curve from the run's per-example
    certificates: the sorted radii of the correctly certified images and a 0.01 grid, equal to counting
    directly, and well under 200 KB of JSON for 500 images at sigma 0.5 (largest radius 1.6)."""
    import json
    import sys

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import certify as bench
    finally:
        sys.path.pop(0)
    rng = np.random.default_rng(0)
    label = rng.integers(0, 10, 500)
    pred = np.where(rng.random(500) < 0.8, label, (label + 1) % 10)
    pred[rng.random(500) < 0.1] = -1
    radius = np.where(pred >= 0, rng.random(500) * 1.6, 0.0)
    np.savez(tmp_path / "certificates.npz", label=label, prediction=pred, radius=radius)
    c = bench.full_curve(tmp_path / "certificates.npz", 1.6)
    ok = (pred == label) & (pred >= 0)
    assert c["examples"] == 500 and c["certified_correct"] == int(ok.sum()) == len(c["radius_correct"])
    assert c["abstained"] == int((pred < 0).sum()) and c["radius_correct"] == sorted(c["radius_correct"])
    assert c["grid"][0] == 0.0 and c["grid"][-1] == pytest.approx(1.6) and len(c["grid"]) == 161
    for r, acc in zip(c["grid"], c["certified_accuracy"], strict=True):
        assert acc == pytest.approx((ok & (radius >= r)).mean(), abs=1e-6)
    redrawn = np.array(c["radius_correct"])
    for r in (0.0, 0.25, 0.5, 1.0):  # any radius, from the stored radii alone
        assert abs((redrawn >= r).sum() - (ok & (radius >= r)).sum()) <= 1  # 6 significant digits
    assert len(json.dumps(c, indent=2)) < 50_000  # two sigmas and the runs' configs stay far below 200 KB


def test_cifar10_pack_unpacks_the_xz_copy_when_no_pack_is_there(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/_common.cifar10_pack: with no .npz among the candidates but the xz-compressed copy present, it
    unpacks that copy byte for byte to the path the configs name and returns it; with neither, a clear exit."""
    import lzma
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import _common

    payload = bytes(range(256)) * 1000
    xz = tmp_path / ".data_xz" / "cifar10-jpeg.npz.xz"
    xz.parent.mkdir()
    xz.write_bytes(lzma.compress(payload))
    monkeypatch.setattr(_common, "PACK_CANDIDATES", ["", str(tmp_path / "absent.npz")])
    monkeypatch.setattr(_common, "PACK_XZ", xz)
    monkeypatch.setattr(_common, "HERE", tmp_path / "benchmarks")
    got = Path(_common.cifar10_pack())
    assert got == tmp_path / ".data" / "cifar10-jpeg.npz" and got.read_bytes() == payload
    assert not list(got.parent.glob("*.part"))
    xz.unlink()
    with pytest.raises(SystemExit, match="not found"):
        _common.cifar10_pack()
