"""The analysis of a model on rotated copies of structures: one pass over the
engine's stream feeding the accumulators.

An analysis splits into independent parts, one per shard of structures
(:py:meth:`AnalysisPlan.run`), joined at the end (:py:meth:`AnalysisPlan.assemble`);
this is how it is spread over processes and resumed (see
:py:mod:`metatrain_symmetry.distributed`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from metatensor.torch import Labels
from metatomic.torch import ModelOutput, System

from .._utils import is_integer, name_list, sha256_of_file
from .._version import __version__
from ..data import check_close_atoms
from ..distributed import DistributedContext, run_resumable
from ..engine import RotatedEvaluator
from ..grid import O3Grid
from ..irreps import BlockLayout
from ..models import LoadedModel, ModelLike, load_model
from ..quantities import standard_lambda
from ..systems import SystemLike, prepare_systems, systems_fingerprint
from .accumulators import BlockAccumulator, Integrator, finish_structure
from .assembly import assemble
from .result import AnalysisResult


DEFAULT_MAX_LAMBDA = 4
"""largest ``lambda`` of the character projections and spectra by default"""

# independent pairs (R, -R) a random grid needs: four for the variance of an
# unbiased estimate of a squared mean, and one more that the spectra use as a
# reference
_MIN_PAIRS = 5
MIN_RANDOM_ELEMENTS = 2 * _MIN_PAIRS
"""fewest elements of a random grid (rotations and their inversions) that an
analysis accepts"""


@dataclass
class AnalysisPart:
    """The finished per-structure quantities of some structures (picklable)."""

    keys: dict[str, tuple[list[str], torch.Tensor]] = field(default_factory=dict)
    """per name, the keys of the model's output blocks as ``(names, values)``:
    plain data, so that saved shards load with ``torch.load(weights_only=True)``"""
    finished: dict[str, list] = field(default_factory=dict)
    """per name, ``(structure index, finished blocks)`` in structure order"""


class AnalysisPlan:
    """A checked analysis request: model, names, grid and settings.

    Builds the parts of an analysis structure by structure and joins them; see
    :py:func:`analyze` for the parameters.
    """

    PART_TYPES = (AnalysisPart, BlockLayout)
    """the classes a part holds besides tensors and containers, for reading saved
    parts back (``result_types`` of
    :py:func:`~metatrain_symmetry.distributed.run_resumable`)"""

    def __init__(
        self,
        model: ModelLike,
        outputs: Sequence[str],
        max_lambda: int = DEFAULT_MAX_LAMBDA,
        grid: O3Grid | None = None,
        batch_size: int | None = None,
        per_atom: bool = False,
    ):
        model = load_model(model)
        names = _check_names(outputs)
        if not is_integer(max_lambda) or max_lambda < 0:
            raise ValueError(
                f"max_lambda must be a non-negative integer, got {max_lambda}"
            )
        if grid is None:
            target_lambda = max(standard_lambda(name) for name in names)
            grid = O3Grid(degree=max(2 * max_lambda, 2 * target_lambda + 1))
        if not isinstance(grid, O3Grid):
            raise TypeError(f"grid must be an O3Grid, got {type(grid).__name__}")
        grid.check_lambda(max_lambda)
        if not grid.inversion:
            raise ValueError(
                "analyze needs improper rotations to resolve sigma: use an O3Grid "
                "with inversion=True"
            )
        if grid.degree is None and len(grid) < MIN_RANDOM_ELEMENTS:
            raise ValueError(
                f"a random grid needs at least {MIN_RANDOM_ELEMENTS} elements "
                f"({_MIN_PAIRS} rotations and their inversions) to estimate spectra "
                f"and their standard errors, got {len(grid)}"
            )
        model.check_names(names)
        self.model = model
        self.names = names
        self.max_lambda = int(max_lambda)
        self.grid = grid
        self.per_atom = per_atom
        self.requests = {name: output_request(model, name, per_atom) for name in names}
        self.evaluator = RotatedEvaluator(model, grid, batch_size)
        self.integrator = Integrator(grid, max_lambda)

    def prepare(self, systems: Sequence[SystemLike]) -> list[System]:
        """The structures as the model's systems (see :py:func:`prepare_systems`)."""
        systems = prepare_systems(systems, self.model)
        self.model.warn_if_single_precision()
        return systems

    def costs(self, systems: Sequence[System]) -> list[int]:
        """``(n_structures,)`` work of each structure: atoms times copies."""
        return [max(len(system), 1) * len(self.grid) for system in systems]

    def settings(self) -> dict:
        """JSON-ready identity of everything but the model and the structures
        that the numbers depend on."""
        digest = hashlib.sha256()
        for tensor in (self.grid.rotations, self.grid.weights):
            digest.update(tensor.to(torch.float64).contiguous().numpy().tobytes())
        return {
            "outputs": self.names,
            "max_lambda": self.max_lambda,
            "per_atom": bool(self.per_atom),
            "grid": {
                "kind": "lebedev" if self.grid.degree is not None else "random",
                "degree": self.grid.degree,
                "n_elements": len(self.grid),
                "sha256": digest.hexdigest(),
            },
            "dtype": str(self.model.dtype).replace("torch.", ""),
            "version": __version__,
        }

    def manifest(self, kind: str, systems: Sequence[System], **extra) -> dict:
        """JSON-ready identity of a resumable run of this plan (see
        :py:func:`~metatrain_symmetry.distributed.run_resumable`): its ``kind``,
        the model file, the structures, the settings and ``extra`` entries.

        :raise ValueError: for a model that was not loaded from a file
        """
        return {
            "kind": kind,
            "model": model_fingerprint(self.model),
            "structures": systems_fingerprint(systems),
            "n_structures": len(systems),
            **extra,
            **self.settings(),
        }

    def run(
        self,
        systems: Sequence[System],
        shards: dict[int, list[int]],
        progress: bool = False,
    ) -> Iterator[tuple[int, AnalysisPart]]:
        """Analyse some structures, shard by shard, in one pass.

        :param systems: all prepared structures (see :py:meth:`prepare`)
        :param shards: ``{shard: structure indices}``, the structures to analyse
        :param progress: show a progress bar
        :return: ``(shard, part)`` as each shard completes, in the order given
        """
        order = [
            (shard, index) for shard, indices in shards.items() for index in indices
        ]
        selected = [systems[index] for _, index in order]
        remaining = {shard: len(indices) for shard, indices in shards.items()}
        names = self.names
        accumulators: dict[str, dict[int, list[BlockAccumulator]]] = {
            name: {} for name in names
        }
        parts = {
            shard: AnalysisPart({}, {name: [] for name in names}) for shard in shards
        }
        integrator = self.integrator
        current = None

        def finish(position: int) -> AnalysisPart | None:
            shard, structure = order[position]
            part = parts[shard]
            finish_structure(position, accumulators, part.finished, integrator)
            # the chunk's position in this pass becomes the dataset index
            for name in names:
                entry = part.finished[name][-1]
                part.finished[name][-1] = (structure, entry[1])
            remaining[shard] -= 1
            if remaining[shard] == 0:
                return parts.pop(shard)
            return None

        stream = self.evaluator.stream(selected, self.requests, progress=progress)
        for chunk in stream:
            if current is not None and chunk.structure != current:
                part = finish(current)
                if part is not None:
                    yield order[current][0], part
            current = chunk.structure
            shard = order[current][0]
            for name, output in chunk.outputs.items():
                keys = output.keys
                parts[shard].keys.setdefault(name, (keys.names, keys.values.cpu()))
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
        if current is not None:
            part = finish(current)
            if part is not None:
                yield order[current][0], part

    def assemble(self, parts: Sequence[AnalysisPart]) -> AnalysisResult:
        """Join the parts of every structure, in structure order, into the
        analysis."""
        keys: dict[str, Labels] = {}
        finished: dict[str, list] = {name: [] for name in self.names}
        for part in parts:
            for name in self.names:
                keys.setdefault(name, Labels(*part.keys[name]))
                finished[name].extend(part.finished[name])
        result = AnalysisResult(
            {},
            {},
            {},
            {},
            grid=self.grid,
            max_lambda=self.max_lambda,
            outputs=self.names,
            estimated=self.integrator.estimated,
        )
        for name in self.names:
            finished[name].sort(key=lambda entry: entry[0])
            assemble(
                name,
                keys[name],
                finished[name],
                result,
                self.max_lambda,
                self.integrator,
            )
        return result


