"""The adaptive gradient-matching attack against a known filtering defence: its feature-space penalty
(:class:`~mlaudit.attacks.poisoning.targeted.FilterPenalty`), the objective option, a small digits brew
whose poisons sit closer to their class than the plain brew's, and the config's refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mlaudit.attacks.poisoning import POISONERS, PoisonTask, Target
from mlaudit.attacks.poisoning.targeted import PENALTY_FOR_FILTER, FilterPenalty, GradientMatching
from mlaudit.data import load_dataset
from mlaudit.data.base import TensorDataset
from mlaudit.defences import FILTERS
from mlaudit.errors import ConfigError
from mlaudit.experiments import parse_config
from mlaudit.query import model_template


def _net(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype).eval()


def _data(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(60, 1, 4, 4, generator=g).to(dtype), torch.arange(3).repeat(20)


def _direct(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, xp: torch.Tensor, c: int) -> tuple[float, float]:
    """The centroid and spectral terms of the poisons ``xp`` of class ``c``, written out on the model's layers."""
    phi = lambda t: model[2](model[1](model[0](t))).detach().double()  # noqa: E731
    f = phi(x[y == c])
    mu = f.mean(0)
    centred = f - mu
    v = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    fp = phi(xp) - mu
    cen = ((fp ** 2).sum(1) / (centred ** 2).sum(1).mean()).mean()
    spec = ((fp @ v) ** 2 / ((centred @ v) ** 2).mean()).mean()
    return float(cen), float(spec)


@pytest.mark.parametrize("kind", ["centroid", "spectral", "both"])
def test_penalty_equals_a_direct_computation(kind: str) -> None:
    m, (x, y) = _net(), _data()
    xp = x[y == 1][:5] + 0.3
    pen = FilterPenalty(m, x, y, kind=kind, weight=2.0, classes=torch.tensor([1]))
    cen, spec = _direct(m, x, y, xp, 1)
    want = {"centroid": cen, "spectral": spec, "both": cen + spec}[kind]
    assert float(pen(xp, torch.full((5,), 1)).detach()) == pytest.approx(2.0 * want, rel=1e-4)
    # a typical clean row scores about 1 per term
    assert float(pen(x[y == 1], y[y == 1]).detach()) == pytest.approx(2.0 * (2 if kind == "both" else 1), rel=1e-4)


def test_penalty_is_differentiable() -> None:
    m, (x, y) = _net(torch.float64), _data(torch.float64)
    pen = FilterPenalty(m, x, y, kind="both", classes=torch.tensor([2]))
    xp = (x[y == 2][:3] + 0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: pen(t, torch.full((3,), 2)), (xp,))


def test_weight_zero_is_the_plain_objective() -> None:
    m, (x, y) = _net(), _data()
    labels, idx = torch.full((4,), 1), torch.arange(4)
    xp = x[y == 1][:4].clone()
    pen = FilterPenalty(m, x, y, kind="both", weight=0.0, classes=torch.tensor([1]))
    plain = GradientMatching(m, x[:1], 2, poison_labels=labels)
    zero = GradientMatching(m, x[:1], 2, poison_labels=labels, penalty=pen)
    assert torch.equal(zero(xp, idx), plain(xp, idx))
    xb = torch.stack([xp, xp + 0.05])
    assert torch.equal(zero.batched(xb, idx), plain.batched(xb, idx))
    one = GradientMatching(m, x[:1], 2, poison_labels=labels, penalty=FilterPenalty(
        m, x, y, kind="both", weight=1.0, classes=torch.tensor([1])))
    assert torch.allclose(one.batched(xb, idx), torch.stack([one(xb[0], idx), one(xb[1], idx)]), atol=1e-5)


def _digits_brew(adaptive: dict | None) -> tuple[torch.Tensor, nn.Module, TensorDataset, torch.Tensor]:
    """A digits mlp trained for a few full-batch steps, then 40 steps of the brew on 60 poisons of class 3
    (target: a test 8 to class 3); returns the poisoned images, the model, the training set and the ids."""
    data = load_dataset("digits")
    torch.manual_seed(0)
    model = model_template("mlp", data)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(data.train.x), data.train.y).backward()
        opt.step()
    model.eval()
    ids = (data.train.y == 3).nonzero().flatten()[:60]
    target = data.test.x[(data.test.y == 8).nonzero().flatten()[:1]]
    task = PoisonTask(train=data.train, num_classes=10, eps=32 / 255, poison_ids=ids, target=Target(target, 8, 3),
                      models=[model], settings={"steps": 40, "restarts": 1, "augment": False},
                      options={"adaptive": adaptive} if adaptive else None, seed=0)
    view = POISONERS.get("gradient-matching", family="targeted")(task).view
    assert view is not None
    return data.train.x[ids] + view.delta, model, data.train, ids


