"""The analysis of a model on rotated copies of structures: one pass over the
engine's stream feeding the accumulators."""

from __future__ import annotations

from collections.abc import Sequence

from metatensor.torch import Labels
from metatomic.torch import ModelOutput

from .._utils import is_integer, name_list
from ..engine import RotatedEvaluator
from ..grid import O3Grid
from ..models import LoadedModel, ModelLike, load_model
from ..quantities import standard_lambda
from ..systems import SystemLike, prepare_systems
from .accumulators import BlockAccumulator, Integrator, finish_structure
from .assembly import assemble
from .result import AnalysisResult


# independent pairs (R, -R) a random grid needs: two for an unbiased estimate of a
# squared mean, four for the variance of that estimate
_MIN_PAIRS = 4


def analyze(
    model: ModelLike,
    systems: Sequence[SystemLike],
    outputs: Sequence[str],
    max_lambda: int = 4,
    grid: O3Grid | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    per_atom: bool = False,
) -> AnalysisResult:
    """Rotational analysis of a model's outputs and internal features.

    Evaluates the model once on every rotated copy (every element of ``grid``) of
    every structure and computes, for each requested name, the equivariance error,
    the character projections, the symmetrized prediction and the normalized
    spectrum.

    :param model: anything :py:func:`load_model` accepts
    :param systems: ``ase.Atoms`` or metatomic ``System`` objects, periodic or not
    :param outputs: output names (``"energy"``, ``"non_conservative_force"``, ...),
        internal features (``"mtt::feature::<module path>"``), and the derivatives
        of the energy ``"forces"`` (``-dE/dr``, per atom) and ``"stress"``
        (``(1/V) dE/d(strain)``, per structure, periodic structures only),
        computed by automatic differentiation on every rotated copy
    :param max_lambda: largest ``lambda`` of the character projections
    :param grid: integration grid; by default ``O3Grid(degree)`` with
        ``degree = max(2 max_lambda, 2 L + 1)``, ``L`` the largest angular momentum
        of the requested outputs
    :param batch_size: rotated copies per model call (default: about 4096 atoms)
    :param progress: show a progress bar
    :param per_atom: analyse per-atom contributions of per-structure outputs such as
        the energy
    :return: the analysis, see :py:class:`AnalysisResult`
    """
    model = load_model(model)
    names = _check_names(outputs)
    if not is_integer(max_lambda) or max_lambda < 0:
        raise ValueError(f"max_lambda must be a non-negative integer, got {max_lambda}")
    if grid is None:
        target_lambda = max(standard_lambda(name) for name in names)
        grid = O3Grid(degree=max(2 * max_lambda, 2 * target_lambda + 1))
    if not isinstance(grid, O3Grid):
        raise TypeError(f"grid must be an O3Grid, got {type(grid).__name__}")
    grid.check_lambda(max_lambda)
    if not grid.inversion:
        raise ValueError(
            "analyze needs improper rotations to resolve sigma: use an O3Grid with "
            "inversion=True"
        )
    if grid.degree is None and len(grid) < 2 * _MIN_PAIRS:
        raise ValueError(
            f"a random grid needs at least {2 * _MIN_PAIRS} elements "
            f"({_MIN_PAIRS} rotations and their inversions) to estimate spectra "
            f"and their standard errors, got {len(grid)}"
        )
    model.check_names(names)
    systems = prepare_systems(systems, model)
    model.warn_if_single_precision()

    requests = {name: _request(model, name, per_atom) for name in names}
    evaluator = RotatedEvaluator(model, grid, batch_size)
    integrator = Integrator(grid, max_lambda)
    accumulators: dict[str, dict[int, list[BlockAccumulator]]] = {n: {} for n in names}
    keys: dict[str, Labels] = {}
    finished: dict[str, list] = {name: [] for name in names}

    current = None
    for chunk in evaluator.stream(systems, requests, progress=progress):
        if current is not None and chunk.structure != current:
            finish_structure(current, accumulators, finished, integrator)
        current = chunk.structure
        for name, output in chunk.outputs.items():
            keys.setdefault(name, output.keys)
            per_structure = accumulators[name]
            if chunk.structure not in per_structure:
                per_structure[chunk.structure] = [
                    BlockAccumulator(name, output.keys, index, block, integrator)
                    for index, block in enumerate(output.blocks)
                ]
            for accumulator, block in zip(
                per_structure[chunk.structure], output.blocks, strict=True
            ):
                accumulator.add(block, chunk.rotations)
    finish_structure(current, accumulators, finished, integrator)

    result = AnalysisResult(
        {},
        {},
        {},
        {},
        grid=grid,
        max_lambda=max_lambda,
        outputs=names,
        estimated=integrator.estimated,
    )
    for name in names:
        assemble(name, keys[name], finished[name], result, max_lambda, integrator)
    return result


def _check_names(outputs) -> list[str]:
    return name_list(
        outputs,
        "no outputs requested: name at least one output or feature",
        "outputs are requested more than once",
    )


def _request(model: LoadedModel, name: str, per_atom: bool) -> ModelOutput:
    kind = model.natural_sample_kind(name)
    if per_atom and kind == "system" and name != "stress":
        kind = "atom"
    declared = model.outputs.get(name)
    unit = "" if declared is None else declared.unit
    return ModelOutput(unit=unit, sample_kind=kind)