def model_fingerprint(model: LoadedModel) -> str:
    """SHA-256 of the file a model was loaded from.

    :raise ValueError: for a model that was not loaded from a file
    """
    if model.source is None or not os.path.isfile(model.source):
        raise ValueError(
            "a work directory needs a model loaded from a file, to recognise it "
            "when resuming: pass the model's path"
        )
    return sha256_of_file(model.source)


def run_context(distributed: bool) -> DistributedContext:
    """The context of torch's default process group with ``distributed``, else a
    single process."""
    return DistributedContext.current() if distributed else DistributedContext()


def analyze(
    model: ModelLike,
    systems: Sequence[SystemLike],
    outputs: Sequence[str],
    max_lambda: int = DEFAULT_MAX_LAMBDA,
    grid: O3Grid | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    per_atom: bool = False,
    distributed: bool = False,
    work_dir: str | os.PathLike | None = None,
    allow_close_atoms: bool = False,
) -> AnalysisResult | None:
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
    :param batch_size: rotated copies per model call (default: about 1024 atoms
        on a CPU, 4096 on a GPU)
    :param progress: show a progress bar (on rank 0 only)
    :param per_atom: analyse per-atom contributions of per-structure outputs such as
        the energy
    :param distributed: spread the structures over the processes of torch's
        initialized default process group (see
        :py:func:`metatrain_symmetry.distributed.init_from_environment`); every
        rank must call this function with the same arguments
    :param work_dir: save each completed shard of structures in this directory,
        and reuse the shards a previous, interrupted run with the same model
        file, structures and settings saved there (another run's directory is
        refused); the directory is kept: remove it once the result is saved
    :param allow_close_atoms: warn, instead of raising, on structures with atoms
        closer than :py:data:`~metatrain_symmetry.data.CLOSE_ATOMS_DISTANCE`
    :return: the analysis, see :py:class:`AnalysisResult`; ``None`` on ranks
        other than 0 when ``distributed``
    """
    check_close_atoms(systems, allow_close_atoms)
    context = run_context(distributed)
    plan = AnalysisPlan(model, outputs, max_lambda, grid, batch_size, per_atom)
    systems = plan.prepare(systems)
    manifest = None if work_dir is None else plan.manifest("analyze", systems)
    parts = run_resumable(
        plan.costs(systems),
        lambda mine: plan.run(systems, mine, progress and context.is_main),
        context,
        work_dir,
        manifest,
        result_types=AnalysisPlan.PART_TYPES,
    )
    if parts is None:
        return None
    return plan.assemble(parts)


def _check_names(outputs) -> list[str]:
    return name_list(
        outputs,
        "no outputs requested: name at least one output or feature",
        "outputs are requested more than once",
    )


def output_request(model: LoadedModel, name: str, per_atom: bool) -> ModelOutput:
    """What to ask the model for ``name``: its unit, and its natural sample kind
    (per atom for per-structure outputs when ``per_atom``, but never for the
    stress)."""
    kind = model.natural_sample_kind(name)
    if per_atom and kind == "system" and name != "stress":
        kind = "atom"
    declared = model.outputs.get(name)
    unit = "" if declared is None else declared.unit
    return ModelOutput(unit=unit, sample_kind=kind)