def test_adaptive_poisons_score_lower_on_the_filters_than_the_plain_brews() -> None:
    """The same brew (seed, poisons, target, steps) with and without the penalty: the adaptive poisons sit
    nearer their clean class centroid in the crafting model's features, and the outlier filter (the defence's
    own code) removes fewer of them from the class at 20%."""
    plain, model, train, ids = _digits_brew(None)
    adaptive, _, _, _ = _digits_brew({"penalty": "centroid", "weight": 1.0})
    pen = FilterPenalty(model, train.x, train.y, kind="centroid", classes=torch.tensor([3]))
    y = torch.full((len(ids),), 3)
    with torch.no_grad():
        r_plain, r_adaptive = (pen.scores(pen.features(p), y) for p in (plain, adaptive))
    assert float(r_adaptive.mean()) < float(r_plain.mean()) - 0.05, (r_plain.mean(), r_adaptive.mean())

    def removed(poisoned: torch.Tensor) -> int:
        x = train.x.clone()
        x[ids] = poisoned
        with torch.no_grad():
            feats = pen.features(x)
        return int(FILTERS.get("outlier")(feats, train.y, rate=0.2)[ids].sum())

    assert removed(adaptive) < removed(plain)


def _defend(attack: dict) -> dict:
    return {"kind": "defend", "dataset": "digits", "model": "mlp", "recipe": "fast",
            "defence": {"method": "outlier", "rate": 0.1}, "attack": {"method": "gradient-matching", **attack}}


def test_config_accepts_the_adaptive_block() -> None:
    c = parse_config(_defend({"adaptive": {"penalty": "spectral", "weight": 3, "directions": 2}}))
    a = c.attack.options.adaptive
    assert (a.penalty, a.weight, a.directions) == ("spectral", 3.0, 2)
    assert parse_config(_defend({})).attack.options.adaptive is None
    assert set(PENALTY_FOR_FILTER) == set(FILTERS.names())


@pytest.mark.parametrize("attack, match", [
    ({"adaptive": {"penalty": "knn"}}, r"attack\.adaptive\.penalty: Input should be 'centroid', 'spectral' or 'both' "
                                       r"\(got 'knn'\)"),
    ({"adaptive": {"penalty": "centroid", "weight": -1}}, r"attack\.adaptive\.weight: .*got -1; allowed 0\.0 <= "
                                                          r"attack\.adaptive\.weight"),
    ({"adaptive": {"penalty": "both", "directions": 0}}, r"attack\.adaptive\.directions: .*got 0; allowed 1 <="),
    ({"adaptive": {"weight": 1}}, r"attack\.adaptive\.penalty: Field required"),
    ({"adaptive": {"penalty": "both", "lambda": 1}}, r"attack\.adaptive\.lambda: Extra inputs"),
    ({"method": "bullseye", "adaptive": {"penalty": "both"}}, "method bullseye does not use attack.adaptive"),
])
def test_config_refusals(attack: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config(_defend(attack))


def test_penalty_refusals() -> None:
    m, (x, y) = _net(), _data()
    with pytest.raises(ConfigError, match="penalty must be one of centroid, spectral, both"):
        FilterPenalty(m, x, y, kind="knn")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="at least 2 clean rows of class 0, got 1"):
        FilterPenalty(m, x[:2], y[:2], kind="centroid")


def test_defend_benchmark_runs_each_filter_plain_and_adaptive() -> None:
    """benchmarks/defend.py --adaptive 1,10: every filter run of the grid also with attack.adaptive, the
    penalty matched to the filter, the rest of the config (scenarios, seed) unchanged; every config parses."""
    import argparse
    import sys
    from pathlib import Path

    from mlaudit.config import load_yaml

    root = Path(__file__).resolve().parents[2] / "benchmarks"
    sys.path.insert(0, str(root))
    try:
        import defend as bench
    finally:
        sys.path.pop(0)
    cfg = load_yaml(root / "configs" / "digits_defend_adaptive_brew.yaml")
    args = argparse.Namespace(filters="outlier,spectral", rates="0.1", adaptive="1,10", methods=None, dp_noise=None,
                              sigmas=None, dpa_k=None, dpa_epochs=None)
    runs = bench.expand(cfg, args)
    assert list(runs) == ["outlier@0.1", "outlier@0.1+adaptive-centroid1", "outlier@0.1+adaptive-centroid10",
                          "spectral@0.1", "spectral@0.1+adaptive-spectral1", "spectral@0.1+adaptive-spectral10"]
    c = parse_config(runs["spectral@0.1+adaptive-spectral10"])
    assert c.attack.options.adaptive.penalty == "spectral" and c.attack.options.adaptive.weight == 10
    assert c.scenarios == cfg["scenarios"] and c.seed == cfg["seed"] and c.defence.method == "spectral"
    assert parse_config(runs["spectral@0.1"]).attack.options.adaptive is None
    assert bench.attack_label(c.model_dump(mode="json")["attack"]) == "gradient-matching adaptive (spectral, weight 10)"
