"""Does fast clipping's cost rule pick the fastest way per layer (issue 15 goal 1)? Per layer, measured.

The rule (``fastclip_rules.use_ghost`` / ``use_ghost_shifted``) chooses, per Conv2d / Linear layer, the ghost norm
or materialised per-example gradients by counting multiply-adds; ``CONV_SHIFT`` chooses shifted windows or unfolded
convs for every stride-1 conv at once. Counting multiply-adds ignores memory traffic (materialised gradients are
written once and read twice) and how well each shape runs. This probe records one batch's layer inputs and output
gradients (ResNet-18-GN and the fast CNN as dp_throughput builds them, ``--slots`` Poisson slots, random CIFAR-shaped
data, fp32, channels_last on CUDA as the loop runs them) and times, for every such layer, the norms plus the clipped
sum (``rule.norms`` then ``rule.sums``) in each way: {shifted windows, unfolded} x {ghost, materialise} for stride-1
convs, {ghost, materialise} for the others; eagerly and, with ``--compile``, each way as its own ``torch.compile``d
graph (static shape). It reports what the rule picks under each conv setting, the fastest way, and the totals: the
rule's choices against the per-layer best (an upper bound on what a better rule could save in these two parts of
the step; the recording pass, GroupNorm rules, clip factors and noise are not in it). Layers of one shape are timed
once (``same_as``). On an H100 each compile of a way should take a few seconds: about 12 distinct ResNet-18-GN layers
and 8 of the fast CNN, 2-4 ways each.

    python benchmarks/probes/dp_rule_oracle.py --device cuda --compile --out /tmp/w/dp_rule_oracle.json
    python benchmarks/probes/dp_rule_oracle.py --device cpu --width 8 --slots 16 --reps 2   # dry run
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import environment, sync, time_step  # noqa: E402
from dp_throughput import builder  # noqa: E402

from mlaudit.privacy import fastclip, fastclip_rules  # noqa: E402


def rule_choice(fn: Any) -> list[bool]:
    """The ghost-or-not decisions the cost rule makes while ``fn()`` runs (mode auto)."""
    seen: list[bool] = []
    plain, shifted = fastclip_rules.use_ghost, fastclip_rules.use_ghost_shifted

    def log(real: Any) -> Any:
        def wrapped(*a: Any, **kw: Any) -> bool:
            got = real(*a, **kw)
            seen.append(got)
            return got
        return wrapped

    fastclip_rules.use_ghost, fastclip_rules.use_ghost_shifted = log(plain), log(shifted)  # type: ignore[assignment]
    try:
        fn()
    finally:
        fastclip_rules.use_ghost, fastclip_rules.use_ghost_shifted = plain, shifted  # type: ignore[assignment]
    return seen


def layer_shape(m: nn.Module, a: torch.Tensor, g: torch.Tensor) -> dict[str, Any]:
    if isinstance(m, nn.Conv2d):
        return {"T": g.shape[2] * g.shape[3], "d_in": m.in_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups,
                "d_out": m.out_channels // m.groups, "stride1": tuple(m.stride) == (1, 1) and m.groups == 1}
    return {"T": a[0].numel() // a.shape[-1], "d_in": a.shape[-1], "d_out": g.shape[-1], "stride1": False}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet18,fastcnn", help="dp_throughput's builders: resnet18, fastcnn, vit")
    ap.add_argument("--slots", type=int, default=288, help="Poisson slots (expected batch 256 pads to ~288)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile", action="store_true", help="also time each way as its own compiled graph")
    ap.add_argument("--out", default="dp_rule_oracle.json")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if args.compile:
        import torch._dynamo.config as dynamo_config

        dynamo_config.cache_size_limit = 256  # one graph per layer and way
    out: dict[str, Any] = {"environment": environment(), "slots": args.slots, "reps": args.reps, "models": {}}
    for name in args.models.split(","):
        fn, desc = builder(name, args.width)
        torch.manual_seed(0)
        m = fn().to(dev)
        x = torch.randn(args.slots, 3, 32, 32, device=dev)
        if dev.type == "cuda":
            m, x = m.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (args.slots,), device=dev)
        f = torch.rand(args.slots, device=dev)  # clip factors: any weights time the same
        layers = fastclip._plan(m)
        with fastclip._all_require_grad(m):
            _, ag, _ = fastclip._forward(m, layers, x, y, 0.0, [])
        rows, timed = [], {}  # a layer of a shape timed before (ResNet-18 repeats most) reuses that row's timings
        for lay in layers:
            if not isinstance(lay.module, (nn.Conv2d, nn.Linear)) or lay.name not in ag:
                continue
            a, g = ag[lay.name]
            shape = layer_shape(lay.module, a, g)
            same = (repr(lay.module), tuple(a.shape), tuple(g.shape), a.stride(), g.stride())
            if same in timed:
                rows.append({**timed[same], "layer": lay.name, "same_as": timed[same]["layer"]})
                continue
            convs = ("shift", "unfold") if shape["stride1"] else ("unfold",)
            row: dict[str, Any] = {"layer": lay.name, "type": type(lay.module).__name__, **shape, "auto": {},
                                   "eager_ms": {}, "compiled_ms": {}}
            for conv, mode in itertools.product(convs, ("ghost", "materialise")):
                fastclip_rules.CONV_SHIFT = conv == "shift"  # type: ignore[assignment]

                def both(a: torch.Tensor, g: torch.Tensor, f: torch.Tensor, mode: str = mode,
                         lay: Any = lay) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
                    # the norms returned too: a compiled graph would drop what no output needs (a ghost norm)
                    sq, st = lay.rule.norms(lay.module, a, g, mode)
                    return sq, lay.rule.sums(lay.module, a, g, f, st)

                if mode == "ghost":  # once per conv setting: what the rule picks
                    picks = rule_choice(lambda: both(a, g, f, "auto"))
                    row["auto"][conv] = "ghost" if picks and picks[0] else "materialise"
                key = f"{conv}/{mode}"
                with torch.no_grad():
                    row["eager_ms"][key] = round(1e3 * time_step(lambda: both(a, g, f), args.reps), 3)
                    if args.compile:
                        torch._dynamo.reset()
                        c = torch.compile(both, dynamic=False)
                        sync()
                        t0 = time.perf_counter()
                        c(a, g, f)
                        sync()
                        row.setdefault("compile_s", {})[key] = round(time.perf_counter() - t0, 1)
                        row["compiled_ms"][key] = round(1e3 * time_step(lambda: c(a, g, f), args.reps), 3)
            fastclip_rules.CONV_SHIFT = None  # type: ignore[assignment]
            rows.append(row)
            timed[same] = row
            out["models"][name] = {"model": desc, "layers": rows, "partial": True}
            Path(args.out).write_text(json.dumps(out, indent=2))  # each layer as it is timed: a timeout keeps them
            print(name, row["layer"], row["T"], row["d_in"], row["d_out"], "auto", row["auto"], "eager",
                  row["eager_ms"], "compiled", row["compiled_ms"], flush=True)
        totals: dict[str, float] = {}
        for kind in ("eager_ms", "compiled_ms") if args.compile else ("eager_ms",):
            for conv in ("shift", "unfold"):  # the rule's picks under each conv setting (unfold where no shift)
                totals[f"{kind} rule, {conv}"] = round(sum(
                    r[kind][f"{c}/{r['auto'][c]}"] for r in rows
                    for c in [conv if conv in r["auto"] else "unfold"]), 3)
            totals[f"{kind} per-layer best"] = round(sum(min(r[kind].values()) for r in rows), 3)
        out["models"][name] = {"model": desc, "layers": rows, "totals": totals}
        print(name, totals, flush=True)
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
