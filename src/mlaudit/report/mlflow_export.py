"""Export a run to MLflow (``mlaudit runs export ID --format mlflow``): the optional ``mlflow`` extra.

One MLflow run per mlaudit run, in the experiment ``experiment`` (created when missing) of the tracking
server or database at ``tracking_uri`` (MLflow's own default when None, i.e. ``$MLFLOW_TRACKING_URI``):

* tags ``mlaudit.id``, ``mlaudit.kind``, ``mlaudit.status``, ``mlaudit.out_dir``;
* params: the resolved config's leaves (dotted names; values as text, cut to 500 characters);
* metrics: every finite numeric metric at step 0, and each finished trial's numeric metrics at step
  ``i`` (the trial's position) under ``trial.<name>``.

Names are reduced to the characters MLflow accepts (letters, digits, ``_ - . / space``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from ..jsonutil import flatten, numeric_leaves

_BAD = re.compile(r"[^A-Za-z0-9_\-./ ]")
BATCH = 500  # entities per log_batch call (MLflow's limit is 1000 metrics, 100 params per batch)


def _name(s: str) -> str:
    return _BAD.sub("_", s)[:250]


def _numeric(d: Mapping[str, Any]) -> list[tuple[str, float]]:
    return [(_name(k), v) for k, v in numeric_leaves(dict(d))]


def export_to_mlflow(run: Mapping[str, Any], *, tracking_uri: str | None = None, experiment: str = "mlaudit") -> str:
    """Log ``run`` (a :meth:`mlaudit.store.RunStore.export` dict) as one MLflow run; returns its run id.
    Raises :class:`ConfigError` when MLflow is not installed."""
    try:
        from mlflow.entities import Metric, Param, RunStatus
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError("--format mlflow needs MLflow: pip install 'mlaudit[mlflow]' (or mlflow-skinny with a tracking server)") from None
    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    exp_id = found.experiment_id if found is not None else client.create_experiment(experiment)
    tags = {"mlaudit.id": str(run["id"]), "mlaudit.kind": str(run.get("kind", "")),
            "mlaudit.status": str(run.get("status", "")), "mlaudit.out_dir": str(run.get("out_dir", ""))}
    created = client.create_run(exp_id, run_name=str(run.get("name") or run["id"]), tags=tags)
    rid = created.info.run_id
    ms = int(time.time() * 1000)
    params = [Param(_name(k), str(v)[:500]) for k, v in flatten(dict(run.get("config") or {})).items()]
    metrics = [Metric(k, v, ms, 0) for k, v in _numeric(run.get("metrics") or {})]
    done = [t for t in run.get("trials", []) if t.get("status") == "done"]
    for i, t in enumerate(done):
        metrics += [Metric(f"trial.{k}", v, ms, i) for k, v in _numeric((t.get("result") or {}).get("metrics", {}))]
    for j in range(0, len(params), 100):
        client.log_batch(rid, params=params[j:j + 100])
    for j in range(0, len(metrics), BATCH):
        client.log_batch(rid, metrics=metrics[j:j + BATCH])
    client.set_terminated(rid, RunStatus.to_string(RunStatus.FINISHED if run.get("status") == "done"
                                                   else RunStatus.FAILED))
    return rid
