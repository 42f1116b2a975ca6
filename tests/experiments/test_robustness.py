"""Experiment kind ``robustness``: end to end on digits with an MLP and two attacks (robust accuracy per
attack and eps, the worst case, intervals, the headline, figures); an external target checkpoint gives
the same numbers as the run that trained it; the gradient-masking checks flag a model whose gradient
is zero; bad input is refused (exit 2) before anything is written."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from torch import Tensor, nn
from typer.testing import CliRunner

from mlaudit.attacks.evasion import cw_l2, fab
from mlaudit.attacks.evasion.sanity import masking_flags, pgd_loss_curve
from mlaudit.cli import app
from mlaudit.data import load_dataset
from mlaudit.errors import ConfigError, DataError
from mlaudit.experiments import parse_config, run_experiment
from mlaudit.experiments.robustness import rate
from mlaudit.headline import headline
from mlaudit.query import load_model
from mlaudit.train.checkpoint import sha256_file

BASE: dict[str, Any] = {"kind": "robustness", "name": "rob", "dataset": "digits", "model": "mlp",
                        "recipe": {"name": "fast", "epochs": 4}, "attacks": ["fgsm", "pgd"],
                        "attack_options": {"pgd": {"steps": 10}},
                        "threat": {"norm": "linf", "eps": [0.05, 0.2, 0.5]}, "examples": 80, "grid": 4, "seed": 0}


def go(config: dict[str, Any], out: Path) -> dict[str, Any]:
    return run_experiment(config, out=out, device="cpu", store=out.parent / "runs.db", quiet=True).results


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("rob") / "run"
    return out, go(BASE, out)


def test_end_to_end_metrics_tables_and_headline(base_run: tuple[Path, dict[str, Any]]) -> None:
    out, r = base_run
    m = r["metrics"]
    assert m["examples"] == 80 and m["models"] == 1 and m["eps"] == [0.05, 0.2, 0.5]
    clean = m["clean_accuracy"]
    assert clean["method"] == "clopper-pearson" and clean["n"] == 80 and clean["value"] > 0.85
    assert clean["lo"] <= clean["value"] <= clean["hi"]
    ra = m["robust_accuracy"]
    assert set(ra) == {"fgsm", "pgd", "worst case"}
    for e in ("0.05", "0.2", "0.5"):
        worst = ra["worst case"][e]["value"]
        assert worst <= min(ra["fgsm"][e]["value"], ra["pgd"][e]["value"]) <= clean["value"]
        assert ra["pgd"][e]["lo"] <= ra["pgd"][e]["value"] <= ra["pgd"][e]["hi"]
    pgd = [ra["pgd"][e]["value"] for e in ("0.05", "0.2", "0.5")]
    assert pgd == sorted(pgd, reverse=True) and pgd[-1] == 0.0  # falls with eps, to 0 at eps 0.5
    assert m["worst_case_at_max_eps"]["value"] == ra["worst case"]["0.5"]["value"]
    assert m["gradient_masking_flags"] == 0  # a plain MLP masks nothing
    assert [c["check"] for c in m["sanity"]][3:] == ["black box (Square) no stronger than white box"]  # one model
    assert headline("robustness", {"worst_case_at_max_eps.value": 0.0, "worst_case_at_max_eps.eps": 0.5}) == \
        "robust 0.0% @eps 0.5"
    html = (out / "report.html").read_text()
    assert "Robust accuracy vs eps" in html and "Sanity checks for gradient masking" in html
    assert html.count("data:image/png") == 2  # the curve and the adversarial-example grid
    assert r["trials"][0]["trial_id"] == "model-0000"


def test_target_checkpoint_gives_the_trained_models_numbers(base_run: tuple[Path, dict[str, Any]],
                                                            tmp_path: Path) -> None:
    out, r = base_run
    ckpt = out / "artifacts" / "models" / "model-0000.pt"
    cfg = {**BASE, "target": {"checkpoint": str(ckpt), "sha256": sha256_file(ckpt)}, "sanity": False, "grid": 0}
    t = go(cfg, tmp_path / "target")["metrics"]
    assert t["clean_accuracy"] == r["metrics"]["clean_accuracy"]
    assert t["robust_accuracy"] == r["metrics"]["robust_accuracy"]
    bad = {**cfg, "target": {"checkpoint": str(ckpt), "sha256": "0" * 64}}
    with pytest.raises(DataError):
        go(bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_minimal_perturbations_are_saved_per_example(base_run: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    """CW and FAB run once without eps; artifacts/min_perturbation.npz holds each one's per-example norm (CW:
    l2, FAB: threat.norm), NaN where it did not fool: the same norms as the attacks called directly on the
    run's model and examples, and the robust accuracy at every eps and the quartiles follow from them."""
    out, _ = base_run
    assert not (out / "artifacts" / "min_perturbation.npz").exists()  # that run has no minimal-norm attack
    cfg = {**BASE, "attacks": ["pgd", "cw", "fab"], "examples": 50, "sanity": False, "grid": 0,
           "attack_options": {"pgd": {"steps": 10}, "cw": {"steps": 20, "search_steps": 2}, "fab": {"steps": 20}}}
    m = go(cfg, tmp_path / "run")["metrics"]
    saved = np.load(tmp_path / "run" / "artifacts" / "min_perturbation.npz")
    assert sorted(saved.files) == ["attacks", "cw", "fab", "models", "norms", "rows"]
    assert list(saved["attacks"]) == ["cw", "fab"] and list(saved["norms"]) == ["l2", "linf"]
    assert list(saved["models"]) == ["model-0000"]
    rows = saved["rows"]
    assert rows.shape == (50,) and (np.diff(rows) > 0).all()
    data = load_dataset({"name": "digits"})
    x, y = data.test.x[torch.from_numpy(rows)], data.test.y[torch.from_numpy(rows)]
    model = load_model(parse_config(cfg).model, tmp_path / "run" / "artifacts" / "models" / "model-0000.pt",
                       data=data).eval()
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    assert int(correct.sum()) == m["clean_accuracy"]["k"]
    direct = {"cw": (cw_l2(model, x, y, steps=20, search_steps=2), "l2"), "fab": (fab(model, x, y, steps=20), "linf")}
    for name, (x_adv, norm) in direct.items():
        with torch.no_grad():
            fooled = correct & (model(x_adv).argmax(1) != y)
        d = (x_adv - x).flatten(1).double()
        size = d.norm(dim=1) if norm == "l2" else d.abs().amax(1)
        a = saved[name]
        assert a.shape == (1, 50) and a.dtype == np.float64
        np.testing.assert_allclose(a[0], torch.where(fooled, size, torch.nan).numpy(), rtol=1e-5, atol=1e-6)
        ok = np.isfinite(a[0])
        assert 0 < ok.sum() <= int(correct.sum()) and (a[0][ok] > 0).all()
        q = m["min_perturbation"][name]
        assert (q["norm"], q["fooled"], q["n"]) == (norm, int(ok.sum()), 50)
        assert q["median"] == pytest.approx(float(np.median(a[0][ok])))
    assert m["cw_min_l2"] == {k: v for k, v in m["min_perturbation"]["cw"].items() if k != "norm"}
    for e in BASE["threat"]["eps"]:  # FAB's norm is the threat's: its robust accuracy is read off the array
        broken = int((saved["fab"][0] <= e * (1 + 1e-5)).sum())
        assert m["robust_accuracy"]["fab"][f"{e:g}"]["k"] == m["clean_accuracy"]["k"] - broken
    assert "Minimal perturbation per example" in (tmp_path / "run" / "report.html").read_text()


