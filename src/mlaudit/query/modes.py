"""The eval-mode guard: query a model in eval mode (or train mode) and put every flag back after.

    with evaluating(model):                        # eval mode; requires_grad untouched
        logits = model(x)
    with evaluating(*models, requires_grad=False): # also freeze the parameters (gradients reach inputs only)
        delta = craft(objective, x, ...)

Restoring is per submodule: a module whose parts were in different modes (a frozen BatchNorm inside
a training network) gets each part's own flag back, and so does every parameter's ``requires_grad``,
also when the block raises.

Each model's list of modules and parameters is cached between blocks (walking a ResNet-18's module tree took
~40 us of the guard's ~67 us per entry and exit on a CPU core) and checked against the model at every entry:
the cached ``_modules`` / ``_parameters`` dicts must still be the model's, holding the same objects in the same
order, or the tree is walked again. A submodule or parameter added, replaced or removed (by attribute, through a
container, or by writing those dicts directly) is therefore seen at the next entry. The flags themselves are
never cached: they are read at every entry.
"""

from __future__ import annotations

import operator
import weakref
from contextlib import AbstractContextManager
from itertools import chain
from types import TracebackType

from torch import nn


def _modules(model: nn.Module) -> list[nn.Module]:
    """``list(model.modules())`` (pre-order, each module once) without the qualified names that
    ``named_modules`` builds: a quarter of the cost on a ResNet-18, whose 69 modules took ~0.15 ms."""
    out: list[nn.Module] = []
    seen: set[int] = set()
    stack = [model]
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        out.append(m)
        stack.extend(reversed([c for c in m._modules.values() if c is not None]))
    return out


def _parameters(mods: list[list[nn.Module]]) -> list[nn.Parameter]:
    """The parameters of the modules ``mods`` (lists from :func:`_modules`), each once, in ``parameters()``
    order."""
    out: list[nn.Parameter] = []
    seen: set[int] = set()
    for own in mods:
        for m in own:
            for p in m._parameters.values():
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


_children = operator.attrgetter("_modules")
_own_params = operator.attrgetter("_parameters")


class _Tree:
    """One model's modules (:func:`_modules`) and parameters (:func:`_parameters`), and the objects its modules'
    ``_modules`` and ``_parameters`` dicts held when they were walked (strong references: no id compared by
    :meth:`current` can be reused while the tree is cached)."""

    __slots__ = ("mods", "params", "values")

    def __init__(self, model: nn.Module) -> None:
        self.mods = _modules(model)
        self.params = _parameters([self.mods])
        self.values = _held(self.mods)

    def current(self) -> bool:
        """Whether the model still has this tree: its modules' ``_modules`` and ``_parameters`` dicts (read again,
        so a replaced dict is seen too) hold the same objects in the same order, compared by identity (a tensor's
        ``==`` is never called). ~12 us on a ResNet-18 on a CPU core, against ~40 us for the walk."""
        values = _held(self.mods)
        return len(values) == len(self.values) and all(map(operator.is_, values, self.values))


def _held(mods: list[nn.Module]) -> list[object]:
    """The values of every module's ``_modules`` dict, then of every module's ``_parameters`` dict (None too)."""
    return [*chain.from_iterable(map(dict.values, map(_children, mods))),
            *chain.from_iterable(map(dict.values, map(_own_params, mods)))]


_TREES: weakref.WeakKeyDictionary[nn.Module, _Tree] = weakref.WeakKeyDictionary()


def _tree(model: nn.Module) -> _Tree:
    """The model's :class:`_Tree`, from the cache when it is still current, else walked (and cached)."""
    try:
        tree = _TREES.get(model)
    except TypeError:  # not weakly referenceable: walked every time
        return _Tree(model)
    if tree is None or not tree.current():
        tree = _Tree(model)
        try:
            _TREES[model] = tree
        except TypeError:
            pass
    return tree


class in_mode(AbstractContextManager[None]):  # noqa: N801 (a function before: a class skips the generator machinery)
    """``model.train(train)`` for every model inside the block; with ``requires_grad`` (True/False) also
    every parameter's flag (None: unchanged). On exit (also on an exception) each submodule's
    ``training`` flag and each parameter's ``requires_grad`` are restored to what they were."""

    # Only what differs is touched: ``train()`` recurses into every submodule, so calling it on each of a
    # ResNet-18's 69 modules on exit cost ~0.8 ms per block on a CPU core, a few percent of an FGSM call on
    # a GPU; a model already in the wanted mode (an attack on an eval model) costs one pass over its flags.

    __slots__ = ("models", "train", "requires_grad", "mods", "was", "params", "flags")

    def __init__(self, *models: nn.Module, train: bool, requires_grad: bool | None = None) -> None:
        self.models, self.train, self.requires_grad = models, train, requires_grad

    def __enter__(self) -> None:
        trees = [_tree(model) for model in self.models]
        self.mods = [t.mods for t in trees]
        self.was = [[m.training for m in own] for own in self.mods]
        rg = self.requires_grad
        if rg is None:
            self.params: list[nn.Parameter] = []
        elif len(trees) == 1:
            self.params = trees[0].params
        else:
            self.params = _parameters(self.mods)
        self.flags = [p.requires_grad for p in self.params]
        try:
            train = self.train
            for model, was in zip(self.models, self.was):
                if (not train) in was:
                    model.train(train)
            if rg is not None and (not rg) in self.flags:
                for p, flag in zip(self.params, self.flags):
                    if flag != rg:
                        p.requires_grad = rg
        except BaseException:
            self._restore()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._restore()

    def _restore(self) -> None:
        for own, was in zip(self.mods, self.was):
            if [m.training for m in own] != was:
                for m, w in zip(own, was):  # pre-order: a parent's train() first, then each part that still differs
                    if m.training != w:
                        m.train(w)
        if self.params and [p.requires_grad for p in self.params] != self.flags:
            for p, flag in zip(self.params, self.flags):
                if p.requires_grad != flag:
                    p.requires_grad = flag


def evaluating(*models: nn.Module, requires_grad: bool | None = None) -> in_mode:
    """Eval mode for every model inside the block (BatchNorm uses its running statistics, dropout is
    off); ``requires_grad=False`` also freezes the parameters (so no ``.grad`` of a model is
    touched). Every flag is restored on exit, also on an exception (see :func:`in_mode`)."""
    return in_mode(*models, train=False, requires_grad=requires_grad)


def training(*models: nn.Module, requires_grad: bool | None = None) -> in_mode:
    """Train mode for every model inside the block, flags restored on exit (see :func:`in_mode`)."""
    return in_mode(*models, train=True, requires_grad=requires_grad)
