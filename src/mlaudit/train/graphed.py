"""One training step replayed as a CUDA graph (issue 23: remove the per-step kernel-launch cost).

A small network's step on a large GPU is a few hundred short kernels; launched one by one from
Python, the host can take as long as the GPU (docs/factory.md: CPU launch overhead about equal to GPU
time for the airbench network on the H200). ``torch.cuda.graph`` records the step's kernels once and
:meth:`CUDAGraph.replay` launches them all with one call (NVIDIA, "CUDA Graphs"; PyTorch's
``torch.cuda.graphs`` whole-network capture). What the graph needs, and how the loop provides it:

* **Static inputs.** The batch is gathered and augmented eagerly (random crops and flips, Gaussian
  noise, PGD examples: anything with host-side randomness or data-dependent control flow), then copied
  into fixed buffers x [K, B, *shape] and y [K, B] that the graph reads.
* **Rates as device tensors.** The learning rate changes every step, so the optimizers read it from
  0-dim tensors (:data:`mlaudit.train.optim.Rate`) filled before each replay; Adam's host-side bias
  correction cannot be captured (:func:`mlaudit.train.optim.graph_safe`).
* **One graph per set of stepping groups.** A :class:`~mlaudit.train.optim.GroupedOptimizer` skips a
  group whose rate is 0 (its buffers must not move), which is control flow: each distinct pattern of
  active groups gets its own graph (airbench's recipe has two: with and without the whitening bias),
  sharing one memory pool.
* **Fallback.** A model whose step cannot be captured (a host synchronisation such as ``.item()`` in its
  forward, data-dependent shapes) raises during capture; the step then runs eagerly for the rest of
  training, with a warning, and :attr:`GraphedStep.path` says so (recorded in each model's metrics).
* **No capture beside another thread's GPU work.** A capture in progress forbids any call that would synchronise
  with its stream, from any thread: a ``torch.cuda.synchronize()`` (inductor's kernel benchmarking, the loop's
  epoch end) in another thread fails with "operation not permitted when stream is capturing" and invalidates the
  capture ("operation failed due to a previous error during capture"). Seen on an H100 (2026-12-07) when
  ``compile: auto`` compiled in a background thread while the job's chunks captured: the compile failed and 4 of
  256 models fell back to eager steps. So a thread that works on the GPU beside training holds
  :func:`pause_captures` for its whole run, and while any holds it a step that would capture runs eagerly
  instead and tries again at its next step (graphs already captured keep replaying: a replay is an ordinary
  launch).
* **Warm-up.** The first ``warmup`` steps of each pattern run eagerly on a side stream (lazy
  initialisation: cuDNN plans, momentum buffers created on the first step), then the next is captured and
  replayed. These are real training steps, so the trained model is the eager loop's up to the
  floating-point differences of kernel selection.

* **Several input shapes (DP-SGD).** A step may read more static inputs than the batch (``extra``: the
  DP-SGD step's slot weights and noise) and, with ``shapes`` None, inputs of a few distinct shapes (the
  DP-SGD step's slot buckets, :data:`mlaudit.privacy.dpsgd.GRAPH_SLOT_MULTIPLE`): each shape gets its own
  static buffers, its own warm-up and graphs, all in the one memory pool. The graphs run one after the
  other on one stream and every graph's output stays referenced, so a graph may reuse only memory the
  others free inside their own replay (their intermediates); replaying them in any order is safe.

The body is the loop's own step function (forward, per-model loss, gradients, optimizer update; for
DP-SGD, :meth:`mlaudit.privacy.dpsgd.DPTraining.update` and the update), the same one the eager path
calls: nothing about training is defined twice.
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor

from ..errors import error_line


class StepBody(Protocol):
    """(x [K, B, *shape], y [K, B], per-slot rates, active slots, *extra static inputs) -> per-model loss [K].

    The rates are floats on the loop's eager path and 0-dim device tensors under :class:`GraphedStep`."""

    def __call__(self, x: Tensor, y: Tensor, rates: Sequence[float | Tensor], active: tuple[bool, ...],
                 *extra: Tensor) -> Tensor: ...


