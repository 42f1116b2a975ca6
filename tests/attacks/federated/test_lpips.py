"""LPIPS (Zhang et al. 2018, eq. 1) on a locally built AlexNet with random weights (no download)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from torch import nn

from mlaudit.attacks.federated.lpips import ALEX_CHANNELS, LPIPS, lpips_alexnet
from mlaudit.errors import ConfigError


def torchvision_layout() -> nn.Sequential:
    """AlexNet's trunk as torchvision numbers it (features.0 .. features.12)."""
    return nn.Sequential(nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
                         nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
                         nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(), nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2))


def files(tmp_path: Path) -> tuple[nn.Sequential, dict, Path, Path]:
    torch.manual_seed(0)
    trunk = torchvision_layout()
    state = {f"features.{k}": v for k, v in trunk.state_dict().items()}
    state["classifier.1.weight"] = torch.randn(4, 4)  # a full AlexNet file also holds the classifier: ignored
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(ALEX_CHANNELS)}
    torch.save(state, tmp_path / "alexnet.pth")
    torch.save(lin, tmp_path / "alex.pth")
    return trunk, lin, tmp_path / "alexnet.pth", tmp_path / "alex.pth"


def direct(trunk: nn.Sequential, lin: dict, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Eq. 1 written out on the torchvision layout: activations after ReLUs 1, 4, 7, 9, 11."""
    def feats(v: torch.Tensor) -> list[torch.Tensor]:
        v = (2 * v - 1 - torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)) / torch.tensor(
            [0.458, 0.448, 0.450]).view(1, 3, 1, 1)
        out = []
        for i, layer in enumerate(list(trunk)[:12]):  # the last max-pool is not read
            v = layer(v)
            if i in (1, 4, 7, 9, 11):
                out.append(v / (v.norm(dim=1, keepdim=True) + 1e-10))
        return out
    total = torch.zeros(len(x))
    for i, (a, b) in enumerate(zip(feats(x), feats(x0), strict=True)):
        w = lin[f"lin{i}.model.1.weight"].view(1, -1, 1, 1)
        total += (w * (a - b) ** 2).sum(1).mean((1, 2))
    return total


def test_lpips_equals_equation_1_on_the_torchvision_layout_and_is_a_premetric(tmp_path: Path) -> None:
    trunk, lin, a, b = files(tmp_path)
    metric = lpips_alexnet(a, b)
    torch.manual_seed(1)
    x, x0 = torch.rand(3, 3, 32, 32), torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        d = metric(x, x0)
        torch.testing.assert_close(d, direct(trunk, lin, x, x0), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(d, metric(x0, x))  # symmetric
        assert bool((d > 0).all())
        torch.testing.assert_close(metric(x, x), torch.zeros(3))
        near = metric(x, (x + 0.01 * torch.randn_like(x)).clamp(0, 1))
        far = metric(x, (x + 0.3 * torch.randn_like(x)).clamp(0, 1))
        assert bool((near < far).all())


def test_grey_images_are_compared_as_three_equal_channels_and_the_box_is_mapped(tmp_path: Path) -> None:
    _, _, a, b = files(tmp_path)
    metric = lpips_alexnet(a, b)
    g, g0 = torch.rand(2, 1, 40, 40), torch.rand(2, 1, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(metric(g, g0), metric(g.expand(-1, 3, -1, -1), g0.expand(-1, 3, -1, -1)))
        shifted = lpips_alexnet(a, b, box=(-1.0, 1.0))
        torch.testing.assert_close(shifted(2 * g - 1, 2 * g0 - 1), metric(g, g0), rtol=1e-5, atol=1e-6)


def test_files_are_hash_checked_and_bad_weights_or_sizes_are_refused(tmp_path: Path) -> None:
    _, lin, a, b = files(tmp_path)
    good = hashlib.sha256(a.read_bytes()).hexdigest()
    lpips_alexnet(a, b, backbone_sha256=good)
    with pytest.raises(Exception, match="sha256"):
        lpips_alexnet(a, b, backbone_sha256="0" * 64)
    with pytest.raises(ConfigError, match="no file at"):
        lpips_alexnet(tmp_path / "missing.pth", b)
    with pytest.raises(ConfigError, match=r"need lin0 \.\. lin4"):
        lpips_alexnet(a, {k: v for k, v in lin.items() if not k.startswith("lin4")})
    with pytest.raises(ConfigError, match="no 'features.10.weight'"):
        state = torch.load(a, weights_only=True)
        lpips_alexnet({k: v for k, v in state.items() if k != "features.10.weight"}, b)
    with pytest.raises(ConfigError, match="non-negative"):
        LPIPS([nn.Identity()], [torch.tensor([-1.0, 1.0, 1.0])])
    with pytest.raises(ConfigError, match="at least 31 pixels"):
        lpips_alexnet(a, b).check_size((1, 8, 8))  # digits are too small for AlexNet
    lpips_alexnet(a, b).check_size((3, 32, 32))


def test_match_reports_lpips_of_the_assigned_pairs(tmp_path: Path) -> None:
    from mlaudit.attacks.federated.metrics import match

    _, _, a, b = files(tmp_path)
    metric = lpips_alexnet(a, b)
    torch.manual_seed(2)
    true = torch.rand(3, 3, 32, 32)
    cands = torch.stack([true[2], (true[0] + 0.05 * torch.randn_like(true[0])).clamp(0, 1)])  # true[1] unmatched
    m = match(true, cands, data_range=1.0, lpips=metric)
    assert m.candidate.tolist() == [1, -1, 0]
    assert m.lpips is not None and float(m.lpips[2]) == 0.0 and bool(torch.isnan(m.lpips[1]))
    with torch.no_grad():
        torch.testing.assert_close(m.lpips[0].float(), metric(true[:1], cands[1:2])[0])
    assert match(true, cands, data_range=1.0).lpips is None


def test_the_weights_download_checks_digests_and_content_and_keeps_valid_files(tmp_path: Path) -> None:
    """``download_lpips_weights`` (and ``mlaudit data lpips-weights``) from local mirrors (file:// URLs): the AlexNet
    file checked against a sha256 prefix, the linear layers by loading them; a valid file already there is kept; a
    digest mismatch or a file that is not what LPIPS needs leaves nothing behind."""
    import json

    from typer.testing import CliRunner

    from mlaudit.attacks.federated.lpips import download_lpips_weights
    from mlaudit.cli import app
    from mlaudit.errors import DataError

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    _, _, alex, lin = files(mirror)
    prefix = hashlib.sha256(alex.read_bytes()).hexdigest()[:8]
    urls = {"backbone_url": alex.as_uri(), "lin_url": lin.as_uri()}
    got = download_lpips_weights(tmp_path / "w", backbone_sha256=prefix, **urls)
    assert Path(got["backbone"]).read_bytes() == alex.read_bytes() and Path(got["lin"]).read_bytes() == lin.read_bytes()
    assert got["lin_sha256"] == hashlib.sha256(lin.read_bytes()).hexdigest()
    metric = lpips_alexnet(got["backbone"], got["lin"], backbone_sha256=got["backbone_sha256"],
                           lin_sha256=got["lin_sha256"])
    x = torch.rand(2, 3, 64, 64)
    assert float(metric(x, x).abs().max()) == 0.0
    stamp = Path(got["backbone"]).stat().st_mtime_ns
    assert download_lpips_weights(tmp_path / "w", backbone_sha256=prefix, **urls) == got
    assert Path(got["backbone"]).stat().st_mtime_ns == stamp  # kept, not fetched again
    with pytest.raises(DataError, match="SHA-256 mismatch"):
        download_lpips_weights(tmp_path / "bad", backbone_sha256="00000000", **urls)
    torch.save({"lin0.model.1.weight": torch.rand(1, 64, 1, 1)}, mirror / "short.pth")
    with pytest.raises(ConfigError, match="is not what LPIPS needs.*lin0 .. lin4"):
        download_lpips_weights(tmp_path / "bad", backbone_sha256=prefix, backbone_url=alex.as_uri(),
                               lin_url=(mirror / "short.pth").as_uri())
    assert sorted(p.name for p in (tmp_path / "bad").iterdir()) == ["alexnet.pth"]  # the valid backbone only
    res = CliRunner().invoke(app, ["data", "lpips-weights", str(tmp_path / "cli"), "--backbone-url", alex.as_uri(),
                                   "--backbone-sha256", prefix, "--lin-url", lin.as_uri()])
    assert res.exit_code == 0, res.output
    assert f"backbone_sha256: {got['backbone_sha256']}" in res.output and json.dumps(str(tmp_path / "cli"))[1:-1] in res.output
    res = CliRunner().invoke(app, ["data", "lpips-weights", str(tmp_path / "cli2"), "--backbone-url", alex.as_uri(),
                                   "--backbone-sha256", "abc", "--lin-url", lin.as_uri()])
    assert res.exit_code == 2 and "prefix of at least 8 hex digits" in res.output
