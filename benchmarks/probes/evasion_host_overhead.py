"""Probe (issue 16): the fixed host cost of one mlaudit evasion call, on a CPU, against torchattacks 3.5.1 and a bare
hand-written loop of the same steps (the floor).

On the H200 FGSM and PGD-10 l2 missed torchattacks' wall time by 0.5-1.8 ms per call (docs/evasion.md, "The fixed
costs, located"), Python work on the host before the first forward pass and after the last. That work hardly depends
on the accelerator, so this probe measures it on a CPU core where the model's math is negligible:

* ``tiny``: one ``nn.Linear`` on 8x8 inputs (10 classes), built so that no example is fooled within eps (the
  classes are orthogonal +-1 patterns with a wide margin): every library runs every step on the whole batch, as on
  the H200's robust rows, and the three timings differ only by host work;
* ``resnet``: the same robust head plus 1e-3 x a CIFAR ResNet-18 of width 1 (the module tree of ResNet-18, 69
  modules, 62 parameter tensors, with next to no arithmetic), for costs that scale with the model's size (the
  eval-mode guard walks every module and parameter).

Each attack is called as benchmarks/evasion.py calls it (mlaudit with a fresh CPU generator per call,
torchattacks' attack object built once); ``bare`` is the same forward / backward / step / projection in a few
lines (``torch.autograd.grad``, no checks, no bookkeeping). The three are interleaved, the order rotated each
repetition, after warm-up calls; one thread (``torch.set_num_threads(1)``); medians of per-call microseconds and
the median of the paired differences. The model records the host clock at each forward pass, which splits every
call into ``lead`` (start -> first forward: on a GPU, time the device idles), steps, and ``tail`` (last forward ->
return). ``--breakdown`` adds where mlaudit's lead and tail go (stamps when ``check_inputs`` returns and when the
engine is entered and left), its parts timed alone, and a cProfile of repeated calls (top functions by own time).

    python benchmarks/probes/evasion_host_overhead.py [--reps 301] [--batch 32] [--breakdown] [--json out.json]
    python benchmarks/probes/evasion_host_overhead.py --src /tmp/before/src --json before.json   # the code before
    python benchmarks/probes/evasion_host_overhead.py --report --before b1.json b2.json --after a1.json a2.json \\
        --out benchmarks/results/evasion_host_overhead_cpu   # writes .json and .md
        [--title "..." --before-commit abc1234 --after-commit def5678]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import platform
import pstats
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[2]
# --src DIR: import mlaudit from another tree (e.g. `git archive <commit> src | tar -x -C /tmp/before`), to time the
# code before a change with the same probe
_SRC = sys.argv[sys.argv.index("--src") + 1] if "--src" in sys.argv else str(ROOT / "src")
sys.path.insert(0, _SRC)

from mlaudit.attacks.evasion import fgsm, pgd  # noqa: E402
from mlaudit.attacks.evasion.base import EvasionObjective, check_inputs, check_loss, make_constraint  # noqa: E402
from mlaudit.craft import craft  # noqa: E402
from mlaudit.models.resnet import ResNet  # noqa: E402
from mlaudit.query.modes import evaluating  # noqa: E402

EPS, EPS_L2 = 8 / 255, 0.5
ATTACKS = ("FGSM linf", "PGD-10 l2", "PGD-20 linf")


class RobustHead(nn.Module):
    """Logits W x with W the +-1 patterns of 10 classes (rows of a Hadamard matrix): an input 0.5 + 0.4 p_y is
    classified y with a margin of 25.6, which no perturbation within eps 8/255 (l-inf, at most 8.1) or 0.5 (l2, at
    most 5.7) closes. ``body`` (optional) is added at 1e-3."""

    def __init__(self, body: nn.Module | None = None) -> None:
        super().__init__()
        h = torch.ones(1, 1)
        while h.shape[0] < 64:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        self.head = nn.Linear(64, 10, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(h[1:11])
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        z = self.head(x.flatten(1))
        return z if self.body is None else z + 1e-3 * self.body(x)


class Stamped(nn.Module):
    """``inner`` with the host clock (ns) read at the entry and exit of every forward call, in ``marks``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.marks: list[tuple[int, int]] = []

    def forward(self, x: Tensor) -> Tensor:
        t0 = time.perf_counter_ns()
        z = self.inner(x)
        self.marks.append((t0, time.perf_counter_ns()))
        return z


