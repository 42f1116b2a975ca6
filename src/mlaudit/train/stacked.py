"""K models of one architecture behind one interface, in two layouts.

``vmap``  parameters and buffers stacked as [K, *shape] leaves; the forward pass is
          ``vmap(functional_call(template, (params, buffers), x))`` (torch.func). BatchNorm keeps
          running statistics per model because its buffers are stacked too. Best where kernels are
          tiny and launch-bound (MLPs, small CNNs on the CPU).
``loop``  K ordinary modules (channels_last on CUDA), called one after another on their slice of
          the [K, B, ...] batch. Best for conv nets on a GPU, where one model's step already fills
          the device and vmap's grouped convolutions cost layout transposes (measured on an H100:
          benchmarks/results/factory_fast.md, factory_resnet.md). Which layout wins depends on the
          architecture; the factory times both when ``strategy: auto`` (factory/layout.py).

Both expose ``trainable()`` (the leaf tensors the optimizer updates, in a fixed order; parameters a
model froze with ``requires_grad=False`` stay fixed) with ``trainable_names()`` beside it,
``forward(x [K, B, ...]) -> [K, B, C]``, ``state_dict(k)`` and ``k``; the training loop and the
optimizers are the same for both, so a model's update is the same elementwise maths either way.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from ..errors import ConfigError


class StackedModels:
    """Base of the two layouts; build one with :meth:`from_modules`."""

    strategy: str

    @property
    def k(self) -> int:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self.trainable()[0].device

    def trainable(self) -> list[Tensor]:
        raise NotImplementedError

    def trainable_names(self) -> list[str]:
        """The parameter name of each entry of :meth:`trainable` (repeated per model for ``loop``)."""
        raise NotImplementedError

    @property
    def leading_k(self) -> bool:
        """Whether each trainable tensor holds all K models ([K, *shape]) or one model's."""
        return self.strategy == "vmap"

    def forward(self, x: Tensor, *, train: bool) -> Tensor:
        raise NotImplementedError

    def state_dict(self, k: int) -> dict[str, Tensor]:
        raise NotImplementedError

    @staticmethod
    def from_modules(models: Sequence[nn.Module], device: torch.device, *, strategy: str = "auto",
                     channels_last: bool = True, compile: bool = False) -> StackedModels:
        """Copy ``models`` (same architecture) onto ``device`` in the chosen layout; ``channels_last``
        (loop layout on CUDA only) stores conv weights and feeds inputs in NHWC order; ``compile``
        (loop layout on CUDA only) runs each model's forward through one ``torch.compile``d call, shared
        by all models of the architecture (their weights are graph inputs, so no recompilation)."""
        strategy = choose_strategy(models[0], device) if strategy == "auto" else strategy
        if strategy not in _LAYOUTS:
            raise ConfigError(f"stack strategy must be auto, vmap or loop, got {strategy!r}")
        if strategy == "loop":
            return LoopStack.build(models, device, channels_last=channels_last,
                                   compile=compile and device.type == "cuda")
        return VmapStack.build(models, device)


@dataclass
class VmapStack(StackedModels):
    template: nn.Module  # on the meta device; only its structure and train/eval flag are used
    params: dict[str, Tensor]  # name -> [K, *shape], leaves (requiring grad unless the model froze them)
    buffers: dict[str, Tensor]  # name -> [K, *shape] (BatchNorm running stats per model)
    strategy: str = "vmap"

    @classmethod
    def build(cls, models: Sequence[nn.Module], device: torch.device) -> VmapStack:
        params, buffers = stack_module_state(list(models))
        template = _fp32_batchnorm(copy.deepcopy(models[0]).to("meta"))
        frozen = {n for n, p in models[0].named_parameters() if not p.requires_grad}
        params = {n: p.detach().to(device).requires_grad_(n not in frozen) for n, p in params.items()}
        buffers = {n: b.to(device) for n, b in buffers.items()}
        return cls(template, params, buffers)

    @property
    def k(self) -> int:
        return next(iter(self.params.values())).shape[0]

    def trainable(self) -> list[Tensor]:
        return [p for p in self.params.values() if p.requires_grad]

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.params.items() if p.requires_grad]

    def forward(self, x: Tensor, *, train: bool) -> Tensor:
        """x [K, B, *shape] -> logits [K, B, C]."""
        _set_mode(self.template, train)

        def one(p: dict[str, Tensor], b: dict[str, Tensor], xb: Tensor) -> Tensor:
            return functional_call(self.template, (p, b), (xb,))

        return vmap(one, randomness="different")(self.params, self.buffers, x)

    def state_dict(self, k: int) -> dict[str, Tensor]:
        """Model k's weights as a CPU state_dict (persistent buffers only, like ``Module.state_dict``)."""
        skip = _non_persistent(self.template)
        return {n: t[k].detach().to("cpu", copy=True) for n, t in {**self.params, **self.buffers}.items()
                if n not in skip}


