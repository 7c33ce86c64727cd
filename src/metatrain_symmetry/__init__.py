"""Measure, train and audit the rotational symmetry of machine-learning
interatomic potentials in the metatensor ecosystem."""

from .diagnostics import AnalysisResult, analyze, equivariance_rmse
from .dynamics import TrainingDynamics, training_dynamics
from .grid import O3Grid
from .models import LoadedModel, load_model
from .retrain import RetrainResult, retrain_last_layer, retraining_objective


__version__ = "0.1.0"

__all__ = [
    "AnalysisResult",
    "LoadedModel",
    "O3Grid",
    "RetrainResult",
    "TrainingDynamics",
    "analyze",
    "equivariance_rmse",
    "load_model",
    "retrain_last_layer",
    "retraining_objective",
    "training_dynamics",
]