Shapes = tuple[tuple[int, ...], ...]
"""The shapes of one call's static inputs (x, y, *extra)."""


_PAUSES = 0
_PAUSE_LOCK = threading.Lock()


def pause_captures() -> Callable[[], None]:
    """Hold off new CUDA graph captures (:class:`GraphedStep` then runs those steps eagerly) until the returned
    ``resume`` is called (once; later calls do nothing). For a thread that works on the GPU beside training
    (:class:`mlaudit.factory.layout.CompileProbe`): take it on the job's thread *before* starting the other
    thread, so no capture can be under way when that thread's first CUDA call is made, and resume from that
    thread when its last CUDA call is done."""
    global _PAUSES
    with _PAUSE_LOCK:
        _PAUSES += 1
    done = threading.Event()

    def resume() -> None:
        global _PAUSES
        with _PAUSE_LOCK:
            if not done.is_set():
                done.set()
                _PAUSES -= 1
    return resume


def captures_paused() -> bool:
    """Whether some thread holds :func:`pause_captures`."""
    return _PAUSES > 0


class GraphedStep:
    """Runs ``body`` eagerly for the first ``warmup`` steps of each (input shapes, active pattern), then as a
    replayed graph.

    ``capture`` builds the graph object and its context (``torch.cuda.CUDAGraph`` and ``torch.cuda.graph``
    by default; tests on CPU inject a recorder). ``shapes``: how many distinct input shapes may be captured
    (1: the non-private loop's fixed batch; None: any number, the DP-SGD step's slot buckets). ``captures``
    counts graphs made, ``replays`` graph steps.
    """

    def __init__(self, body: StepBody, *, slots: int, device: torch.device, warmup: int = 2,
                 capture: Callable[[], tuple[object, Callable[..., object]]] | None = None,
                 shapes: int | None = 1) -> None:
        self.body, self.warmup, self.device, self.max_shapes = body, warmup, device, shapes
        self.rates = [torch.zeros((), device=device) for _ in range(slots)]
        self.graphs: dict[tuple[Shapes, tuple[bool, ...]], tuple[object, Tensor]] = {}
        self.seen: Counter[tuple[Shapes, tuple[bool, ...]]] = Counter()
        self.inputs: dict[Shapes, list[Tensor]] = {}  # the static buffers (x, y, *extra) of each input shape
        self.pool: object | None = None
        self.capture = capture or _cuda_capture
        self.captures = self.replays = 0
        self.paused = 0  # steps run eagerly because captures were paused (pause_captures)
        self.failed: str | None = None  # why capture failed (the step then stays eager)

    @property
    def path(self) -> str:
        """``cuda-graph``, or ``eager (capture failed: ...)`` after a fallback (or ``eager`` if nothing was captured)."""
        if self.failed is not None:
            return f"eager (capture failed: {self.failed})"
        if self.captures:
            return "cuda-graph" if not self.paused else f"cuda-graph ({self.paused} steps eager while captures were paused)"
        return "eager (captures paused)" if self.paused else "eager"

    def __call__(self, xb: Tensor, yb: Tensor, rates: Sequence[float], active: tuple[bool, ...],
                 *extra: Tensor) -> Tensor:
        """One step on (xb [K, B, *shape], yb [K, B], *extra) at ``rates``; returns the per-model loss [K] (a copy)."""
        shapes = self._load((xb, yb, *extra))
        for t, r in zip(self.rates, rates, strict=True):
            t.fill_(r)
        key = (shapes, active)
        entry = self.graphs.get(key)
        if self.failed is not None or (entry is None and self.seen[key] < self.warmup):
            self.seen[key] += 1
            return self._eager(shapes, active)
        if entry is None and captures_paused():  # another thread is on the GPU: see the module docstring
            self.paused += 1
            return self._eager(shapes, active)
        if entry is None:
            graph, ctx = self.capture()
            try:
                with ctx(graph, pool=self.pool):
                    out = self.body(*self._args(shapes, active))
            except Exception as e:  # noqa: BLE001 - any capture error: the step is still valid eagerly
                self.failed = error_line(e)
                warnings.warn(f"recipe.cuda_graph: the training step could not be captured ({self.failed}); "
                              "running it eagerly", RuntimeWarning, stacklevel=2)
                return self._eager(shapes, active)  # nothing ran during the failed capture: this step runs now
            if self.pool is None and hasattr(graph, "pool"):
                self.pool = graph.pool()
            entry = self.graphs[key] = (graph, out)
            self.captures += 1
        entry[0].replay()  # capturing records the kernels without running them: replay runs this step
        self.replays += 1
        return entry[1].clone()

    def _load(self, inputs: tuple[Tensor, ...]) -> Shapes:
        """Copy this call's inputs into the static buffers of their shapes (made on first sight) and return the
        shapes. The caller's tensors may change afterwards: the graph reads only the buffers."""
        shapes = tuple(tuple(t.shape) for t in inputs)
        static = self.inputs.get(shapes)
        if static is None:
            if self.max_shapes is not None and len(self.inputs) >= self.max_shapes and self.graphs:
                have = next(iter(self.inputs))
                raise ValueError(f"a graphed step needs fixed batch shapes: captured with {list(have[0])} "
                                 f"(x), got {list(shapes[0])}")
            if self.max_shapes is not None and len(self.inputs) >= self.max_shapes:
                self.inputs.clear()  # nothing captured yet: the new shape replaces the old buffers
            self.inputs[shapes] = [t.clone() for t in inputs]
        else:
            for buf, t in zip(static, inputs, strict=True):
                buf.copy_(t)
        return shapes

    def _args(self, shapes: Shapes, active: tuple[bool, ...]) -> tuple[object, ...]:
        x, y, *extra = self.inputs[shapes]
        return (x, y, self.rates, active, *extra)

    def _eager(self, shapes: Shapes, active: tuple[bool, ...]) -> Tensor:
        if self.device.type != "cuda":  # no streams: the warm-up runs where it stands
            return self.body(*self._args(shapes, active)).detach()
        side = warmup_stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            out = self.body(*self._args(shapes, active)).detach()
        torch.cuda.current_stream(self.device).wait_stream(side)
        return out


