"""Helpers shared by the tests: small hand-written metatomic models whose
rotational behaviour is known exactly (:py:class:`AnalyticModel`,
:py:class:`PairPotential`), :py:func:`epoch_weights` and
:py:func:`assert_same_numbers`.

All outputs of :py:class:`AnalyticModel` are functions of the unit vectors ``x_k``
from atom 0 to atoms 1, 2 and 3 of each structure:

* ``mtt::x_z``: ``x_1 . e_z``, a pure (1, +1) function of the rotation
* ``mtt::x_z_squared``: ``(x_1 . e_z)^2``, 5/9 in (0, +1) and 4/9 in (2, +1)
* ``mtt::triple``: ``x_1 . (x_2 x x_3)``, a pure pseudoscalar (0, -1)
* ``mtt::legendre_2``: ``P_2(x_1 . e_z)``, a pure (2, +1) function of the rotation
* ``mtt::legendre_1_3``: ``sqrt(3 * 0.84) P_1(x_1 . e_z) + sqrt(7 * 0.16) P_3(x_1 .
  e_z)``, 0.84 in (1, +1) and 0.16 in (3, +1) (the mean square of ``P_l`` over the
  sphere is ``1 / (2 l + 1)``)
* ``mtt::harmonics_2``: the five real spherical harmonics of degree 2 of ``x_1`` as
  properties, normalized so that their squares add up to one: pure (2, +1), and
  the same mean square in every orientation
* ``mtt::harmonics_1_3``: ``sqrt(0.84) x_1`` and ``sqrt(0.16)`` times the seven
  normalized real spherical harmonics of degree 3 of ``x_1``, as ten properties:
  0.84 in (1, +1) and 0.16 in (3, +1), with unit mean square in every orientation
* ``mtt::offset_harmonics_2``: the constant ``OFFSET`` (or the model's
  ``offset``) followed by the five
  properties of ``mtt::harmonics_2``, like an absolute energy next to its small
  orientation-dependent part: ``OFFSET^2 / (OFFSET^2 + 1)`` in (0, +1) and
  ``1 / (OFFSET^2 + 1)`` in (2, +1), a channel of the same parity as the constant
* ``mtt::distance``: ``|r_1 - r_0|``, invariant (0, +1)
* ``non_conservative_force``: per-atom positions relative to the centroid, an exactly
  equivariant Cartesian vector
* ``mtt::spherical_x``: ``x_1`` as a spherical ``(1, +1)`` block (components
  ``(y, z, x)``), exactly equivariant
* ``mtt::axial``: the axial vector ``x_1 x x_2`` as a spherical ``(1, -1)`` block,
  exactly equivariant
* ``mtt::axial_as_polar``: the same values declared ``(1, +1)``: they fail to change
  sign under the inversion, so the back-transformed response averages to zero with
  variance ``|x_1 x x_2|^2 / 3`` per component
"""

import math
from typing import Dict, List, Optional  # noqa: UP035

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import ModelCapabilities, ModelOutput, NeighborListOptions, System


EXACT_AUDIT_FILES = [
    "audit.chemiscope.json.gz",
    "audit.html",
    "audit.json",
    "audit.md",
    "spectra.mts",
    "spectra.png",
    "tensors",
]
"""what an audit on an exact grid writes, in sorted order"""


OUTPUTS = {
    "mtt::x_z": ModelOutput(sample_kind="system"),
    "mtt::x_z_squared": ModelOutput(sample_kind="system"),
    "mtt::triple": ModelOutput(sample_kind="system"),
    "mtt::legendre_2": ModelOutput(sample_kind="system"),
    "mtt::legendre_1_3": ModelOutput(sample_kind="system"),
    "mtt::harmonics_2": ModelOutput(sample_kind="system"),
    "mtt::harmonics_1_3": ModelOutput(sample_kind="system"),
    "mtt::offset_harmonics_2": ModelOutput(sample_kind="system"),
    "mtt::distance": ModelOutput(sample_kind="system"),
    "non_conservative_force": ModelOutput(sample_kind="atom"),
    "mtt::spherical_x": ModelOutput(sample_kind="system"),
    "mtt::axial": ModelOutput(sample_kind="system"),
    "mtt::axial_as_polar": ModelOutput(sample_kind="system"),
}

OFFSET = 100.0

# name: (o3_sigma declared, which vector)
SPHERICAL = {
    "mtt::spherical_x": (1, "x_1"),
    "mtt::axial": (-1, "cross"),
    "mtt::axial_as_polar": (1, "cross"),
}


