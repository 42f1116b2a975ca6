"""The trainer seam (mlaudit.train.trainer): signatures are checked before any work, and every way a
user's training function can go wrong ends in a TrainingError that names the seed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from mlaudit.errors import ConfigError, TrainingError
from mlaudit.train.trainer import UserTrainer, run_user_trainer

CODE = '''
import torch
from torch import nn

def good(model, train_set, *, seed, device, classes):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = train_set.tensors
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
        opt.step()
    return model

def in_place(model, train_set):
    good(model, train_set, seed=0, device="cpu", classes=())

def builds(dataset, seed):
    m = nn.Linear(3, 2)
    with torch.no_grad():
        m.weight.add_(len(dataset))
    return m

def noisy(model, train_set, *, seed):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model

def lazy(model, train_set):
    return model

def nan(model, train_set):
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))

def wrong_type(model, train_set):
    return 3

def other_arch(model, train_set):
    return nn.Linear(3, 5)

def raises(model, train_set):
    raise RuntimeError("boom")

def needs_more(model, train_set, epochs):
    return model

def three(a, b, c):
    return None

not_callable = 3
'''


@pytest.fixture
def mod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "utrainers.py").write_text(CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "utrainers"


def _run(spec: str, seed: int = 1):
    torch.manual_seed(0)
    x, y = torch.randn(20, 3), torch.arange(20) % 2
    model, wall = run_user_trainer(UserTrainer(spec), lambda: nn.Linear(3, 2), x, y, classes=("a", "b"), seed=seed,
                                   device=torch.device("cpu"), recipe=None)
    return model.state_dict(), wall


def test_good_trainers(mod: str) -> None:
    state, wall = _run(f"{mod}:good")
    assert set(state) == {"weight", "bias"} and wall >= 0
    assert set(_run(f"{mod}:in_place")[0]) == {"weight", "bias"}
    assert UserTrainer(f"{mod}:builds").builds_model
    assert torch.allclose(_run(f"{mod}:builds")[0]["weight"].mean(), torch.tensor(20.0), atol=1.0)


def test_seeded(mod: str) -> None:
    a, b, c = _run(f"{mod}:noisy", 3)[0], _run(f"{mod}:noisy", 3)[0], _run(f"{mod}:noisy", 4)[0]
    assert torch.equal(a["weight"], b["weight"]) and not torch.equal(a["weight"], c["weight"])


def test_rng_state_is_restored_exactly(mod: str) -> None:
    x, y = torch.randn(4, 3), torch.arange(4) % 2
    state = torch.random.get_rng_state()
    run_user_trainer(UserTrainer(f"{mod}:noisy"), lambda: nn.Linear(3, 2), x, y, classes=("a", "b"), seed=9, device=torch.device("cpu"),
                     recipe=None)
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize(("fn", "match"), [
    ("lazy", "initial weights unchanged"),
    ("nan", "non-finite"),
    ("wrong_type", "returned int, not a torch.nn.Module"),
    ("other_arch", "does not fit the config's model: shapes differ"),
    ("raises", "raised RuntimeError: boom"),
])
def test_failures_name_the_seed(mod: str, fn: str, match: str) -> None:
    with pytest.raises(TrainingError, match=match) as e:
        _run(f"{mod}:{fn}", seed=77)
    assert e.value.seed == 77 and "seed 77" in str(e.value)


@pytest.mark.parametrize(("fn", "match"), [
    ("needs_more", "requires epochs"),
    ("three", "has the signature \\(a, b, c\\)"),
    ("not_callable", "not a function"),
    ("missing", "has no attribute 'missing'"),
])
def test_bad_signatures_are_config_errors(mod: str, fn: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        UserTrainer(f"{mod}:{fn}")