def make(model_kind: str, batch: int) -> tuple[Stamped, Tensor, Tensor]:
    torch.manual_seed(0)
    body = None
    if model_kind == "resnet":
        body = ResNet((2, 2, 2, 2), in_channels=1, num_classes=10, width=1, norm="batch")
    head = RobustHead(body)
    model = Stamped(head).eval()
    y = torch.arange(batch) % 10
    x = (0.5 + 0.4 * head.head.weight.detach()[y]).view(batch, 1, 8, 8)
    x = (x + 0.05 * torch.rand(x.shape)).clamp(0, 1)
    return model, x, y


# ---- the floor: the same steps, hand-written ----

def bare_fgsm(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    xr = x.detach().requires_grad_(True)
    g, = torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
    return (x + EPS * g.sign()).clamp(0, 1)


def bare_pgd_linf(model: nn.Module, x: Tensor, y: Tensor, steps: int = 20) -> Tensor:
    gen = torch.Generator().manual_seed(0)
    alpha = EPS / 8
    delta = (torch.rand(x.shape, generator=gen) * 2 - 1) * EPS
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        g, = torch.autograd.grad(F.cross_entropy(model(x + delta), y, reduction="sum"), delta)
        delta = (delta.detach() + alpha * g.sign()).clamp(-EPS, EPS)
        delta = (x + delta).clamp(0, 1) - x
    return x + delta


def _unit(v: Tensor) -> Tensor:
    return v / v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (v.dim() - 1)))


def bare_pgd_l2(model: nn.Module, x: Tensor, y: Tensor, steps: int = 10) -> Tensor:
    gen = torch.Generator().manual_seed(0)
    alpha = EPS_L2 / 4
    shape = (-1, *([1] * (x.dim() - 1)))
    delta = _unit(torch.randn(x.shape, generator=gen)) * (EPS_L2 * torch.rand(len(x), generator=gen)).view(shape)
    delta = (x + delta).clamp(0, 1) - x
    for _ in range(steps):
        delta.requires_grad_(True)
        g, = torch.autograd.grad(F.cross_entropy(model(x + delta), y, reduction="sum"), delta)
        delta = delta.detach() + alpha * _unit(g)
        delta = delta * (EPS_L2 / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1.0).view(shape)
        delta = (x + delta).clamp(0, 1) - x
    return x + delta


def contenders(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, dict[str, Callable[[], Tensor]]]:
    """attack -> {mlaudit, torchattacks, bare}: argument-free calls on the same model and inputs, mlaudit's as
    benchmarks/evasion.py makes them (a fresh seeded CPU generator per PGD call)."""
    import torchattacks

    ta_fgsm = torchattacks.FGSM(model, eps=EPS)
    ta_l2 = torchattacks.PGDL2(model, eps=EPS_L2, alpha=EPS_L2 / 4, steps=10, random_start=True)
    ta_linf = torchattacks.PGD(model, eps=EPS, alpha=EPS / 8, steps=20, random_start=True)
    return {
        "FGSM linf": {"mlaudit": lambda: fgsm(model, x, y, eps=EPS),
                      "torchattacks": lambda: ta_fgsm(x, y),
                      "bare": lambda: bare_fgsm(model, x, y)},
        "PGD-10 l2": {"mlaudit": lambda: pgd(model, x, y, eps=EPS_L2, norm="l2", steps=10, step_size=EPS_L2 / 4,
                                             generator=torch.Generator().manual_seed(0)),
                      "torchattacks": lambda: ta_l2(x, y),
                      "bare": lambda: bare_pgd_l2(model, x, y)},
        "PGD-20 linf": {"mlaudit": lambda: pgd(model, x, y, eps=EPS, steps=20, step_size=EPS / 8,
                                               generator=torch.Generator().manual_seed(0)),
                        "torchattacks": lambda: ta_linf(x, y),
                        "bare": lambda: bare_pgd_linf(model, x, y)},
    }