_STREAMS: dict[tuple[torch.device, str], list[torch.cuda.Stream]] = {}


def _pool(device: torch.device, role: str, k: int) -> list[torch.cuda.Stream]:
    """``k`` CUDA streams of ``device`` for ``role``, created once per process and reused by every chunk (a pool
    of hundreds of chunks would otherwise create streams without end)."""
    pool = _STREAMS.setdefault((device, role), [])
    while len(pool) < k:
        pool.append(torch.cuda.Stream(device))
    return pool[:k]


def model_streams(device: torch.device, k: int) -> list[torch.cuda.Stream]:
    """The per-model streams of a graphed loop-layout step (:attr:`mlaudit.train.stacked.LoopStack.streams`)."""
    return _pool(device, "model", k)


def warmup_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream the eager warm-up steps run on (PyTorch's graph notes: warm up on a side stream)."""
    return _pool(device, "side", 1)[0]


def _cuda_capture() -> tuple[object, Callable[..., object]]:
    # thread_local: only this thread is held to CUDA's ban on potentially unsafe calls (allocations, kernel loads)
    # during a capture, so other threads' host work is not refused. A synchronisation with the capturing stream is
    # refused from any thread whatever the mode: that is what pause_captures is for.
    return torch.cuda.CUDAGraph(), functools.partial(torch.cuda.graph, capture_error_mode="thread_local")
