"""DP-SGD throughput (issues 6 and 15): mlaudit's DP-SGD (per-example and fast clipping) vs non-private SGD
for the same model and batch size, and Opacus (hooks and ghost clipping) beside them.

Models (``--models``, comma-separated): ``resnet18`` (ResNet-18 with GroupNorm, ``model: {name: resnet18,
norm: group}``, the default), ``fastcnn`` (``model: {name: fastcnn, norm: group}``) and ``vit`` (a ViT-small
defined here, the zoo has none: 4x4 patches of 32x32 images = 64 tokens, dim 384, depth 12, 6 heads, MLP
4x, pre-LayerNorm blocks, learned positions (``nn.Embedding``), mean pooling), and ``vit-mha``: the same with
PyTorch's ``nn.TransformerEncoderLayer`` blocks (``nn.MultiheadAttention`` inside; Opacus gets them through
``ModuleValidator.fix``, its ``DPMultiheadAttention``), and ``lstm``: an image's 32 rows as 32 steps through a
2-layer ``nn.LSTM`` (Opacus: its ``DPLSTM`` through ``ModuleValidator.fix``). Batch 256, CIFAR-10 (the JPEG
pack when present, else random 3x32x32 data: the step time does not depend on the pixels).

* **mlaudit** runs the one training loop (``mlaudit.train.loop.train_stack``, K = 1, ``loop`` layout) with
  the ``fast`` recipe (SGD-Nesterov, crop + flip), non-private (bf16 autocast on CUDA, the recipe's
  default, and fp32) and private (``dp: {noise_multiplier: 1, clip: 1, sample_rate: 256/n}``, float32):
  ``mlaudit_dpsgd`` with ``clipping: per-example`` (torch.func per-example gradients) and
  ``mlaudit_dpsgd_fast`` with ``clipping: fast`` (book-keeping with ghost norms, mlaudit.privacy.fastclip;
  stride-1 convs by shifted windows of the padded input, no unfold), ``mlaudit_dpsgd_fast_unfold`` /
  ``_grouped`` the same with every conv unfolded by a strided im2col + one bmm / by a grouped
  ``convolution_backward`` (``--conv-materialise``), and on CUDA
  ``mlaudit_dpsgd_fast_tf32`` (float32 matmuls in TF32, ``torch.backends.cuda.matmul.allow_tf32``),
  ``mlaudit_dpsgd_fast_tf32norms`` (only the conv rules' per-example-norm matmuls in TF32,
  ``fastclip_rules.CONV_NORMS_TF32 = True``) and
  ``mlaudit_dpsgd_fast_bf16``: the fast path with ``precision: bf16`` (bf16 autocast forward, as the
  non-private recipe), and ``mlaudit_dpsgd_fast_graph`` (``_<conv>`` for the other conv options): the fast
  path (fp32) replayed as a CUDA graph (``cuda_graph: true``; mlaudit.train.graphed, one graph per slot bucket
  of 32; its step path is recorded as ``step_path``; CUDA only). The other private runs set ``cuda_graph: false`` (the eager step,
  as timed before the graphed step existed). ``mlaudit_dpsgd_fast_compiled`` / ``_graph_compiled``
  (``--runs compile,graph-compile``; CUDA only): ``compile: true``, the norms and sums compiled by inductor, eager /
  graphed, warmed up as the graphed run; ``_graph_compiled_tf32`` (``graph-compile-tf32``) the graphed one with
  TF32 float32 matmuls, as cuDNN computes the non-private step's weight gradients, and ``_graph_compiled_bf16``
  (``graph-compile-bf16``) with ``precision: bf16`` (the non-private recipe's autocast; its ratio to
  ``mlaudit_sgd_recipe`` is the like-for-like one); ``_graph_compiled_all`` (``graph-compile-all``, and ``-tf32``,
  ``-bf16``): the same three with book-keeping's recording forward and its backward to the layer outputs compiled
  too (``fastclip.COMPILE_RECORD``). When a compiled run is wanted, ``mlaudit_sgd_fp32_compiled`` (and with a bf16
  one ``mlaudit_sgd_recipe_compiled``) times the non-private step compiled and graphed as well, and the compiled
  rows' ratios to it are given beside the others. When a TF32 run is wanted, ``mlaudit_sgd_tf32`` times the
  non-private fp32 step with TF32 matmuls too, the like-for-like reference of the TF32 rows (a ViT's fp32 step
  is matmuls, which PyTorch keeps IEEE by default). One epoch of ``--steps`` steps warms up (``--graph-warmup-epochs``
  for the graphed run, so the rarer slot buckets are captured before the timed epoch),
  the next epoch of ``--steps`` steps is timed (the loop synchronises at the end of every epoch). mlaudit
  clips the widest Poisson batch of the step rounded up to a multiple of 8 (fast), 32 (per-example) or a
  bucket of 32 (graphed) (at most B_max = ceil(qn + 6 sqrt(qn)) + 1 = 353 slots for an expected 256).
* **Opacus** (optional: skipped when not installed) wraps the same architecture with
  ``PrivacyEngine.make_private`` (``grad_sample_mode="hooks"``, and ``"ghost"`` when supported), on a
  fixed batch of 256 on the device, plain SGD-momentum, fp32; beside it the same hand-written loop
  without privacy (fp32). ``--steps`` steps are timed after ``--warmup`` steps.

Peak GPU memory (``torch.cuda.max_memory_allocated``) is recorded per run.

Usage::

    python benchmarks/dp_throughput.py --device cuda --models resnet18,fastcnn,vit [--steps 20] [--runs fast,graph]
    python benchmarks/dp_throughput.py --device cpu --steps 2 --batch-size 8 --width 8 --name cpu_dryrun \\
        --models resnet18,fastcnn,vit

Writes benchmarks/results/dp_throughput[_<name>].{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._dynamo.utils import counters as dynamo_counters

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PACK_CANDIDATES, environment, sync, time_step, write_results  # noqa: E402

from mlaudit.data import load_dataset  # noqa: E402
from mlaudit.data.base import TensorDataset  # noqa: E402
from mlaudit.models import ModelSpec, build_model  # noqa: E402
from mlaudit.privacy import fastclip, fastclip_rules  # noqa: E402
from mlaudit.privacy.dpsgd import max_batch  # noqa: E402
from mlaudit.train.loop import init_models, resolve_augment, train_stack  # noqa: E402
from mlaudit.train.recipe import Recipe, resolve_recipe  # noqa: E402

Builder = Callable[[], nn.Module]


class Block(nn.Module):
    """Pre-norm transformer block on [B, T, d]: x + proj(attn(LN x)), then x + MLP(LN x)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """ViT-small for 32x32 images (Dosovitskiy et al. 2021): [B, 3, 32, 32] -> 64 tokens of 4x4 patches
    (Conv2d, stride 4) + learned positions (nn.Embedding) -> ``depth`` blocks -> LayerNorm -> mean -> logits."""

    def __init__(self, *, num_classes: int = 10, dim: int = 384, depth: int = 12, heads: int = 6, patch: int = 4,
                 image: int = 32, torch_blocks: bool = False) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.pos = nn.Embedding((image // patch) ** 2, dim)
        # torch_blocks: PyTorch's own pre-norm encoder layer (nn.MultiheadAttention inside), as a user would write it
        self.blocks = nn.Sequential(*[
            nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True) if torch_blocks else Block(dim, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2)
        # positions per example ([B, T], contiguous for Opacus), so every layer's output rows belong to one example
        h = h + self.pos(torch.arange(h.shape[1], device=h.device).repeat(h.shape[0], 1))
        return self.head(self.norm(self.blocks(h)).mean(1))


class RowLSTM(nn.Module):
    """An image's 32 rows as 32 steps of 96 values (3 channels x 32 pixels) through a 2-layer nn.LSTM of width
    ``hidden``, read at the last step: [B, 3, 32, 32] -> logits."""

    def __init__(self, hidden: int = 256, num_classes: int = 10) -> None:
        super().__init__()
        self.rnn, self.head = nn.LSTM(96, hidden, num_layers=2, batch_first=True), nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x.permute(0, 2, 1, 3).flatten(2))
        return self.head(out[:, -1])


def builder(name: str, width: int | None) -> tuple[Builder, dict[str, Any]]:
    """The model constructor and its description; ``width`` scales the zoo models, and is the ViT's dim."""
    if name == "lstm":
        hidden = width or 256
        return (lambda: RowLSTM(hidden)), {"name": "row LSTM (benchmark)", "hidden": hidden, "layers": 2, "steps": 32}
    if name in ("vit", "vit-mha"):
        dim = width or 384
        heads = next(h for h in (6, 4, 3, 2, 1) if dim % h == 0)
        mha = name == "vit-mha"
        return (lambda: ViT(dim=dim, heads=heads, torch_blocks=mha)), {
            "name": "vit-small (benchmark)" + (", nn.TransformerEncoderLayer blocks" if mha else ""), "dim": dim,
            "depth": 12, "heads": heads, "patch": 4}
    spec = ModelSpec(name=name, norm="group", width=width)
    return (lambda: build_model(spec, input_shape=(3, 32, 32), num_classes=10)), spec.model_dump()


def training_split(n: int, *, synthetic: bool) -> tuple[TensorDataset, str]:
    """n CIFAR-10 training images (the JPEG pack) or n random 3x32x32 images; and a description."""
    if not synthetic:
        for c in PACK_CANDIDATES:
            if c and Path(c).is_file():
                train = load_dataset({"name": "cifar10", "root": c}).train
                if len(train) >= n:
                    return train.subset(torch.arange(n)), f"CIFAR-10 (JPEG pack {c}), first {n} training images"
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    return TensorDataset(x, y, tuple(str(i) for i in range(10))), f"synthetic uniform 3x32x32, {n} images"


def time_mlaudit(fn: Builder, train: TensorDataset, recipe: Recipe, *, steps: int, device: torch.device,
                 name: str, warmup_epochs: int = 1, info: dict[str, Any] | None = None) -> float:
    """Steady-state seconds per step: ``warmup_epochs`` epochs (``steps`` steps each) warm up, the next one is
    timed; ``info`` gets the step path the loop reports (``cuda-graph``, ``eager``, ...) and, for a compiled run,
    how many graphs dynamo compiled during the timed epoch (``timed_epoch_compiles``; not 0 means a slot width met
    there for the first time was compiled inside the timing)."""
    marks: list[float] = []
    graphs: list[int] = []

    def on_epoch(_e: int, _loss: torch.Tensor) -> None:  # called after the loop's end-of-epoch sync
        sync()
        marks.append(time.perf_counter())
        graphs.append(dynamo_counters["stats"]["unique_graphs"])

    r = recipe.model_copy(update={"epochs": warmup_epochs + 1})
    augment = resolve_augment(r, "cifar10", (3, 32, 32))
    sync()
    out = train_stack(init_models(fn, [0]), train, r, seeds=[0], lr=r.resolved_lr(residual=True), device=device,
                      augment=augment, on_epoch=on_epoch, strategy="loop")
    assert out[0].steps == (warmup_epochs + 1) * steps, (name, out[0].steps)
    if info is not None:
        info["step_path"] = out[0].step_path
        if recipe.compile is True:
            info["timed_epoch_compiles"] = graphs[-1] - graphs[-2]
    return (marks[-1] - marks[-2]) / steps


def opacus_step(fn: Builder, mode: str | None, x: torch.Tensor, y: torch.Tensor, *, batch: int,
                bf16: bool = False) -> Callable[[], None]:
    """One training step of a hand-written loop: plain PyTorch (``mode`` None) or Opacus ``mode``."""
    model = fn().to(x.device)
    if mode is not None:
        from opacus.validators import ModuleValidator

        if not ModuleValidator.is_valid(model):  # nn.MultiheadAttention -> Opacus's DPMultiheadAttention, as its docs say
            model = ModuleValidator.fix(model).to(x.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    crit: Any = nn.CrossEntropyLoss()
    if mode is not None:
        from opacus import PrivacyEngine

        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x.cpu(), y.cpu()), batch_size=batch)
        kw: dict[str, Any] = dict(module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
                                  max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=mode)
        if mode == "ghost":
            model, opt, crit, _ = PrivacyEngine().make_private(criterion=crit, **kw)
        else:
            model, opt, _ = PrivacyEngine().make_private(**kw)
    model.train()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast:
            out = model(x)
        loss = crit(out.float(), y)
        loss.backward()
        opt.step()

    return step


def opacus_version() -> str | None:
    try:
        import opacus
    except ImportError:
        return None
    return str(opacus.__version__)


def set_conv(conv: str) -> None:
    """How fast clipping materialises conv per-example gradients: ``shift`` (stride-1 ungrouped convs by
    shifted windows, the others unfolded), ``unfold`` or ``grouped`` (every conv)."""
    fastclip_rules.CONV_SHIFT = conv == "shift"  # type: ignore[assignment]
    fastclip_rules.CONV_MATERIALISE = "unfold" if conv == "shift" else conv  # type: ignore[assignment]


def run_option(key: str) -> str:
    """The ``--runs`` option that times the private run ``key``."""
    parts = key.split("_")
    if "compiled" in parts:
        return (("graph-compile" if "graph" in parts else "compile") + ("-all" if "all" in parts else "")
                + ("-tf32" if "tf32" in parts else "") + ("-bf16" if "bf16" in parts else ""))
    return next((o for o in ("tf32norms", "tf32", "bf16", "graph") if o in parts), "per-example" if key == "mlaudit_dpsgd" else "fast")


def bench_model(fn: Builder, args: argparse.Namespace, device: torch.device, train: TensorDataset,
                opacus: str | None) -> dict[str, dict[str, Any]]:
    """All runs of one model: {run name: {s_per_step, examples_per_s, precision, peak_gpu_mem_mb | error}}."""
    bsz, steps, cuda = args.batch_size, args.steps, device.type == "cuda"
    n = len(train)
    runs: dict[str, dict[str, Any]] = {}

    def record(key: str, run: Callable[[], float], *, info: dict[str, Any] | None = None, **extra: Any) -> None:
        if key.startswith("mlaudit_dpsgd") and run_option(key) not in wanted:
            return
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            s = run()
        except Exception as e:  # noqa: BLE001 - a failing run (e.g. an Opacus mode, out of memory) is reported
            runs[key] = {"error": f"{type(e).__name__}: {e}"}
            print(f"  {key}: {type(e).__name__}: {e}", flush=True)
            return
        mem = round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None
        runs[key] = {"s_per_step": round(s, 5), "examples_per_s": round(bsz / s, 1), "peak_gpu_mem_mb": mem, **extra,
                     **(info or {})}
        print(f"  {key}: {s * 1e3:.1f} ms/step" + (f", peak {mem} MiB" if mem is not None else "")
              + (f", {info}" if info else ""), flush=True)

    def ml(recipe: Recipe, name: str, **kw: Any) -> Callable[[], float]:
        return lambda: time_mlaudit(fn, train, recipe, steps=steps, device=device, name=name, **kw)

    def in_tf32(run: Callable[[], float]) -> Callable[[], float]:
        """``run`` with every float32 matmul in TF32 (cuDNN's convolutions use TF32 by default already)."""
        def tf32() -> float:
            with fastclip_rules.matmul_tf32(True):
                return run()
        return tf32

    wanted = set(args.runs.split(","))  # the private runs to time (--runs)

    def with_flag(run: Callable[[], float], module: Any, flag: str, value: Any) -> Callable[[], float]:
        """``run`` with ``module.flag`` set to ``value``, restored after (a switch of mlaudit.privacy's modules)."""
        def flagged() -> float:
            before = getattr(module, flag)
            setattr(module, flag, value)
            try:
                return run()
            finally:
                setattr(module, flag, before)
        return flagged
    base = resolve_recipe({"name": "fast", "batch_size": bsz, "schedule": "constant"})
    record("mlaudit_sgd_recipe", ml(base, "sgd"), precision="bf16 autocast" if cuda else "fp32")
    if cuda:
        record("mlaudit_sgd_fp32", ml(base.model_copy(update={"precision": "fp32"}), "sgd32"), precision="fp32")
    if cuda and any("tf32" in w for w in wanted):  # the like-for-like reference of the TF32 rows
        record("mlaudit_sgd_tf32", in_tf32(ml(base.model_copy(update={"precision": "fp32"}), "sgd_tf32")),
               precision="fp32, TF32 matmuls")
    if cuda and any("compile" in w for w in wanted):  # the references of the compiled rows: the non-private step
        # compiled and graphed as well, so a compiled DP row's ratio to it does not credit DP with the compile
        for prec, ref in (("fp32", "mlaudit_sgd_fp32_compiled"), ("bf16", "mlaudit_sgd_recipe_compiled")):
            if prec == "bf16" and not any(w.endswith("bf16") for w in wanted):
                continue
            info: dict[str, Any] = {}
            record(ref, ml(base.model_copy(update={"precision": prec, "compile": True, "cuda_graph": True}), ref,
                           warmup_epochs=args.graph_warmup_epochs, info=info), info=info,
                   precision="bf16 autocast" if prec == "bf16" else "fp32")
    dp = {"noise_multiplier": 1.0, "clip": 1.0, "sample_rate": bsz / n}
    slots = max_batch(bsz / n, n)
    convs = args.conv_materialise.split(",")
    for key, clipping in (("mlaudit_dpsgd", "per-example"), ("mlaudit_dpsgd_fast", "fast")):
        private = resolve_recipe({**base.model_dump(), "precision": "fp32", "cuda_graph": False,
                                  "dp": {**dp, "clipping": clipping}})
        for conv in convs if clipping == "fast" else ["-"]:
            name = key if conv in ("-", convs[0]) else f"{key}_{conv}"
            set_conv(convs[0] if conv == "-" else conv)
            record(name, ml(private, name), precision="fp32", per_example_slots=slots, clipping=clipping,
                   conv_materialise=None if conv == "-" else conv)
    set_conv(convs[0])
    if cuda:  # the fast path with TF32 float32 matmuls
        private = resolve_recipe({**base.model_dump(), "precision": "fp32", "cuda_graph": False,
                                  "dp": {**dp, "clipping": "fast"}})
        record("mlaudit_dpsgd_fast_tf32", in_tf32(ml(private, "fast_tf32")), precision="fp32, TF32 matmuls",
               per_example_slots=slots, clipping="fast", conv_materialise=convs[0])
    if cuda:  # the fast path with TF32 conv-norm matmuls only (fastclip_rules.CONV_NORMS_TF32; the model's own matmuls
        # keep the user's setting)
        private = resolve_recipe({**base.model_dump(), "precision": "fp32", "cuda_graph": False,
                                  "dp": {**dp, "clipping": "fast"}})
        tf32norms = with_flag(ml(private, "fast_tf32norms"), fastclip_rules, "CONV_NORMS_TF32", True)
        record("mlaudit_dpsgd_fast_tf32norms", tf32norms, precision="fp32, TF32 conv-norm matmuls",
               per_example_slots=slots, clipping="fast", conv_materialise=convs[0])
    if cuda:  # the fast path with the recipe's bf16 autocast forward (precision: bf16)
        private = resolve_recipe({**base.model_dump(), "precision": "bf16", "cuda_graph": False,
                                  "dp": {**dp, "clipping": "fast"}})
        record("mlaudit_dpsgd_fast_bf16", ml(private, "fast_bf16"), precision="bf16 autocast",
               per_example_slots=slots, clipping="fast", conv_materialise=convs[0])
    if cuda:  # the fast path (fp32) replayed as one CUDA graph per slot bucket (CUDA graphs need a CUDA device)
        private = resolve_recipe({**base.model_dump(), "precision": "fp32", "cuda_graph": True,
                                  "dp": {**dp, "clipping": "fast"}})
        for conv in convs:
            name = "mlaudit_dpsgd_fast_graph" + ("" if conv == convs[0] else f"_{conv}")
            set_conv(conv)
            info = {}
            record(name, ml(private, name, warmup_epochs=args.graph_warmup_epochs, info=info), info=info,
                   precision="fp32", per_example_slots=slots, clipping="fast", conv_materialise=conv)
        set_conv(convs[0])
    if cuda:  # recipe.compile: true: the fast path's norms and sums compiled by inductor (a static graph, then one with
        # a dynamic batch size, or one per slot bucket where a layer is chunked), eager and inside the CUDA graph;
        # warmed up as the graphed run, so the buckets compile before the timed epoch
        for graph in (False, True):
            private = resolve_recipe({**base.model_dump(), "precision": "fp32", "cuda_graph": graph, "compile": True,
                                      "dp": {**dp, "clipping": "fast"}})
            name = "mlaudit_dpsgd_fast" + ("_graph" if graph else "") + "_compiled"
            info = {}
            record(name, ml(private, name, warmup_epochs=args.graph_warmup_epochs, info=info), info=info,
                   precision="fp32", per_example_slots=slots, clipping="fast", conv_materialise=convs[0])
        # the graphed compiled step with TF32 float32 matmuls (the per-example gradients, Grams and weighted sums,
        # and the model's Linear layers): the non-private step's weight gradients are cuDNN convolutions in TF32
        # already (cuDNN's default), the sums' matmuls IEEE (docs/privacy.md, "What bounds it"); where dynamo's
        # global-state guard covers the TF32 flag the sums compile again under it, in the warm-up (a compile inside
        # the timed epoch would show in timed_epoch_compiles). -bf16: under the non-private recipe's bf16 autocast,
        # each layer's norms and sum from its bf16 inputs and output gradients (half the per-example gradient
        # traffic), squared norms summed in float32. -all: the recording forward and its backward compiled too
        # (fastclip.COMPILE_RECORD), in each precision.
        # The other --conv-materialise options (_<conv>) in IEEE float32 only: which conv path compiles best.
        for conv in convs:
            set_conv(conv)
            for rec_too in (False, True):
                for prec in ("fp32", "tf32", "bf16") if conv == convs[0] else ("fp32",):
                    if rec_too is False and prec == "fp32" and conv == convs[0]:
                        continue  # mlaudit_dpsgd_fast_graph_compiled, above
                    name = ("mlaudit_dpsgd_fast_graph_compiled" + ("_all" if rec_too else "")
                            + ("" if prec == "fp32" else f"_{prec}") + ("" if conv == convs[0] else f"_{conv}"))
                    private = resolve_recipe({**base.model_dump(), "precision": "bf16" if prec == "bf16" else "fp32",
                                              "cuda_graph": True, "compile": True, "dp": {**dp, "clipping": "fast"}})
                    info = {}
                    run = ml(private, name, warmup_epochs=args.graph_warmup_epochs, info=info)
                    run = in_tf32(run) if prec == "tf32" else run
                    record(name, with_flag(run, fastclip, "COMPILE_RECORD", True) if rec_too else run, info=info,
                           precision={"fp32": "fp32", "tf32": "fp32, TF32 matmuls", "bf16": "bf16 autocast"}[prec],
                           per_example_slots=slots, clipping="fast", conv_materialise=conv, compiled_record=rec_too)
        set_conv(convs[0])

    x, y = train.x[:bsz].to(device), train.y[:bsz].to(device)
    record("torch_sgd_fp32", lambda: time_step(opacus_step(fn, None, x, y, batch=bsz), n=steps, warmup=args.warmup),
           precision="fp32")
    if opacus is not None:
        for mode in ("hooks", "ghost"):
            record(f"opacus_{mode}", lambda m=mode: time_step(opacus_step(fn, m, x, y, batch=bsz), n=steps,  # type: ignore[misc]
                                                               warmup=args.warmup), precision="fp32")
    return runs


def ratios(runs: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Private over non-private step time: mlaudit runs over mlaudit_sgd_{recipe,fp32}, Opacus over torch_sgd_fp32
    (and over mlaudit_sgd_recipe, the fastest non-private step of the run)."""
    t = {k: v["s_per_step"] for k, v in runs.items() if "s_per_step" in v}
    out = {}
    for k in (k for k in t if k.startswith("mlaudit_dpsgd")):
        for ref in ("mlaudit_sgd_recipe", "mlaudit_sgd_fp32") + (("mlaudit_sgd_tf32",) if "tf32" in k else ()) + (
                ("mlaudit_sgd_recipe_compiled", "mlaudit_sgd_fp32_compiled") if "compiled" in k else ()):
            if ref in t:
                out[f"{k} / {ref}"] = t[k] / t[ref]
    for k in (k for k in t if k.startswith("opacus_")):
        for ref in ("torch_sgd_fp32", "mlaudit_sgd_recipe"):
            if ref in t:
                out[f"{k} / {ref}"] = t[k] / t[ref]
    return {k: round(v, 2) for k, v in out.items() if math.isfinite(v)}


def table(name: str, desc: dict[str, Any], runs: dict[str, dict[str, Any]], rat: dict[str, float]) -> str:
    md = (f"## {name}\n\n`{desc}`\n\n| run | precision | ms/step | examples/s | peak GPU MiB |\n"
          "|---|---|---|---|---|\n")
    for k, v in runs.items():
        path = f", step path {v['step_path']}" if "step_path" in v else ""
        path += (f", {v['timed_epoch_compiles']} compile(s) in the timed epoch" if v.get("timed_epoch_compiles")
                 else "")
        md += (f"| {k} | {v.get('precision', '')}{path} | {v['s_per_step'] * 1e3:.1f} | {v['examples_per_s']} | "
               f"{v.get('peak_gpu_mem_mb') or ''} |\n" if "s_per_step" in v else f"| {k} | | failed: {v['error'][:80]} | | |\n")
    return md + "\n| ratio (slower by) | x |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rat.items()) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--models", default="resnet18", help="comma-separated: resnet18, fastcnn, vit, vit-mha, lstm")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (and as many warm-up steps)")
    ap.add_argument("--warmup", type=int, default=5, help="warm-up steps of the hand-written Opacus/PyTorch loops")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--width", type=int, default=None, help="model width (default: the zoo's; the ViT's dim)")
    ap.add_argument("--conv-materialise", default="shift,unfold",
                    help="fast-clipping conv per-example gradients: shift (stride-1 convs by shifted windows), "
                         "unfold and/or grouped (one run each; the first is the one named mlaudit_dpsgd_fast)")
    ap.add_argument("--runs", default="per-example,fast,tf32,tf32norms,bf16,graph",
                    help="private runs to time, comma-separated: per-example, fast (one per --conv-materialise), "
                         "tf32, tf32norms (TF32 conv-norm matmuls only), bf16, graph (the fast step as a CUDA graph), "
                         "compile, graph-compile (recipe.compile: true, eager / graphed), graph-compile-tf32 / "
                         "graph-compile-bf16 (the latter with TF32 matmuls / bf16 autocast), graph-compile-all, "
                         "graph-compile-all-tf32, graph-compile-all-bf16 (the same with the recording forward and "
                         "backward compiled too); all but per-example and fast on CUDA only")
    ap.add_argument("--graph-warmup-epochs", type=int, default=3,
                    help="warm-up epochs of the graphed run (each slot bucket is warmed up and captured once)")
    ap.add_argument("--synthetic", action="store_true", help="random data even when the CIFAR-10 pack exists")
    ap.add_argument("--no-opacus", action="store_true")
    ap.add_argument("--name", default=None, help="results file suffix")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="(Secure RNG turned off|Full backward hook is firing)")
    device = torch.device(args.device)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    if unknown := sorted(set(names) - {"resnet18", "fastcnn", "vit", "vit-mha", "lstm"}):
        raise SystemExit(f"unknown --models {unknown}; choose from resnet18, fastcnn, vit, vit-mha, lstm")
    bsz, steps = args.batch_size, args.steps
    n = bsz * steps
    train, data_desc = training_split(n, synthetic=args.synthetic)
    version = None if args.no_opacus else opacus_version()
    if "compile" in args.runs:
        # one process compiles the clipped sums (and with -all the recording pass) for every compiled row: fp32, TF32
        # and bf16 each get their own graphs (a static one, then a dynamic one), and where a rule chunks a layer, one
        # per slot bucket (about five; ResNet-18-GN with unfolded convs chunks at 224 slots, with shifted windows not
        # below 364, CPU count 2026-12-08). Past dynamo's default limit of 8 graphs per function the later ones would
        # run eagerly, unannounced in the timings
        import torch._dynamo.config as dynamo_config

        dynamo_config.cache_size_limit = 64
    opacus_note = ("skipped (--no-opacus)" if args.no_opacus else "skipped (opacus not installed)") \
        if version is None else f"opacus {version}"
    env = environment() | {"data": data_desc, "device": str(device), "opacus": version,
                           "dynamo_cache_size_limit": torch._dynamo.config.cache_size_limit}
    md = (f"# DP-SGD throughput, batch {bsz}\n\n{env['date']}, {env['gpu'] or 'CPU'}, torch {env['torch']}, "
          f"{opacus_note}; {data_desc}; {steps} timed steps after warm-up. mlaudit's DP step clips the sampled "
          f"batch rounded up to a multiple of 8 (fast) or 32 (per-example, and the graphed fast step's buckets) (at "
          f"most {max_batch(bsz / n, n)} slots; expected batch {bsz}); "
          + ("" if device.type == "cuda" else "the graphed DP step (mlaudit_dpsgd_fast_graph) needs CUDA: not run; ")
          + "goal (issue 15): mlaudit_dpsgd_fast / mlaudit_sgd <= 1.5.\n\n")
    results: dict[str, Any] = {}
    for name in names:
        fn, desc = builder(name, args.width)
        print(f"{name}:", flush=True)
        runs = bench_model(fn, args, device, train, version)
        rat = ratios(runs)
        results[name] = {"model": desc, "runs": runs, "ratios": rat}
        md += table(name, desc, runs, rat)
    write_results(f"dp_throughput{'_' + args.name if args.name else ''}",
                  {"environment": env, "batch_size": bsz, "steps": steps, "models": results,
                   "dp": {"noise_multiplier": 1.0, "clip": 1.0, "sample_rate": bsz / n}}, md)


if __name__ == "__main__":
    main()