def interleaved(fns: dict[str, Callable[[], Tensor]], model: Stamped, reps: int, warmup: int) -> dict[str, Any]:
    """Per-call microseconds of each function, called in turn (order rotated each repetition): medians, quartiles
    and the median of the paired differences to ``mlaudit``; and the call's timeline from the model's forward
    stamps: ``lead`` (call start -> first forward pass entered: validation and setup, on a GPU time with the device
    idle), ``tail`` (last forward pass left -> the call returns: the last loss, backward, step, read-back and
    wrap-up) and ``per_step`` ((wall - lead - tail) / (forward passes - 1): one step's loss, backward, step and
    projection, plus the next forward pass)."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    lines: dict[str, list[tuple[float, float, float, int]]] = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % len(names):] + names[:r % len(names)]:
            model.marks = []
            t0 = time.perf_counter_ns()
            fns[n]()
            t1 = time.perf_counter_ns()
            times[n].append((t1 - t0) / 1e3)
            m = model.marks
            lead, tail = (m[0][0] - t0) / 1e3, (t1 - m[-1][1]) / 1e3
            lines[n].append((lead, tail, ((t1 - t0) / 1e3 - lead - tail) / max(len(m) - 1, 1), len(m)))
    out: dict[str, Any] = {}
    for n in names:
        q = statistics.quantiles(times[n], n=4)
        out[n] = {"median_us": statistics.median(times[n]), "q1_us": q[0], "q3_us": q[2],
                  "lead_us": statistics.median(v[0] for v in lines[n]),
                  "tail_us": statistics.median(v[1] for v in lines[n]),
                  "per_step_us": statistics.median(v[2] for v in lines[n]),
                  "forwards": statistics.median(v[3] for v in lines[n])}
    for n in names:
        if n != "mlaudit":
            out[f"mlaudit_minus_{n}_us"] = statistics.median(a - b for a, b in zip(times["mlaudit"], times[n]))
    return out


def _median_us(fn: Callable[[], object], reps: int) -> float:
    for _ in range(max(3, reps // 10)):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        fn()
        ts.append((time.perf_counter_ns() - t0) / 1e3)
    return statistics.median(ts)


def breakdown(model: nn.Module, x: Tensor, y: Tensor, reps: int) -> dict[str, dict[str, float]]:
    """The parts of mlaudit's calls, each timed alone (median us): validation, the engine's setup objects, the
    eval-mode guard, the engine itself (the crafting loop) and the floor's loop."""
    out: dict[str, dict[str, float]] = {}
    for attack, norm, eps, steps, lr, init in (("FGSM linf", "linf", EPS, 1, 1.0, "zero"),
                                                ("PGD-10 l2", "l2", EPS_L2, 10, 0.25, "random"),
                                                ("PGD-20 linf", "linf", EPS, 20, 1 / 8, "random")):
        objective = EvasionObjective(model, y, loss="ce")
        constraint = make_constraint(norm, eps, (0.0, 1.0))

        def run_craft(objective=objective, constraint=constraint, steps=steps, lr=lr, init=init) -> object:
            return craft(objective, x, constraint=constraint, steps=steps, optimizer="pgd", lr=lr,
                         schedule="constant", init=init, generator=torch.Generator().manual_seed(0),
                         keep_best=False, early_stop=attack != "FGSM linf", final_eval=False)

        def guard() -> None:
            with evaluating(model, requires_grad=False):
                pass

        def guarded_craft(run_craft=run_craft) -> object:
            with evaluating(model, requires_grad=False):
                return run_craft()

        bare = {"FGSM linf": bare_fgsm, "PGD-10 l2": bare_pgd_l2, "PGD-20 linf": bare_pgd_linf}[attack]
        parts = {
            "check_inputs (probe cached)": lambda norm=norm, eps=eps: check_inputs(model, x, y, eps=eps, norm=norm),
            "check_loss": lambda: check_loss("ce", 10, targeted=False),
            "torch.Generator().manual_seed(0)": lambda: torch.Generator().manual_seed(0),
            "EvasionObjective(...)": lambda: EvasionObjective(model, y, loss="ce"),
            "make_constraint": lambda norm=norm, eps=eps: make_constraint(norm, eps, (0.0, 1.0)),
            "evaluating(model, requires_grad=False) enter+exit": guard,
            "craft (engine, params frozen)": guarded_craft,
            "bare loop (floor)": lambda bare=bare: bare(model, x, y),
        }
        if attack == "PGD-10 l2":
            parts["craft l2 random_init alone"] = lambda: constraint.random_init(x, torch.Generator().manual_seed(0))
        out[attack] = {k: _median_us(f, reps) for k, f in parts.items()}
    return out


