"""Command-line interface: parse -> config object -> library call -> exit code.

Exit codes: 0 success, 2 invalid input (bad config, unknown name, missing data files, bad
option), 1 failure during a run (the message names the trial).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .errors import ConfigError, DataError, MlauditError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="mlaudit: audit the training-data security of ML models.")
runs_app = typer.Typer(no_args_is_help=True, help="Inspect the run store.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect datasets.")
app.add_typer(runs_app, name="runs")
app.add_typer(data_app, name="data")
out_console = Console()
err_console = Console(stderr=True)

StoreOpt = Annotated[Path | None, typer.Option("--store", help="SQLite run store (default ~/.mlaudit/runs.db).")]


def _fail(e: BaseException) -> None:
    """Print the error; exit 2 for invalid input (config, names, data files), else 1."""
    code = 2 if isinstance(e, (ConfigError, DataError)) else 1
    err_console.print(f"[bold red]error:[/] {e}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(help="Experiment config (YAML).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default runs/<name>-<time>).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field: key.sub=value (YAML value).")] = None,
    executor: Annotated[str, typer.Option(help="local, process or ray.")] = "local",
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="Ray cluster address (default: start a local one on 127.0.0.1).")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes for --executor process.")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Resume the run in this folder.")] = None,
    store: StoreOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Run an experiment from a YAML config (or resume one)."""
    from .config import apply_overrides, load_yaml
    from .experiments import parse_config, run_experiment

    try:
        opts: dict[str, object] = {}
        if executor == "ray" and ray_address:
            opts["address"] = ray_address
        elif ray_address:
            raise ConfigError("--ray-address only applies with --executor ray")
        if workers is not None:
            if executor != "process":
                raise ConfigError("--workers only applies with --executor process")
            opts["workers"] = workers
        if resume is not None:
            if config is not None:
                raise ConfigError("give either CONFIG or --resume DIR, not both")
            raw = load_yaml(resume / "config.yaml") if (resume / "config.yaml").is_file() else None
            if raw is None:
                raise ConfigError(f"{str(resume)!r} holds no run to resume (no config.yaml)")
            out_dir, do_resume = resume, True
        else:
            if config is None:
                raise ConfigError("missing CONFIG (a YAML file) or --resume DIR")
            raw = load_yaml(config)
            out_dir, do_resume = None, False
        raw = apply_overrides(raw, set_ or [])
        cfg = parse_config(raw)
        out_dir = out_dir or out or Path("runs") / f"{cfg.display_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        res = run_experiment(cfg, out=out_dir, device=device, executor=executor, executor_options=opts,
                             store=store, resume=do_resume, quiet=quiet)
    except (ConfigError, DataError) as e:
        _fail(e)
        return
    except MlauditError as e:
        err_console.print(f"[bold red]error during the run:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err_console.print("interrupted; finished trials are saved: resume with --resume DIR")
        raise typer.Exit(130) from None
    _summary(res.results, res.out_dir, quiet)


def _summary(results: dict, out_dir: Path, quiet: bool) -> None:
    from .report.html import flatten_metrics

    if quiet:
        out_console.print(str(out_dir))
        return
    t = Table(title=f"{results['kind']}: {results['name']}")
    t.add_column("metric")
    t.add_column("value")
    for k, v in flatten_metrics(results["metrics"]).items():
        t.add_row(k, v)
    out_console.print(t)
    c = results["cost"]
    out_console.print(f"{c['models_trained']} models trained in {c['wall_s']:.1f} s on {c['device']} "
                      f"({results['executor']} executor); results in {out_dir}/results.json, report in {out_dir}/report.html",
                      highlight=False)


@runs_app.command("list")
def runs_list(store: StoreOpt = None, limit: int = 50) -> None:
    """List recorded runs, newest first."""
    from .store import RunStore, default_store_path

    rs = RunStore(store or default_store_path())
    t = Table()
    for col in ("id", "kind", "name", "status", "created", "out_dir"):
        t.add_column(col)
    for r in rs.list_experiments(limit=limit):
        t.add_row(r.id, r.kind, r.name, r.status, str(r.created_at), str(r.out_dir))
    out_console.print(t)


@runs_app.command("show")
def runs_show(run_id: str, store: StoreOpt = None) -> None:
    """Show one run (id or unique prefix): status, metrics, trials."""
    from .store import RunStore, default_store_path

    try:
        data = RunStore(store or default_store_path()).export(run_id)
    except MlauditError as e:
        _fail(e)
        return
    exp = data.get("experiment", data)
    out_console.print_json(json.dumps({"experiment": exp, "metrics": data.get("metrics"),
                                       "trials": len(data.get("trials", []))}, default=str))


@runs_app.command("export")
def runs_export(run_id: str, out: Annotated[Path | None, typer.Option("--out")] = None, store: StoreOpt = None) -> None:
    """Export everything recorded about a run as JSON (stdout or --out FILE)."""
    from .store import RunStore, default_store_path

    try:
        data = RunStore(store or default_store_path()).export(run_id)
    except MlauditError as e:
        _fail(e)
        return
    text = json.dumps(data, indent=2, default=str)
    if out:
        out.write_text(text)
    else:
        sys.stdout.write(text + "\n")


@data_app.command("info")
def data_info(name: str, root: Annotated[str | None, typer.Option(help="Data folder or file.")] = None) -> None:
    """Load a dataset and describe it (sizes, shape, classes, id)."""
    from .data import load_dataset

    try:
        spec: dict[str, object] = {"name": name}
        if root:
            spec["root"] = root
        info = load_dataset(spec).describe()
    except MlauditError as e:
        _fail(e)
        return
    t = Table(show_header=False)
    for k, v in info.items():
        t.add_row(str(k), ", ".join(map(str, v)) if isinstance(v, list) else str(v))
    out_console.print(t)


@app.command()
def models() -> None:
    """List the model zoo."""
    from .models import MODELS, model_entry

    t = Table()
    for col in ("name", "inputs", "residual", "description"):
        t.add_column(col)
    for n in MODELS.names() or _zoo_names():
        e = model_entry(n)
        t.add_row(n, "images" if e.image_only else "any", "yes" if e.residual else "no", e.description)
    out_console.print(t)


def _zoo_names() -> list[str]:
    from .models.registry import MODELS, _ensure_zoo_loaded

    _ensure_zoo_loaded()
    return MODELS.names()


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("runs/demo"),
    store: StoreOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """A short tour on the bundled digits data, on CPU in a few minutes."""
    from .demo import run_demo

    try:
        run_demo(out=out, store=store, quiet=quiet)
    except MlauditError as e:
        _fail(e)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
