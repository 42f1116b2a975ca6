"""The hidden-trigger backdoors (family ``backdoor``): Hidden Trigger Backdoor (Saha et al. 2020) and
Sleeper Agent (Souri et al. 2022). Their options are validated with errors naming the field; their
poisons are target-class rows with their labels kept, within eps of the clean images everywhere and
with no trigger on them; their objectives improve over crafting (feature distance to the triggered
sources, gradient alignment with the triggered-source loss); the pairing is a one-to-one greedy
assignment; the data selection takes the largest per-example gradient norms; retraining leaves the
caller's models untouched. End-to-end runs through the ``backdoor`` kind are in
tests/experiments/test_backdoor_kind.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mlaudit.attacks.poisoning import POISONERS, PoisonTask
from mlaudit.attacks.poisoning.backdoor import TriggerSpec, apply_trigger
from mlaudit.attacks.poisoning.backdoor.hidden_trigger import HiddenTriggerCollision, nearest_pairing
from mlaudit.attacks.poisoning.backdoor.sleeper_agent import gradient_norms, segments
from mlaudit.data.base import TensorDataset
from mlaudit.errors import ConfigError
from mlaudit.query import param_grad
from mlaudit.query.features import penultimate_features

METHODS = ["hidden-trigger", "sleeper-agent"]
EPS = 16 / 255


def split(n: int = 300, classes: int = 10, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % classes,
                         tuple(str(c) for c in range(classes)))


def fitted_mlp(train: TensorDataset, seed: int = 0, steps: int = 60) -> nn.Module:
    """A crafting model that fits the clean rows a little (features and gradients that mean something)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(train.x), train.y).backward()
        opt.step()
    return model.eval()


def run(method: str, train: TensorDataset, models: list[nn.Module], *, eps: float = EPS, steps: int = 20,
        seed: int = 0, **options):
    task = PoisonTask(train=train, num_classes=len(train.classes), eps=eps, models=models,
                      settings={"steps": steps}, options=options, seed=seed)
    return task, POISONERS.get(method, family="backdoor")(task)


@pytest.mark.parametrize(("method", "options", "words"), [
    ("hidden-trigger", {"pairing": "closest"}, ["options.pairing", "'closest'", "'nearest' or 'random'"]),
    ("sleeper-agent", {"selection": "max-loss"}, ["options.selection", "'max-loss'", "'max-gradient' or 'random'"]),
    ("sleeper-agent", {"source_images": 0}, ["options.source_images", "got 0", "1 <= options.source_images"]),
    ("sleeper-agent", {"retrain_rounds": -1}, ["options.retrain_rounds", "got -1", "0 <= options.retrain_rounds"]),
    ("sleeper-agent", {"source_batch_size": 0}, ["options.source_batch_size", "got 0"]),
    ("sleeper-agent", {"retrain_recipe": "slow"}, ["options.retrain_recipe", "retrain_recipe = 'slow' is not a "
                                                   "training recipe", "allowed: a preset name"]),
    ("sleeper-agent", {"retrain_recipe": {"name": "fast", "epochs": 0}}, ["retrain_recipe", "epochs"]),
    ("hidden-trigger", {"target_class": 2, "source_classes": [2, 3]}, ["target_class = 2 is also in source_classes"]),
    ("sleeper-agent", {"budget": 1.5}, ["options.budget", "got 1.5"]),
    ("hidden-trigger", {"eps": 0.1}, ["options.eps", "Extra inputs are not permitted"]),
])
def test_options_are_validated_naming_the_field_the_value_and_what_is_allowed(method: str, options: dict,
                                                                              words: list[str]) -> None:
    entry = POISONERS.get(method, family="backdoor")
    with pytest.raises(ConfigError) as err:
        entry.make_options(options)
    text = " ".join(str(err.value).split())
    for w in words:
        assert w in text, text


def test_option_defaults_are_the_papers() -> None:
    ht = POISONERS.get("hidden-trigger", family="backdoor")
    sa = POISONERS.get("sleeper-agent", family="backdoor")
    assert ht.make_options({}).pairing == "nearest"
    o = sa.make_options({})
    assert (o.selection, o.source_images, o.retrain_rounds, o.retrain_recipe) == ("max-gradient", None, 4, None)
    for entry, augment in ((ht, False), (sa, True)):
        s = entry.settings()
        assert (s.steps, s.lr, s.optimizer, s.schedule, s.restarts, s.augment) == (250, 0.1, "signed-adam", "step", 1,
                                                                                    augment)


