"""Equivariance errors, character projections, spectra and symmetrized predictions,
all computed in one pass over the rotated copies streamed by the engine.

For an output ``t`` and a grid of elements ``g`` with weights ``w_g``:

* the back-transformed response ``z(g) = rho(g)^-1 t(g x)`` gives the symmetrized
  prediction ``t_bar = sum_g w_g z(g)`` (``average``) and the equivariance error
  ``A = sum_g w_g ||z(g) - t_bar||^2`` (``variance``, averaged over components as
  in metatomic's ``o3::variance::<name>``);
* the direct response ``u(g) = t(g x)`` gives the character projections
  ``B_{lambda,sigma} = (2 lambda + 1) ||sum_g w_g D_{lambda,sigma}(g^-1) u(g)||^2``
  (``character_projection``) and the normalized per-structure spectrum
  ``b = B / sum_g w_g ||u(g)||^2`` (``spectrum``).

Every moment is accumulated in float64, centred on the first rotated copy so that
``E[x^2] - E[x]^2`` does not lose digits when the mean is large.

On random grids the weighted sums are replaced by unbiased Monte-Carlo estimates
over the independent pairs ``(R, -R)`` of the grid, with standard errors (see
:py:mod:`metatrain_symmetry.estimators`); exact grids take the path above
unchanged.

The modules of this package: ``accumulators`` (moments of the rotated copies),
``assembly`` (TensorMaps from the finished moments), ``analysis`` (the pass and
:py:func:`~metatrain_symmetry.analyze`), ``result``
(:py:class:`~metatrain_symmetry.AnalysisResult`), ``files`` and ``plots`` (what an
analysis writes)."""

from .analysis import (
    DEFAULT_MAX_LAMBDA,
    MIN_RANDOM_ELEMENTS,
    AnalysisPart,
    AnalysisPlan,
    analyze,
    model_fingerprint,
    output_request,
    run_context,
)
from .assembly import SPECTRUM_NORM_TOLERANCE, ZERO_OUTPUT_TOLERANCE, zero_structures
from .files import file_stem, save_result, summary_table
from .plots import hatch_unresolved, plot_spectra
from .result import AnalysisResult, equivariance_rmse


__all__ = [
    "DEFAULT_MAX_LAMBDA",
    "MIN_RANDOM_ELEMENTS",
    "SPECTRUM_NORM_TOLERANCE",
    "ZERO_OUTPUT_TOLERANCE",
    "AnalysisPart",
    "AnalysisPlan",
    "AnalysisResult",
    "analyze",
    "equivariance_rmse",
    "file_stem",
    "hatch_unresolved",
    "model_fingerprint",
    "output_request",
    "plot_spectra",
    "run_context",
    "save_result",
    "summary_table",
    "zero_structures",
]
