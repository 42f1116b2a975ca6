"""The user's own data (mlaudit.data.user): every accepted form converts to the same tensors, and
what cannot be converted is refused with the split, the index and the reason."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mlaudit.data.registry import DatasetSpec, load_dataset
from mlaudit.data.user import as_bundle
from mlaudit.errors import ConfigError, DataError


def _xy(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 4, 4, generator=g), torch.arange(n) % 4


class Custom(torch.utils.data.Dataset):
    """A map-style dataset that is not a TensorDataset."""

    classes = ["a", "b", "c", "d"]

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):  # noqa: ANN204
        return self.x[i].numpy(), int(self.y[i])


def test_forms_agree() -> None:
    (x, y), (xt, yt) = _xy(), _xy(12, 1)
    pair = as_bundle(((x, y), (xt, yt)), name="u")
    tds = as_bundle((torch.utils.data.TensorDataset(x, y), torch.utils.data.TensorDataset(xt, yt)), name="u")
    custom = as_bundle((Custom(x, y), Custom(xt, yt)), name="u")
    for b in (tds, custom):
        assert torch.equal(b.train.x, pair.train.x) and torch.equal(b.test.y, pair.test.y)
    assert pair.train.classes == ("0", "1", "2", "3") and custom.train.classes == ("a", "b", "c", "d")
    assert pair.train.x.dtype == torch.float32 and pair.train.y.dtype == torch.int64


def test_single_split_is_split_stratified() -> None:
    x, y = _xy(100)
    b = as_bundle((x, y), name="u", test_fraction=0.2, seed=3)
    assert len(b.train) == 80 and len(b.test) == 20
    assert sorted(torch.bincount(b.test.y).tolist()) == [5, 5, 5, 5]


def test_uint8_and_pil_images_become_chw_floats() -> None:
    img = np.arange(3 * 5 * 5, dtype=np.uint8).reshape(5, 5, 3)
    pil = [(Image.fromarray(img), 0), (Image.fromarray(img), 1)]
    b = as_bundle((pil, pil), name="u")
    assert b.train.shape == (3, 5, 5)
    assert torch.allclose(b.train.x[0], torch.from_numpy(img).permute(2, 0, 1).float() / 255)
    arr = as_bundle(((torch.from_numpy(np.stack([img, img])), torch.tensor([0, 1])),) * 2, name="u")
    assert arr.train.shape == (3, 5, 5)


@pytest.mark.parametrize(("data", "match"), [
    (((torch.rand(4, 2), torch.arange(3)), (torch.rand(2, 2), torch.arange(2))), "x has 4 rows but y has 3"),
    (([(torch.rand(2), 0), (torch.rand(3), 1)], [(torch.rand(2), 0)]), "variable-size samples"),
    (([(torch.rand(2), "cat")], [(torch.rand(2), 0)]), "labels must be integer class indices"),
    (((torch.rand(4, 2), torch.tensor([0.5, 1.0, 0.0, 1.0])), (torch.rand(2, 2), torch.arange(2))), "fractional"),
    (((torch.full((2, 2), float("nan")), torch.arange(2)), (torch.rand(2, 2), torch.arange(2))), "NaN"),
    (([], [(torch.rand(2), 0)]), "between 1 and"),
    ((3, 4), "give \\(x, y\\) tensors or a map-style"),
])
def test_bad_data_is_refused(data, match: str) -> None:  # noqa: ANN001
    with pytest.raises(DataError, match=match):
        as_bundle(data, name="u")


def test_import_string_dataset(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    (tmp_path / "udata_mod.py").write_text(
        "import torch\n"
        "def load(n=30):\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    x = torch.rand(n, 3, generator=g)\n"
        "    return (x, torch.arange(n) % 3), (x[:6], torch.arange(6) % 3)\n"
        "DATA = (torch.zeros(6, 2), torch.tensor([0, 1, 0, 1, 0, 1]))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    b = load_dataset({"name": "udata_mod:load", "options": {"n": 12}, "limit_train": 10})
    assert len(b.train) == 10 and b.input_shape == (3,) and b.name == "udata_mod:load"
    assert len(load_dataset("udata_mod:DATA").train) == 4  # one split: 1 of 3 per class held out (stratified)
    with pytest.raises(DataError, match="failed when called"):
        load_dataset({"name": "udata_mod:load", "options": {"bogus": 1}})
    with pytest.raises(ConfigError, match="is data, not a function"):
        load_dataset({"name": "udata_mod:DATA", "options": {"n": 1}})


def test_spec_validation_does_not_import() -> None:
    DatasetSpec(name="surely_not_importable_mod:load")  # validates the form only; imported when loaded