def harmonics(unit: torch.Tensor, degree: int) -> torch.Tensor:
    """Real spherical harmonics of degree 1, 2 or 3 of a unit vector, scaled so
    that their squares add up to one (the standard ones times ``sqrt(4 pi / (2 l
    + 1))``)."""
    x, y, z = unit[0], unit[1], unit[2]
    if degree == 1:
        return torch.stack([y, z, x])
    if degree == 2:
        values = [
            3.0**0.5 * x * y,
            3.0**0.5 * y * z,
            (2 * z**2 - x**2 - y**2) / 2,
            3.0**0.5 * x * z,
            3.0**0.5 / 2 * (x**2 - y**2),
        ]
        return torch.stack(values)
    values = [
        (35 / 32) ** 0.5 * y * (3 * x**2 - y**2),
        105**0.5 / 2 * x * y * z,
        (21 / 32) ** 0.5 * y * (4 * z**2 - x**2 - y**2),
        (7 / 16) ** 0.5 * z * (2 * z**2 - 3 * x**2 - 3 * y**2),
        (21 / 32) ** 0.5 * x * (4 * z**2 - x**2 - y**2),
        (105 / 16) ** 0.5 * z * (x**2 - y**2),
        (35 / 32) ** 0.5 * x * (x**2 - 3 * y**2),
    ]
    return torch.stack(values) * (4 / 7) ** 0.5


class AnalyticModel(torch.nn.Module):
    def __init__(self, dtype=torch.float64, offset: float = OFFSET):
        super().__init__()
        self.register_buffer("scale", torch.ones((), dtype=dtype))
        self.offset = offset

    def forward(
        self,
        systems: list[System],
        outputs: dict[str, ModelOutput],
        selected_atoms: Optional[Labels] = None,
    ) -> dict[str, TensorMap]:
        results: dict[str, TensorMap] = {}
        per_system: dict[str, list[torch.Tensor]] = {
            "mtt::x_z": [],
            "mtt::x_z_squared": [],
            "mtt::triple": [],
            "mtt::legendre_2": [],
            "mtt::legendre_1_3": [],
            "mtt::harmonics_2": [],
            "mtt::harmonics_1_3": [],
            "mtt::offset_harmonics_2": [],
            "mtt::distance": [],
        }
        centered: list[torch.Tensor] = []
        spherical: dict[str, list[torch.Tensor]] = {"x_1": [], "cross": []}
        for system in systems:
            positions = system.positions * self.scale
            vectors = positions[1:4] - positions[0]
            unit = vectors / torch.linalg.norm(vectors, dim=1, keepdim=True)
            per_system["mtt::x_z"].append(unit[0, 2])
            per_system["mtt::x_z_squared"].append(unit[0, 2] ** 2)
            per_system["mtt::triple"].append(
                torch.dot(unit[0], torch.linalg.cross(unit[1], unit[2]))
            )
            z = unit[0, 2]
            per_system["mtt::legendre_2"].append((3 * z**2 - 1) / 2)
            per_system["mtt::legendre_1_3"].append(
                (3 * 0.84) ** 0.5 * z + (7 * 0.16) ** 0.5 * (5 * z**3 - 3 * z) / 2
            )
            per_system["mtt::harmonics_2"].append(harmonics(unit[0], 2))
            per_system["mtt::harmonics_1_3"].append(
                torch.cat(
                    [
                        0.84**0.5 * harmonics(unit[0], 1),
                        0.16**0.5 * harmonics(unit[0], 3),
                    ]
                )
            )
            per_system["mtt::offset_harmonics_2"].append(
                torch.cat(
                    [
                        torch.full((1,), self.offset, dtype=unit.dtype),
                        per_system["mtt::harmonics_2"][-1],
                    ]
                )
            )
            per_system["mtt::distance"].append(torch.linalg.norm(vectors[0]))
            # real spherical components of a vector are ordered (y, z, x)
            order = torch.tensor([1, 2, 0])
            spherical["x_1"].append(unit[0][order])
            spherical["cross"].append(torch.linalg.cross(unit[0], unit[1])[order])
            centered.append(positions - positions.mean(dim=0))

        n_systems = len(systems)
        system_samples = Labels(
            ["system"], torch.arange(n_systems, dtype=torch.int32).reshape(-1, 1)
        )
        for name, values in per_system.items():
            if name in outputs:
                stacked = torch.stack(values).reshape(n_systems, -1)
                results[name] = TensorMap(
                    Labels.single(),
                    [
                        TensorBlock(
                            values=stacked,
                            samples=system_samples,
                            components=[],
                            properties=Labels(
                                ["value"],
                                torch.arange(stacked.shape[1]).reshape(-1, 1),
                            ),
                        )
                    ],
                )
        for name, (sigma, vector) in SPHERICAL.items():
            if name in outputs:
                results[name] = TensorMap(
                    Labels(["o3_lambda", "o3_sigma"], torch.tensor([[1, sigma]])),
                    [
                        TensorBlock(
                            values=torch.stack(spherical[vector]).unsqueeze(-1),
                            samples=system_samples,
                            components=[
                                Labels("o3_mu", torch.tensor([[-1], [0], [1]]))
                            ],
                            properties=Labels(["value"], torch.tensor([[0]])),
                        )
                    ],
                )
        if "non_conservative_force" in outputs:
            samples = []
            for index, system in enumerate(systems):
                atoms = torch.arange(len(system), dtype=torch.int32)
                samples.append(
                    torch.stack([torch.full_like(atoms, index), atoms], dim=1)
                )
            results["non_conservative_force"] = TensorMap(
                Labels.single(),
                [
                    TensorBlock(
                        values=torch.cat(centered).unsqueeze(-1),
                        samples=Labels(["system", "atom"], torch.cat(samples)),
                        components=[
                            Labels(
                                "xyz", torch.arange(3, dtype=torch.int32).reshape(-1, 1)
                            )
                        ],
                        properties=Labels(["force"], torch.tensor([[0]])),
                    )
                ],
            )
        return results


