"""Command-line interface: parse -> config object -> library call -> exit code.

Exit codes: 0 success; 2 invalid input (bad config or option, unknown name, missing or corrupt
data files, an output folder holding something else); 1 failure during a run (the message names
the trial); 130 interrupted (finished trials are kept: resume with ``mlaudit run --resume DIR``, plus
``--store DB`` when the run used one).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from . import __version__
from .cli_views import (
    cell,
    compare_table,
    console_logging,
    err_console,
    out_console,
    print_summary,
    resume_command,
    runs_table,
)
from .cli_views import fail as _fail
from .errors import ConfigError, DataError, MlauditError, TrialError
from .termsafe import safe, safe_json

# Plain (click) help: paragraphs rewrapped to the terminal (at most 100 columns), flags without a
# metavar; -h and --help everywhere (subcommands inherit the context settings).
_HELP = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _typer(help: str) -> typer.Typer:  # noqa: A002
    return typer.Typer(no_args_is_help=True, help=help, rich_markup_mode=None, context_settings=_HELP)


app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None, context_settings=_HELP,
                  help="mlaudit: audit the training-data security of ML models.")
runs_app = _typer("Inspect the run store.")
data_app = _typer("Inspect datasets.")
dp_app = _typer("Differential-privacy accounting for DP-SGD.")
app.add_typer(runs_app, name="runs")
app.add_typer(data_app, name="data")
app.add_typer(dp_app, name="dp")

StoreOpt = Annotated[Path | None, typer.Option("--store", help="SQLite run store (default $MLAUDIT_STORE or ~/.mlaudit/runs.db).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars; print only the output folder.")]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads for torch (default: $MLAUDIT_THREADS, "
                                                "else 1 on machines with <= 2 cores, half the cores (max 8) above).")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mlaudit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True,
                                                callback=_version)] = False) -> None:
    """mlaudit: audit the training-data security of ML models."""


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(help="Experiment config (YAML).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default runs/<name>-<time>).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config field, e.g. --set recipe.epochs=2 (repeatable; the value is YAML).")] = None,
    executor: Annotated[str, typer.Option(help="local, process or ray.")] = "local",
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="Ray cluster address (default: start a local one on 127.0.0.1).")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes for --executor process.", min=1)] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Resume the run in this folder.")] = None,
    grow: Annotated[bool, typer.Option("--grow", help="With --resume: let --set raise the kind's growable counts "
                                       "(targeted-poison: scenarios, victims; availability-poison: victims; dp-audit: "
                                       "models_per_side; train: trials); finished trials are kept.")] = False,
    store: StoreOpt = None,
    quiet: QuietOpt = False,
    threads: ThreadsOpt = None,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="Print mlaudit's log on stderr "
                                         "(-v info, -vv debug); artifacts/run.log keeps it either way.")] = 0,
) -> None:
    """Run an experiment from a YAML config, or resume or grow one.

    Resume with --resume DIR; grow with --resume DIR --grow --set scenarios=8.

    Writes DIR/config.yaml, results.json, report.html and artifacts/, and commits each finished
    trial to the run store. Exit code 2: invalid input; 1: a failure during the run.
    """
    from .config import apply_overrides, load_yaml
    from .experiments import parse_config, run_experiment
    from .threads import configure_threads

    out_dir: Path | None = None
    handler = console_logging(verbose)
    try:
        configure_threads(threads)
        opts = _executor_options(executor, ray_address, workers)
        if resume is not None:
            if config is not None:
                raise ConfigError("give either CONFIG or --resume DIR, not both")
            if out is not None and out.resolve() != resume.resolve():
                raise ConfigError(f"--resume {str(resume)!r} continues the run in that folder; drop --out {str(out)!r}")
            if not (resume / "config.yaml").is_file():
                raise ConfigError(f"{str(resume)!r} holds no run to resume (no config.yaml); give the --out folder "
                                  "of an earlier `mlaudit run`")
            raw = load_yaml(resume / "config.yaml")
        elif config is None:
            raise ConfigError("missing CONFIG (a YAML file) or --resume DIR; see `mlaudit run --help`")
        else:
            raw = load_yaml(config)
        cfg = parse_config(apply_overrides(raw, set_ or []))
        out_dir = resume or out or Path("runs") / f"{cfg.slug}-{time.strftime('%Y%m%d-%H%M%S')}"
        res = run_experiment(cfg, out=out_dir, device=device, executor=executor, executor_options=opts,
                             store=store, resume=resume is not None, grow=grow, quiet=quiet)
    except (ConfigError, DataError) as e:
        _fail(e)
    except TrialError as e:
        _fail(e, prefix="error during the run",
              hint=f"finished trials are kept; `{resume_command(out_dir, store)}` retries trial {e.trial_id!r} "
                   "and the others not yet finished (a changed config needs a new --out)" if out_dir else None)
    except MlauditError as e:
        _fail(e, prefix="error during the run")
    except OSError as e:
        _fail(e, prefix="error (file system)")
    except KeyboardInterrupt:
        err_console().print(Text(safe(f"interrupted; finished trials are saved: continue with "
                                      f"`{resume_command(out_dir, store)}`")))
        raise typer.Exit(130) from None
    finally:
        if handler is not None:  # in-process callers (tests, notebooks) run many commands
            logging.getLogger("mlaudit").removeHandler(handler)
    if quiet:
        typer.echo(safe(res.out_dir))
    else:
        print_summary(res.results, res.out_dir)


def _executor_options(executor: str, ray_address: str | None, workers: int | None) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    if ray_address:
        if executor != "ray":
            raise ConfigError("--ray-address only applies with --executor ray")
        opts["address"] = ray_address
    if workers is not None:
        if executor != "process":
            raise ConfigError("--workers only applies with --executor process")
        opts["workers"] = workers
    return opts


def _store(path: Path | None):  # noqa: ANN202
    from .store import RunStore, default_store_path

    return RunStore(path or default_store_path())


@runs_app.command("list")
def runs_list(store: StoreOpt = None,
              limit: Annotated[int, typer.Option(help="Show at most this many runs.", min=1)] = 50,
              wide: Annotated[bool, typer.Option("--wide", help="Full names and kinds, the status and the output "
                                                 "folder (wider than 80 columns).")] = False) -> None:
    """List recorded runs, newest first, with the headline metric of each finished run.

    The result column holds test accuracy (train), the best attack's TPR at 0.1% FPR (membership), the
    epsilon lower bound vs the claim (dp-audit), poison success (targeted), the poisoned accuracy and its
    drop in points (availability, indiscriminate); or the status of a run that did not finish.
    """
    try:
        rs = _store(store)
        rows = rs.list_experiments(limit=limit)
        width = out_console().width
        table = runs_table(rows, rs.metrics, width=width, wide=wide)
        out_console(width=max(width, 1000) if wide else None).print(table)
    except MlauditError as e:
        _fail(e)


@runs_app.command("show")
def runs_show(run_id: Annotated[str, typer.Argument(help="Run id or a unique prefix of it.")],
              store: StoreOpt = None) -> None:
    """Show one run: status, config, metrics, and how many trials finished or failed (JSON)."""
    try:
        data = _store(store).export(run_id)
    except MlauditError as e:
        _fail(e)
    trials = data.pop("trials", [])
    data.pop("artifacts", None)
    data["trials"] = {
        "done": sum(t["status"] == "done" for t in trials),
        "failed": [{"trial_id": t["trial_id"], "error": t["error"]} for t in trials if t["status"] == "failed"],
    }
    sys.stdout.write(safe_json(data) + "\n")


@runs_app.command("index")
def runs_index(out: Annotated[Path, typer.Option("--out", help="HTML file to write.")] = Path("runs/index.html"),
               limit: Annotated[int, typer.Option(help="At most this many runs, newest first.", min=1)] = 1000,
               store: StoreOpt = None) -> None:
    """Write a static HTML index of the store's runs: headline metric, status, a link to each report."""
    from .report.index import write_index

    try:
        if out.is_dir():
            raise ConfigError(f"--out {str(out)!r} is a folder; give a file name such as runs/index.html")
        typer.echo(safe(write_index(_store(store), out, limit=limit)))
    except MlauditError as e:
        _fail(e)
    except OSError as e:
        _fail(e, prefix="error (file system)")


