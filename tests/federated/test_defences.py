"""Client-side defences against gradient inversion (mlaudit.federated.defences and the federated kind's
``defence:`` block): each transform on known tensors, seeded noise, an end-to-end digits round where
pruning lowers Inverting Gradients' reconstruction PSNR, bad config values naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from mlaudit.errors import ConfigError
from mlaudit.experiments import run_experiment
from mlaudit.experiments.federated_config import DefenceOptions, FederatedConfig
from mlaudit.federated import defend_updates, distortion
from mlaudit.federated.defences import update_norms


def _updates() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(3, 4, 5, generator=g), "b": torch.randn(3, 7, generator=g)}


def test_prune_keeps_exactly_the_top_magnitudes_per_tensor_and_user() -> None:
    u = _updates()
    out = defend_updates(u, method="prune", prune=0.75)
    for name, t in u.items():
        flat, got = t.flatten(1), out[name].flatten(1)
        n = flat.shape[1]
        keep = n - int(0.75 * n)
        for row, grow in zip(flat, got, strict=True):
            top = row.abs().topk(keep).indices
            assert torch.equal(grow[top], row[top])  # the top (1-p) magnitudes kept unchanged
            assert int((grow != 0).sum()) == keep  # and exactly the others zeroed
    assert torch.equal(defend_updates(u, method="prune", prune=0.0)["w"], u["w"])
    assert torch.equal(u["w"], _updates()["w"])  # input unchanged


def test_clip_noise_bounds_the_norm_before_noise_and_noise_std_is_sigma_clip() -> None:
    u = {"w": torch.randn(4, 2000, generator=torch.Generator().manual_seed(1)) * 10}
    clipped = defend_updates(u, method="clip-noise", clip=2.0, sigma=0.0, generator=torch.Generator())
    assert torch.all(update_norms(clipped) <= 2.0 + 1e-5) and torch.allclose(update_norms(clipped).float(), torch.full((4,), 2.0))
    small = {"w": u["w"] * 1e-3}  # norms below the clip: unchanged
    assert torch.allclose(defend_updates(small, method="clip-noise", clip=2.0, sigma=0.0, generator=torch.Generator())["w"],
                          small["w"])
    noisy = defend_updates(u, method="clip-noise", clip=2.0, sigma=0.5, generator=torch.Generator().manual_seed(3))
    assert abs(float((noisy["w"] - clipped["w"]).std()) - 1.0) < 0.05  # std sigma * clip = 1


def test_seeded_noise_is_reproducible_and_has_std_sigma() -> None:
    u = _updates()
    a = defend_updates(u, method="noise", sigma=0.3, generator=torch.Generator().manual_seed(7))
    b = defend_updates(u, method="noise", sigma=0.3, generator=torch.Generator().manual_seed(7))
    c = defend_updates(u, method="noise", sigma=0.3, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(a[n], b[n]) for n in u) and not torch.equal(a["w"], c["w"])
    big = defend_updates({"w": torch.zeros(2, 10_000)}, method="noise", sigma=0.3, generator=torch.Generator().manual_seed(0))
    assert abs(float(big["w"].std()) - 0.3) < 0.01
    with pytest.raises(ConfigError, match="sigma"):
        defend_updates(u, method="noise", sigma=0.3)  # no generator


def test_quantise_levels_and_distortion() -> None:
    u = _updates()
    q = defend_updates(u, method="quantise", bits=2)
    for name, t in u.items():
        top = t.flatten(1).abs().amax(1, keepdim=True)
        levels = q[name].flatten(1) / top
        assert torch.all(torch.isin(levels.round(decimals=5), torch.tensor([-1.0, 0.0, 1.0])))
    assert torch.allclose(defend_updates(u, method="quantise", bits=24)["w"], u["w"], atol=1e-5)
    d = distortion(u, defend_updates(u, method="none"))
    assert d.shape == (3,) and torch.all(d == 0)
    assert torch.all(distortion(u, q) > 0)


def test_pruning_lowers_the_reconstruction_psnr_of_a_digit(tmp_path: Path) -> None:
    cfg = {"kind": "federated", "dataset": "digits", "model": {"name": "mlp", "width": 32}, "recipe": "fast",
           "attack": "inverting-gradients", "users": 1, "batch": 1, "inversion": {"steps": 300}, "grid": 0, "seed": 0,
           "defence": {"method": "prune", "prune": 0.9}}
    r = run_experiment(cfg, out=tmp_path / "o", device="cpu", store=tmp_path / "runs.db", quiet=True).results
    m, d = r["metrics"], r["metrics"]["defence"]
    assert d["without"]["recovered"]["k"] == 1 and d["without"]["psnr"]["median"] > 40  # undefended: recovered
    assert d["with"]["psnr"]["median"] < d["without"]["psnr"]["median"] - 20  # pruned: far worse
    assert d["with"]["recovered"]["k"] == m["recovered"]["k"] == 0 and m["settings"]["defence"] == "prune"
    assert 0 < d["update_distortion"]["mean"] < 1 and d["prune"] == 0.9
    assert "Client-side defence" in (tmp_path / "o" / "report.html").read_text()


BASE: dict[str, Any] = {"kind": "federated", "dataset": "digits", "model": "mlp"}


@pytest.mark.parametrize(("defence", "words"), [
    ({"method": "blur"}, ["defence.method", "blur", "noise", "clip-noise", "prune", "quantise"]),
    ({"method": "prune", "prune": 1.0}, ["defence.prune", "1.0", "less than 1"]),
    ({"method": "prune"}, ["defence.prune", "required", "0 <= prune < 1"]),
    ({"method": "noise", "sigma": -1}, ["defence.sigma", "-1", "greater than or equal to 0"]),
    ({"method": "clip-noise", "sigma": 1.0}, ["defence.clip", "required", "clip > 0"]),
    ({"method": "quantise", "bits": 1}, ["defence.bits", "1", "greater than or equal to 2"]),
    ({"method": "noise", "sigma": 0.1, "prune": 0.5}, ["defence.prune", "0.5", "allowed fields", "sigma"]),
    ({"method": "noise", "sigma": 0.1, "rate": 2}, ["defence.rate", "Extra inputs"]),
])
def test_bad_defence_values_name_the_field(defence: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ValidationError) as err:
        FederatedConfig.model_validate({**BASE, "defence": defence})
    text = str(err.value).replace("\n", " ")
    for w in words:
        assert w in text, (w, text)
    assert DefenceOptions().method == "none"