def capabilities(dtype: str = "float64") -> ModelCapabilities:
    return ModelCapabilities(
        outputs=OUTPUTS,
        atomic_types=[1, 6, 8],
        interaction_range=0.0,
        length_unit="angstrom",
        supported_devices=["cpu"],
        dtype=dtype,
    )


class PairPotential(torch.nn.Module):
    """An exactly invariant energy ``E = sum_{i<j} exp(-r_ij) (r_ij - r_c)^2`` over
    the pairs of a half neighbour list, computed from its distance vectors so
    that forces and stress flow through the neighbour list.

    With ``lab_frame = a``, the energy has the lab-frame term ``a sum_{i<j}
    (r_ij . e_z)^2``, which breaks its invariance (not its translation invariance).
    With ``bond_length = b``, the pair energy is the harmonic ``k (r_ij - b)^2``
    instead (``k = stiffness``), which binds a molecule.
    """

    def __init__(
        self,
        cutoff: float = 3.0,
        dtype=torch.float64,
        lab_frame=0.0,
        bond_length=0.0,
        stiffness=10.0,
    ):
        super().__init__()
        self.register_buffer("scale", torch.ones((), dtype=dtype))
        self.options = NeighborListOptions(cutoff=cutoff, full_list=False, strict=True)
        self.lab_frame = float(lab_frame)
        self.bond_length = float(bond_length)
        self.stiffness = float(stiffness)

    def requested_neighbor_lists(self) -> list[NeighborListOptions]:
        return [self.options]

    # typing's generics: metatomic's AtomisticModel checks these annotations
    def forward(
        self,
        systems: List[System],  # noqa: UP006
        outputs: Dict[str, ModelOutput],  # noqa: UP006
        selected_atoms: Optional[Labels] = None,
    ) -> Dict[str, TensorMap]:  # noqa: UP006
        energies: list[torch.Tensor] = []
        for system in systems:
            vectors = system.get_neighbor_list(self.options).values.squeeze(-1)
            distances = torch.linalg.norm(vectors * self.scale, dim=1)
            if self.bond_length > 0.0:
                pair = self.stiffness * (distances - self.bond_length) ** 2
            else:
                pair = torch.exp(-distances) * (distances - self.options.cutoff) ** 2
            pair = pair + self.lab_frame * (vectors[:, 2] * self.scale) ** 2
            energies.append(pair.sum())
        samples = Labels(
            ["system"], torch.arange(len(systems), dtype=torch.int32).reshape(-1, 1)
        )
        block = TensorBlock(
            values=torch.stack(energies).reshape(-1, 1),
            samples=samples,
            components=[],
            properties=Labels(["energy"], torch.tensor([[0]])),
        )
        # not Labels.single(): TorchScript cannot save modules calling it
        keys = Labels(["_"], torch.tensor([[0]]))
        return {"energy": TensorMap(keys, [block])}


