"""Experiment kinds, their configs, and the runner that writes results, store rows and reports."""

from .base import (
           KINDS,
           ExperimentConfig,
           ExperimentOutput,
           FactoryOptions,
           experiment_kind,
           experiment_kinds,
           parse_config,
           register_experiment,
)
from .context import RunContext
from .runner import RunResult, resume_experiment, run_experiment

__all__ = ["KINDS", "ExperimentConfig", "ExperimentOutput", "FactoryOptions", "experiment_kind", "experiment_kinds",
           "parse_config", "register_experiment", "RunContext", "RunResult", "resume_experiment", "run_experiment"]
