""":py:func:`infinitesimal`: Lie derivatives, torque and antisymmetric virial of
a model on many structures, batch by batch."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import System

from .._utils import first_line, is_integer, name_list, progress_bar
from .._version import __version__
from ..copies import prepare_rotations
from ..data import check_close_atoms
from ..diagnostics import (
    model_fingerprint,
    output_request,
    run_context,
    zero_structures,
)
from ..distributed import run_resumable
from ..engine import check_periodic, default_atoms_per_batch
from ..generators import inversion_sign
from ..irreps import block_layout
from ..models import LoadedModel, ModelLike, load_model
from ..quantities import DERIVED_OUTPUTS
from ..systems import SystemLike, prepare_systems, systems_fingerprint
from .derivatives import (
    BlockDerivatives,
    Derivatives,
    ForwardModeUnsupported,
    backward_derivatives,
    energy_derivatives,
    forward_derivatives,
)
from .result import InfinitesimalResult
from .shards import merge_records, shard_record


__all__ = ["METHODS", "infinitesimal"]


METHODS = ("auto", "forward", "double-backward")
"""how the derivatives of model outputs are taken: ``"auto"`` tries forward
mode and falls back to double backward, saying so once"""

ENERGY_OUTPUTS = ("energy", *DERIVED_OUTPUTS)
"""outputs whose Lie derivatives come from derivatives of the energy"""

_COPIES = 4
"""copies of each structure in a batch: one per generator, and the inverted one"""


# the energy's metrics need autograd: not the inference mode of a caller
@torch.inference_mode(False)
def infinitesimal(
    model: ModelLike,
    systems: Sequence[SystemLike],
    outputs: Sequence[str] = (),
    features: Sequence[str] = (),
    batch_size: int | None = None,
    method: str = "auto",
    progress: bool = False,
    distributed: bool = False,
    work_dir: str | os.PathLike | None = None,
    allow_close_atoms: bool = False,
) -> InfinitesimalResult | None:
    """Infinitesimal symmetry metrics: the Lie derivatives of outputs and
    features along the three generators of rotations, their parity under the
    inversion and, for a conservative energy, the net torque (non-periodic
    structures) and the antisymmetric virial (periodic ones).

    About one model call per structure instead of one per grid element: a screen
    of where the symmetry breaks, not a replacement for a grid analysis (an output
    can be invariant to first order and broken at finite angles).

    :param model: anything :py:func:`~metatrain_symmetry.load_model` accepts
    :param systems: ``ase.Atoms`` or metatomic ``System`` objects
    :param outputs: output names, including ``"forces"`` and ``"stress"`` (the
        derivatives of the energy)
    :param features: internal features (``"mtt::feature::<module path>"``)
    :param batch_size: structures per model call (default: about 1024 atoms on a
        CPU, 4096 on a GPU, counting the copies)
    :param method: see :py:data:`METHODS`
    :param progress: show a progress bar (on rank 0 only)
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
    :return: see :py:class:`InfinitesimalResult`; ``None`` on ranks other than 0
        when ``distributed``. Spread over shards (``distributed`` or
        ``work_dir``), its tensors are on the CPU
    """
    check_close_atoms(systems, allow_close_atoms)
    model = load_model(model)
    names = _checked_names(model, [*outputs, *features], batch_size, method)
    systems = prepare_systems(systems, model)
    if "stress" in names:
        check_periodic(systems)
    evaluation = _Evaluation(model, names, batch_size, method)
    if not distributed and work_dir is None:
        with progress_bar(systems, _COPIES, "infinitesimal", progress) as bar:
            return evaluation.run(systems, bar)
    return _sharded(evaluation, systems, progress, distributed, work_dir)


class _Evaluation:
    """The checked request of an infinitesimal analysis, evaluated on a set of
    structures at a time; after a fallback to double backward, it stays there."""

    def __init__(self, model: LoadedModel, names: list[str], batch_size, method):
        self.model = model
        self.names = names
        self.batch_size = batch_size
        self.method = method
        self.energy_names = [name for name in names if name in ENERGY_OUTPUTS]
        self.other = {
            name: output_request(model, name, False)
            for name in names
            if name not in ENERGY_OUTPUTS
        }
        self.energy_request = output_request(model, "energy", False)

    def manifest(self, systems: Sequence[System]) -> dict:
        """JSON-ready identity of a resumable run on ``systems``."""
        return {
            "kind": "infinitesimal",
            "model": model_fingerprint(self.model),
            "structures": systems_fingerprint(systems),
            "n_structures": len(systems),
            "outputs": self.names,
            "method": self.method,
            "batch_size": self.batch_size,
            "dtype": str(self.model.dtype).replace("torch.", ""),
            "version": __version__,
        }

    def run(self, systems: Sequence[System], bar) -> InfinitesimalResult:
        """The metrics of ``systems``, batch by batch, advancing ``bar``."""
        collected: dict[str, tuple[Labels, list[list[BlockDerivatives]]]] = {}
        energy_raw: list[dict[str, torch.Tensor]] = []
        for batch in _batches(systems, self.batch_size):
            prepared = [prepare_rotations(systems[i]) for i in batch]
            derivatives: Derivatives = {}
            if self.other:
                found, self.method = _model_derivatives(
                    self.model, prepared, self.other, self.method
                )
                derivatives.update(found)
            if self.energy_names:
                found, raw = energy_derivatives(
                    self.model, prepared, self.energy_names, self.energy_request
                )
                derivatives.update(found)
                energy_raw.extend(raw)
            for name, (keys, entries) in derivatives.items():
                collected.setdefault(name, (keys, []))[1].extend(entries)
            bar.update(sum(len(systems[i]) for i in batch) * _COPIES)

        method = "forward" if self.method == "auto" else self.method
        result = InfinitesimalResult(outputs=self.names, method=method)
        for name in self.names:
            keys, entries = collected[name]
            _add_output(result, name, keys, entries)
        if self.energy_names:
            result.torque, result.antisymmetric_virial = _energy_metrics(
                systems, energy_raw
            )
        return result


def _sharded(
    evaluation: _Evaluation, systems, progress, distributed, work_dir
) -> InfinitesimalResult | None:
    """:py:func:`infinitesimal` shard by shard, spread over ranks and resumable."""
    context = run_context(distributed)
    manifest = None if work_dir is None else evaluation.manifest(systems)

    def compute(mine: dict[int, list[int]]):
        selected = [systems[index] for shard in mine.values() for index in shard]
        enabled = progress and context.is_main
        with progress_bar(selected, _COPIES, "infinitesimal", enabled) as bar:
            for shard, indices in mine.items():
                part = evaluation.run([systems[index] for index in indices], bar)
                yield shard, shard_record(part)

    records = run_resumable(
        [max(len(system), 1) * _COPIES for system in systems],
        compute,
        context,
        work_dir,
        manifest,
    )
    return None if records is None else merge_records(records)


def _checked_names(model, names, batch_size, method: str) -> list[str]:
    """The requested names, once each, after checking every argument."""
    names = name_list(
        names,
        "no outputs requested: name at least one output or feature",
        "outputs are requested more than once",
    )
    model.check_names(names)
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}': choose one of {list(METHODS)}")
    if batch_size is not None and (not is_integer(batch_size) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    return names


def _model_derivatives(model, prepared, requests, method: str):
    """Derivatives of the model's own outputs, with the method to use next."""
    if method in ("auto", "forward"):
        try:
            return forward_derivatives(model, prepared, requests), method
        except ForwardModeUnsupported as error:
            if method == "forward":
                raise ValueError(
                    "the model does not support forward-mode differentiation "
                    f"({first_line(error)}): use method='double-backward'"
                ) from None
            warnings.warn(
                "the model does not support forward-mode differentiation "
                f"({first_line(error)}); taking its Lie derivatives by double "
                "backward instead",
                stacklevel=3,
            )
    try:
        return backward_derivatives(model, prepared, requests), "double-backward"
    except RuntimeError as error:
        raise ValueError(
            f"the model cannot be differentiated twice ({first_line(error)}), "
            "which its Lie derivatives need when forward mode is not available"
        ) from None