@dataclass
class LoopStack(StackedModels):
    modules: list[nn.Module]
    strategy: str = "loop"
    channels_last: bool = False
    compiled: bool = False
    streams: list[torch.cuda.Stream] | None = None
    """One CUDA stream per model (set by the training loop for a CUDA-graph step): each model's forward, and
    so its backward, which autograd runs on the forward's stream, is issued on its own stream, so a captured
    graph has K independent branches the GPU can run concurrently. None: all on the current stream."""

    @classmethod
    def build(cls, models: Sequence[nn.Module], device: torch.device, *, channels_last: bool = True,
              compile: bool = False) -> LoopStack:
        fmt = torch.channels_last if device.type == "cuda" and channels_last else torch.contiguous_format
        mods = []
        for m in models:
            c = _moved(copy.deepcopy(m), device)  # deepcopy keeps each parameter's requires_grad
            if fmt is torch.channels_last:
                c = c.to(memory_format=fmt)
            mods.append(c)
        return cls(mods, channels_last=fmt is torch.channels_last, compiled=compile)

    @property
    def k(self) -> int:
        return len(self.modules)

    def trainable(self) -> list[Tensor]:
        return [p for m in self.modules for p in m.parameters() if p.requires_grad]

    def trainable_names(self) -> list[str]:
        return [n for m in self.modules for n, p in m.named_parameters() if p.requires_grad]

    @property
    def buffers(self) -> dict[str, Tensor]:
        """Buffers stacked [K, *shape] (a copy, for inspection)."""
        names = [n for n, _ in self.modules[0].named_buffers()]
        per = [dict(m.named_buffers()) for m in self.modules]
        return {n: torch.stack([d[n] for d in per]) for n in names}

    def forward(self, x: Tensor, *, train: bool) -> Tensor:
        """x [K, B, *shape] -> logits [K, B, C]: one plain call per model (on its stream, see ``streams``)."""
        outs = []
        here = torch.cuda.current_stream(x.device) if self.streams is not None else None
        for i, (m, xk) in enumerate(zip(self.modules, x)):
            _set_mode(m, train)
            with contextlib.nullcontext() if here is None else _on(self.streams[i], here):
                if self.channels_last and xk.dim() == 4:
                    xk = xk.contiguous(memory_format=torch.channels_last)
                outs.append(_compiled_call()(m, xk) if self.compiled else m(xk))
        if here is not None:
            for st in self.streams:  # join: the loss and the stack read every model's logits
                here.wait_stream(st)
            if not torch.cuda.is_current_stream_capturing():
                for o in outs:  # eager: keep the allocator from reusing a logits block before `here` is done
                    o.record_stream(here)
        return torch.stack(outs)

    def state_dict(self, k: int) -> dict[str, Tensor]:
        return _to_cpu(self.modules[k].state_dict())


@contextlib.contextmanager
def _on(stream: torch.cuda.Stream, parent: torch.cuda.Stream) -> Iterator[None]:
    """Issue work on ``stream`` after everything already issued on ``parent`` (a fork; the caller joins)."""
    stream.wait_stream(parent)
    with torch.cuda.stream(stream):
        yield


_LAYOUTS = ("vmap", "loop")


