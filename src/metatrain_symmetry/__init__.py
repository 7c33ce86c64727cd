"""Measure, train and audit the rotational symmetry of machine-learning
interatomic potentials in the metatensor ecosystem."""

from .audit import AuditResult, audit
from .diagnostics import AnalysisResult, analyze, equivariance_rmse
from .export import export_audited, read_audit
from .grid import O3Grid
from .models import LoadedModel, load_model


__version__ = "0.1.0"

__all__ = [
    "AnalysisResult",
    "AuditResult",
    "LoadedModel",
    "O3Grid",
    "analyze",
    "audit",
    "equivariance_rmse",
    "export_audited",
    "load_model",
    "read_audit",
]