def test_rate_intervals() -> None:
    one = rate(torch.tensor([[True] * 3 + [False]]))
    assert one["method"] == "clopper-pearson" and (one["k"], one["n"], one["value"]) == (3, 4, 0.75)
    two = rate(torch.tensor([[True, True, False, False], [True, False, False, False]]))
    assert two["method"] == "bootstrap" and two["value"] == pytest.approx(3 / 8) and two["lo"] <= 3 / 8 <= two["hi"]


class _Quantised(nn.Module):
    """A linear model behind input rounding to 4 levels: its input gradient is 0 (gradient masking)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin((x * 3).round() / 3)


def test_masking_checks_flag_a_zero_gradient_model() -> None:
    torch.manual_seed(0)
    model = _Quantised().eval()
    x = torch.rand(40, 16)
    y = model(x).argmax(1)  # all correct clean
    curve = pgd_loss_curve(model, x, y, eps=0.3)
    assert curve[-1] == pytest.approx(curve[0])  # no gradient: PGD never moves
    flags = masking_flags(unbounded_robust=1.0, unbounded_eps=1.0, loss_curve=curve, fgsm_vs_pgd=[(0.1, 10, 30, 40)])
    assert [f["flagged"] for f in flags] == [True, True, True]
    lin = nn.Linear(16, 3).eval()
    up = pgd_loss_curve(lin, x, lin(x).argmax(1), eps=0.3)
    assert up[-1] > up[0]
    ok = masking_flags(unbounded_robust=0.0, unbounded_eps=1.0, loss_curve=up, fgsm_vs_pgd=[(0.1, 30, 29, 40)])
    assert not any(f["flagged"] for f in ok)


def test_black_box_and_transfer_checks_flag_a_model_whose_gradient_misleads() -> None:
    """A model whose gradient is zero (quantised input) keeps PGD at 100% robust, while Square (forward passes
    only) and PGD on an unquantised twin (transfer) fool it: both checks flag; the twin itself is clean."""
    from mlaudit.attacks.evasion import pgd, square

    torch.manual_seed(0)
    masked = _Quantised().eval()
    twin = nn.Sequential(nn.Flatten(), masked.lin).eval()  # same weights, the gradient intact
    x = torch.rand(40, 1, 4, 4)
    y = masked(x.flatten(1)).argmax(1)
    flat = nn.Sequential(nn.Flatten(), masked).eval()
    white = int((flat(pgd(flat, x, y, eps=0.3, steps=10)).argmax(1) == y).sum())
    black = int((flat(square(flat, x, y, eps=0.3, n_queries=200)).argmax(1) == y).sum())
    transfer = int((flat(pgd(twin, x, y, eps=0.3, steps=10)).argmax(1) == y).sum())
    assert white >= 30 and black < white - 10 and transfer < white - 10, (white, black, transfer)
    flags = masking_flags(unbounded_robust=0.0, unbounded_eps=1.0, loss_curve=[1.0, 2.0], fgsm_vs_pgd=[],
                          weaker_attacks=[("black box (Square)", 0.3, black, white, 40),
                                          ("transfer", 0.3, transfer, white, 40)])
    assert [f["flagged"] for f in flags[3:]] == [True, True]
    within = masking_flags(unbounded_robust=0.0, unbounded_eps=1.0, loss_curve=[1.0, 2.0], fgsm_vs_pgd=[],
                           weaker_attacks=[("black box (Square)", 0.3, 9, 10, 40)])  # 1 example: the tolerance
    assert not within[3]["flagged"]


def test_several_models_get_the_transfer_check(tmp_path: Path) -> None:
    r = go({**BASE, "trials": 2, "examples": 30, "sanity_queries": 50, "grid": 0}, tmp_path / "run")
    checks = [(c["model"], c["check"]) for c in r["metrics"]["sanity"]]
    for tid in ("model-0000", "model-0001"):
        assert (tid, "transfer (PGD-20 on another model) no stronger than white box") in checks
        assert (tid, "black box (Square) no stronger than white box") in checks


def _bad(**change: Any) -> dict[str, Any]:
    cfg = copy.deepcopy(BASE)
    for k, v in change.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {**cfg[k], **v}
        else:
            cfg[k] = v
    return cfg


@pytest.mark.parametrize(("change", "words"), [
    ({"threat": {"eps": [-0.1, 0.1]}}, ["threat.eps must be >= 0"]),
    ({"threat": {"eps": [0.1, 1.5]}}, ["above the pixel range", "eps <= 1"]),
    ({"threat": {"norm": "l2", "eps": [0.5, 9.0]}}, ["above the pixel range", "eps <= 8"]),  # sqrt(64) = 8
    ({"threat": {"norm": "l3"}}, ["threat.norm", "'linf', 'l2' or 'l1'"]),
    ({"threat": {"box": [0, 0.5], "eps": [0.1]}}, ["threat.box", "outside it"]),
    ({"attacks": ["pgd", "nope"]}, ["unknown: ['nope']", "valid attacks", "apgd"]),
    ({"attack_options": {"pgd": {"stepz": 3}}}, ["attack_options.pgd.stepz", "allowed", "steps"]),
    ({"attack_options": {"pgd": {"steps": "ten"}}}, ["attack_options.pgd.steps", "int"]),
    ({"attack_options": {"pgd": {"steps": 0}}}, ["attack_options.pgd.steps", "steps > 0"]),
    ({"attack_options": {"pgd": {"loss": "nope"}}}, ["unknown", "'nope'", "dlr"]),
    ({"examples": 0}, ["examples", "1 <= examples"]),
    ({"examples": 100_000}, ["examples = 100000 exceeds the 359 examples", "test split"]),
    ({"defence": {"transform": "blur"}}, ["defence.transform", "bit-depth"]),
    ({"defence": {"transform": "bit-depth", "bits": 9}}, ["defence.bits", "8"]),
    ({"defence": {"transform": "resize-pad", "max_size": 8}}, ["defence.max_size = 8", "> the image side 8"]),
    ({"defence": {"transform": "noise", "eot": 0}}, ["defence.eot", "1"]),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path: Path, change: dict[str, Any], words: list[str]) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(_bad(**change)))
    res = CliRunner().invoke(app, ["run", str(cfg), "--out", str(tmp_path / "out"), "--device", "cpu", "--store",
                                   str(tmp_path / "runs.db")])
    assert res.exit_code == 2, res.output
    for w in words:
        assert w in res.stderr, res.stderr
    assert "Traceback" not in res.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs.db").exists()
    with pytest.raises(ConfigError):
        run_experiment(_bad(**change), out=tmp_path / "out2", device="cpu", store=tmp_path / "r2.db", quiet=True)
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("method", ["pgd", "trades"])
def test_adversarial_training_recipe_raises_robust_accuracy(tmp_path: Path, method: str) -> None:
    """recipe.adversarial (PGD-AT, or TRADES with its default beta 6, through the crafting engine) on the
    loop and vmap layouts: same models, more robust than the standard model of the same seed."""
    base = {**BASE, "attacks": ["pgd"], "threat": {"eps": [0.1]}, "examples": 120, "grid": 0, "sanity": False,
            "recipe": {"name": "fast", "epochs": 4}}
    std = go(base, tmp_path / "std")["metrics"]["robust_accuracy"]["pgd"]["0.1"]["value"]
    adv_recipe = {"name": "fast", "epochs": 4, "adversarial": {"method": method, "eps": 0.1, "steps": 3}}
    runs = [go({**base, "recipe": adv_recipe, "factory": {"strategy": s}}, tmp_path / s)["metrics"]
            for s in ("vmap", "loop")]
    adv = runs[0]["robust_accuracy"]["pgd"]["0.1"]["value"]
    assert adv > std + 0.1
    assert runs[1]["robust_accuracy"]["pgd"]["0.1"]["value"] == pytest.approx(adv, abs=0.03)


@pytest.mark.parametrize(("recipe", "words"), [
    ({"adversarial": {"method": "pgd", "eps": 2.0}}, ["adversarial.eps 2.0 is outside the pixel range"]),
    ({"adversarial": {"method": "fgsm", "eps": 0.1}}, ["adversarial.method"]),
    ({"adversarial": {"eps": 0.1}, "dp": {"noise_multiplier": 1.0}}, ["cannot be combined"]),
])
def test_adversarial_recipe_bad_input(recipe: dict[str, Any], words: list[str]) -> None:
    from mlaudit.experiments import parse_config

    with pytest.raises(ConfigError) as ei:
        parse_config({**BASE, "recipe": {"name": "fast", **recipe}})
    for w in words:
        assert w in str(ei.value)
    with pytest.raises(ConfigError, match="recipe.adversarial"):
        parse_config({**BASE, "recipe": {"name": "fast", "adversarial": {"eps": 0.1}}, "trainer": "pkg.mod:fit"})


def test_defence_non_adaptive_vs_adaptive(tmp_path: Path) -> None:
    """Seed 003's lesson through the kind: bit-depth reduction looks robust to PGD through its (zero)
    gradient and falls to BPDA; the table and metrics show both side by side."""
    cfg = {**BASE, "attacks": ["pgd"], "threat": {"norm": "linf", "eps": [0.3]}, "examples": 60, "grid": 0,
           "sanity": False, "defence": {"transform": "bit-depth", "bits": 2, "steps": 10}}
    r = go(cfg, tmp_path / "run")
    d = r["metrics"]["defence"]
    at = d["by_eps"]["0.3"]
    assert d["bpda"] and d["eot"] == 1 and d["transform"] == "bit-depth"
    assert at["robust_naive"] > at["robust_adaptive"] + 0.3
    assert d["adaptive_gap_at_max_eps"] == pytest.approx(at["robust_naive"] - at["robust_adaptive"])
    html = (tmp_path / "run" / "report.html").read_text()
    assert "non-adaptive vs adaptive" in html