def split(calls: dict[str, dict[str, Callable[[], Tensor]]], model: Stamped, reps: int) -> dict[str, dict[str, float]]:
    """Where mlaudit's lead and tail go (median us): host clock stamps at the call's start, after ``check_inputs``
    returns, when the engine (``craft``) is entered, at the first forward pass's entry, at the last forward pass's
    exit, when ``craft`` returns, and at the call's end (the stamps wrap the module globals ``check_inputs`` of
    fgsm.py / pgd.py and ``craft`` of base.py for the duration of this function)."""
    mods = [sys.modules[f"mlaudit.attacks.evasion.{m}"] for m in ("fgsm", "pgd")]
    base = sys.modules["mlaudit.attacks.evasion.base"]
    stamps: dict[str, int] = {}
    orig_check, orig_craft = base.check_inputs, base.craft

    def check(*a: Any, **k: Any) -> int:
        out = orig_check(*a, **k)
        stamps["checked"] = time.perf_counter_ns()
        return out

    def crafted(*a: Any, **k: Any) -> Any:
        stamps["craft_in"] = time.perf_counter_ns()
        out = orig_craft(*a, **k)
        stamps["craft_out"] = time.perf_counter_ns()
        return out

    for m in mods:
        m.check_inputs = check
    base.craft = crafted
    out: dict[str, dict[str, float]] = {}
    try:
        for attack in ATTACKS:
            fn = calls[attack]["mlaudit"]
            for _ in range(10):
                fn()
            rows: list[dict[str, float]] = []
            for _ in range(reps):
                model.marks = []
                t0 = time.perf_counter_ns()
                fn()
                t1 = time.perf_counter_ns()
                first, last = model.marks[0][0], model.marks[-1][1]
                rows.append({"lead: start -> check_inputs done": stamps["checked"] - t0,
                             "lead: -> craft entered (run_engine setup, eval-mode guard entered)":
                                 stamps["craft_in"] - stamps["checked"],
                             "lead: -> first forward (engine setup)": first - stamps["craft_in"],
                             "tail: last forward -> craft returns (last loss, backward, step, read-back)":
                                 stamps["craft_out"] - last,
                             "tail: -> return (eval-mode guard left, x + delta)": t1 - stamps["craft_out"]})
            out[attack] = {k: statistics.median(r[k] for r in rows) / 1e3 for k in rows[0]}
    finally:
        for m in mods:
            m.check_inputs = orig_check
        base.craft = orig_craft
    return out