def _batches(systems: Sequence[System], batch_size: int | None):
    """Consecutive structure indices, ``batch_size`` at a time or as many as fit
    in :py:func:`~metatrain_symmetry.engine.default_atoms_per_batch` atoms."""
    batch: list[int] = []
    atoms = 0
    limit = default_atoms_per_batch(systems[0].positions.device) if systems else 0
    for index, system in enumerate(systems):
        size = max(len(system), 1) * _COPIES
        full = (
            len(batch) == batch_size if batch_size is not None else atoms + size > limit
        )
        if batch and full:
            yield batch
            batch, atoms = [], 0
        batch.append(index)
        atoms += size
    if batch:
        yield batch


def _add_output(result: InfinitesimalResult, name: str, keys, entries) -> None:
    """The Lie-derivative map of one output, and its per-structure metrics."""
    n = len(entries)
    squares = torch.zeros(n, dtype=torch.float64)
    lie_squares = torch.zeros(n, dtype=torch.float64)
    parity_squares = torch.zeros(n, dtype=torch.float64)
    sizes = [0] * n
    blocks = []
    for index in range(len(keys)):
        samples, values = [], []
        for structure, blocks_of in enumerate(entries):
            entry = blocks_of[index]
            value = entry.chunk.values[0]
            layout_sign = _parity(name, keys, index, entry)
            squares[structure] += float(value.double().square().sum())
            lie_squares[structure] += float(entry.lie.double().square().sum())
            parity = layout_sign * entry.inverted - value
            parity_squares[structure] += float(parity.double().square().sum())
            sizes[structure] += value.numel()
            column = torch.full(
                (len(entry.chunk.sample_values), 1), structure, dtype=torch.int32
            ).to(entry.chunk.sample_values.device)
            samples.append(torch.cat([column, entry.chunk.sample_values], dim=1))
            values.append(entry.lie.movedim(0, 1))
        first = entries[0][index].chunk
        blocks.append(
            TensorBlock(
                values=torch.cat(values),
                samples=Labels(["system", *first.sample_names], torch.cat(samples)),
                components=[_generator_labels(first.properties.values.device)]
                + list(first.components),
                properties=first.properties,
            )
        )
    result.lie_derivative[name] = TensorMap(keys, blocks)
    zero = zero_structures(squares, sizes)
    nan = torch.full_like(squares, float("nan"))
    norms = squares.clamp(min=torch.finfo(torch.float64).tiny)
    result.zero_structures[name] = zero
    result.relative_lie_derivative[name] = torch.where(
        zero, nan, (lie_squares / norms).sqrt()
    )
    result.inversion_error[name] = torch.where(
        zero, nan, (parity_squares / norms).sqrt()
    )


