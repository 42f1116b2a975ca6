"""Choosing the stack layout (``vmap`` or ``loop``, :mod:`mlaudit.train.stacked`) by measurement.

Which layout trains K models faster depends on the architecture, not only on K: on an H100
(benchmarks/results/factory_*.md, 2026-11-22) vmap was 1.1x faster than the loop for K = 8
ResNet-18s (3.66 vs 3.96 s per model-epoch) but 3.6x slower for K = 8 fast CNNs (1.68 vs 0.46),
whose max-pool backward and float32 BatchNorm suffer under vmap; for a narrow fast CNN (width 16)
vmap over K = 32 was 2.7x faster than training one at a time. So for ``strategy: auto`` on a GPU
with K > 1 the factory times a few training steps of each layout on the real data and keeps the
faster one, by the median epoch after the first of one timed call (:func:`epoch_times`; cost: a few seconds per job).
Elsewhere the static rule of
:func:`~mlaudit.train.stacked.choose_strategy` applies.
"""

from __future__ import annotations

import logging
import math
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from ..data.base import TensorDataset
from ..errors import error_line
from ..train.graphed import pause_captures
from ..train.loop import init_models, train_stack
from ..train.recipe import AugmentConfig, Recipe
from ..train.stacked import StackedModels, choose_strategy

log = logging.getLogger(__name__)
PROBE_STEPS = 4
PROBE_MAX_MODELS = 16
"""The probe trains at most this many models per layout: the loop layout's cost grows linearly with K
while vmap's grows more slowly, so a layout vmap beats at 16 models it also beats at more; probing
K = 500 models (a DP audit's chunk) in the loop layout would itself cost minutes."""


def _probe_run(recipe: Recipe, *, k: int, model_fn: Callable[[], nn.Module], data: TensorDataset, lr: float,
               device: torch.device, augment: AugmentConfig | None
               ) -> tuple[Callable[..., None], int, int]:
    """The training call of the timed probes (:func:`pick_layout`, :class:`CompileProbe`):
    ``run(epochs, layout, on_epoch=None, models=None, on_epoch_models=None, **recipe_update)`` trains
    min(k, :data:`PROBE_MAX_MODELS`) fresh models (or ``models``) on the first :data:`PROBE_STEPS` batches of ``data``
    (``on_epoch`` and ``on_epoch_models`` are train_stack's), CUDA-synchronised before and after. Also returns that
    number of models and the model-steps of one probe epoch."""
    n = min(len(data), PROBE_STEPS * recipe.batch_size)
    probe = data.subset(torch.arange(n, device=data.device))
    kp = min(k, PROBE_MAX_MODELS)

    def run(epochs: int, layout: str, on_epoch: Callable[[int, torch.Tensor], None] | None = None,
            models: list[nn.Module] | None = None,
            on_epoch_models: Callable[[int, StackedModels], None] | None = None, **update: object) -> None:
        models = init_models(model_fn, range(kp)) if models is None else models
        torch.cuda.synchronize(device)
        train_stack(models, probe, recipe.model_copy(update={"epochs": epochs, **update}),
                    seeds=list(range(len(models))), lr=lr, device=device, augment=augment, strategy=layout,
                    on_epoch=on_epoch, on_epoch_models=on_epoch_models)
        torch.cuda.synchronize(device)

    return run, kp, kp * -(-n // recipe.batch_size)


def pick_layout(strategy: str, *, k: int, model_fn: Callable[[], nn.Module], data: TensorDataset, recipe: Recipe,
                lr: float, device: torch.device, augment: AugmentConfig | None) -> tuple[str, str]:
    """The layout to train a chunk of ``k`` models with and why (a sentence for results.json); see the
    module docstring."""
    if strategy != "auto":
        return strategy, "set by factory.strategy"
    if recipe.dp is not None and recipe.dp.clipping == "fast":
        return "loop", DP_FAST_REASON
    if dp_fast_loop(recipe, model_fn, device):
        return "loop", DP_LOOP_REASON
    template = model_fn()
    if recipe.dp is not None and recipe.dp.clipping == "auto" and _recurrent(template):
        return "loop", DP_RECURRENT_REASON
    static = choose_strategy(template, device)
    if device.type != "cuda" or k == 1:
        why = "one model per chunk" if k == 1 else f"static rule on {device.type}"
        return static, f"{why}: {'conv net on CUDA' if static == 'loop' else 'vmap'} ({static})"
    run, kp, _ = _probe_run(recipe, k=k, model_fn=model_fn, data=data, lr=lr, device=device, augment=augment)
    times: dict[str, float] = {}
    for layout in ("loop", "vmap"):
        try:  # the first epoch warms up cuDNN autotuning and allocations; the rest are timed
            times[layout] = steady_epoch_time(epoch_times(lambda e, layout=layout, **kw: run(e, layout, **kw)))
        except torch.cuda.OutOfMemoryError:
            times[layout] = float("inf")
        torch.cuda.empty_cache()
    best = min(times, key=times.__getitem__)
    probe_text = ", ".join(f"{a} {t:.3f} s" for a, t in times.items())
    log.info("stack layout for %d models: %s (probe with %d: %s)", k, best, kp, probe_text)
    if times[best] == float("inf"):
        return static, f"both layouts ran out of memory in the probe; static rule ({static})"
    return best, (f"timed probe, one epoch of {PROBE_STEPS} steps x {kp} models (median of {PROBE_EPOCHS - 1} epochs "
                  f"after the first): {probe_text}")


DP_RECURRENT_REASON = ("DP-SGD on a model with nn.LSTM / nn.GRU: loop layout with book-keeping clipping (vmap's "
                       "per-example path fails on GRUs and on some LSTMs, and where it runs an LSTM it took 11x the "
                       "book-keeping step on a CPU, 2026-12-07)")


def _recurrent(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.LSTM, nn.GRU, nn.RNN)) for m in model.modules())


