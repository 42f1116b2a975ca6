"""Templates and checkpoints (mlaudit.query.load): model_template leaves the global RNG alone,
fit_weights is the one fit check (missing / unexpected / shape keys named, ConfigError), load_model
reads weights-only, hash-checked files."""

from __future__ import annotations

import pytest
import torch

from mlaudit.data.base import DataBundle, TensorDataset
from mlaudit.errors import ConfigError, DataError
from mlaudit.models.registry import ModelSpec, build_model
from mlaudit.query import fit_weights, load_model, model_template
from mlaudit.train import init_models, save_checkpoint


def bundle(shape: tuple[int, ...] = (1, 8, 8), classes: int = 3) -> DataBundle:
    x = torch.rand(6, *shape)
    y = torch.arange(6) % classes
    names = [str(c) for c in range(classes)]
    return DataBundle("tiny", TensorDataset(x, y, names), TensorDataset(x, y, names))


def test_model_template_leaves_the_global_rng_unchanged() -> None:
    data = bundle()
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    m = model_template(ModelSpec(name="mlp", width=8), data)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert m(torch.rand(2, 1, 8, 8)).shape == (2, 3)


def test_inside_a_seeded_init_the_template_is_the_seeded_model() -> None:
    spec, data = ModelSpec(name="mlp", width=8), bundle()
    a = init_models(lambda: model_template(spec, data), [7])[0]
    b = init_models(lambda: build_model(spec, input_shape=data.input_shape, num_classes=data.num_classes), [7])[0]
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_fit_weights_names_missing_unexpected_and_shape_keys() -> None:
    data = bundle()
    model = model_template(ModelSpec(name="mlp", width=8), data)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    before = {k: v.clone() for k, v in sd.items()}
    first = next(iter(sd))
    missing = sd.pop(first)
    sd["head.extra"] = torch.zeros(1)
    last = list(sd)[-2]
    sd[last] = torch.zeros(99)
    with pytest.raises(ConfigError) as e:
        fit_weights(model, sd, source="checkpoint '/x/a.pt'", what="model 'mlp'", hint="use the right model")
    msg = str(e.value)
    assert msg.startswith("checkpoint '/x/a.pt' does not fit model 'mlp': ")
    assert f"missing keys ['{first}']" in msg and "unexpected keys ['head.extra']" in msg
    assert f"{last}: checkpoint [99] vs model" in msg and msg.endswith(". Use the right model")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing copied on a mismatch
    sd[first], sd[last] = missing, model.state_dict()[last].clone()
    del sd["head.extra"]
    fit_weights(model, {k: torch.zeros_like(v) for k, v in sd.items()}, source="zeros")
    assert all(float(v.abs().sum()) == 0 for v in model.state_dict().values())


def test_fit_weights_lists_the_first_few_of_many() -> None:
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(6)])
    with pytest.raises(ConfigError, match=r"missing keys \['0.bias', '0.weight', '1.bias', '1.weight'\] ... \(12\)"):
        fit_weights(model, {}, source="empty")


def test_load_model_checks_hash_and_fit(tmp_path) -> None:
    data, spec = bundle(), ModelSpec(name="mlp", width=8)
    src = build_model(spec, input_shape=data.input_shape, num_classes=data.num_classes)
    path = tmp_path / "m.pt"
    h = save_checkpoint(src.state_dict(), path)
    m = load_model(spec, path, sha256=h, data=data)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), src.state_dict().values()))
    into = model_template(spec, data)
    assert load_model(into, path) is into
    with pytest.raises(DataError, match="sha256"):
        load_model(spec, path, sha256="0" * 64, data=data)
    with pytest.raises(ConfigError, match=r"checkpoint '.*m.pt' does not fit model 'mlp' \(width 16, norm batch\)"):
        load_model(ModelSpec(name="mlp", width=16), path, data=data)
    with pytest.raises(ConfigError, match="needs data="):
        load_model(spec, path)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="could not be loaded"):
        load_model(spec, bad, data=data)