@pytest.mark.parametrize("method", METHODS)
def test_poisons_are_target_rows_within_eps_with_labels_kept_and_no_trigger(method: str) -> None:
    """P = floor(budget x N) rows of the target class, labels unchanged, |delta| <= eps on every pixel
    (the trigger's too: it is not stamped), the trigger's pixels not set to the trigger, in the box."""
    train = split()
    spec = {"size": 3, "location": "bottom-right"}
    task, poison = run(method, train, [fitted_mlp(train)], target_class=4, budget=0.06, trigger=spec)
    v = poison.view
    assert v.indices.numel() == 18 == poison.info["poisons"] and v.relabel_indices.numel() == 0
    assert bool((train.y[v.indices] == 4).all()) and torch.equal(v.labels, train.y)  # clean label
    assert v.eps == EPS and float(v.delta.abs().max()) <= EPS + 1e-6
    assert float(v.delta.abs().max()) > EPS / 2  # the budget is used
    x = train.x[v.indices] + v.delta
    assert float(x.min()) >= -1e-6 and float(x.max()) <= 1 + 1e-6
    trigger = TriggerSpec(**spec).build((1, 8, 8))
    stamped = apply_trigger(train.x[v.indices], trigger)
    region = trigger.region.expand_as(x)
    gap = (x - stamped).abs()[region]
    assert float(gap.max()) > 0.5  # a 0/1 checkerboard the poisons do not carry
    assert poison.info["relabelled"] == 0 and poison.info["eps"] == EPS


def test_hidden_trigger_pulls_poison_features_to_the_triggered_sources() -> None:
    """The objective (mean squared feature distance to the paired triggered source) drops over crafting,
    in the poisoner's own record and recomputed from the returned poisons."""
    train = split()
    model = fitted_mlp(train)
    task, poison = run("hidden-trigger", train, [model], eps=32 / 255, steps=30, budget=0.06,
                       trigger={"size": 3})
    info = poison.info
    assert info["feature_distance_end"] < 0.8 * info["feature_distance_start"]
    assert info["history"][-1] <= info["history"][0] and len(info["history"]) == 30
    v = poison.view
    x0 = train.x[v.indices]
    feats = penultimate_features(model)
    with torch.no_grad():  # the poisons moved towards the triggered source images in feature space
        pool = feats(apply_trigger(train.x[train.y != 0], TriggerSpec(size=3).build((1, 8, 8))))
        before = torch.cdist(feats(x0), pool).min(1).values.mean()
        after = torch.cdist(feats(x0 + v.delta), pool).min(1).values.mean()
    assert float(after) < 0.9 * float(before)


@pytest.mark.parametrize("pairing", ["nearest", "random"])
def test_pairing_is_one_to_one_and_nearest_is_closer_than_random(pairing: str) -> None:
    train = split()
    model = fitted_mlp(train)
    x, pool = train.x[:20], apply_trigger(train.x[100:120], TriggerSpec(size=3).build((1, 8, 8)))
    obj = HiddenTriggerCollision(penultimate_features(model), pool, x, pairing=pairing)
    with torch.no_grad():
        loss = obj(x, torch.arange(20))
    assert loss.shape == (20,)
    assert sorted(obj.last_pairing.tolist()) == list(range(20))  # a permutation of the pool rows
    if pairing == "random":
        assert obj.last_pairing.tolist() == list(range(20))
    else:
        rand = HiddenTriggerCollision(penultimate_features(model), pool, x, pairing="random")
        with torch.no_grad():
            assert float(loss.sum()) < float(rand(x, torch.arange(20)).sum())


def test_nearest_pairing_is_the_greedy_assignment() -> None:
    d = torch.tensor([[0.1, 0.2, 9.0], [0.15, 5.0, 6.0], [7.0, 0.3, 8.0]])
    # greedy: (0,0) 0.1 first, then (2,1) 0.3, then (1,2) 6.0
    assert nearest_pairing(d).tolist() == [0, 2, 1]
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        d = torch.rand(7, 7, generator=g)
        ref, left = {}, d.clone()
        for _ in range(7):  # the reference: Python loop over the remaining entries
            r, c = divmod(int(left.argmin()), 7)
            ref[r] = c
            left[r], left[:, c] = float("inf"), float("inf")
        assert nearest_pairing(d).tolist() == [ref[i] for i in range(7)]
    with pytest.raises(ValueError, match="square"):
        nearest_pairing(torch.zeros(2, 3))


