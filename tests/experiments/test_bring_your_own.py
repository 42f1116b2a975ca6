"""Bring your own model, data and trainer, in every experiment kind (the open-toolkit contract).

A user module defines a small ``nn.Module``, its own ``Dataset`` class and a plain PyTorch training
function; each kind runs end to end on them through the run store, and every kind of bad input is
refused before anything is written (exit code 2) or fails its trial with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mlaudit.errors import ConfigError, DataError, TrialError
from mlaudit.experiments.runner import run_experiment

USER = '''
import torch
from torch import nn
from sklearn.datasets import load_digits


class Net(nn.Module):
    def __init__(self, num_classes=10, hidden=32):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.body(x)


class Digits(torch.utils.data.Dataset):
    """A map-style dataset of (image [1, 8, 8], label) pairs."""

    def __init__(self, part):
        d = load_digits()
        x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
        y = torch.tensor(d.target)
        idx = torch.arange(len(y))
        keep = idx % 5 != 0 if part == "train" else idx % 5 == 0
        self.x, self.y = x[keep][:600 if part == "train" else 200], y[keep][:600 if part == "train" else 200]

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def load():
    return Digits("train"), Digits("test")


def fit(model, train_set, *, seed, device):
    x, y = (t.to(device) for t in train_set.tensors)   # full batch: 600 examples
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def diverge(model, train_set):
    opt = torch.optim.SGD(model.parameters(), lr=1e30)
    x, y = train_set.tensors
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


CALLS = []


def second_fails(model, train_set, *, seed, device):
    CALLS.append(seed)
    if len(CALLS) == 2:
        raise FloatingPointError("boom on the second model")
    return fit(model, train_set, seed=seed, device=device)


def every_other_fails(model, train_set, *, seed, device):
    CALLS.append(seed)
    if len(CALLS) % 2 == 0:
        raise FloatingPointError("boom on an even call")
    return fit(model, train_set, seed=seed, device=device)


def only_first_trains(model, train_set, *, seed, device):
    CALLS.append(seed)
    if len(CALLS) > 1:
        raise FloatingPointError("boom after the first call")
    return fit(model, train_set, seed=seed, device=device)


def not_a_model():
    return 3


def wrong_classes():
    return Net(num_classes=3)


def mismatched():
    return (torch.rand(5, 2), torch.arange(4)), (torch.rand(2, 2), torch.arange(2))
'''


@pytest.fixture
def user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "byo_user.py").write_text(USER)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "byo_user"


def base(user: str, **changes: Any) -> dict[str, Any]:
    cfg = {"dataset": f"{user}:load", "model": f"{user}:Net", "recipe": "fast", "trainer": f"{user}:fit", "seed": 0}
    return cfg | changes


def run(cfg: dict[str, Any], tmp_path: Path, name: str = "o", **kw: Any) -> dict[str, Any]:
    return run_experiment(cfg, out=tmp_path / name, device="cpu", store=tmp_path / "s.db", quiet=True, **kw).results


BADNETS = {"method": "badnets", "budget": 0.03, "target_class": 0,
           "trigger": {"type": "patch", "size": 2, "location": "bottom-right", "pattern": "checkerboard"}}
KINDS = {
    "train": {"kind": "train", "trials": 2},
    "membership-inference": {"kind": "membership-inference", "pool": {"models": 8}, "attacks": ["loss", "lira-online"],
                             "memorization": False, "n_boot": 10},
    "targeted-poison": {"kind": "targeted-poison", "scenarios": 1, "victims": 1,
                        "attack": {"method": "gradient-matching", "eps": 16, "budget": 0.02, "restarts": 1, "steps": 5}},
    "availability-poison": {"kind": "availability-poison", "victims": 1,
                            "attack": {"method": "adversarial-untargeted", "eps": 64, "steps": 5}},
    "indiscriminate-poison": {"kind": "indiscriminate-poison", "victims": 1, "attack": {"method": "label-flip",
                                                                                         "eps_d": 0.1}},
    "dp-audit": {"kind": "dp-audit", "models_per_side": 20, "claimed_epsilon": 1.0, "confidence": 0.9},
    "protect": {"kind": "protect", "attack": {"method": "lowkey", "eps": 32, "steps": 5}, "users": 2,
                "trainers": [{"name": "attacked", "strategy": "attacked"}, {"name": "adaptive", "strategy": "adaptive"}]},
    "robustness": {"kind": "robustness", "trials": 2, "attacks": ["pgd"], "attack_options": {"pgd": {"steps": 5}},
                   "threat": {"eps": [0.1]}, "examples": 40, "sanity": False, "grid": 0},
    "backdoor": {"kind": "backdoor", "victims": 1, "attack": BADNETS},
    "defend": {"kind": "defend", "victims": 1, "attack": BADNETS, "defence": {"method": "spectral", "rate": 0.25}},
    "defend-ndt": {"kind": "defend", "victims": 1, "attack": BADNETS,
                   "defence": {"method": "ndt", "sigma": 0.25, "models": 5, "alpha": 0.1}},
    "defend-dpa": {"kind": "defend", "victims": 1, "attack": BADNETS, "defence": {"method": "dpa", "k": 4}},
    "certify": {"kind": "certify", "sigma": 0.25, "n0": 20, "n": 200, "predict_n": 100, "alpha": 0.01,
                "radii": [0, 0.25], "examples": 40},
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_runs_on_the_users_model_data_and_trainer(user: str, tmp_path: Path, kind: str) -> None:
    res = run(base(user, **KINDS[kind]), tmp_path)
    assert res["config"]["trainer"] == f"{user}:fit" and res["config"]["model"]["name"] == f"{user}:Net"
    assert res["cost"]["models_trained"] >= (1 if kind == "certify" else 2)
    assert (tmp_path / "o" / "report.html").is_file()
    trained = [t for t in res["trials"] if isinstance(t, dict) and "test_accuracy" in t]
    if kind == "train":
        assert len(trained) == 2 and all(t["test_accuracy"] > 0.6 for t in trained)  # 10 classes: chance is 0.1
    m = res["metrics"]
    if kind.startswith("defend") or kind == "backdoor":  # the user's trainer learns the trigger on 18 of 600 rows
        asr = m["attack_success"]["no_defence"] if kind.startswith("defend") else m["attack_success_rate"]
        assert asr["mean"] > 0.5, asr
    if kind == "defend":  # the filter ranks in the user's model's own penultimate features
        assert m["removal"]["poisons"] == 18 and m["removal"]["poisons_removed"] > m["removal"]["random_poisons_removed"]
    if kind == "certify":
        assert m["certified_accuracy"]["0"]["value"] > 0.5, m["certified_accuracy"]


def test_robustness_kind_attacks_the_users_model(user: str, tmp_path: Path) -> None:
    """The ``robustness`` kind with ``model: package.module:factory`` (mlaudit's digits and recipe): the user's
    class is trained and attacked end to end; its checkpoint loads into the user's own ``Net``, which recomputes
    the clean accuracy and FAB's per-example minimal perturbations on the attacked examples; the checkpoint
    given back as ``target`` gives the same numbers."""
    import importlib

    import numpy as np

    from mlaudit.attacks.evasion import fab
    from mlaudit.data import load_dataset
    from mlaudit.train.checkpoint import load_checkpoint, sha256_file

    cfg = {"kind": "robustness", "dataset": "digits", "model": f"{user}:Net", "recipe": {"name": "fast", "epochs": 4},
           "attacks": ["pgd", "fab"], "attack_options": {"pgd": {"steps": 10}, "fab": {"steps": 20}},
           "threat": {"norm": "linf", "eps": [0.05, 0.2, 0.5]}, "examples": 60, "sanity": False, "grid": 2, "seed": 0}
    res = run(cfg, tmp_path)
    m = res["metrics"]
    assert res["config"]["model"]["name"] == f"{user}:Net" and res["cost"]["models_trained"] == 1
    assert m["clean_accuracy"]["value"] > 0.8 and m["examples"] == 60
    for attack in ("pgd", "fab", "worst case"):
        curve = [m["robust_accuracy"][attack][e]["value"] for e in ("0.05", "0.2", "0.5")]
        assert curve == sorted(curve, reverse=True) and curve[0] > 0.3 and curve[-1] == 0.0, (attack, curve)
    ckpt = tmp_path / "o" / "artifacts" / "models" / "model-0000.pt"
    net = importlib.import_module(user).Net()
    net.load_state_dict(load_checkpoint(ckpt))  # strict: the user's own architecture
    net.eval()
    saved = np.load(tmp_path / "o" / "artifacts" / "min_perturbation.npz")
    rows = torch.from_numpy(saved["rows"])
    data = load_dataset({"name": "digits"})
    x, y = data.test.x[rows], data.test.y[rows]
    with torch.no_grad():
        correct = net(x).argmax(1) == y
    assert int(correct.sum()) == m["clean_accuracy"]["k"]
    x_min = fab(net, x, y, norm="linf", steps=20)
    with torch.no_grad():
        fooled = correct & (net(x_min).argmax(1) != y)
    size = (x_min - x).flatten(1).abs().amax(1).double()
    np.testing.assert_allclose(saved["fab"][0], torch.where(fooled, size, torch.nan).numpy(), rtol=1e-5, atol=1e-6)
    ext = {**cfg, "target": {"checkpoint": str(ckpt), "sha256": sha256_file(ckpt)}, "grid": 0}
    again = run(ext, tmp_path, "target")["metrics"]
    assert again["clean_accuracy"] == m["clean_accuracy"] and again["robust_accuracy"] == m["robust_accuracy"]
    assert again["min_perturbation"] == m["min_perturbation"]


def test_user_trainer_resumes_and_travels_to_process_workers(user: str, tmp_path: Path) -> None:
    cfg = base(user, kind="train", trials=3)
    local = run(cfg, tmp_path, "a")
    again = run_experiment(cfg, out=tmp_path / "a", device="cpu", store=tmp_path / "s.db", quiet=True,
                           resume=True).results
    assert again["cost"]["models_trained"] == 0 and again["metrics"] == local["metrics"]
    pooled = run(cfg, tmp_path, "b", executor="process", executor_options={"workers": 2})
    assert pooled["metrics"]["test_accuracy"]["mean"] == pytest.approx(local["metrics"]["test_accuracy"]["mean"],
                                                                       abs=1e-4)


@pytest.mark.parametrize(("changes", "error", "match"), [
    ({"model": "byo_user:missing"}, ConfigError, "has no attribute 'missing'"),
    ({"model": "no_such_module_q:Net"}, ConfigError, "cannot import module"),
    ({"model": "byo_user:not_a_model"}, ConfigError, "returned int, not a torch.nn.Module"),
    ({"model": "byo_user:wrong_classes"}, ConfigError, r"must return logits \[N, 10\]"),
    ({"dataset": "byo_user:mismatched"}, DataError, "x has 5 rows but y has 4"),
    ({"trainer": "byo_user:Digits"}, ConfigError, "not a function"),
    ({"trainer": "byo_user:not_a_model"}, ConfigError, "has the signature \\(\\)"),
    ({"trainer": "not an import"}, ConfigError, "trainer must be 'mlaudit'"),
    ({"recipe": {"name": "fast", "dp": {"epsilon": 1.0, "delta": 1e-5, "clip": 1.0}}}, ConfigError,
     "recipe.dp configures mlaudit's own DP-SGD"),
])
def test_bad_user_code_is_refused_before_anything_is_written(user: str, tmp_path: Path, changes: dict[str, Any],
                                                             error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        run(base(user, kind="train", trials=2) | changes, tmp_path)
    assert not (tmp_path / "o").exists() and not (tmp_path / "s.db").exists()


def test_a_diverging_user_trainer_fails_its_trial_with_the_reason(user: str, tmp_path: Path) -> None:
    with pytest.raises(TrialError, match="non-finite") as e:
        run(base(user, kind="train", trials=2, trainer=f"{user}:diverge"), tmp_path)
    assert e.value.trial_id.endswith("0")


def test_one_failed_trial_is_recorded_and_the_others_go_on(user: str, tmp_path: Path) -> None:
    """The ``train`` kind: a trial that fails is left out (and named), the rest finish, a resume retries it."""
    import importlib

    importlib.import_module(user).CALLS.clear()
    res = run(base(user, kind="train", trials=4, trainer=f"{user}:second_fails"), tmp_path)
    failed = res["metrics"]["failed_trials"]
    assert [f["trial_id"] for f in failed] == ["model-0001"] and "boom on the second model" in failed[0]["error"]
    assert res["metrics"]["test_accuracy"]["n"] == 3 and len(res["trials"]) == 3
    report = (tmp_path / "o" / "report.html").read_text()
    assert "1 of 4 trials failed" in report and "model-0001" in report
    again = run(base(user, kind="train", trials=4, trainer=f"{user}:second_fails"), tmp_path, resume=True)
    assert "failed_trials" not in again["metrics"] and again["metrics"]["test_accuracy"]["n"] == 4


def test_a_failed_victim_is_left_out_and_named_in_indiscriminate_poisoning(user: str, tmp_path: Path) -> None:
    """Victims are independent: the trainer's second call (a clean victim; a model is trained first for the
    attack) fails, the other victims go on and the comparison uses the ones that finished."""
    import importlib

    importlib.import_module(user).CALLS.clear()
    cfg = base(user, kind="indiscriminate-poison", victims=2, trainer=f"{user}:second_fails",
               attack={"method": "label-flip", "eps_d": 0.1})
    res = run(cfg, tmp_path)
    (failed,) = res["metrics"]["failed_trials"]
    assert failed["trial_id"].startswith("clean-v") and "boom on the second model" in failed["error"]
    assert res["metrics"]["clean_accuracy"]["n"] == 1 and res["metrics"]["poisoned_accuracy"]["n"] == 2
    assert "1 victim(s) failed to train" in (tmp_path / "o" / "report.html").read_text()


def _failing(user: str, trainer: str = "second_fails") -> str:
    import importlib

    importlib.import_module(user).CALLS.clear()
    return f"{user}:{trainer}"


def test_a_failed_pool_model_is_dropped_from_membership_inference(user: str, tmp_path: Path) -> None:
    """The pool's second model fails: its row of the inclusion matrix is dropped, the attacks and the
    memorization estimate use the 7 others (still enough shadows), the report names it; a resume
    trains it and gives exactly the run in which nothing failed."""
    cfg = base(user, kind="membership-inference", pool={"models": 8}, attacks=["loss", "lira-online"], n_boot=10)
    res = run(cfg | {"trainer": _failing(user)}, tmp_path)
    (failed,) = res["metrics"]["failed_trials"]
    assert failed["trial_id"] == "pool-0001" and "boom on the second model" in failed["error"]
    pool = res["metrics"]["pool"]
    assert pool["models"] == 7 and pool["models_planned"] == 8 and pool["test_accuracy"]["n"] == 7
    assert res["metrics"]["loss"]["n_pos"] + res["metrics"]["loss"]["n_neg"] == 7 * pool["examples"]
    assert [t["model"] for t in res["trials"]] == [0, 2, 3, 4, 5, 6, 7]
    report = (tmp_path / "o" / "report.html").read_text()
    assert "1 of the 8 pool models failed to train and are dropped from the pool" in report
    assert "3 to 4 of 7 models" in report  # the examples model 1 held have one IN model fewer

    again = run(cfg | {"trainer": f"{user}:second_fails"}, tmp_path, resume=True)  # CALLS > 2: no more failures
    whole = run(cfg, tmp_path, "whole")
    assert "failed_trials" not in again["metrics"] and again["metrics"]["pool"]["models"] == 8
    for k in ("loss", "lira-online", "memorization"):
        assert again["metrics"][k] == whole["metrics"][k], k


def test_membership_inference_fails_when_the_pool_left_cannot_serve_the_attacks(user: str, tmp_path: Path) -> None:
    cfg = base(user, kind="membership-inference", pool={"models": 8}, attacks=["loss", "lira-online"], n_boot=10,
               trainer=_failing(user, "every_other_fails"))
    with pytest.raises(TrialError, match="4 of the 8 pool models failed to train and the rest cannot serve the "
                                         "attacks: attack lira-online needs >= 1 IN and >= 1 OUT shadow models .* "
                                         "but with the 4 models left") as e:
        run(cfg, tmp_path)
    assert e.value.trial_id == "pool-0001"


def test_a_failed_victim_is_left_out_of_targeted_poisoning(user: str, tmp_path: Path) -> None:
    """The trainer's second call (the first victim; the crafting model is trained first) fails: the
    scenario's success is over the other victim, the failed one is named; a resume trains it and gives
    exactly the run in which nothing failed."""
    cfg = base(user, kind="targeted-poison", scenarios=1, victims=2,
               attack={"method": "gradient-matching", "eps": 16, "budget": 0.02, "restarts": 1, "steps": 5})
    res = run(cfg | {"trainer": _failing(user)}, tmp_path)
    (failed,) = res["metrics"]["failed_trials"]
    assert failed["trial_id"] == "s000-v000" and "boom on the second model" in failed["error"]
    (sc,) = res["metrics"]["scenarios"]
    assert len(sc["victim_success"]) == 1 and res["metrics"]["victim_accuracy"]["n"] == 1
    assert res["metrics"]["clean_victim_accuracy"]["n"] == 2
    assert [(t["trial_id"], t["victim"]) for t in res["trials"] if t["scenario"] == 0] == [("s000-v001", 1)]
    assert "1 victim(s) failed to train and are left out of every number here: s000-v000" in (
        tmp_path / "o" / "report.html").read_text()
    again = run(cfg | {"trainer": f"{user}:second_fails"}, tmp_path, resume=True)
    assert "failed_trials" not in again["metrics"] and len(again["metrics"]["scenarios"][0]["victim_success"]) == 2
    assert again["cost"]["models_trained"] == 1
    whole = run(cfg, tmp_path, "whole")
    for k in ("poison_success", "victim_accuracy", "clean_baseline_success"):
        assert again["metrics"][k] == whole["metrics"][k], k


def test_a_failed_audit_model_is_dropped_from_its_side_in_dp_audit(user: str, tmp_path: Path) -> None:
    """The second "in" model fails: the game runs on 19 "in" and 20 "out" models, the report gives the
    counts per side; a resume trains it and gives exactly the run in which nothing failed."""
    cfg = base(user, kind="dp-audit", models_per_side=20, claimed_epsilon=1.0, confidence=0.9)
    res = run(cfg | {"trainer": _failing(user)}, tmp_path)
    m = res["metrics"]
    assert [f["trial_id"] for f in m["failed_trials"]] == ["in-00001"]
    assert (m["models"], m["models_in"], m["models_out"]) == (39, 19, 20)
    assert m["n_pos"] == 10 and m["n_neg"] == 10  # the test halves: 19 - 9 and 20 - 10
    assert "in-00001" not in {t["trial_id"] for t in res["trials"]}
    assert ("1 audit model(s) failed to train and are dropped from their side, leaving 19 &#39;in&#39; and 20 "
            "&#39;out&#39; models of 20 each") in (tmp_path / "o" / "report.html").read_text()
    again = run(cfg | {"trainer": f"{user}:second_fails"}, tmp_path, resume=True)
    whole = run(cfg, tmp_path, "whole")
    assert "failed_trials" not in again["metrics"] and again["metrics"]["models_in"] == 20
    for k in ("epsilon_lower_bound", "fp", "fn", "canary_score_in", "canary_score_out"):
        assert again["metrics"][k] == whole["metrics"][k], k


def test_dp_audit_fails_when_a_side_has_fewer_than_two_models(user: str, tmp_path: Path) -> None:
    cfg = base(user, kind="dp-audit", models_per_side=5, claimed_epsilon=1.0, confidence=0.5,
               trainer=_failing(user, "only_first_trains"))
    with pytest.raises(TrialError, match="4 of the 5 'in' models failed to train, and the distinguishing game needs"):
        run(cfg, tmp_path)


def test_library_api_with_objects(user: str, tmp_path: Path) -> None:
    """The public entry points take the objects themselves (a class, a function, datasets, a trained
    target module) and write the same run folder as the config."""
    import importlib

    import mlaudit.membership

    u = importlib.import_module(user)
    train_set, test_set = u.load()
    members = torch.arange(len(train_set)) % 2 == 0
    target = u.fit(u.Net(), torch.utils.data.TensorDataset(train_set.x[members], train_set.y[members]), seed=1,
                   device="cpu")
    r = mlaudit.membership.audit(model=u.Net, data=(train_set, test_set), trainer=u.fit, target=target,
                                 members=members, models=8, attacks=("loss", "lira-online"), out=tmp_path / "mi",
                                 device="cpu", store=tmp_path / "s.db", memorization=False, n_boot=10)
    assert r.report.is_file() and r.metrics["target"]["lira-online"]["auc"]["value"] > 0.5
    assert r.results["config"]["dataset"]["name"].startswith("memory:")
