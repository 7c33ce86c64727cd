"""The audit of a model on a dataset, and what is made of it.

:py:func:`~metatrain_symmetry.audit.audit` evaluates a model on every structure of a
dataset, unrotated and on an O(3) grid, and summarises per output: the error against the
dataset's targets, the per-structure equivariance RMSE (also relative to that error),
the symmetry leakage, and the dataset-mean ``(lambda, sigma)`` spectrum; per internal
feature: the mean spectrum. The :py:class:`~metatrain_symmetry.AuditResult` it returns
is complete: its ``summary`` (the content of ``audit.json``, following the JSON schema
of :py:func:`~metatrain_symmetry.audit_schema`) records the identity of the model and
the dataset. :py:func:`~metatrain_symmetry.write_audit_report` writes the summary, a
readable table, the spectra, a heatmap, a chemiscope dataset and an offline HTML viewer;
:py:func:`~metatrain_symmetry.export_audited` exports a checkpoint with its audit in the
model's metadata.

The modules of this package, in the order an audit uses them:

- ``targets``: outputs compared with dataset targets, the targets, predictions;
- ``run``: :py:func:`~metatrain_symmetry.audit.audit`, the recipe;
- ``summary``: identities of model and dataset, the summary and its schema;
- ``viewer``: the chemiscope views and the offline HTML viewer;
- ``result``: :py:class:`~metatrain_symmetry.AuditResult`;
- ``markdown`` and ``files``: ``audit.md`` and every file of an audit;
- ``export``: the audited (and optionally symmetrized) export.
"""

from ..identity import dataset_identity, model_identity
from .export import AUDIT_METADATA_KEY, export_audited, read_audit
from .files import spectra_error_tensormap, spectra_tensormap, write_audit_report
from .markdown import audit_markdown
from .result import AuditResult
from .run import audit
from .summary import SCHEMA_VERSION, audit_schema, describe_outputs
from .targets import default_targets, force_output, predict
from .viewer import (
    ChemiscopeViews,
    audit_title,
    chemiscope_dataset,
    chemiscope_library,
    write_chemiscope,
    write_html_viewer,
)


__all__ = [
    "AUDIT_METADATA_KEY",
    "SCHEMA_VERSION",
    "AuditResult",
    "ChemiscopeViews",
    "audit",
    "audit_markdown",
    "audit_schema",
    "audit_title",
    "chemiscope_dataset",
    "chemiscope_library",
    "dataset_identity",
    "default_targets",
    "describe_outputs",
    "export_audited",
    "force_output",
    "model_identity",
    "predict",
    "read_audit",
    "spectra_error_tensormap",
    "spectra_tensormap",
    "write_audit_report",
    "write_chemiscope",
    "write_html_viewer",
]
