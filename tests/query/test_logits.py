"""Logits queries (mlaudit.query.logits): parsing, the augmentations equal the training ones,
collect_logits equals predict on augmented inputs, checkpoints round-trip, forward_batched equals a
plain forward."""

from __future__ import annotations

import pytest
import torch

from mlaudit.data.augment import AugmentParams, apply_augment
from mlaudit.errors import ConfigError, DataError
from mlaudit.models.registry import ModelSpec, build_model, has_batchnorm
from mlaudit.query import logits as ql
from mlaudit.train import init_models, predict, save_checkpoint
from mlaudit.train.stacked import StackedModels


def images(n: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 6, 7, generator=torch.Generator().manual_seed(seed))


def test_flip_is_torch_flip_on_width() -> None:
    x = images()
    assert torch.equal(ql.parse_query("flip").apply(x), torch.flip(x, dims=[-1]))
    assert ql.parse_query("identity").apply(x) is x


@pytest.mark.parametrize("dx,dy", [(2, 0), (-1, 3), (0, -2), (7, 0)])
@pytest.mark.parametrize("flip", [False, True])
def test_shift_queries_equal_apply_augment(dx: int, dy: int, flip: bool) -> None:
    x = images()
    name = f"{'flip+' if flip else ''}shift:{dx},{dy}"
    q = ql.parse_query(name)
    params = AugmentParams(torch.tensor([[dx, dy]] * 5), torch.full((5,), flip))
    assert (q.dx, q.dy, q.flip) == (dx, dy, flip)
    assert torch.equal(q.apply(x), apply_augment(x, params))


def test_shift_moves_content_like_training() -> None:
    x = torch.arange(12.0).view(1, 1, 3, 4)
    out = ql.parse_query("shift:1,0").apply(x)
    assert torch.equal(out[0, 0, :, :3], x[0, 0, :, 1:]) and (out[0, 0, :, 3] == 0).all()


@pytest.mark.parametrize("bad", ["mirror", "shift", "shift:1", "shift:a,b", "flip:1", "identity:0", "shift:1,2,3"])
def test_bad_query_names_list_the_valid_patterns(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"shift:DX,DY.*flip\+shift:DX,DY"):
        ql.parse_query(bad)


def test_query_lists_are_validated() -> None:
    with pytest.raises(ConfigError, match="repeat"):
        ql.parse_queries(["flip", "flip"])
    with pytest.raises(ConfigError, match="non-empty"):
        ql.parse_queries([])
    with pytest.raises(ConfigError, match="non-empty"):
        ql.parse_queries("flip")  # a bare string is not a list of names


def test_default_queries() -> None:
    qs = ql.default_queries(pad=2, flip=True)
    assert len(qs) == 18 and qs[0] == "identity" and "flip" in qs and "flip+shift:-2,2" in qs
    assert len(set(qs)) == 18 and all(ql.parse_query(q) for q in qs)
    assert ql.default_queries(pad=0, flip=False) == ("identity",)


def tiny_stack(k: int = 3) -> tuple[StackedModels, ModelSpec, list[torch.nn.Module]]:
    spec = ModelSpec(name="mlp", width=8)
    fn = lambda: build_model(spec, input_shape=(3, 6, 7), num_classes=4)  # noqa: E731
    mods = init_models(fn, list(range(k)))
    return StackedModels.from_modules(mods, torch.device("cpu")), spec, mods


def test_collect_logits_equals_predict_on_augmented_inputs() -> None:
    stack, _, _ = tiny_stack()
    x = images(11)
    queries = ("identity", "flip", "shift:1,-1")
    out = ql.collect_logits(stack, x, queries=queries, batch_size=4)
    assert out.shape == (3, 11, 3, 4) and out.dtype == torch.float32
    for a, q in enumerate(queries):
        ref = predict(stack, ql.parse_query(q).apply(x))
        torch.testing.assert_close(out[:, :, a], ref, rtol=1e-5, atol=1e-6)


def test_vector_inputs_allow_only_identity() -> None:
    spec = ModelSpec(name="mlp", width=8)
    mods = init_models(lambda: build_model(spec, input_shape=(5,), num_classes=3), [0, 1])
    stack = StackedModels.from_modules(mods, torch.device("cpu"))
    x = torch.rand(4, 5)
    assert ql.collect_logits(stack, x).shape == (2, 4, 1, 3)
    with pytest.raises(ConfigError, match="needs images"):
        ql.collect_logits(stack, x, queries=("identity", "flip"))


def test_logits_from_checkpoints_matches_the_stack(tmp_path) -> None:
    stack, spec, mods = tiny_stack(k=3)
    x = images(6)
    paths = [tmp_path / f"m{i}.pt" for i in range(3)]
    hashes = [save_checkpoint(m.state_dict(), p) for m, p in zip(mods, paths)]
    ref = ql.collect_logits(stack, x, queries=("identity", "flip"))

    def template() -> torch.nn.Module:
        return build_model(spec, input_shape=(3, 6, 7), num_classes=4)

    mixed = [paths[0], mods[1].state_dict(), str(paths[2])]
    got = ql.logits_from_checkpoints(template, mixed, x, queries=("identity", "flip"), chunk=2,
                                  sha256=[hashes[0], None, hashes[2]])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(DataError, match="sha256"):
        ql.logits_from_checkpoints(template, paths, x, sha256=[hashes[1]] * 3)
    with pytest.raises(ConfigError, match="invalid query"):
        ql.logits_from_checkpoints(template, paths, x, queries=("rotate",))


def test_forward_batched_equals_a_plain_forward_and_restores_the_mode() -> None:
    _, spec, mods = tiny_stack(k=1)
    m = mods[0].train()
    x = images(11)
    with torch.no_grad():
        ref = m.eval()(x)
    m.train()
    out = ql.forward_batched(m, x, batch_size=4)
    assert out.shape == (11, 4) and not out.requires_grad
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert m.training and all(sub.training for sub in m.modules())  # eval inside, train again after
    assert ql.forward_batched(m, x[:0]).shape == (0, 4)  # no rows: an empty forward, not an error
    with pytest.raises(ConfigError, match="batch_size"):
        ql.forward_batched(m, x, batch_size=0)


def test_forward_batched_at_given_parameters() -> None:
    _, _, mods = tiny_stack(k=2)
    x = images(7)
    other = dict(mods[1].named_parameters())
    got = ql.forward_batched(mods[0], x, batch_size=3, params=other)
    torch.testing.assert_close(got, ql.forward_batched(mods[1], x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, ql.forward_batched(mods[0], x))  # the module's own weights are untouched


def test_forward_batched_keeps_batchnorm_running_statistics() -> None:
    m = build_model(ModelSpec(name="fastcnn", width=4), input_shape=(3, 8, 8), num_classes=4)
    assert has_batchnorm(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ql.forward_batched(m.train(), torch.rand(5, 3, 8, 8))
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