def _moved(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` on ``device`` with one host-to-device copy per dtype instead of one per tensor (on
    the H200 machines each pageable copy cost ~1 ms, ~60 of them per small CNN). Tensors become views
    of one device buffer per dtype; layout conversions afterwards copy them out as usual.

    Each view starts at a multiple of :data:`_ALIGN` bytes, as a tensor of its own would: cuDNN's and PyTorch's
    vectorised kernels assume aligned pointers, and packed end to end (a classifier bias of 10 floats before the
    BatchNorm running statistics) a ResNet-18's BatchNorm failed on an H100 with "CUDA error: misaligned address"
    (2026-12-05, tests/gpu/test_cuda_factory.py)."""
    if device.type != "cuda":
        return module.to(device)
    tensors = [t for t in [*module.parameters(), *module.buffers()] if t.device != device]
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    with torch.no_grad():
        for group in by_dtype.values():
            for t, piece in zip(group, _packed(group, device), strict=True):
                t.data = piece
    return module


def _packed(group: list[Tensor], device: torch.device) -> list[Tensor]:
    """Copies of ``group`` (one dtype) on ``device`` as views of one buffer, each starting on :data:`_ALIGN` bytes
    of it: one host-to-device copy for the lot."""
    offsets = _aligned_offsets([t.numel() for t in group], group[0].element_size())
    host = torch.zeros(offsets[-1], dtype=group[0].dtype)
    for t, start in zip(group, offsets):
        host[start:start + t.numel()].copy_(t.detach().reshape(-1))
    flat = host.to(device)
    return [flat[start:start + t.numel()].view(t.shape) for t, start in zip(group, offsets)]


_ALIGN = 256
"""Bytes each tensor of a packed device buffer starts on (:func:`_moved`; the CUDA caching allocator's blocks start
on 512)."""


def _aligned_offsets(numels: list[int], element_size: int) -> list[int]:
    """The start of each of ``numels`` tensors in a buffer where each starts on :data:`_ALIGN` bytes, in elements,
    then the buffer's length: [0, o_1, ..., o_{n-1}, total]."""
    step = max(1, _ALIGN // element_size)
    out = [0]
    for n in numels:
        out.append(out[-1] + -(-n // step) * step)
    return out


def _to_cpu(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A CPU copy of ``state`` with one device-to-host copy per dtype (see :func:`_moved`)."""
    items = [(n, t.detach()) for n, t in state.items()]
    if not items or items[0][1].device.type != "cuda":
        return {n: t.to("cpu", copy=True).contiguous() for n, t in items}
    out: dict[str, Tensor] = {}
    by_dtype: dict[torch.dtype, list[tuple[str, Tensor]]] = {}
    for n, t in items:
        by_dtype.setdefault(t.dtype, []).append((n, t))
    for group in by_dtype.values():
        flat = torch.cat([t.contiguous().reshape(-1) for _, t in group]).cpu()
        for (n, t), piece in zip(group, flat.split([t.numel() for _, t in group])):
            out[n] = piece.view(t.shape).clone()
    return {n: out[n] for n, _ in items}


def _call(module: nn.Module, x: Tensor) -> Tensor:
    return module(x)


@functools.cache
def _compiled_call() -> Callable[[nn.Module, Tensor], Tensor]:
    """``torch.compile(module(x))`` built once: the module is an argument, so models of one architecture
    share the compiled graphs (one per train/eval mode and input shape)."""
    return torch.compile(_call, dynamic=False)


def choose_strategy(model: nn.Module, device: torch.device) -> str:
    """The static rule, used for K = 1 and off the GPU: ``loop`` for conv nets on CUDA, else
    ``vmap``. For K > 1 on a GPU the factory measures instead (:mod:`mlaudit.factory.layout`)."""
    has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    return "loop" if device.type == "cuda" and has_conv else "vmap"


def _set_mode(module: nn.Module, train: bool) -> None:
    # Module.train() walks every submodule (about 0.5 ms for a small CNN): skip it when unchanged.
    if module.training != train:
        module.train(train)


def _non_persistent(module: nn.Module) -> set[str]:
    out = set()
    for prefix, m in module.named_modules():
        for b in getattr(m, "_non_persistent_buffers_set", ()):
            out.add(f"{prefix}.{b}" if prefix else b)
    return out


class _FP32Norm:
    """Mixin placed before a BatchNorm class: normalise in float32 with autocast off.

    Under vmap + bf16 autocast, the batched backward of ``batch_norm`` rejects bf16 inputs with
    float32 running statistics; BatchNorm in float32 avoids it.
    """

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return super().forward(x.float())  # type: ignore[misc]


@functools.cache
def _fp32_class(cls: type) -> type:
    return type(f"FP32{cls.__name__}", (_FP32Norm, cls), {})


def _fp32_batchnorm(template: nn.Module) -> nn.Module:
    """Swap the class of every BatchNorm in ``template`` for its float32 variant (names unchanged)."""
    for m in template.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, _FP32Norm):
            m.__class__ = _fp32_class(type(m))
    return template