@runs_app.command("compare")
def runs_compare(run_ids: Annotated[list[str], typer.Argument(help="Two or more run ids (or unique prefixes).")],
                 match: Annotated[str | None, typer.Option("--match", help="Only metrics whose dotted name contains "
                                                           "this text (e.g. tpr_at_fpr.0.001).")] = None,
                 show_all: Annotated[bool, typer.Option("--all", help="Every metric leaf, not only point "
                                                        "estimates.")] = False,
                 store: StoreOpt = None) -> None:
    """Compare runs side by side: headline, the config fields that differ, and their metrics."""
    try:
        if len(run_ids) < 2:
            raise ConfigError(f"runs compare needs two or more run ids, got {len(run_ids)}")
        rs = _store(store)
        runs = [rs.get_experiment(i) for i in run_ids]
        table = compare_table(runs, [rs.metrics(r.id) for r in runs], match=match, show_all=show_all)
        out_console(width=max(out_console().width, 60 + 40 * len(runs))).print(table)
    except MlauditError as e:
        _fail(e)


@runs_app.command("export")
def runs_export(run_id: Annotated[str, typer.Argument(help="Run id or a unique prefix of it.")],
                out: Annotated[Path | None, typer.Option("--out", help="json: write to this file instead of stdout; "
                                                         "tensorboard: the log folder (default runs/tensorboard/ID).")] = None,
                format_: Annotated[str, typer.Option("--format", help="json (everything recorded), tensorboard "
                                                     "(metrics and per-trial scalars as an event file) or mlflow "
                                                     "(one MLflow run; needs the mlflow extra).")] = "json",
                tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", help="mlflow: the tracking "
                                                                 "server or database (default: MLflow's own).")] = None,
                store: StoreOpt = None) -> None:
    """Export everything recorded about a run as JSON (stdout or --out FILE), or its scalars to TensorBoard."""
    from .experiments.runner import write_atomic

    try:
        if format_ not in ("json", "tensorboard", "mlflow"):
            raise ConfigError(f"--format must be json, tensorboard or mlflow, got {format_!r}")
        if tracking_uri is not None and format_ != "mlflow":
            raise ConfigError("--tracking-uri only applies with --format mlflow")
        data = _store(store).export(run_id)
        if format_ == "mlflow":
            from .report.mlflow_export import export_to_mlflow

            typer.echo(safe(export_to_mlflow(data, tracking_uri=tracking_uri)))
        elif format_ == "tensorboard":
            from .report.tensorboard import write_tensorboard

            log_dir = out if out is not None else Path("runs") / "tensorboard" / data["id"]
            if log_dir.is_file():
                raise ConfigError(f"--out {str(log_dir)!r} is a file; give a folder for TensorBoard's event files")
            typer.echo(safe(write_tensorboard(data, log_dir)))
        elif out is None:
            sys.stdout.write(safe_json(data) + "\n")
        else:
            if out.is_dir():
                raise ConfigError(f"--out {str(out)!r} is a folder; give a file name such as run.json")
            out.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(out, json.dumps(data, indent=2) + "\n")
    except MlauditError as e:
        _fail(e)
    except OSError as e:
        _fail(e, prefix="error (file system)")


