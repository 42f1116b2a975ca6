"""Experiment kind ``federated``: the example config end to end through the CLI (exact recoveries = inputs
alone in a bin, headline, report with the verdict first and the image grid); Inverting Gradients and DLG
runs; FedAvg; the user's nn.Module by import string; a DP defence stops the imprint; the parameter-only imprint
(zoo MLP, the user's model by import string, simulated and through Flower); bad input exits 2 before anything is
written."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from mlaudit.cli import app
from mlaudit.config import load_yaml
from mlaudit.errors import ConfigError
from mlaudit.experiments import run_experiment
from mlaudit.headline import headline

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "federated.yaml"
SMALL: dict[str, Any] = {"kind": "federated", "dataset": "digits", "model": {"name": "mlp", "width": 32},
                         "recipe": "fast", "attack": "imprint", "users": 4, "batch": 4, "imprint": {"bins": 16},
                         "seed": 0}


def cli(tmp_path: Path, *args: str) -> Any:
    return CliRunner().invoke(app, ["run", *args, "--device", "cpu", "--store", str(tmp_path / "runs.db")])


def go(config: dict[str, Any], out: Path) -> dict[str, Any]:
    return run_experiment(config, out=out, device="cpu", store=out.parent / "runs.db", quiet=True).results


def test_example_config_runs_end_to_end_through_the_cli(tmp_path: Path) -> None:
    res = cli(tmp_path, str(EXAMPLE), "--out", str(tmp_path / "run"))
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "run" / "results.json").read_text())
    m, cfg = r["metrics"], load_yaml(EXAMPLE)
    n = cfg["users"] * cfg["batch"]
    assert m["recovered"]["n"] == n == m["settings"]["inputs_per_update"] and m["secure_aggregation"] is True
    alone = m["imprint"]["inputs_alone_in_a_bin"]
    # only inputs alone in a bin can come back exactly (>= 80 dB); float32 rounding of the gradient ratio can leave
    # one of them just under 80 dB on some CPUs (seen: 25 of 26 on torch 2.13.0+cpu), but all are recovered
    assert alone > 0 and alone - max(1, alone // 10) <= m["exact"]["k"] <= alone
    assert m["recovered"]["k"] >= alone
    assert m["recovered"]["k"] >= m["exact"]["k"] and m["recovered"]["lo"] <= m["recovered"]["value"] <= m["recovered"]["hi"]
    assert m["psnr"]["q3"] >= 80 and m["label_accuracy"] is None and r["cost"]["models_trained"] == 0
    text = headline("federated", {"recovered.k": m["recovered"]["k"], "recovered.n": n, "secure_aggregation": True})
    assert text == f"recovered {m['recovered']['k']}/{n} via secagg"
    html = (tmp_path / "run" / "report.html").read_text()
    verdict = html.index(f"secure aggregation): {text}")
    assert verdict < html.index("Recovery of the users") and html.count("data:image/png") == 1


@pytest.mark.parametrize("attack", ["inverting-gradients", "dlg"])
def test_honest_but_curious_attacks_recover_a_single_digit(tmp_path: Path, attack: str) -> None:
    cfg = {**SMALL, "attack": attack, "users": 1, "batch": 1, "inversion": {"steps": 300}, "grid": 0}
    m = go(cfg, tmp_path / "o")["metrics"]
    assert m["recovered"]["k"] == 1 and m["label_accuracy"] == 1.0 and m["settings"]["steps"] == 300


def test_without_secure_aggregation_each_update_is_attacked_alone(tmp_path: Path) -> None:
    cfg = {**SMALL, "attack": "inverting-gradients", "users": 3, "batch": 1, "aggregation": {"secure": False},
           "inversion": {"steps": 200, "labels": "known"}}
    m = go(cfg, tmp_path / "o")["metrics"]
    assert m["settings"]["inputs_per_update"] == 1 and m["recovered"]["n"] == 3 and m["recovered"]["k"] >= 2
    assert m["label_accuracy"] is None and m["secure_aggregation"] is False


def test_fedavg_and_the_users_module_by_import_string(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "fl_user.py").write_text(
        "from torch import nn\n\nclass Net(nn.Module):\n    def __init__(self, num_classes=10):\n        super().__init__()\n"
        "        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, num_classes))\n\n"
        "    def forward(self, x):\n        return self.body(x)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = {**SMALL, "model": "fl_user:Net", "protocol": "fedavg", "local_epochs": 2, "local_batch": 2, "local_lr": 0.01}
    r = go(cfg, tmp_path / "o")
    m = r["metrics"]
    assert r["config"]["model"]["name"] == "fl_user:Net" and m["settings"]["local_epochs"] == 2
    assert m["recovered"]["k"] >= 1 and m["recovered"]["n"] == 16


def test_pretrained_model_and_a_dp_defence(tmp_path: Path) -> None:
    cfg = {**SMALL, "pretrain": True, "recipe": {"name": "fast", "epochs": 1}, "users": 8, "batch": 2, "trials": 2,
           "aggregation": {"clip": 1.0, "noise_multiplier": 1.0}}
    r = go(cfg, tmp_path / "o")
    assert r["cost"]["models_trained"] == 2 and len(r["trials"]) == 2
    assert r["metrics"]["exact"]["k"] == 0 and r["metrics"]["recovered"]["n"] == 32


PARAMS: dict[str, Any] = {**SMALL, "model": {"name": "mlp", "width": 64, "norm": "none"}, "users": 4, "batch": 8,
                          "imprint": {"bins": 64, "variant": "parameters"}, "grid": 0}


def test_parameter_only_imprint_on_the_zoo_mlp_recovers_what_the_module_variant_does(tmp_path: Path) -> None:
    """Same seed, same bins: the parameter variant recovers exactly the inputs alone in their bin, as the module
    variant does; it reports the planted model's test accuracy next to the global model's."""
    par = go(PARAMS, tmp_path / "par")["metrics"]
    mod = go({**PARAMS, "imprint": {"bins": 64}}, tmp_path / "mod")["metrics"]
    alone = par["imprint"]["inputs_alone_in_a_bin"]
    assert alone == mod["imprint"]["inputs_alone_in_a_bin"] >= 10
    assert par["exact"]["k"] == alone and mod["exact"]["k"] == alone and par["recovered"]["n"] == 32
    assert par["settings"]["imprint_variant"] == "parameters" and mod["settings"]["imprint_variant"] == "module"
    acc = par["imprint"]["test_accuracy"]
    assert 0 <= acc["clean"] <= 1 and acc["change"] == pytest.approx(acc["planted"] - acc["clean"])
    assert acc["clean"] == mod["imprint"]["test_accuracy"]["clean"]


USER_NET = ("from torch import nn\n\nclass Net(nn.Sequential):\n    def __init__(self, num_classes=10):\n"
            "        super().__init__(nn.Flatten(), nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, num_classes))\n\n"
            "class Conv(nn.Module):\n    def __init__(self, num_classes=10):\n        super().__init__()\n"
            "        self.conv1 = nn.Conv2d(1, 4, 3)\n        self.fc = nn.Linear(144, num_classes)\n\n"
            "    def forward(self, x):\n        return self.fc(self.conv1(x).flatten(1))\n\n"
            "class PassConv(nn.Sequential):  # size-keeping convolutions in front: they carry the input through\n"
            "    def __init__(self, num_classes=10):\n"
            "        super().__init__(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),\n"
            "                         nn.Flatten(), nn.Linear(256, 96), nn.ReLU(), nn.Linear(96, num_classes))\n")


@pytest.mark.parametrize("transport", ["simulated", "flower"])
def test_parameter_only_imprint_on_the_users_model_by_import_string(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    transport: str) -> None:
    if transport == "flower":
        pytest.importorskip("flwr")
    (tmp_path / "fl_param_user.py").write_text(USER_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = {**PARAMS, "model": "fl_param_user:Net", "transport": transport,
           "imprint": {"bins": 64, "variant": "parameters", "layer": "1"}}
    m = go(cfg, tmp_path / "o")["metrics"]
    alone = m["imprint"]["inputs_alone_in_a_bin"]
    assert m["settings"]["imprint_layer"] == "1" and m["settings"]["transport"] == transport
    assert alone >= 10 and alone - 1 <= m["exact"]["k"] <= alone


@pytest.mark.parametrize("transport", ["simulated", "flower"])
def test_parameter_only_imprint_behind_the_users_convolutions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              transport: str) -> None:
    """A user's conv net (two size-keeping convolutions, then Linear, ReLU, Linear): the server sets the
    convolutions to carry the input through and plants the bins in the first Linear; the inputs alone in a bin
    come back verbatim, in process and through Flower (the convolutions travel as planted values)."""
    if transport == "flower":
        pytest.importorskip("flwr")
    (tmp_path / "fl_param_user.py").write_text(USER_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    m = go({**PARAMS, "model": "fl_param_user:PassConv", "transport": transport}, tmp_path / "o")["metrics"]
    alone = m["imprint"]["inputs_alone_in_a_bin"]
    assert m["settings"]["imprint_layer"] == "5" and m["settings"]["transport"] == transport
    assert alone >= 10 and alone - 1 <= m["exact"]["k"] <= alone


def _bad(**change: Any) -> dict[str, Any]:
    return copy.deepcopy(SMALL) | change


def test_several_simulated_rounds_recover_more_of_the_users_data(tmp_path: Path) -> None:
    """Imprint over 4 simulated rounds (fresh batches, bins re-planted each round): every round recovers inputs
    verbatim, the cumulative share grows and is the count of distinct training rows recovered (never above the
    sum of the rounds' counts), and round 1 is the one-round run's."""
    cfg = {**SMALL, "users": 2, "batch": 8, "imprint": {"bins": 32, "measurement": "random"}, "grid": 0}
    one = go(cfg, tmp_path / "one")["metrics"]
    m = go({**cfg, "rounds": 4}, tmp_path / "four")["metrics"]
    rounds = m["imprint"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert rounds[0]["exact"] == pytest.approx(one["exact"]["value"])
    cum = [r["cumulative_exact"] for r in rounds]
    assert all(b >= a for a, b in zip(cum, cum[1:])) and cum[-1] > 2 * cum[0] > 0
    held = 1438  # the two users share digits' training split: distinct rows recovered <= the rounds' counts
    assert round(cum[-1] * held) <= round(sum(r["exact"] * 16 for r in rounds))
    assert m["recovered"]["n"] == 4 * 16  # the recovery metrics pool the four rounds' inputs


@pytest.mark.parametrize(("change", "words"), [
    ({"users": 0}, ["users", "got 0", "1 <= users"]),
    ({"batch": 0}, ["batch", "got 0", "1 <= batch"]),
    ({"imprint": {"bins": 0}}, ["imprint.bins", "got 0", "1 <= imprint.bins <= 65536"]),
    ({"imprint": {"bins": 400}}, ["bins = 400 exceeds the 359 public inputs", "allowed 1 <= bins <= 359"]),
    ({"attack": "breaching"}, ["attack", "breaching", "inverting-gradients", "dlg", "imprint"]),
    ({"users": 500, "batch": 4}, ["users * batch = 500 * 4 = 2000", "allowed users * batch <= 1438"]),
    ({"partition": {"scheme": "dirichlet", "alpha": 0.001}, "users": 100, "batch": 4},
     ["partition.alpha = 0.001", "fewer than 4 examples"]),
    ({"aggregation": {"noise_multiplier": 1.0}}, ["aggregation.noise_multiplier = 1.0 needs aggregation.clip"]),
    ({"local_epochs": 3}, ["local_epochs and local_batch are FedAvg settings"]),
    ({"protocol": "fedavg", "local_batch": 8}, ["local_batch = 8 exceeds batch = 4"]),
    ({"box": [0, 0.5]}, ["box [0.0, 0.5]", "outside it"]),
    ({"psnr_threshold": 0}, ["psnr_threshold", "got 0"]),
    ({"inversion": {"steps": 0}}, ["inversion.steps", "got 0"]),
    ({"rounds": 2, "trials": 2}, ["rounds = 2 repeats the imprint attack", "trials = 2",
                                  "allowed with attack imprint: trials 1"]),
    ({"attack": "dlg", "rounds": 2, "attack_rounds": [3]}, ["attack_rounds = [3]", "1 <= r <= rounds = 2"]),
    ({"attack_rounds": [1]}, ["attack_rounds = [1]", "attack = 'imprint'", "allowed: attack inverting-gradients or dlg"]),
    ({"transport": "flower", "flower_host": "0.0.0.0"}, ["flower_host = '0.0.0.0'", "not a loopback address"]),
    ({"transport": "pigeon"}, ["transport", "pigeon", "simulated", "flower"]),
    ({"imprint": {"scale": 0}}, ["imprint.scale", "got 0"]),
    ({"rounds": 3, "attack": "dlg", "trials": 2},
     ["rounds = 3 runs several rounds", "trials = 2", "allowed: attack imprint, inverting-gradients or dlg, with trials 1"]),
    ({"transport": "flower", "rounds": 2, "trials": 2}, ["rounds = 2 with trials = 2"]),
    ({"imprint": {"variant": "rows"}}, ["imprint.variant", "rows", "module", "parameters"]),
    ({"imprint": {"layer": "net.1"}}, ["imprint.layer = 'net.1'", "imprint.variant = 'module'", "imprint.variant: parameters"]),
    ({"imprint": {"variant": "parameters"}}, ["imprint.variant = 'parameters' (model 'mlp')", "'net.1' has bias=False",
                                              "norm none"]),
    ({"model": {"name": "mlp", "width": 32, "norm": "none"}, "imprint": {"variant": "parameters", "bins": 48}},
     ["bins = 48 exceeds the 32 hidden units of 'net.1'", "allowed 1 <= bins <= 32"]),
    ({"model": {"name": "mlp", "width": 32, "norm": "none"}, "imprint": {"variant": "parameters", "next_layer": "net.1"}},
     ["next_layer 'net.1' does not run after layer 'net.1'"]),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path: Path, change: dict[str, Any], words: list[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_bad(**change)))
    res = cli(tmp_path, str(path), "--out", str(tmp_path / "out"))
    missing = [w for w in words if w not in res.stderr]
    assert (res.exit_code, missing, "Traceback" in res.output) == (2, [], False), res.output
    with pytest.raises(ConfigError):  # the library refuses it the same way
        run_experiment(load_yaml(path), out=tmp_path / "lib", device="cpu", store=tmp_path / "lib.db", quiet=True)
    assert [p.name for p in tmp_path.iterdir()] == ["bad.yaml"]  # no run folder, no store


def test_a_conv_model_is_refused_for_the_parameter_variant_before_anything_is_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "fl_param_conv.py").write_text(USER_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="needs a first nn.Linear on the flattened input followed by ReLU; found Conv2d "
                                          "'conv1'"):
        go({**PARAMS, "model": "fl_param_conv:Conv"}, tmp_path / "o")
    assert not (tmp_path / "o").exists() and not (tmp_path / "runs.db").exists()