def test_sleeper_agent_aligns_the_poison_gradient_with_the_triggered_source_loss() -> None:
    """1 - cos(g_adv, g_p) drops over crafting: the start (clean poisons) and end alignment the poisoner
    records, and the same cosine recomputed from the returned poisons."""
    train = split()
    model = fitted_mlp(train)
    spec = TriggerSpec(size=3)
    task, poison = run("sleeper-agent", train, [model], eps=32 / 255, steps=30, budget=0.06, trigger={"size": 3},
                       selection="random", retrain_rounds=0)
    info = poison.info
    assert 1 - info["alignment_end"] < 0.7 * (1 - info["alignment_start"]) and info["retrain_rounds"] == 0
    assert info["objective"] == pytest.approx(1 - info["alignment_end"]) and info["history"][-1] < info["history"][0]
    v = poison.view
    src = train.x[train.y != 0]
    g_adv = param_grad(model, lambda f: nn.functional.cross_entropy(
        f(apply_trigger(src, spec.build((1, 8, 8)))), torch.zeros(len(src), dtype=torch.long), reduction="sum"))

    def cos(x: torch.Tensor) -> float:
        g = param_grad(model, lambda f: nn.functional.cross_entropy(f(x), train.y[v.indices], reduction="sum"))
        return float(g_adv.cos(g))

    assert cos(train.x[v.indices]) == pytest.approx(info["alignment_start"], abs=1e-4)
    assert cos(train.x[v.indices] + v.delta) == pytest.approx(info["alignment_end"], abs=1e-4)


def test_sleeper_agent_selects_the_target_rows_with_the_largest_gradient_norm() -> None:
    train = split()
    model = fitted_mlp(train, steps=30)
    rows = (train.y == 4).nonzero().flatten()
    norms = gradient_norms(model, train.x[rows], train.y[rows], batch_size=7)
    loop = torch.stack([param_grad(model, (train.x[r:r + 1], train.y[r:r + 1])).norm() for r in rows.tolist()])
    assert torch.allclose(norms, loop, rtol=1e-4, atol=1e-6)  # vmap per-example norms = one backward each
    _, poison = run("sleeper-agent", train, [model], steps=2, target_class=4, budget=0.04, retrain_rounds=0)
    top = rows[torch.argsort(norms, descending=True)[:12]].sort().values
    assert torch.equal(poison.view.indices, top)
    assert poison.info["selection"] == "max-gradient"
    assert poison.info["grad_norm_selected_mean"] > poison.info["grad_norm_target_class_mean"]
    allowed = rows[::2]  # poison_ids restricts the rows it may pick
    task = PoisonTask(train=train, num_classes=10, eps=EPS, models=[model], settings={"steps": 1},
                      options={"target_class": 4, "budget": 0.01, "retrain_rounds": 0}, poison_ids=allowed)
    picked = POISONERS.get("sleeper-agent", family="backdoor")(task).view.indices
    assert set(picked.tolist()) <= set(allowed.tolist())


def test_sleeper_agent_retraining_rounds_leave_the_callers_models_alone() -> None:
    assert segments(250, 4) == [50, 50, 50, 50, 50] and segments(2, 4) == [1, 1] and segments(7, 0) == [7]
    train = split(200)
    model = fitted_mlp(train)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, poison = run("sleeper-agent", train, [model], steps=4, budget=0.05, retrain_rounds=1, selection="random",
                    retrain_recipe={"name": "fast", "epochs": 1})
    assert poison.info["retrain_rounds"] == 1 and len(poison.info["segment_objectives"]) == 2
    assert poison.info["retrain_recipe"] == {"name": "fast", "epochs": 1}
    assert len(poison.info["history"]) == 4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert float(poison.view.delta.abs().max()) <= EPS + 1e-6


def test_source_images_cap_and_seeds() -> None:
    train = split()
    model = fitted_mlp(train)
    _, a = run("sleeper-agent", train, [model], steps=3, budget=0.03, source_images=40, seed=3, retrain_rounds=1)
    _, b = run("sleeper-agent", train, [model], steps=3, budget=0.03, source_images=40, seed=3, retrain_rounds=1)
    assert a.info["source_rows"] == 40 and torch.equal(a.view.delta, b.view.delta)
    _, c = run("hidden-trigger", train, [model], steps=3, budget=0.03, seed=3)
    assert c.info["source_rows"] == 9  # one triggered source per poison
    with pytest.raises(ConfigError, match="only 30 target-class training rows"):
        run("hidden-trigger", train, [model], budget=0.2)
    with pytest.raises(ConfigError, match="needs eps"):
        POISONERS.get("sleeper-agent", family="backdoor")(PoisonTask(train=train, num_classes=10, models=[model],
                                                                     options={"budget": 0.03}))
