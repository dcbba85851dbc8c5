"""Training: recipes, GPU-side augmentation, the resumable (and torchrun-ready) loop."""
from fer_edge.training.recipes import RECIPES, get_recipe
from fer_edge.training.trainer import TrainSettings, train_run

__all__ = ["RECIPES", "get_recipe", "TrainSettings", "train_run"]