def _parity(name: str, keys: Labels, index: int, entry: BlockDerivatives) -> int:
    layout = block_layout(name, keys.names, keys.values[index], entry.chunk.components)
    return inversion_sign(layout)


def _generator_labels(device) -> Labels:
    return Labels.range("generator", 3).to(device)


def _energy_metrics(
    systems: Sequence[System], raw: list[dict[str, torch.Tensor]]
) -> tuple[TensorMap, TensorMap]:
    """The torque of the non-periodic structures and the antisymmetric virial of
    the periodic ones."""
    torques, torque_rows, virials, virial_rows = [], [], [], []
    for index, (system, entry) in enumerate(zip(systems, raw, strict=True)):
        if bool(torch.any(system.pbc)):
            virial = -entry["strain_gradient"]
            virials.append((virial - virial.T) / 2)
            virial_rows.append(index)
        else:
            positions = system.positions.detach()
            torques.append(torch.linalg.cross(positions, entry["forces"]).sum(dim=0))
            torque_rows.append(index)
    dtype, device = systems[0].positions.dtype, systems[0].positions.device
    torque = _system_map(torques, torque_rows, [(3,), ["xyz"]], dtype, device)
    virial = _system_map(
        virials, virial_rows, [(3, 3), ["xyz_1", "xyz_2"]], dtype, device
    )
    return torque, virial


def _system_map(values, rows, shape, dtype, device) -> TensorMap:
    sizes, names = shape
    stacked = (
        torch.stack(values)
        if values
        else torch.zeros(0, *sizes, dtype=dtype, device=device)
    )
    return TensorMap(
        Labels.single().to(device),
        [
            TensorBlock(
                values=stacked.unsqueeze(-1),
                samples=Labels(
                    ["system"],
                    torch.tensor(rows, dtype=torch.int32, device=device).view(-1, 1),
                ),
                components=[Labels.range(name, 3).to(device) for name in names],
                properties=Labels.range("energy", 1).to(device),
            )
        ],
    )
