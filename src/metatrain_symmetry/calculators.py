"""ASE calculators for a model, its O(3) average and a random rotation per call.

The one module that knows the simulation engines. Three calculators give the three
variants that ``mtt-symmetry consequences`` runs side by side, and users can put
them in their own scripts:

- :py:func:`model_calculator`: the model as it is, through metatomic's ASE
  calculator;
- :py:class:`AveragedCalculator`: the model's average over an O(3) quadrature,
  ``E(x) = sum_g w_g E(g x)`` with forces ``-dE/dx`` and the stress of the same
  average: exactly invariant when the quadrature is (every finite group of
  rotations is a subgroup of O(3), so a grid average is invariant under the grid's
  own rotations and, for smooth models, close to invariant under all);
- :py:class:`RandomRotationCalculator`: any calculator evaluated in a freshly drawn
  Haar-random O(3) frame at every call, forces and stress rotated back.
"""

from __future__ import annotations

import numpy as np
import torch
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress
from metatomic.torch import ModelOutput, unit_conversion_factor

from .engine import RotatedEvaluator
from .grid import O3Grid
from .models import LoadedModel, ModelLike, load_model
from .systems import prepare_systems


__all__ = [
    "DEFAULT_AVERAGE_DEGREE",
    "AveragedCalculator",
    "RandomRotationCalculator",
    "energy_model",
    "model_calculator",
    "random_orthogonal_matrix",
]


DEFAULT_AVERAGE_DEGREE = 5
"""Lebedev degree of the quadrature of :py:class:`AveragedCalculator` by default
(168 elements: 14 Lebedev nodes x 6 in-plane angles x 2 cosets)"""

PROPERTIES = ["energy", "free_energy", "forces", "stress"]


def energy_model(model: ModelLike, device: str | None = None) -> LoadedModel:
    """Load ``model`` for simulations, refusing one without an ``energy`` output."""
    loaded = load_model(model, device=device)
    if "energy" not in loaded.outputs:
        raise ValueError(
            f"the model has no 'energy' output (it has {sorted(loaded.outputs)}); "
            "molecular dynamics and relaxations need a model of the energy"
        )
    return loaded


def model_calculator(model: ModelLike, device: str | None = None) -> Calculator:
    """The model as it is: metatomic's ASE calculator, with conservative forces
    and stress from the derivatives of the energy."""
    from metatomic_ase import MetatomicCalculator

    loaded = energy_model(model, device)
    return MetatomicCalculator(loaded.atomistic_model(), device=device)


def _is_periodic(atoms: Atoms) -> bool:
    return bool(np.all(atoms.pbc)) and abs(atoms.cell.volume) > 0.0


class AveragedCalculator(Calculator):
    """The O(3) average of a model's energy on a quadrature, with its forces and
    (for periodic structures) stress.

    All rotated copies of a structure go through the model in large batches
    (:py:class:`~metatrain_symmetry.engine.RotatedEvaluator`), so one call costs
    about one batched evaluation of ``len(grid)`` copies.

    :param model: any model :py:func:`~metatrain_symmetry.load_model` accepts, with
        an ``energy`` output
    :param grid: the quadrature (default: ``O3Grid(DEFAULT_AVERAGE_DEGREE)``);
        ``O3Grid.random(N)`` for a cheaper, unbiased but noisy average
    :param batch_size: rotated copies per model call (default: the engine's)
    :param device: device the model runs on
    """

    implemented_properties = PROPERTIES

    def __init__(
        self,
        model: ModelLike,
        grid: O3Grid | None = None,
        batch_size: int | None = None,
        device: str | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.model = energy_model(model, device)
        self.grid = O3Grid(DEFAULT_AVERAGE_DEGREE) if grid is None else grid
        self._evaluator = RotatedEvaluator(self.model, self.grid, batch_size)
        unit = self.model.outputs["energy"].unit or "eV"
        self._energy_factor = unit_conversion_factor(unit, "eV")
        self._length_factor = unit_conversion_factor(self.model.length_unit, "angstrom")

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        periodic = _is_periodic(self.atoms)
        names = ["energy", "forces"] + (["stress"] if periodic else [])
        requests = {name: ModelOutput(sample_kind="system") for name in names}
        systems = prepare_systems([self.atoms], self.model)
        dtype = self.model.dtype
        rotations = self.grid.rotations.to(dtype)
        weights = self.grid.weights.to(dtype)
        energy = torch.zeros((), dtype=dtype)
        forces = torch.zeros((len(self.atoms), 3), dtype=dtype)
        stress = torch.zeros((3, 3), dtype=dtype)
        for chunk in self._evaluator.stream(systems, requests):
            w = weights[chunk.rotations]
            r = rotations[chunk.rotations]
            values = {n: chunk.outputs[n].blocks[0].values.cpu() for n in names}
            energy += (w * values["energy"].reshape(-1)).sum()
            # back to the input frame: F = R^T F(g x), sigma = R^T sigma(g x) R
            forces += torch.einsum("n,nji,naj->ai", w, r, values["forces"][..., 0])
            if periodic:
                stress += torch.einsum(
                    "n,nki,nkl,nlj->ij", w, r, values["stress"][:, 0, ..., 0], r
                )
        self.results["energy"] = float(energy) * self._energy_factor
        self.results["free_energy"] = self.results["energy"]
        self.results["forces"] = (
            forces.numpy() * self._energy_factor / self._length_factor
        )
        if periodic:
            self.results["stress"] = full_3x3_to_voigt_6_stress(
                stress.numpy() * self._energy_factor / self._length_factor**3
            )


def random_orthogonal_matrix(rng: np.random.Generator) -> np.ndarray:
    """A Haar-random element of O(3) (a rotation or a rotation times the
    inversion, with probability 1/2 each), as a ``(3, 3)`` float64 array.

    The QR decomposition of a Gaussian matrix, with the signs of R's diagonal
    moved into Q, is Haar-distributed on O(3) (Mezzadri 2007).
    """
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


class RandomRotationCalculator(Calculator):
    """Any ASE calculator evaluated in a Haar-random O(3) frame drawn afresh at
    every call, with forces and stress rotated back to the input frame.

    The energy is then a random variable whose mean is the O(3) average; the
    breaking no longer has a preferred lab frame to act in, at the cost of noise
    in energies and forces (which thermostatted dynamics absorb, but which makes
    NVE energy drift and relaxations to tight ``fmax`` harder).

    :param calculator: the calculator to rotate, e.g. :py:func:`model_calculator`
    :param seed: seed of the random frames
    """

    implemented_properties = PROPERTIES

    def __init__(self, calculator: Calculator, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.calculator = calculator
        self.rng = np.random.default_rng(seed)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        rotation = random_orthogonal_matrix(self.rng)
        rotated = Atoms(
            numbers=self.atoms.numbers,
            positions=self.atoms.positions @ rotation.T,
            cell=self.atoms.cell.array @ rotation.T,
            pbc=self.atoms.pbc,
        )
        rotated.calc = self.calculator
        self.results["energy"] = rotated.get_potential_energy()
        self.results["free_energy"] = self.results["energy"]
        # rows are vectors: R^T f per atom is f @ R
        self.results["forces"] = rotated.get_forces() @ rotation
        if _is_periodic(self.atoms):
            stress = rotated.get_stress(voigt=False)
            self.results["stress"] = full_3x3_to_voigt_6_stress(
                rotation.T @ stress @ rotation
            )