DP_FAST_REASON = "dp.clipping: fast: book-keeping clipping runs in the loop layout (vmap's steps clip per example)"
DP_LOOP_REASON = ("DP-SGD with book-keeping clipping on CUDA: loop layout, no probe (vmap's per-example path "
                  "keeps [K, B, *params] gradients: on the H200 a fast-CNN DP audit of 150 models per side trained "
                  "in 226 s with vmap, 19 models per chunk after out-of-memory back-offs, and in 76 s with the loop, "
                  "230 per chunk, 2026-12-03)")


def dp_fast_loop(recipe: Recipe, model_fn: Callable[[], nn.Module], device: torch.device) -> bool:
    """Whether a chunk goes to the loop layout without a probe: DP-SGD on CUDA whose clipping may take the
    book-keeping path (``dp.clipping`` auto or fast) and whose layers all have a fast-clipping rule.

    The 16-model probe cannot see what decides this case: vmap's per-example gradients cap its chunks by
    memory (about 5x a loop model's footprint at K = 19, more than the two-model measurement predicts) and
    each chunk pays set-up and evaluation again. Measured (H200, 2026-12-03; benchmarks/results/
    dp_audit_cifar10_fastcnn_150_*_h200.md): the probe picked vmap (1.5 s against the loop's 2.0 s per probe
    epoch), whose run took 0.75 s per model against 0.25 s with the loop layout, to the same audit counts."""
    if recipe.dp is None or device.type != "cuda" or recipe.dp.clipping == "per-example":
        return False
    from ..privacy.fastclip import fast_clip_supported  # lazy: privacy imports train

    return fast_clip_supported(model_fn())


PROBE_EPOCHS = 6
"""Epochs of one timed probe call: the first pays what a call pays once (cuDNN autotuning, the CUDA graph's warm-up
and capture, inductor's compile, a DP chunk's verification of book-keeping clipping), the median of the other five
is the step's time. Until 2026-12-07 the probe took ``t(2 epochs) - t(1 epoch)`` of two calls: the difference of two
noisy calls of ~1 s for a few tens of ms of steps. Its readings moved between 1.5 and 3.2 s for one DP chunk
(docs/privacy.md), and in the 256-model pool (H100) it read 0.245 s eager vs 0.069 s compiled per probe epoch (a
1.6x and a 0.5x estimate of the job's real per-model times, 1.0 and 0.88 s)."""