def pair_capabilities() -> ModelCapabilities:
    return ModelCapabilities(
        outputs={"energy": ModelOutput(unit="eV", sample_kind="system")},
        atomic_types=[1, 6, 8, 29],
        interaction_range=3.0,
        length_unit="angstrom",
        supported_devices=["cpu"],
        dtype="float64",
    )


def epoch_weights(path):
    """The model of a metatrain checkpoint with the weights of its own epoch (not
    the best weights so far, which :py:func:`metatrain_symmetry.load_model`
    takes)."""
    from metatrain.utils.io import model_from_checkpoint

    import metatrain_symmetry as msym

    checkpoint = torch.load(path, weights_only=False, map_location="cpu")
    return msym.load_model(model_from_checkpoint(checkpoint, context="restart"))


def finite_lie_derivative(model, atoms, name: str, generator: int, step=1e-3):
    """``L_k f`` of a Cartesian output by central differences of rotated copies
    (Richardson-extrapolated, error of order ``step^4``), evaluated through the
    engine at the identity of each rotated structure.

    :return: ``(n_samples, *components, n_properties)``
    """
    import numpy as np
    import scipy.linalg

    from metatrain_symmetry.engine import RotatedEvaluator
    from metatrain_symmetry.grid import O3Grid
    from metatrain_symmetry.systems import prepare_systems

    matrix = np.zeros((3, 3))
    i, j = [(1, 2), (2, 0), (0, 1)][generator]
    matrix[j, i], matrix[i, j] = 1.0, -1.0

    def back_rotated(angle):
        rotation = scipy.linalg.expm(angle * matrix)
        rotated = atoms.copy()
        rotated.positions = atoms.positions @ rotation.T
        if atoms.cell.rank > 0:
            rotated.cell = np.asarray(atoms.cell) @ rotation.T
        systems = prepare_systems([rotated], model)
        request = {name: ModelOutput(sample_kind=model.natural_sample_kind(name))}
        evaluator = RotatedEvaluator(model, O3Grid.identity())
        (chunk,) = evaluator.stream(systems, request)
        values = chunk.outputs[name].blocks[0].values[0]
        # rho(R)^-1 on every Cartesian axis: v_i -> sum_j R_ji v_j
        back = torch.tensor(rotation, dtype=values.dtype)
        for axis in range(values.ndim - 2):
            moved = values.movedim(1 + axis, 1)
            moved = torch.einsum("ji,sj...->si...", back, moved)
            values = moved.movedim(1, 1 + axis)
        return values

    def central(h):
        return (back_rotated(h) - back_rotated(-h)) / (2 * h)

    return (4 * central(step / 2) - central(step)) / 3


def assert_same_numbers(
    first, second, rel: float, abs: float, ignored=(), path: str = ""
) -> None:
    """Two JSON documents with the same structure (keys in the same order) and
    numbers, floats within ``rel`` relative or ``abs`` absolute, but for the
    ``ignored`` keys (timings, file paths) wherever they are."""
    if isinstance(first, dict):
        assert list(first) == list(second), path
        for key in first:
            if key not in ignored:
                where = f"{path}/{key}"
                assert_same_numbers(first[key], second[key], rel, abs, ignored, where)
    elif isinstance(first, list):
        assert len(first) == len(second), path
        for index, (a, b) in enumerate(zip(first, second, strict=True)):
            assert_same_numbers(a, b, rel, abs, ignored, f"{path}[{index}]")
    elif isinstance(first, float):
        assert math.isclose(first, second, rel_tol=rel, abs_tol=abs), (
            path,
            first,
            second,
        )
    else:
        assert first == second, path


class NoForwardMode(torch.autograd.Function):
    """The identity, with a backward formula and no forward-mode one: a model
    that applies it cannot be differentiated in forward mode."""

    @staticmethod
    def forward(ctx, values):
        return values.clone()

    @staticmethod
    def backward(ctx, gradient):
        return gradient


def assert_same_tensors(output, expected, quantities, rtol=1e-12, atol=1e-15):
    """Every ``<name>.<quantity>.mts`` file in ``output`` is the TensorMap of
    ``expected`` (an analysis result), and no other TensorMap was written."""
    import metatensor.torch as mts

    from metatrain_symmetry.diagnostics import file_stem

    for name in expected.outputs:
        for quantity in quantities:
            written = mts.load(str(output / f"{file_stem(name)}.{quantity}.mts"))
            tensor = getattr(expected, quantity)[name]
            assert mts.allclose(written, tensor, rtol=rtol, atol=atol), (
                name,
                quantity,
            )
    files = sorted(path.name for path in output.glob("*.mts"))
    assert len(files) == len(expected.outputs) * len(quantities)