def engine_items(batch: int, reps: int = 3000) -> dict[str, float]:
    """Pieces of the engine's (mlaudit.craft) step, setup and read-back, each timed alone in a loop on ``tiny``'s
    shapes (median us): what an engine change could save per step or per call on the host."""
    import math

    from mlaudit.craft import L2Ball, LinfBall
    from mlaudit.craft.engine import _project
    from mlaudit.craft.steps import UPDATES, StepInfo

    x = torch.rand(batch, 1, 8, 8)
    delta, grad = torch.rand(1, batch, 1, 8, 8) * 0.01, torch.randn(1, batch, 1, 8, 8)
    done, frozen, totals = torch.zeros(1, batch, dtype=torch.bool), torch.zeros(batch, dtype=torch.bool), torch.zeros(1)
    per, out_obj = torch.randn(1, batch), torch.full((1, batch), math.inf)
    out_done = torch.zeros(1, batch, dtype=torch.bool)
    linf, l2 = LinfBall(EPS), L2Ball(EPS_L2)
    hist = [torch.zeros(1) for _ in range(10)]

    def no_grad() -> None:
        with torch.no_grad():
            pass

    def read_back() -> object:
        h = torch.cat([*hist, totals.float(), out_obj.flatten(), out_done.flatten().float()]).cpu()
        return h[:10].view(-1, 1).tolist(), h[10:11].tolist(), h[11:11 + batch].view(1, -1), h[11 + batch:].bool()

    items: dict[str, Callable[[], object]] = {
        "early-stop count per step (frozen | done.all(0); stack of two sums; tolist)":
            lambda: torch.stack([(frozen | done.all(0)).sum(), (~torch.isfinite(totals)).sum()]).tolist(),
        "StepInfo(...) per step": lambda: StepInfo(linf, x, per, 0, 10),
        "pgd update, l-inf (steepest + sub_)": lambda: UPDATES["pgd"](delta.clone(), grad, {}, 0.01, 1,
                                                                      StepInfo(linf, x, per, 0, 10)),
        "pgd update, l2 (unit l2 + sub_)": lambda: UPDATES["pgd"](delta.clone(), grad, {}, 0.01, 1,
                                                                  StepInfo(l2, x, per, 0, 10)),
        "_project, l-inf": lambda: _project(linf, delta, x),
        "_project, l2": lambda: _project(l2, delta, x),
        "hand-written l-inf projection ((x + d.clamp).clamp - x)": lambda: (x + delta[0].clamp(-EPS, EPS)).clamp(0, 1) - x,
        "setup allocations (2 arange, zeros_like, empty_like, full, 3 zeros)":
            lambda: (torch.arange(batch), torch.zeros_like(x), torch.empty_like(delta), torch.full((1, batch), math.inf),
                     torch.zeros(1, batch, dtype=torch.bool), torch.zeros(batch, dtype=torch.bool), torch.zeros(1),
                     torch.arange(batch)),
        "read-back (cat of 10 steps' history and the results, .cpu(), views, tolist)": read_back,
        "per-step result writes (out_done, out_obj)":
            lambda: (out_done.__setitem__((slice(None), slice(None)), done),
                     out_obj.__setitem__((slice(None), slice(None)), per)),
        "torch.no_grad() enter + exit": no_grad,
    }
    return {k: _median_us(f, reps) for k, f in items.items()}


def profile(fn: Callable[[], object], calls: int, top: int = 25) -> str:
    """cProfile of ``calls`` calls of fn: the top functions by own time, in microseconds per call of fn."""
    for _ in range(5):
        fn()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    st = pstats.Stats(pr)
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]  # (cc, nc, tt, ct, callers)
    lines = [f"{'own us/call':>12} {'cum us/call':>12} {'calls/call':>10}  function"]
    for (file, line, name), (_cc, nc, tt, ct, _callers) in rows:
        where = f"{Path(file).name}:{line}" if line else file
        lines.append(f"{1e6 * tt / calls:12.1f} {1e6 * ct / calls:12.1f} {nc / calls:10.1f}  {name} ({where})")
    return "\n".join(lines)


def check_same(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, float]:
    """max |mlaudit - floor| per attack: the floor does the same arithmetic (a sanity check of the comparison)."""
    calls = contenders(model, x, y)
    return {a: float((calls[a]["mlaudit"]() - calls[a]["bare"]()).abs().max()) for a in ATTACKS}


