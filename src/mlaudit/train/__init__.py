"""Training: recipes, the one (stacked) training loop, evaluation, checkpoints.

``train(model, data, recipe, seed=...)`` trains a user's own ``nn.Module`` in place and returns it;
the factory (:mod:`mlaudit.factory`) trains many models through the same loop.
"""

from .api import train
from .checkpoint import load_checkpoint, save_checkpoint
from .evaluate import evaluate, predict, stack_from_state_dicts
from .loop import StackedModels, TrainOutput, init_models, resolve_augment, train_stack
from .recipe import RECIPES, AugmentConfig, Recipe, lr_at, resolve_recipe

__all__ = [
    "train", "load_checkpoint", "save_checkpoint", "evaluate", "predict", "stack_from_state_dicts",
    "StackedModels", "TrainOutput", "init_models", "resolve_augment", "train_stack",
    "RECIPES", "AugmentConfig", "Recipe", "lr_at", "resolve_recipe",
]
