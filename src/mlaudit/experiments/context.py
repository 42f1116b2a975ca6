"""RunContext: what an experiment kind gets to do its work — train models through the factory
with resume and checkpointing, report progress, and account for cost."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..factory import Executor, FactoryJob, TrainedModel, TrialSpec, train_many
from ..store import RunStore
from ..train.checkpoint import save_checkpoint
from .progress import Progress


@dataclass
class Cost:
    """Resources an experiment used. ``gpu_seconds`` counts wall time of factory calls on CUDA
    times the GPUs they held; ``models_trained`` counts models trained in this process's runs
    (resumed trials included from their records)."""

    models_trained: int = 0
    train_wall_s: float = 0.0
    gpu_seconds: float = 0.0
    peak_gpu_mem_mb: float | None = None

    def add_peak(self, mb: float | None) -> None:
        if mb is not None:
            self.peak_gpu_mem_mb = max(self.peak_gpu_mem_mb or 0.0, mb)


@dataclass
class RunContext:
    """Handed to an experiment kind's ``run(config, ctx)``."""

    out_dir: Path
    store: RunStore
    experiment_id: str
    device: str
    executor: Executor
    progress: Progress
    finished: dict[str, dict[str, Any]] = field(default_factory=dict)
    cost: Cost = field(default_factory=Cost)

    @property
    def artifacts(self) -> Path:
        return self.out_dir / "artifacts"

    def checkpoint_path(self, trial_id: str) -> Path:
        return self.artifacts / "models" / f"{trial_id}.pt"

    def train(self, job: FactoryJob, *, save_weights: bool = True, label: str = "training models") -> list[dict[str, Any]]:
        """Train the job's trials that are not finished yet; returns one record per trial, in order.

        Each model is committed to the run store (and its weights saved under
        ``artifacts/models/<trial_id>.pt``) the moment its chunk ends, so an interrupted run resumes
        from there. A record holds ``trial_id``, ``seed``, ``tags``, ``metrics``, ``steps``,
        ``wall_s`` and, when saved, ``checkpoint`` (relative path) and ``sha256``.
        """
        todo = [t for t in job.trials if t.trial_id not in self.finished]
        cuda = job.device.startswith("cuda")
        if todo:
            task = self.progress.task(label, total=len(job.trials), completed=len(job.trials) - len(todo))
            t0 = time.perf_counter()
            if cuda:
                for i in range(torch.cuda.device_count()):
                    torch.cuda.reset_peak_memory_stats(i)

            def commit(m: TrainedModel) -> None:
                rec = self._record(m, save_weights)
                self.store.commit_trial(self.experiment_id, m.trial_id, rec, wall_s=m.wall_s)
                self.finished[m.trial_id] = rec
                self.cost.models_trained += 1
                self.cost.add_peak(m.metrics.get("peak_gpu_mem_mb"))
                self.progress.advance(task)

            train_many(job.with_trials(todo), executor=self.executor, on_result=commit)
            wall = time.perf_counter() - t0
            self.cost.train_wall_s += wall
            if cuda:
                self.cost.gpu_seconds += wall * max(1, torch.cuda.device_count())
            self.progress.done(task)
        return [self.finished[t.trial_id] for t in job.trials]

    def _record(self, m: TrainedModel, save_weights: bool) -> dict[str, Any]:
        rec: dict[str, Any] = {"trial_id": m.trial_id, "seed": m.seed, "tags": m.tags, "metrics": m.metrics,
                               "steps": m.steps, "wall_s": m.wall_s}
        if save_weights:
            path = self.checkpoint_path(m.trial_id)
            rec["sha256"] = save_checkpoint(m.state_dict, path)
            rec["checkpoint"] = str(path.relative_to(self.out_dir))
        return rec

    def pending(self, trials: Sequence[TrialSpec]) -> list[TrialSpec]:
        return [t for t in trials if t.trial_id not in self.finished]