def meta() -> dict[str, Any]:
    import torchattacks

    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu": cpu, "cores": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "torchattacks": torchattacks.__version__,
            "commit": commit.strip()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,resnet")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=301, help="interleaved calls per contender")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--attacks", default=";".join(ATTACKS))
    ap.add_argument("--breakdown", action="store_true", help="also time mlaudit's parts and cProfile it")
    ap.add_argument("--engine-items", action="store_true", help="only time pieces of the engine (mlaudit.craft) alone")
    ap.add_argument("--label", default="", help="a name for this run (e.g. before / after)")
    ap.add_argument("--src", help="the source tree mlaudit is imported from (default: this checkout's src)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--report", action="store_true", help="write --out .json/.md from the --before and --after files")
    ap.add_argument("--before", type=Path, nargs="+", default=[])
    ap.add_argument("--after", type=Path, nargs="+", default=[])
    ap.add_argument("--note", default="", help="a sentence for the report's header")
    ap.add_argument("--title", default="Evasion attacks: the fixed host cost of one call, on a CPU (issue 16)")
    ap.add_argument("--before-commit", help="the commit the before runs imported (default: the runs' checkout HEAD)")
    ap.add_argument("--after-commit", help="the commit the after runs imported (default: 'the change of this commit')")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.report:
        return report(args.before, args.after, args.out, args.note, title=args.title,
                      before_commit=args.before_commit, after_commit=args.after_commit)
    torch.set_num_threads(1)
    if args.engine_items:
        for k, v in engine_items(args.batch).items():
            print(f"{v:8.2f} us  {k}")
        return None
    import mlaudit

    info = {**meta(), "mlaudit_from": str(Path(mlaudit.__file__).parents[1]), "threads": 1, "batch": args.batch, "reps": args.reps, "warmup": args.warmup,
            "label": args.label, "eps_linf": EPS, "eps_l2": EPS_L2}
    results: dict[str, Any] = {"meta": info, "models": {}}
    print(json.dumps(info), flush=True)
    for kind in args.models.split(","):
        model, x, y = make(kind, args.batch)
        assert (model(x).argmax(1) == y).all()  # and stays so within eps: no library stops early
        res: dict[str, Any] = {"max_abs_diff_to_floor": check_same(model, x, y), "timing": {}}
        print(f"\n== {kind} (batch {args.batch}, x {list(x.shape)}): max |mlaudit - floor| "
              f"{res['max_abs_diff_to_floor']}", flush=True)
        calls = contenders(model, x, y)
        for attack in args.attacks.split(";"):
            r = interleaved(calls[attack], model, args.reps, args.warmup)
            res["timing"][attack] = r
            print(f"{attack:12s} mlaudit {r['mlaudit']['median_us']:8.1f} us  torchattacks "
                  f"{r['torchattacks']['median_us']:8.1f} us  bare {r['bare']['median_us']:8.1f} us  | paired: "
                  f"mlaudit - torchattacks {r['mlaudit_minus_torchattacks_us']:+7.1f} us, mlaudit - bare "
                  f"{r['mlaudit_minus_bare_us']:+7.1f} us", flush=True)
            for n in ("mlaudit", "torchattacks", "bare"):
                print(f"    {n:12s} lead {r[n]['lead_us']:7.1f} us  tail {r[n]['tail_us']:7.1f} us  per step "
                      f"{r[n]['per_step_us']:7.1f} us  forwards {r[n]['forwards']:.0f}", flush=True)
        if args.breakdown:
            res["split"] = split(calls, model, max(101, args.reps // 2))
            for attack, parts in res["split"].items():
                print(f"-- {attack}: mlaudit's lead and tail (median us)")
                for k, v in parts.items():
                    print(f"   {v:9.1f}  {k}")
            res["breakdown"] = breakdown(model, x, y, max(101, args.reps // 2))
            for attack, parts in res["breakdown"].items():
                print(f"-- {attack} parts (median us, each alone)")
                for k, v in parts.items():
                    print(f"   {v:9.1f}  {k}")
            res["profile"] = {}
            for attack in ("FGSM linf", "PGD-10 l2"):
                for who in ("mlaudit", "bare"):
                    text = profile(calls[attack][who], calls=200)
                    res["profile"][f"{attack} {who}"] = text
                    print(f"-- cProfile {attack} {who} (per call)\n{text}")
        results["models"][kind] = res
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


def report(befores: list[Path], afters: list[Path], out: Path, note: str = "", *,
           title: str = "Evasion attacks: the fixed host cost of one call, on a CPU (issue 16)",
           before_commit: str | None = None, after_commit: str | None = None) -> None:
    """out.json (every run) and out.md: per-call us before / after for each run pair, against torchattacks and the
    floor, the lead / tail timeline and the split of mlaudit's call (from the runs made with --breakdown)."""
    bs = [json.loads(p.read_text()) for p in befores]
    as_ = [json.loads(p.read_text()) for p in afters]
    out.with_suffix(".json").write_text(json.dumps({"note": note, "before_commit": before_commit,
                                                    "after_commit": after_commit, "before": bs, "after": as_},
                                                   indent=1))
    m = as_[0]["meta"]
    when = "; ".join(f"run {k + 1}: before {b['meta']['date']}, after {a['meta']['date']}"
                     for k, (b, a) in enumerate(zip(bs, as_)))
    after_text = f"commit {after_commit}" if after_commit else "the change of this commit"
    lines = [f"# {title}", "",
             f"`python benchmarks/probes/evasion_host_overhead.py --reps {m['reps']} [--breakdown] [--src DIR] --json ...` "
             f"({when}). Before: mlaudit at commit {before_commit or bs[0]['meta']['commit']} (imported with `--src` "
             f"from a `git archive` of it), after: {after_text}, same probe. "
             f"{m['cpu']}, 2 cores shared with other jobs (timings are noisy: medians, and mlaudit, torchattacks and "
             f"the floor interleaved with the order rotated each repetition), `torch.set_num_threads(1)`; Python "
             f"{m['python']}, torch {m['torch']}, torchattacks {m['torchattacks']}. {m['warmup']} warm-up calls each, "
             f"then {m['reps']} timed calls each; per-call medians in microseconds, and the median of the paired "
             "per-repetition differences. " + note, "",
             f"Models (batch {m['batch']}, inputs [{m['batch']}, 1, 8, 8]): `tiny`, one Linear whose classes are "
             "orthogonal +-1 patterns, so no example is fooled within eps and every library runs every step on the "
             "whole batch (the math is negligible: what is left is host work); `resnet`, the same head plus a "
             "width-1 CIFAR ResNet-18 at 1e-3 (ResNet-18's 69 modules and 62 parameter tensors, little arithmetic). "
             f"eps {m['eps_linf']:.4f} (8/255, l-inf) and {m['eps_l2']} (l2); FGSM one signed step; PGD-10 l2 step "
             "eps/4 and PGD-20 l-inf step eps/8, random start, as benchmarks/evasion.py calls them. `bare`: the same "
             "steps hand-written (torch.autograd.grad, no checks, no bookkeeping), the floor.", ""]
    for kind in as_[0]["models"]:
        lines += [f"## {kind}", "",
                  "Per call, medians of the runs (us; `a / b` = run 1 / run 2): mlaudit before and after, and after "
                  "the change against torchattacks and the floor (`bare`), each from the interleaved run it was timed "
                  "in.", "",
                  "| attack | mlaudit before | mlaudit after | torchattacks (after runs) | bare (after runs) | "
                  "after / torchattacks | after / bare |", "|---|---:|---:|---:|---:|---:|---:|"]
        for attack in as_[0]["models"][kind]["timing"]:
            tb = [b["models"][kind]["timing"][attack] for b in bs]
            ta = [a["models"][kind]["timing"][attack] for a in as_]

            def col(rs: list[dict[str, Any]], who: str) -> str:
                return " / ".join(f"{r[who]['median_us']:.0f}" for r in rs)

            def ratio(rs: list[dict[str, Any]], who: str) -> str:
                return " / ".join(f"{r['mlaudit']['median_us'] / r[who]['median_us']:.2f}" for r in rs)

            lines.append(f"| {attack} | {col(tb, 'mlaudit')} | {col(ta, 'mlaudit')} | {col(ta, 'torchattacks')} | "
                         f"{col(ta, 'bare')} | {ratio(ta, 'torchattacks')} | {ratio(ta, 'bare')} |")
        lines += ["", "Each run pair in full:", "",
                  "| attack | run | mlaudit before | mlaudit after | torchattacks (before run / after run) | bare "
                  "(before run / after run) | mlaudit - torchattacks, paired: before -> after | mlaudit - bare, "
                  "paired: before -> after |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for attack in as_[0]["models"][kind]["timing"]:
            for k, (b, a) in enumerate(zip(bs, as_)):
                rb, ra = b["models"][kind]["timing"][attack], a["models"][kind]["timing"][attack]
                lines.append(
                    f"| {attack} | {k + 1} | {rb['mlaudit']['median_us']:.0f} | {ra['mlaudit']['median_us']:.0f} | "
                    f"{rb['torchattacks']['median_us']:.0f} / {ra['torchattacks']['median_us']:.0f} | "
                    f"{rb['bare']['median_us']:.0f} / {ra['bare']['median_us']:.0f} | "
                    f"{rb['mlaudit_minus_torchattacks_us']:+.0f} -> {ra['mlaudit_minus_torchattacks_us']:+.0f} | "
                    f"{rb['mlaudit_minus_bare_us']:+.0f} -> {ra['mlaudit_minus_bare_us']:+.0f} |")
        lines += ["", "Timeline of a call (run 1, medians, us): `lead` = call start -> first forward pass entered "
                  "(on a GPU the device idles through it); `tail` = last forward pass left -> return; `step` = one "
                  "step between forward passes.", "",
                  "| attack | who | lead before | lead after | tail before | tail after | step before | step after |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for attack in as_[0]["models"][kind]["timing"]:
            rb, ra = bs[0]["models"][kind]["timing"][attack], as_[0]["models"][kind]["timing"][attack]
            for who in ("mlaudit", "torchattacks", "bare"):
                lines.append(f"| {attack} | {who} | {rb[who]['lead_us']:.1f} | {ra[who]['lead_us']:.1f} | "
                             f"{rb[who]['tail_us']:.1f} | {ra[who]['tail_us']:.1f} | {rb[who]['per_step_us']:.1f} | "
                             f"{ra[who]['per_step_us']:.1f} |")
        sb, sa = bs[0]["models"][kind].get("split"), as_[0]["models"][kind].get("split")
        if sb and sa:
            lines += ["", "Where mlaudit's lead and tail go (run 1, host clock stamps inside the call, medians, us; "
                      "before -> after):", "", "| stretch | " + " | ".join(sa) + " |", "|---|" + "---:|" * len(sa)]
            for k in next(iter(sa.values())):
                lines.append(f"| {k} | " + " | ".join(f"{sb[t][k]:.1f} -> {sa[t][k]:.1f}" for t in sa) + " |")
        pb, pa = bs[0]["models"][kind].get("breakdown"), as_[0]["models"][kind].get("breakdown")
        if pb and pa:
            lines += ["", "Parts timed alone, in a loop (run 1, medians, us; before -> after; warm caches, so "
                      "smaller than inside a call):", "", "| part | " + " | ".join(pa) + " |",
                      "|---|" + "---:|" * len(pa)]
            for k in dict.fromkeys(k for p in pa.values() for k in p):
                lines.append(f"| {k} | " + " | ".join(
                    f"{pb[t][k]:.1f} -> {pa[t][k]:.1f}" if k in pa[t] else "-" for t in pa) + " |")
        lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