def epoch_times(run: Callable[..., None], epochs: int = PROBE_EPOCHS,
                clock: Callable[[], float] = time.perf_counter, losses: list[list[float]] | None = None
                ) -> list[float]:
    """Seconds of each epoch of one call ``run(epochs, on_epoch=...)``: stamped when each epoch ends, in
    train_stack's ``on_epoch``, which runs after the epoch's losses reached the host (the device's work is done).
    ``losses``: if given, each epoch's mean loss per model is appended to it."""
    stamps = [clock()]

    def stamp(_epoch: int, loss: torch.Tensor | None) -> None:
        stamps.append(clock())
        if losses is not None and loss is not None:
            losses.append([float(v) for v in loss])

    run(epochs, on_epoch=stamp)
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def steady_epoch_time(times: Sequence[float]) -> float:
    """The steady epoch of :func:`epoch_times`: the median after the first (one slow epoch does not move it)."""
    return max(statistics.median(times[1:] if len(times) > 1 else times), 1e-9)


COMPILE_PROBE_MIN_S = 200.0
"""``recipe.compile: auto`` probes only a job whose training, estimated from the layout's eager steps, takes at least
this long. Measured on an H100 (2026-12-07, docs/factory.md "The graph of a compiled step"): compiling took 14.5 s
(inductor's caches warm) to 28.9 s (cold) for the airbench network, and the compiled step saved 12-19% of training
time (A/B/A, LiRA-pool models); below ~200 s of training the expected saving does not repay the compile."""
COMPILE_MIN_GAIN = 0.03
"""The compiled step must be at least this much faster per epoch in the probe to be kept: one of two short
4-model comparisons on the H100 went 7% the other way, so a tie is not a reason to run inductor's kernels."""


COMPILE_LOSS_RTOL = 0.1
"""The compiled probe's mean loss per model and epoch must lie within this fraction of the eager probe's (the same
models, data order and recipe; floor 0.05 in absolute terms) for ``compile: auto`` to keep the compiled step.
Rounding alone moves them far less: compiled vs eager airbench-muon over the probe's 6 x 4 steps under bf16, at most
0.27% (CPU inductor, 2026-12-07, benchmarks/results/compile_loss_agreement_cpu.md), and even a fast CNN compiled in
fp32 vs eager in bf16 differed by <= 1.5% over 3 epochs (H100, benchmarks/results/compile_graph_nan_h100.md). A step
compiled into something else (there: fastcnn's NaN at the second step under bf16) is not a faster step."""


def compile_disagreement(eager: Sequence[Sequence[float]], compiled: Sequence[Sequence[float]]) -> str | None:
    """None if the compiled probe's losses [epochs][models] match the eager probe's within
    :data:`COMPILE_LOSS_RTOL` (of the eager loss, at least 0.5), else where they differ most (a sentence)."""
    if len(compiled) != len(eager):
        return f"the compiled probe reported {len(compiled)} epochs, the eager one {len(eager)}"
    worst: tuple[float, int, int, float, float] | None = None
    for e, (le, lc) in enumerate(zip(eager, compiled, strict=True)):
        for m, (a, b) in enumerate(zip(le, lc, strict=True)):
            finite = math.isfinite(a) and math.isfinite(b)
            excess = abs(b - a) - COMPILE_LOSS_RTOL * max(abs(a), 0.5) if finite else math.inf
            if excess > 0 and (worst is None or excess > worst[0]):
                worst = (excess, e, m, a, b)
    if worst is None:
        return None
    _, e, m, a, b = worst
    return (f"model {m}'s mean loss in probe epoch {e + 1}: {a:.4g} eager vs {b:.4g} compiled "
            f"(beyond {100 * COMPILE_LOSS_RTOL:.0f}%)")