@app.command("examples")
def examples(copy: Annotated[Path | None, typer.Option("--copy", help="Copy every example into this folder.")] = None,
             overwrite: Annotated[bool, typer.Option("--overwrite", help="With --copy: replace existing files.")] = False
             ) -> None:
    """List the example configs and bring-your-own scripts shipped with mlaudit, or copy them."""
    from .example_configs import copy_examples, examples_root, list_examples

    if copy is None:
        typer.echo(safe(f"{examples_root()}:"))
        for name in list_examples():
            typer.echo(f"  {name}")
        typer.echo("run one with: mlaudit run <folder>/<name>.yaml   (copy them with --copy DIR)")
        return
    try:
        written = copy_examples(copy, overwrite=overwrite)
    except MlauditError as e:
        _fail(e)
    typer.echo(safe(f"copied {len(written)} examples to {copy}"))


@data_app.command("info")
def data_info(name: Annotated[str, typer.Argument(help="A registered dataset (see the error for the list).")],
              root: Annotated[str | None, typer.Option(help="Data folder or file.")] = None) -> None:
    """Load a dataset and describe it (sizes, shape, classes, id)."""
    from pydantic import ValidationError

    from .config import format_validation_error
    from .data import DatasetSpec, load_dataset

    try:
        spec: dict[str, object] = {"name": name}
        if root:
            spec["root"] = root
        info = load_dataset(spec).describe()
    except MlauditError as e:
        _fail(e)
    except ValidationError as e:  # of the dataset spec, e.g. an unknown name
        _fail(ConfigError(format_validation_error(e, prefix="dataset", model=DatasetSpec)))
    t = Table(show_header=False)
    t.add_column(no_wrap=True)
    t.add_column(overflow="fold")
    for k, v in info.items():
        t.add_row(cell(k), Text(safe(", ".join(map(str, v)) if isinstance(v, (list, tuple)) else v)))
    out_console().print(t)


