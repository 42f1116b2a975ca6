"""Logits of modules, stacks and checkpoints: one model on many inputs, many models on many inputs.

* :func:`forward_batched` — one module on x [N, *shape] -> logits [N, C], eval mode, no gradient,
  in chunks (the forward every attack and audit uses instead of a loop of its own);
* :func:`collect_logits` — every model of a :class:`~mlaudit.train.stacked.StackedModels` on every
  input under every query -> [K, N, A, C];
* :func:`logits_from_checkpoints` — M saved models, loaded a chunk at a time -> [M, N, A, C].

Queries (for membership inference). LiRA queries every model on the example and on augmented copies
of it (Carlini et al. 2022, Sec. IV-C / VI-B: "mirror" and "shift" queries, the augmentations used in
training), treating the A answers as one multivariate observation. A query is named by a string:

    identity            the example itself
    flip                mirrored left-right
    shift:DX,DY         translated with zero fill by integer (DX, DY), e.g. "shift:2,0" or "shift:-4,4"
    flip+shift:DX,DY    translated, then mirrored

exactly as :func:`mlaudit.data.augment.apply_augment` does in training with
``AugmentParams(shift=(DX, DY), flip=...)``: output pixel (i, j) is input pixel (i + DY, j' + DX),
with j' = W - 1 - j when mirrored; pixels from outside the image are 0. Vector inputs [N, D] allow
only ``identity``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..data.augment import AugmentParams, apply_augment
from ..errors import ConfigError
from ..registry import Registry
from ..train.checkpoint import load_checkpoint
from ..train.evaluate import predict, stack_from_state_dicts
from ..train.stacked import StackedModels
from .modes import evaluating

QUERY_PATTERNS = ("identity", "flip", "shift:DX,DY", "flip+shift:DX,DY")
"""The valid forms of a query name (DX, DY: integers, pixels)."""


@dataclass(frozen=True)
class Query:
    """A parsed query: translation (dx, dy) in pixels, then an optional left-right mirror."""

    name: str
    dx: int = 0
    dy: int = 0
    flip: bool = False

    @property
    def is_identity(self) -> bool:
        return self.dx == 0 and self.dy == 0 and not self.flip

    def apply(self, x: Tensor) -> Tensor:
        """The augmented batch: ``x`` [n, C, H, W] (or [n, ...] for ``identity``) -> same shape."""
        if self.is_identity:
            return x
        if x.dim() != 4:
            raise ConfigError(f"query {self.name!r} needs images [N, C, H, W], got inputs of shape "
                              f"{list(x.shape)}; use queries=('identity',) for vector data")
        n = x.shape[0]
        shift = torch.tensor([[self.dx, self.dy]], dtype=torch.int64, device=x.device).expand(n, 2)
        flip = torch.full((n,), self.flip, dtype=torch.bool, device=x.device)
        return apply_augment(x, AugmentParams(shift, flip))


QueryParser = Callable[[str, str | None], Query]
QUERY_KINDS: Registry[QueryParser] = Registry("query kind")


def _bad(name: str, why: str) -> ConfigError:
    return ConfigError(f"invalid query {name!r}: {why}; valid queries look like {', '.join(QUERY_PATTERNS)} "
                       "(e.g. 'shift:2,0', 'flip+shift:-4,4')")


def _shift_args(name: str, args: str | None) -> tuple[int, int]:
    parts = (args or "").split(",")
    try:
        dx, dy = (int(p.strip()) for p in parts)
    except ValueError:
        raise _bad(name, "a shift needs two integers DX,DY") from None
    return dx, dy


def _no_args(name: str, args: str | None) -> None:
    if args is not None:
        raise _bad(name, "this query takes no ':' arguments")


@QUERY_KINDS.register("identity")
def _identity(name: str, args: str | None) -> Query:
    _no_args(name, args)
    return Query(name)


@QUERY_KINDS.register("flip")
def _flip(name: str, args: str | None) -> Query:
    _no_args(name, args)
    return Query(name, flip=True)


@QUERY_KINDS.register("shift")
def _shift(name: str, args: str | None) -> Query:
    dx, dy = _shift_args(name, args)
    return Query(name, dx=dx, dy=dy)


@QUERY_KINDS.register("flip+shift")
def _flip_shift(name: str, args: str | None) -> Query:
    dx, dy = _shift_args(name, args)
    return Query(name, dx=dx, dy=dy, flip=True)


def parse_query(name: str) -> Query:
    """Parse a query name (see the module docstring); ConfigError listing the valid forms if invalid."""
    if not isinstance(name, str):
        raise _bad(str(name), "a query name must be a string")
    kind, sep, args = name.strip().partition(":")
    if kind not in QUERY_KINDS:
        raise _bad(name, f"unknown query kind {kind!r}")
    return QUERY_KINDS.get(kind)(name, args if sep else None)


def parse_queries(queries: Sequence[str]) -> list[Query]:
    """Parse every name; at least one, no duplicates."""
    if isinstance(queries, str) or len(queries) == 0:
        raise ConfigError(f"queries must be a non-empty list of query names, got {queries!r}")
    if len(set(queries)) != len(queries):
        raise ConfigError(f"queries must not repeat a name, got {list(queries)}")
    return [parse_query(q) for q in queries]


def default_queries(*, pad: int, flip: bool) -> tuple[str, ...]:
    """The training augmentations as queries: shifts by {-pad, 0, pad} in x and y, each also mirrored
    when ``flip`` (identity first; 18 queries for pad > 0 with flip, as LiRA's 'mirror + shift')."""
    offsets = (0, -pad, pad) if pad > 0 else (0,)
    out = []
    for mirror in ((False, True) if flip else (False,)):
        for dy in offsets:
            for dx in offsets:
                plain = "identity" if dx == dy == 0 else f"shift:{dx},{dy}"
                out.append(("flip" if plain == "identity" else f"flip+{plain}") if mirror else plain)
    return tuple(out)


@torch.no_grad()
def forward_batched(model: nn.Module, x: Tensor, *, batch_size: int = 1024, device: torch.device | str | None = None,
                    params: Mapping[str, Tensor] | None = None) -> Tensor:
    """Outputs of ``model`` on x [N, *shape] -> [N, *out] (logits [N, C] for a classifier), on ``device``.

    Eval mode (every submodule's training flag restored after, see :func:`~mlaudit.query.modes.evaluating`),
    no gradient, ``batch_size`` inputs per forward pass; each chunk of ``x`` moves to ``device`` (None: the
    device of the model's first parameter or buffer, else x's). ``params`` ({name: tensor}, e.g. a
    :class:`~mlaudit.query.params.ParamVector`) evaluates the model at these parameter values instead of
    its own (:func:`torch.func.functional_call`; the module is not modified).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if device is None:
        first = next(itertools.chain(model.parameters(), model.buffers()), None)
        device = first.device if first is not None else x.device
    out = []
    with evaluating(model):
        for i in range(0, max(x.shape[0], 1), batch_size):  # x with 0 rows: one empty forward, output [0, *out]
            xb = x[i:i + batch_size].to(device)
            out.append(model(xb) if params is None else functional_call(model, dict(params), (xb,)))
    return torch.cat(out)


def collect_logits(stack: StackedModels, x: Tensor, *, queries: Sequence[str] = ("identity",),
                   batch_size: int = 1024, bf16: bool = False) -> Tensor:
    """Logits of every model of ``stack`` on every input under every query.

    Args:
        stack: K trained models (eval mode is used; BatchNorm running statistics per model).
        x: inputs float32 [N, *shape] (any device; batches move to the stack's device).
        queries: query names (see the module docstring), A of them.
        batch_size: inputs per forward pass; bf16: autocast to bfloat16 on CUDA (see ``predict``).

    Returns:
        float32 [K, N, A, C] on the CPU.
    """
    parsed = parse_queries(queries)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    n = x.shape[0]
    if n == 0:
        raise ConfigError("collect_logits needs at least one input, got x with 0 rows")
    out: Tensor | None = None  # filled on the stack's device, copied to the CPU once at the end
    for i in range(0, n, batch_size):
        xb = x[i:i + batch_size].to(stack.device)
        for a, q in enumerate(parsed):
            logits = predict(stack, q.apply(xb), batch_size=batch_size, bf16=bf16)  # [K, b, C]
            if out is None:
                out = torch.empty((logits.shape[0], n, len(parsed), logits.shape[-1]), dtype=torch.float32,
                                  device=logits.device)
            out[:, i:i + xb.shape[0], a] = logits
    assert out is not None  # n >= 1
    return out.cpu()


Checkpoint = str | Path | Mapping[str, Tensor]


def logits_from_checkpoints(template_fn: Callable[[], nn.Module], checkpoints: Sequence[Checkpoint], x: Tensor, *,
                            queries: Sequence[str] = ("identity",), device: torch.device | str = "cpu",
                            chunk: int = 16, batch_size: int = 1024, bf16: bool = False,
                            sha256: Sequence[str | None] | None = None) -> Tensor:
    """Logits [M, N, A, C] (float32, CPU) of M saved models, loaded ``chunk`` models at a time.

    Args:
        template_fn: builds a module of the architecture (its weights are ignored).
        checkpoints: M checkpoint paths (loaded with ``weights_only=True`` by
            :func:`mlaudit.train.checkpoint.load_checkpoint`) or state_dicts.
        x: inputs [N, *shape]; queries, batch_size, bf16: as in :func:`collect_logits`.
        device: where the models run. chunk: models held on ``device`` at once.
        sha256: optional expected hash per checkpoint (None entries, and state_dicts, are not checked).

    Memory: the result takes M * N * A * C * 4 bytes on the CPU; ``x`` is copied to ``device`` once
    (N * prod(shape) * 4 bytes there) and stays there for all chunks, and each chunk's logits stay
    on ``device`` until the chunk is done (no host transfer per batch).
    """
    parse_queries(queries)  # fail before loading anything
    if chunk < 1:
        raise ConfigError(f"chunk must be >= 1, got {chunk}")
    if sha256 is not None and len(sha256) != len(checkpoints):
        raise ConfigError(f"sha256 has {len(sha256)} entries for {len(checkpoints)} checkpoints; give one per "
                          "checkpoint (None to skip one)")
    if len(checkpoints) == 0:
        raise ConfigError("logits_from_checkpoints needs at least one checkpoint")
    template = template_fn()
    x = x.to(device)
    parts = []
    for i in range(0, len(checkpoints), chunk):
        sds = []
        for j in range(i, min(i + chunk, len(checkpoints))):
            ck = checkpoints[j]
            if isinstance(ck, Mapping):
                sds.append(dict(ck))
            else:
                sds.append(load_checkpoint(ck, sha256=None if sha256 is None else sha256[j]))
        stack = stack_from_state_dicts(template, sds, device)
        parts.append(collect_logits(stack, x, queries=queries, batch_size=batch_size, bf16=bf16))
        del stack
    return torch.cat(parts)