def job_model_steps(sizes: Iterable[int], *, batch_size: int, epochs: int) -> int:
    """Training steps summed over a job's models: model i trains ``ceil(sizes[i] / batch_size)`` steps per epoch."""
    return sum(-(-int(n) // batch_size) for n in sizes) * epochs


def estimated_training_s(probe_epoch_s: float, probe_model_steps: int, job_model_steps: int) -> float:
    """A job's training seconds from a probe epoch of ``probe_model_steps`` model-steps: per model-step time x the
    job's model-steps."""
    return probe_epoch_s / max(probe_model_steps, 1) * job_model_steps


def compile_decision(eager_epoch_s: float, compiled_epoch_s: float | None, *, compile_s: float | None,
                     probe_model_steps: int, job_model_steps: int) -> tuple[bool, str]:
    """Whether the job compiles, and why (a sentence for results.json), from the probe's timings.

    ``eager_epoch_s``: one probe epoch (``probe_model_steps`` model-steps) of the step without compile;
    ``compiled_epoch_s`` / ``compile_s``: the same with compile and the compile's one-time cost (None: the compiled
    step was not probed because the job is too short). The compile is already paid once the probe ran (the
    compiled graphs are kept for the job), so the choice is the faster step, by at least :data:`COMPILE_MIN_GAIN`."""
    est = estimated_training_s(eager_epoch_s, probe_model_steps, job_model_steps)
    if compiled_epoch_s is None:
        return False, (f"compile auto: not probed, the job's training is estimated at {est:.0f} s "
                       f"(< {COMPILE_PROBE_MIN_S:.0f} s, too short to repay a compile)")
    gain = 1.0 - compiled_epoch_s / eager_epoch_s if eager_epoch_s > 0 else 0.0
    timing = (f"probe epoch {eager_epoch_s:.3f} s eager vs {compiled_epoch_s:.3f} s compiled ({100 * gain:+.1f}%), "
              f"compile {compile_s:.1f} s, job estimated at {est:.0f} s")
    if gain >= COMPILE_MIN_GAIN:
        return True, f"compile auto: compiled, {timing}"
    return False, f"compile auto: not compiled (gain below {100 * COMPILE_MIN_GAIN:.0f}%), {timing}"


COMPILE_SWITCH_INTERVAL_S = 1e-4
"""Python's thread switch interval while the background compile runs (default 5 ms). Every torch call releases
the GIL and takes it back, and a thread that wants it back waits up to one interval while another runs Python:
on the 2-core CPU of 2026-12-07 (torch 2.13) an in-place add on 16 floats took 2.7 us alone and 2.4 ms beside a
thread running pure Python at 5 ms, 92 us at 0.1 ms, 44 us at 0.01 ms. The job's eager steps (a few tens of
torch calls each) would crawl through the Python-bound parts of a compile (dynamo's tracing, inductor's lowering).
Beside a real compile (inductor's C++ backend, whose compiler runs in subprocesses) the interval changed little:
the compile took 29.6 s at 5 ms and 27.3 s at 0.1 ms (25.2 s alone), the other thread's adds 5.6 and 5.8 us."""

WarmFn = Callable[[StackedModels], object]
"""What the background compile runs after its training step on the stack it trained (the factory's evaluation and
queries of a chunk), so that their compiled graphs are ready too."""


class CompileProbe:
    """``recipe.compile`` for a factory job, and why: ``true`` / ``false`` as set; ``auto`` measured.

    ``auto`` compiles only in the loop layout on CUDA (where ``recipe.compile`` applies), and only a job whose
    training, estimated from a probe of the eager step (:data:`PROBE_STEPS` batches x min(k, 16) models, the
    layout probe's setting), lasts at least :data:`COMPILE_PROBE_MIN_S`; then it times the compiled step the same
    way and keeps it if :func:`compile_decision` says so. A compiled probe that fails (out of memory, a model
    inductor cannot compile, a NaN loss) or whose losses differ from the eager probe's (:func:`compile_disagreement`)
    leaves the job eager, with the error or the difference in the reason.
    ``job_sizes``: the number of training examples of each of the job's models. A DP-SGD job is probed like any
    other where its steps take book-keeping clipping (:func:`dp_fast_loop`): what compiles there is the clipped sum's
    norms and sums. Through the loop on an H100 (2026-12-08, benchmarks/results/dp_throughput_compile_h100.md) that
    paid only inside CUDA graphs (ResNet-18-GN 27.9 -> 23.4 ms/step graphed, 29.7 -> 31.3 eager), which is why it
    is measured rather than assumed.

    **Compiling in the background** (``background=True``, the factory's choice). Inductor's compile of the airbench
    network took 15-29 s on an H100 (2026-12-07), with the GPU idle: 6-11% of a 256-model pool. With ``background``
    the compile runs in a thread, one epoch of the compiled step on one throwaway model (no CUDA graph: captures
    stay on the calling thread) and then ``warm(stack)`` on it, while :meth:`decision` answers "eager" and the job's
    first chunks train with the eager step. Those chunks capture no CUDA graph until the thread is done
    (:func:`mlaudit.train.graphed.pause_captures`): on an H100 (2026-12-07) captures beside the compile failed both
    ways, the thread's synchronisations refused while a capture was under way and the capture invalidated by them.
    The compiled graphs are kept by ``torch.compile`` for every
    model of the architecture (the guards are on shapes and global state, not on the module), so once the thread
    is done the compiled probe runs on the calling thread at its steady speed and the decision is made as without
    ``background``. The models a chunk trains do not depend on the thread: they are built on the calling thread
    (the thread's model is built before it starts), and every draw of training comes from per-model generators.
    Which chunks train compiled depends on when the compile ends, as ``auto``'s choice depends on the timings:
    set ``compile: true`` or ``false`` to fix the path. Call :meth:`close` when the job ends (it waits for a compile
    still running)."""

    def __init__(self, recipe: Recipe, *, layout: str, k: int, model_fn: Callable[[], nn.Module], data: TensorDataset,
                 lr: float, device: torch.device, augment: AugmentConfig | None, job_sizes: Sequence[int],
                 clock: Callable[[], float] = time.perf_counter, background: bool = False,
                 warm: WarmFn | None = None) -> None:
        self._final: tuple[bool, str] | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._compile_s = 0.0
        self.eager_chunks = 0  # chunks answered "eager" while the compile ran
        self.clock, self.layout = clock, layout
        if recipe.compile != "auto":
            self._final = bool(recipe.compile), "set by recipe.compile"
            return
        if device.type != "cuda" or layout != "loop":
            self._final = False, ("compile auto: compile applies to the loop layout on CUDA "
                                  f"(here {layout} on {device.type})")
            return
        if recipe.dp is not None and not dp_fast_loop(recipe, model_fn, device):
            # what compiles in a DP step is book-keeping's norms and sums (fastclip.clipped_grad_sum); the
            # per-example path has nothing compiled to probe
            self._final = False, ("compile auto: DP-SGD steps compile only with book-keeping clipping "
                                  "(dp.clipping fast, or auto on a model whose layers all have a fast-clipping "
                                  f"rule); here dp.clipping {recipe.dp.clipping}")
            return
        self.run, _, self.steps = _probe_run(recipe, k=k, model_fn=model_fn, data=data, lr=lr, device=device,
                                             augment=augment)
        self.eager_losses: list[list[float]] = []
        self.eager_times = epoch_times(lambda e, **kw: self.run(e, layout, compile=False, **kw), clock=clock,
                                       losses=self.eager_losses)
        self.eager = steady_epoch_time(self.eager_times)
        self.total = job_model_steps(job_sizes, batch_size=recipe.batch_size, epochs=recipe.epochs)
        if estimated_training_s(self.eager, self.steps, self.total) < COMPILE_PROBE_MIN_S:
            self._final = compile_decision(self.eager, None, compile_s=None, probe_model_steps=self.steps,
                                           job_model_steps=self.total)
            return
        if not background:
            self._settle()
            return
        model = init_models(model_fn, [0])  # here, not in the thread: init_models seeds the global CPU generator
        self._switch = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch, COMPILE_SWITCH_INTERVAL_S))  # restored when the compile ends
        # no CUDA graph capture on the job's thread while this thread works on the GPU (graphed.pause_captures): the
        # first chunks train with eager steps, not captured ones (only CUDA gets here: see above)
        resume = pause_captures()
        self._thread = threading.Thread(target=self._compile, args=(model, warm, resume), name="mlaudit-compile",
                                        daemon=True)
        self._thread.start()

    def _compile(self, model: list[nn.Module], warm: WarmFn | None, resume: Callable[[], None]) -> None:
        """The background thread: one compiled epoch (inductor compiles the forward and backward), then ``warm``;
        then ``resume`` lets the job's steps capture again."""
        t0 = self.clock()
        try:
            trained: dict[int, StackedModels] = {}
            self.run(1, self.layout, models=model, compile=True, cuda_graph=False,
                     on_epoch_models=lambda _e, st: trained.__setitem__(0, st))
            if warm is not None and 0 in trained:
                warm(trained[0])
        except BaseException as e:  # noqa: BLE001 - reported by decision() on the job's thread
            self._error = e
        finally:
            try:
                if torch.cuda.is_initialized():
                    torch.cuda.synchronize()  # this thread's last kernels are done before captures resume
            finally:
                resume()
                sys.setswitchinterval(self._switch)
        self._compile_s = self.clock() - t0

    def decision(self) -> tuple[bool, str]:
        """Whether the next chunk trains compiled, and why; final once the probe has settled (never blocks on a
        background compile: while it runs, the answer is eager)."""
        if self._final is not None:
            return self._final
        assert self._thread is not None
        if self._thread.is_alive():
            self.eager_chunks += 1
            est = estimated_training_s(self.eager, self.steps, self.total)
            return False, (f"compile auto: eager while the step compiles in the background (probe epoch "
                           f"{self.eager:.3f} s eager, job estimated at {est:.0f} s)")
        self._thread.join()
        self._thread = None
        if self._error is not None:
            self._final = self._failed(self._error)
        else:
            self._settle(compile_s=self._compile_s)
        assert self._final is not None
        return self._final

    def close(self) -> None:
        """Wait for a background compile still running (at the end of the job)."""
        if self._thread is not None:
            self._thread.join()

    def _failed(self, e: BaseException) -> tuple[bool, str]:
        torch.cuda.empty_cache()
        text = error_line(e)
        log.warning("recipe.compile auto: the compiled probe failed (%s); training without compile", text)
        return False, f"compile auto: not compiled, the compiled probe failed ({text})"

    def _settle(self, compile_s: float | None = None) -> None:
        """The compiled probe on this thread and the decision. ``compile_s``: the background compile's wall time
        (None: the compile happens here, in the probe's first epoch)."""
        compiled_losses: list[list[float]] = []
        try:  # a compile not yet done happens in the first epoch, in the eager warm-up steps of the graphed step
            compiled_times = epoch_times(lambda e, **kw: self.run(e, self.layout, compile=True, **kw), clock=self.clock,
                                         losses=compiled_losses)
        except Exception as e:  # noqa: BLE001 - out of memory, or a model inductor cannot compile: the eager step ran
            self._final = self._failed(e)
            return
        torch.cuda.empty_cache()
        differ = compile_disagreement(self.eager_losses, compiled_losses)
        if differ is not None:
            log.warning("recipe.compile auto: the compiled step trains differently (%s); training without compile",
                        differ)
            self._final = False, ("compile auto: not compiled, the compiled probe's losses differ from the eager "
                                  f"step's ({differ})")
            return
        compiled = steady_epoch_time(compiled_times)
        once = (compiled_times[0] - compiled) - (self.eager_times[0] - self.eager)  # the first epoch's extra
        use, why = compile_decision(self.eager, compiled, compile_s=max(once, 0.0) if compile_s is None else compile_s,
                                    probe_model_steps=self.steps, job_model_steps=self.total)
        if compile_s is not None:
            why += f"; compiled in the background while {self.eager_chunks} chunk(s) trained eagerly"
        log.info("%s", why)
        self._final = use, why


def pick_compile(recipe: Recipe, *, layout: str, k: int, model_fn: Callable[[], nn.Module], data: TensorDataset,
                 lr: float, device: torch.device, augment: AugmentConfig | None, job_sizes: Sequence[int],
                 clock: Callable[[], float] = time.perf_counter) -> tuple[bool, str]:
    """:class:`CompileProbe`'s decision, compiling on this thread (the probe's first compiled epoch pays inductor's
    compile: the compile's cost is that epoch's one-time part less the eager probe's)."""
    return CompileProbe(recipe, layout=layout, k=k, model_fn=model_fn, data=data, lr=lr, device=device,
                        augment=augment, job_sizes=job_sizes, clock=clock).decision()