@data_app.command("lpips-weights")
def data_lpips_weights(root: Annotated[Path, typer.Argument(help="Folder to keep the two weight files in.")],
                       backbone_url: Annotated[str | None, typer.Option(help="AlexNet weights, a torchvision state_dict "
                                                                        "(default: torchvision's).")] = None,
                       backbone_sha256: Annotated[str | None, typer.Option(help="Their sha256, or a prefix of >= 8 hex "
                                                                           "digits (default: torchvision's).")] = None,
                       lin_url: Annotated[str | None, typer.Option(help="LPIPS v0.1's linear layers for AlexNet "
                                                                   "(default: the lpips package's).")] = None,
                       lin_sha256: Annotated[str | None, typer.Option(help="Their sha256 (none pinned by default: "
                                                                      "checked by loading).")] = None,
                       timeout: Annotated[float, typer.Option(help="Seconds per download.", min=0.1)] = 60.0) -> None:
    """Download the AlexNet and LPIPS weights the federated kind's ``lpips`` block reads, and print the lines to put
    in a config (with their sha256)."""
    from .attacks.federated import lpips

    try:
        got = lpips.download_lpips_weights(
            root, backbone_url=backbone_url or lpips.ALEXNET_URL, lin_url=lin_url or lpips.LPIPS_LIN_URL,
            backbone_sha256=backbone_sha256 if backbone_url else (backbone_sha256 or lpips.ALEXNET_SHA256),
            lin_sha256=lin_sha256, timeout=timeout)
    except MlauditError as e:
        _fail(e)
    typer.echo(safe(f"lpips: {{backbone: {got['backbone']}, lin: {got['lin']}, backbone_sha256: "
                    f"{got['backbone_sha256']}, lin_sha256: {got['lin_sha256']}}}"))


@data_app.command("verify")
def data_verify(manifest: Annotated[Path, typer.Argument(help="JSON Lines manifest: url, sha256 and optional "
                                                          "label, caption, path per line.")],
                root: Annotated[Path | None, typer.Option(help="Check local copies under this folder (each entry's "
                                                          "path, or its URL's file name) instead of downloading.")] = None,
                timeout: Annotated[float, typer.Option(help="Seconds per download.", min=0.1)] = 10.0) -> None:
    """Check every item of a URL-indexed dataset against the sha256 recorded when it was indexed.

    Exit 0 when every item matches, 1 when any item changed (split-view poisoning or corruption) or is
    missing, 2 when the manifest itself is malformed."""
    from .data.manifest import fetch_all, fetch_bytes, load_manifest, verify_local

    try:
        entries = load_manifest(manifest)
        report = (verify_local(entries, root) if root is not None
                  else fetch_all(entries, fetch=lambda u: fetch_bytes(u, timeout=timeout)))
    except MlauditError as e:
        _fail(e)
    s = report.summary()
    t = Table(show_header=False)
    t.add_column(no_wrap=True)
    t.add_column()
    for k in ("items", "accepted", "rejected", "unavailable"):
        t.add_row(k, str(s[k]))
    out_console().print(t)
    bad = [i for i, st in enumerate(report.status) if st != "accepted"]
    for i in bad[:10]:
        why = ("sha256 differs from the manifest's" if report.status[i] == "rejected"
               else report.errors.get(i, "unavailable"))
        err_console().print(Text(safe(f"{report.status[i]}: line item {i + 1}, {entries[i].url}: {why}")))
    if len(bad) > 10:
        err_console().print(Text(f"... and {len(bad) - 10} more"))
    if bad:
        raise typer.Exit(1)


SigmaOpt = Annotated[float, typer.Option("--noise-multiplier", help="Noise multiplier sigma (noise std / clip norm).")]
RateOpt = Annotated[float, typer.Option("--sample-rate", help="Poisson sampling rate q = batch size / N.")]
StepsOpt = Annotated[int, typer.Option("--steps", help="Number of DP-SGD steps T.")]
DeltaOpt = Annotated[float, typer.Option("--delta", help="Target delta (well below 1/N).")]
AccOpt = Annotated[str, typer.Option("--accountant", help="rdp (Balle et al. 2020 conversion) or prv (Gopi et al. 2021).")]


@dp_app.command("epsilon")
def dp_epsilon(noise_multiplier: SigmaOpt, sample_rate: RateOpt, steps: StepsOpt, delta: DeltaOpt = 1e-5,
               accountant: AccOpt = "rdp") -> None:
    """Print the epsilon of DP-SGD with these settings."""
    from .privacy.accountant import epsilon

    _echo_number(epsilon, noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, delta=delta,
                 accountant=accountant)


@dp_app.command("noise")
def dp_noise(epsilon_: Annotated[float, typer.Option("--epsilon", help="Target epsilon.")], sample_rate: RateOpt,
             steps: StepsOpt, delta: DeltaOpt = 1e-5, accountant: AccOpt = "rdp") -> None:
    """Print the smallest noise multiplier sigma that reaches the target epsilon."""
    from .privacy.accountant import calibrate_noise

    _echo_number(calibrate_noise, target_epsilon=epsilon_, sample_rate=sample_rate, steps=steps, delta=delta,
                 accountant=accountant)


