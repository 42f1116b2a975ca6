"""Config validation: every bad config is one ConfigError naming the field, the value and what is
allowed; --set overrides; YAML loading; nothing is written to the output folder for bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlaudit.config import apply_overrides, field_range, load_yaml
from mlaudit.errors import ConfigError
from mlaudit.experiments import parse_config, run_experiment
from mlaudit.experiments.base import config_to_dict
from mlaudit.experiments.train import TrainConfig
from mlaudit.train.recipe import Recipe

BASE: dict[str, Any] = {"kind": "train", "name": "t", "dataset": "digits", "model": "mlp", "recipe": "fast",
                        "trials": 4, "seed": 0}


def _err(**changes: Any) -> str:
    with pytest.raises(ConfigError) as ei:
        parse_config({**BASE, **changes})
    return str(ei.value)


def test_contract_config_parses_with_defaults() -> None:
    cfg = parse_config(BASE)
    assert (cfg.kind, cfg.dataset.name, cfg.model.name, cfg.recipe.name, cfg.trials, cfg.seed) == (
        "train", "digits", "mlp", "fast", 4, 0)
    d = config_to_dict(cfg)
    assert d["recipe"]["epochs"] == 12 and d["factory"] == {"batched": True, "max_chunk": None, "strategy": "auto"}
    # the mapping forms of the contract
    cfg2 = parse_config({**BASE, "dataset": {"name": "cifar10", "root": "/data"},
                         "model": {"name": "resnet18", "width": 64}, "recipe": {"name": "witches-brew", "epochs": 40}})
    assert cfg2.dataset.root == "/data" and cfg2.model.width == 64 and cfg2.recipe.milestones == (14, 24, 35)


@pytest.mark.parametrize(("field", "value", "valid"), [
    ("kind", "nope", ["train"]),
    ("model", "nope", ["mlp", "resnet18", "fastcnn"]),
    ("dataset", "nope", ["digits", "synthetic", "cifar10", "mnist"]),
    ("recipe", "nope", ["fast", "witches-brew", "airbench"]),
    ("model", {"name": "nope", "width": 8}, ["mlp", "resnet18"]),
    ("recipe", {"name": "nope", "epochs": 2}, ["fast", "witches-brew"]),
])
def test_unknown_names_list_valid_ones(field: str, value: Any, valid: list[str]) -> None:
    msg = _err(**{field: value})
    assert "'nope'" in msg and "valid" in msg
    for name in valid:
        assert name in msg


def test_missing_kind_lists_kinds() -> None:
    with pytest.raises(ConfigError, match="no 'kind'.*train"):
        parse_config({k: v for k, v in BASE.items() if k != "kind"})
    with pytest.raises(ConfigError, match="kind must be a name"):
        parse_config({**BASE, "kind": ["train"]})
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_config(["kind", "train"])  # type: ignore[arg-type]


@pytest.mark.parametrize(("changes", "field", "allowed"), [
    ({"trials": 0}, "trials", "1 <= trials <= 100000"),
    ({"seed": -1}, "seed", "0 <= seed < 4294967296"),
    ({"recipe": {"name": "fast", "epochs": -1}}, "recipe.epochs", "1 <= recipe.epochs <= 10000"),
    ({"recipe": {"name": "witches-brew", "momentum": 1.5}}, "recipe.momentum", "0.0 <= recipe.momentum < 1.0"),
    ({"model": {"name": "mlp", "width": 0}}, "model.width", "1 <= model.width <= 4096"),
    ({"factory": {"max_chunk": 0}}, "factory.max_chunk", "1 <= factory.max_chunk <= 4096"),
    ({"dataset": {"name": "digits", "test_fraction": 1.5}}, "dataset.test_fraction", "0.0 < dataset.test_fraction < 1.0"),
])
def test_out_of_range_names_field_value_and_range(changes: dict, field: str, allowed: str) -> None:
    msg = _err(**changes)
    assert f"{field}:" in msg
    assert f"allowed {allowed}" in msg
    assert "Value error" not in msg and "(got {...})" not in msg  # nested errors are not double-wrapped


def test_field_range_walks_nested_models() -> None:
    assert field_range(TrainConfig, ("recipe", "epochs")) == "1 <= X <= 10000"
    assert field_range(TrainConfig, ("trials",)) == "1 <= X <= 100000"
    assert field_range(TrainConfig, ("name",)) is None
    assert field_range(TrainConfig, ("nope", "x")) is None
    assert field_range(Recipe, ("gamma",)) == "0.0 < X <= 1.0"


@pytest.mark.parametrize(("changes", "field", "words"), [
    ({"trials": "four"}, "trials", "valid integer"),
    ({"trials": 2.5}, "trials", "fractional"),
    ({"seed": [1]}, "seed", "valid integer"),
    ({"recipe": 5}, "recipe", "dictionary"),
    ({"recipe": {"name": "fast", "epochs": "ten"}}, "recipe.epochs", "valid integer"),
    ({"recipe": {"name": "witches-brew", "epochs": "ten"}}, "recipe", "epochs must be an integer"),
    ({"recipe": {"name": "fast", "lr": -1.0}}, "recipe.lr", "positive"),
    ({"model": 3}, "model", "dictionary"),
    ({"save_models": "maybe"}, "save_models", "boolean"),
    ({"name": "x" * 300}, "name", "at most 200"),
    ({"factory": {"strategy": "nope"}}, "factory.strategy", "'auto', 'vmap' or 'loop'"),
])
def test_wrong_types_name_the_field(changes: dict, field: str, words: str) -> None:
    msg = _err(**changes)
    assert f"{field}" in msg and words in msg


@pytest.mark.parametrize(("changes", "field"), [
    ({"epochz": 3}, "epochz"),
    ({"recipe": {"name": "fast", "epochz": 3}}, "recipe.epochz"),
    ({"dataset": {"name": "digits", "rooot": "/x"}}, "dataset.rooot"),
    ({"model": {"name": "mlp", "depth": 3}}, "model.depth"),
    ({"factory": {"chunk": 3}}, "factory.chunk"),
])
def test_unknown_fields_are_rejected_by_name(changes: dict, field: str) -> None:
    msg = _err(**changes)
    assert f"{field}: Extra inputs are not permitted" in msg


def test_several_problems_are_all_reported() -> None:
    msg = _err(trials=0, seed=-3, extra=1)
    assert "trials:" in msg and "seed:" in msg and "extra:" in msg


def test_invalid_config_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    for bad in ({**BASE, "trials": 0}, {**BASE, "model": "nope"}, {**BASE, "recipe": {"name": "fast", "epochs": -1}}):
        with pytest.raises(ConfigError):
            run_experiment(bad, out=out, device="cpu", store=tmp_path / "runs.db", quiet=True)
    assert not out.exists() and not (tmp_path / "runs.db").exists()


_JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.integers(-3, 60),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.sampled_from(["fast", "witches-brew", "digits", "mlp", "auto", "none", "1e3", "12"]),
    st.lists(st.integers(-3, 60), max_size=4), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def _spec(names: list[str], fields: list[str]) -> st.SearchStrategy:
    """A short name, or a mapping with a (usually valid) name and random values for known fields."""
    mapping = st.fixed_dictionaries({"name": st.sampled_from(names)}, optional={f: _JUNK for f in fields})
    return st.one_of(mapping, st.sampled_from(names), st.fixed_dictionaries({"name": _JUNK}), _JUNK)


_CHANGES = st.fixed_dictionaries({}, optional={
    "kind": st.one_of(st.just("train"), _JUNK),
    "name": _JUNK, "trials": _JUNK, "seed": _JUNK, "save_models": _JUNK, "extra": _JUNK,
    "recipe": _spec(["fast", "witches-brew", "airbench", "custom"],
                    ["epochs", "lr", "milestones", "batch_size", "augment", "momentum", "schedule", "gamma"]),
    "model": _spec(["mlp", "resnet18", "logistic"], ["width", "norm", "num_classes", "in_channels", "depth"]),
    "dataset": _spec(["digits", "synthetic", "cifar10"], ["root", "limit_train", "test_fraction", "options", "seed"]),
    "factory": st.one_of(_JUNK, st.fixed_dictionaries({}, optional={"batched": _JUNK, "max_chunk": _JUNK,
                                                                            "strategy": _JUNK})),
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(changes=_CHANGES, drop=st.lists(st.sampled_from(list(BASE)), max_size=2))
def test_fuzz_parse_config_only_raises_config_error(changes: dict, drop: list[str]) -> None:
    raw = {k: v for k, v in {**BASE, **changes}.items() if k not in drop}
    try:
        cfg = parse_config(raw)
    except ConfigError as e:
        assert str(e)
    else:
        assert parse_config(config_to_dict(cfg)) == cfg  # a valid config round-trips through its dict


def test_overrides_nested_and_promoted() -> None:
    raw = {"kind": "train", "dataset": "digits", "model": "mlp", "recipe": "fast"}
    out = apply_overrides(raw, ["recipe.epochs=2", "model.width=16", "trials=3", "dataset.options.n_train=64",
                                "name=my run", "factory={max_chunk: 1}", "recipe.lr=1e-3"])
    assert out["recipe"] == {"name": "fast", "epochs": 2, "lr": 0.001}
    assert out["model"] == {"name": "mlp", "width": 16}
    assert out["dataset"] == {"name": "digits", "options": {"n_train": 64}}
    assert out["trials"] == 3 and out["name"] == "my run" and out["factory"] == {"max_chunk": 1}
    assert raw["recipe"] == "fast"  # the input is not modified
    cfg = parse_config(apply_overrides(raw, ["recipe.epochs=2", "recipe.lr=1e-3"]))
    assert cfg.recipe.epochs == 2 and cfg.recipe.lr == 0.001 and cfg.recipe.name == "fast"
    assert apply_overrides({"recipe": {"name": "fast"}}, ["recipe=airbench"]) == {"recipe": "airbench"}
    assert apply_overrides({}, ["name=1e3x"]) == {"name": "1e3x"}


@pytest.mark.parametrize(("assignment", "match"), [
    ("trials", "key=value"),
    ("=3", "dotted key"),
    ("recipe..epochs=3", "dotted key"),
    ("trials.x=3", "trials is 4, not a mapping"),
    ("recipe.epochs=[1", "not valid YAML"),
])
def test_bad_overrides(assignment: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        apply_overrides(dict(BASE), [assignment])


def test_load_yaml_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not a file"):
        load_yaml(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: [train\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)
    bad.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        load_yaml(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_yaml(bad)
    bad.write_bytes(b"\xff\xfe\x00kind")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_yaml(bad)
    bad.write_text("kind: train\ntrials: 2\n")
    assert load_yaml(bad) == {"kind": "train", "trials": 2}


# ------------------------------------------------------------------ fuzzing every kind's example config

def _example_configs() -> dict[str, dict]:
    from mlaudit.config import load_yaml

    root = Path(__file__).resolve().parents[2] / "examples"
    out: dict[str, dict] = {}
    for path in sorted(root.glob("*.yaml")):
        raw = load_yaml(path)
        out.setdefault(raw["kind"], raw)
    return out


EXAMPLES = _example_configs()


def _paths(d: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a nested mapping (leaves and inner mappings)."""
    out = []
    if isinstance(d, dict):
        for k, v in d.items():
            out.append((*prefix, k))
            out += _paths(v, (*prefix, k))
    return out


