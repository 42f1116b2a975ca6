"""Train a job's trials with the user's own training function, one trial at a time.

The same job, run store, resume, cost accounting and executors as mlaudit's own loop: only the
step that turns (initial model, training set) into a trained model is the user's. Each trial's
model is built from the job's ``model`` with the trial's seed (as the factory does), its training
set is the trial's view and subset mask materialised as tensors, and the result is checked and
evaluated on the test split with the shared evaluation (:mod:`mlaudit.train.trainer` lists the checks).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from ..data.base import DataBundle
from ..data.view import DataView
from ..models.registry import build_model
from ..train.evaluate import evaluate
from ..train.loop import StackedModels, training_pools
from ..train.trainer import UserTrainer, run_user_trainer
from .batched import query_outputs
from .spec import FactoryJob, TrainedModel, TrialSpec


def run_user_trials(job: FactoryJob, data: DataBundle, device: torch.device,
                    on_result: Callable[[TrainedModel], None] | None) -> list[TrainedModel]:
    """Train every trial of ``job`` with ``job.trainer``; ``on_result`` as each model finishes."""
    trainer = UserTrainer(job.trainer or "")
    model_fn = functools.partial(build_model, job.model, input_shape=data.input_shape, num_classes=data.num_classes)
    done = []
    for t in job.trials:
        x, y = trial_training_set(t, job, data)
        model, wall = run_user_trainer(trainer, model_fn, x, y, classes=data.train.classes, seed=t.seed,
                                       device=device, recipe=job.recipe)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        metrics: dict[str, float | str] = {"trainer": job.trainer}
        outputs: dict[str, torch.Tensor] = {}
        if job.evaluate or job.queries:
            stack = StackedModels.from_modules([model], device, strategy="loop")
            if job.evaluate:
                ev = evaluate(stack, data.test.to(device), batch_size=job.recipe.eval_batch_size)
                metrics.update(test_accuracy=float(ev["accuracy"][0]), test_loss=float(ev["loss"][0]))
            outputs = query_outputs(job, stack, data, batch_size=job.recipe.eval_batch_size)[0]
        m = TrainedModel(t.trial_id, t.seed, state, metrics, 0, wall, dict(t.tags), outputs=outputs)
        if on_result is not None:
            on_result(m)
        done.append(m)
    return done


def trial_training_set(t: TrialSpec, job: FactoryJob, data: DataBundle) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples trial ``t`` trains on (the one loop's pool: its view's kept virtual indices, cut by
    its mask); (x, y) on CPU."""
    view = job.views[t.view] if t.view is not None else DataView.identity(data.train)
    pool = training_pools(data.train, [view], t.mask[None] if t.mask is not None else None)[0]
    x, y = view.gather(pool.to(view.device))
    return x.cpu(), y.cpu()