@dp_app.command("check")
def dp_check(model: Annotated[str, typer.Argument(help="A zoo name, your model as 'package.module:factory', or a "
                                                     "model mapping in YAML, e.g. '{name: resnet18, norm: group}'.")],
             input_shape: Annotated[str, typer.Option("--input-shape", help="One input's shape, e.g. 3,32,32.")],
             classes: Annotated[int, typer.Option("--classes", min=2, help="Number of classes.")] = 10,
             verify: Annotated[bool, typer.Option("--verify", help="Also run the model on 4 random inputs "
                                                  "(uniform [0, 1)) and compare the rules with autograd.")] = False) -> None:
    """List the layers of a model with parameters and whether DP-SGD's book-keeping (fast) clipping covers each,
    or why not and the fix (exit 1 if any is not covered; then dp.clipping auto clips per example)."""
    import torch

    from .models.registry import build_model
    from .privacy.fastclip import fast_clip_report, verify_fast_clip

    try:
        shape = tuple(int(v) for v in input_shape.split(","))
        if not shape or min(shape) < 1:
            raise ValueError
    except ValueError:
        _fail(ConfigError(f"--input-shape {input_shape!r}: allowed a comma-separated list of positive integers, "
                          "e.g. 3,32,32"))
    import yaml
    from pydantic import ValidationError

    from .config import format_validation_error
    from .models.registry import ModelSpec

    try:
        spec = yaml.safe_load(model) if model.lstrip().startswith("{") else model
        net = build_model(spec, input_shape=shape, num_classes=classes)
        rows = fast_clip_report(net)
    except MlauditError as e:
        _fail(e)
    except ValidationError as e:
        _fail(ConfigError(format_validation_error(e, prefix="model", model=ModelSpec)))
    except yaml.YAMLError as e:
        _fail(ConfigError(f"model {model!r}: not a zoo name, an import string or a YAML mapping ({e})"))
    t = Table()
    for col in ("layer", "type", "parameters", "fast clipping"):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(cell(str(r["layer"]) or "(model)"), cell(str(r["type"])), str(r["parameters"]),
                  Text(safe("yes" if r["supported"] else f"no: {r['error']}")))
    out_console().print(t)
    if not all(r["supported"] for r in rows):
        raise typer.Exit(1)
    if verify:
        torch.manual_seed(0)
        try:
            verify_fast_clip(net, torch.rand(4, *shape), torch.randint(0, classes, (4,)))
        except MlauditError as e:
            err_console().print(Text(safe(f"verification failed: {e}")))
            raise typer.Exit(1) from None
        typer.echo("verified: the rules' gradient equals autograd's on 4 random inputs, and 2 examples' norms equal "
                   "their own")


def _echo_number(fn: Callable[..., float], **kwargs: Any) -> None:
    """Print ``fn(**kwargs)`` to 6 significant digits; invalid input exits 2 via :func:`_fail`."""
    try:
        value = fn(**kwargs)
    except MlauditError as e:
        _fail(e)
        return
    typer.echo(f"{value:.6g}")


@app.command()
def models() -> None:
    """List the model zoo (every registered architecture)."""
    from .models import MODELS, model_entry, zoo  # noqa: F401  (importing zoo registers every architecture)

    t = Table()
    t.add_column("name", no_wrap=True)
    for col in ("inputs", "residual", "description"):
        t.add_column(col, overflow="fold")
    for n in MODELS.names():
        e = model_entry(n)
        t.add_row(cell(n), "images" if e.image_only else "any", "yes" if e.residual else "no", Text(safe(e.description)))
    out_console().print(t)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("runs/demo"),
    store: StoreOpt = None,
    quiet: QuietOpt = False,
    epochs: Annotated[int | None, typer.Option(help="Train for this many epochs (default 12) for a quicker look.",
                                               min=1, max=100)] = None,
    threads: ThreadsOpt = None,
) -> None:
    """A short tour on the bundled digits data, on CPU in a few minutes."""
    from .demo import run_demo
    from .threads import configure_threads

    try:
        configure_threads(threads)
        run_demo(out=out, store=store, quiet=quiet, epochs=epochs)
    except (MlauditError, OSError) as e:
        _fail(e)
    if quiet:
        typer.echo(safe(out))


def main() -> None:
    """Entry point of the ``mlaudit`` console script."""
    app()


if __name__ == "__main__":
    main()