def _replaced(raw: dict, path: tuple, value: Any) -> dict:
    import copy

    new = copy.deepcopy(raw)
    node = new
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return new


_RECIPE_JUNK = st.one_of(_JUNK, st.fixed_dictionaries({"name": st.sampled_from(["airbench-muon", "airbench", "fast"])},
                                                      optional={"optimizer": st.sampled_from(["muon", "adam", "x"]),
                                                                "loss_reduction": _JUNK, "tta": _JUNK, "compile": _JUNK,
                                                                "param_groups": st.one_of(_JUNK, st.lists(
                                                                    st.dictionaries(st.sampled_from(
                                                                        ["match", "lr", "epochs", "optimizer", "bad"]),
                                                                        _JUNK, max_size=3), max_size=2)),
                                                                "augment": st.one_of(_JUNK, st.fixed_dictionaries(
                                                                    {}, optional={"flip": _JUNK, "pad_mode": _JUNK,
                                                                                  "crop_pad": _JUNK}))}))


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_every_kind_only_raises_config_error(kind: str, data: st.DataObject) -> None:
    """Any field of any kind's example config replaced by junk (and the recipe by junk recipes, including
    the airbench-muon fields): parse_config returns a config that round-trips, or raises ConfigError."""
    raw = EXAMPLES[kind]
    paths = _paths(raw)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        raw = _replaced(raw, path, data.draw(_RECIPE_JUNK if path == ("recipe",) else _JUNK))
        paths = _paths(raw) or [("kind",)]
    try:
        cfg = parse_config(raw)
    except ConfigError as e:
        assert str(e)
    else:
        assert parse_config(config_to_dict(cfg)) == cfg
