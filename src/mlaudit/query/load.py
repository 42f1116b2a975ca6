"""Model templates and saved weights: build an architecture for a dataset, put a checkpoint into it.

    template = model_template(spec, data)                       # global RNG untouched
    model = load_model(spec, "crafter.pt", sha256=h, data=data)  # weights-only, hash-checked, fit-checked
    fit_weights(model, state_dict, source="target checkpoint 'x.pt'")

:func:`fit_weights` is the one check that a state_dict fits a module: every mismatch (missing keys,
unexpected keys, shapes) is a :class:`~mlaudit.errors.ConfigError` naming the source and the first
few keys of each kind, raised before any weight is copied. Files are read only by
:func:`mlaudit.train.checkpoint.load_checkpoint` (``weights_only=True``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.registry import ModelSpec, build_model, resolve_model_spec
from ..train.checkpoint import load_checkpoint

if TYPE_CHECKING:
    from ..data.base import DataBundle

SHOWN = 4
"""How many keys of each kind of mismatch a fit error lists."""


def model_template(spec: ModelSpec | str | dict[str, Any], data: DataBundle) -> nn.Module:
    """A freshly built module of ``spec`` for ``data``'s inputs and classes, on the CPU.

    Built inside ``torch.random.fork_rng(devices=[])``: the global CPU RNG state is the same after the
    call as before, so building a template never shifts a later seeded draw. (Seeded initialisations
    are :func:`mlaudit.train.loop.init_models`' job; called inside it, the template is the same as
    ``build_model`` would make from the seeded state.)
    """
    with torch.random.fork_rng(devices=[]):
        return build_model(spec, input_shape=data.input_shape, num_classes=data.num_classes)


def _shown(keys: list[str]) -> str:
    return f"{keys[:SHOWN]}{' ...' if len(keys) > SHOWN else ''} ({len(keys)})"


def fit_weights(model: nn.Module, state_dict: Mapping[str, Tensor], *, source: str, what: str | None = None,
                hint: str | None = None) -> None:
    """Load ``state_dict`` into ``model`` (strictly) after checking that it fits.

    Args:
        model: the module to fill (its ``state_dict()`` keys and shapes are the reference).
        state_dict: {name: tensor}, e.g. from :func:`~mlaudit.train.checkpoint.load_checkpoint`.
        source: where the weights come from, for the message (``"checkpoint '/runs/a.pt'"``).
        what: the model, for the message (default: its class name).
        hint: what to do about a mismatch, appended to the message.

    Raises:
        ConfigError: ``"<source> does not fit <what>: missing keys [...] (n); unexpected keys [...] (n);
        shapes differ: <key>: checkpoint [..] vs model [..]; ..."`` (the first few of each kind).
    """
    want = model.state_dict()
    missing = sorted(set(want) - set(state_dict))
    extra = sorted(set(state_dict) - set(want))
    shapes = [f"{k}: checkpoint {list(state_dict[k].shape)} vs model {list(want[k].shape)}"
              for k in want if k in state_dict and state_dict[k].shape != want[k].shape]
    parts = ([f"missing keys {_shown(missing)}"] if missing else []) + \
            ([f"unexpected keys {_shown(extra)}"] if extra else []) + \
            ([f"shapes differ: {'; '.join(shapes[:SHOWN])}{' ...' if len(shapes) > SHOWN else ''}"] if shapes else [])
    where = f"{source} does not fit {what or type(model).__name__}"
    tail = f". {hint[0].upper()}{hint[1:]}" if hint else ""
    if parts:
        raise ConfigError(f"{where}: {'; '.join(parts)}{tail}")
    try:
        model.load_state_dict(dict(state_dict))
    except RuntimeError as e:  # keys and shapes fit; a module's own loading hook refused
        raise ConfigError(f"{where}: {str(e).splitlines()[0]}{tail}") from None


def describe(spec: ModelSpec, data: DataBundle | None = None) -> str:
    """``model 'name' (width w, norm n)``, with the data (``on digits (input [1, 8, 8], 10 classes)``)."""
    out = f"model {spec.name!r} (width {spec.width}, norm {spec.norm})"
    if data is not None:
        out += f" on {data.name} (input {list(data.input_shape)}, {data.num_classes} classes)"
    return out


def load_model(spec_or_template: ModelSpec | str | dict[str, Any] | nn.Module, path: str | Path, *,
               sha256: str | None = None, data: DataBundle | None = None, source: str | None = None,
               hint: str | None = None) -> nn.Module:
    """A module with the weights of checkpoint ``path`` (CPU, the template's mode).

    Args:
        spec_or_template: a model spec (then ``data`` is needed to build it with :func:`model_template`)
            or a module to load into (filled in place and returned).
        path: a state_dict file written by :func:`mlaudit.train.checkpoint.save_checkpoint` (or
            ``torch.save(model.state_dict())``), read with ``weights_only=True``.
        sha256: the file's expected hash (None: not checked).
        source, hint: for the fit error (default source ``"checkpoint '<path>'"``), see :func:`fit_weights`.

    Raises:
        DataError: a missing, corrupt or non-state_dict file, or a hash mismatch.
        ConfigError: the weights do not fit the architecture (:func:`fit_weights`).
    """
    if isinstance(spec_or_template, nn.Module):
        model, what = spec_or_template, None
    else:
        if data is None:
            raise ConfigError("load_model needs data= (the dataset fixes input shape and classes) to build a "
                              "model from a spec; or pass a module to load into")
        spec = resolve_model_spec(spec_or_template)
        model, what = model_template(spec, data), describe(spec, data)
    sd = load_checkpoint(path, sha256=sha256)
    fit_weights(model, sd, source=source or f"checkpoint {str(path)!r}", what=what, hint=hint)
    return model
