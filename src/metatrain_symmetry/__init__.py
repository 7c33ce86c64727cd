"""Measure, train and audit the rotational symmetry of machine-learning
interatomic potentials in the metatensor ecosystem."""

from ._version import __version__
from .audit import (
    AuditResult,
    audit,
    audit_schema,
    chemiscope_dataset,
    export_audited,
    read_audit,
    write_audit_report,
    write_html_viewer,
)
from .diagnostics import AnalysisResult, analyze, equivariance_rmse
from .dynamics import TrainingDynamics, training_dynamics
from .grid import O3Grid
from .infinitesimal import InfinitesimalResult, infinitesimal
from .models import LoadedModel, ModelTarget, load_model
from .retrain import RetrainResult, retrain_last_layer, retraining_objective


__all__ = [
    "__version__",
    "AnalysisResult",
    "AuditResult",
    "InfinitesimalResult",
    "LoadedModel",
    "ModelTarget",
    "O3Grid",
    "RetrainResult",
    "TrainingDynamics",
    "analyze",
    "audit",
    "audit_schema",
    "chemiscope_dataset",
    "equivariance_rmse",
    "export_audited",
    "infinitesimal",
    "load_model",
    "read_audit",
    "retrain_last_layer",
    "retraining_objective",
    "training_dynamics",
    "write_audit_report",
    "write_html_viewer",
]
