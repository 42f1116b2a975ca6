"""Experiment kinds, their configs, and the runner that writes results, store rows and reports."""

from .base import (
           ExperimentConfig,
           ExperimentOutput,
           FactoryOptions,
           experiment_kinds,
           parse_config,
           register_experiment,
)
from .runner import RunResult, resume_experiment, run_experiment

__all__ = ["ExperimentConfig", "ExperimentOutput", "FactoryOptions", "experiment_kinds", "parse_config",
           "register_experiment", "RunResult", "resume_experiment", "run_experiment"]
