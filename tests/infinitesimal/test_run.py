import subprocess

import ase
import ase.build
import numpy as np
import pytest
import torch
from ase.neighborlist import neighbor_list
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import ModelOutput, System

import metatrain_symmetry as msym
from metatrain_symmetry.generators import so3_generators
from tests.helpers import (
    AnalyticModel,
    NoForwardMode,
    PairPotential,
    capabilities,
    finite_lie_derivative,
    pair_capabilities,
)


EQUIVARIANT = ["mtt::spherical_x", "mtt::axial", "non_conservative_force"]


@pytest.fixture
def analytic_model():
    return msym.load_model(AnalyticModel(), capabilities=capabilities())


def pair_model(lab_frame=0.0, cutoff=6.0):
    return msym.load_model(
        PairPotential(cutoff=cutoff, lab_frame=lab_frame),
        capabilities=pair_capabilities(),
    )


def per_structure(tensor: TensorMap, structure: int) -> torch.Tensor:
    block = tensor.block()
    return block.values[block.samples.column("system") == structure]


def test_equivariant_outputs_have_no_lie_derivative(analytic_model, molecules):
    result = msym.infinitesimal(
        analytic_model, molecules, EQUIVARIANT + ["mtt::distance"]
    )
    assert result.method == "forward"
    for name in result.outputs:
        block = result.lie_derivative[name].block()
        assert block.components[0] == Labels.range("generator", 3)
        assert block.samples.names[0] == "system"
        assert float(block.values.abs().max()) < 1e-13, name
        assert float(result.relative_lie_derivative[name].max()) < 1e-13
    # the axial vector is declared (1, -1): it keeps its sign under the inversion
    assert float(result.inversion_error["mtt::axial"].max()) < 1e-14


def test_analytic_outputs_match_finite_differences(analytic_model, molecules):
    result = msym.infinitesimal(analytic_model, molecules, ["mtt::x_z", "mtt::triple"])
    for name in result.outputs:
        for structure, atoms in enumerate(molecules):
            values = per_structure(result.lie_derivative[name], structure)
            for k in range(3):
                reference = finite_lie_derivative(analytic_model, atoms, name, k)
                assert torch.allclose(values[:, k], reference, atol=1e-9)
    # x_z changes sign under the inversion, the triple product too: both are
    # declared invariant, so |(-f) - f| / |f| = 2
    assert torch.allclose(
        result.inversion_error["mtt::triple"], torch.tensor(2.0).double()
    )


class OffsetForce(torch.nn.Module):
    """Positions relative to the centroid (equivariant) plus a lab-frame vector."""

    def __init__(self, offset):
        super().__init__()
        self.offset = torch.tensor(offset, dtype=torch.float64)

    def forward(self, systems: list[System], outputs, selected_atoms=None):
        values, samples = [], []
        for index, system in enumerate(systems):
            values.append(system.positions - system.positions.mean(dim=0) + self.offset)
            atoms = torch.arange(len(system), dtype=torch.int32)
            samples.append(torch.stack([torch.full_like(atoms, index), atoms], dim=1))
        block = TensorBlock(
            values=torch.cat(values).unsqueeze(-1),
            samples=Labels(["system", "atom"], torch.cat(samples)),
            components=[Labels.range("xyz", 3)],
            properties=Labels.range("force", 1),
        )
        return {"non_conservative_force": TensorMap(Labels.single(), [block])}


def test_constant_lab_frame_vector(molecules):
    offset = [0.3, -1.1, 0.6]
    model = msym.load_model(OffsetForce(offset), capabilities=capabilities())
    result = msym.infinitesimal(model, molecules, ["non_conservative_force"])
    values = result.lie_derivative["non_conservative_force"].block().values[..., 0]
    expected = -torch.einsum(
        "kij,j->ki", so3_generators(), torch.tensor(offset).double()
    )
    assert torch.allclose(values, expected.expand_as(values), atol=1e-13)
    # its reversal under the inversion misses twice the offset on every atom
    for structure, atoms in enumerate(molecules):
        centred = atoms.positions - atoms.positions.mean(axis=0)
        norm = np.linalg.norm(centred + offset)
        assert float(result.inversion_error["non_conservative_force"][structure]) == (
            pytest.approx(2 * np.sqrt(len(atoms)) * np.linalg.norm(offset) / norm)
        )


def test_invariant_energy_has_no_torque_or_antisymmetric_virial(
    molecules, periodic_frames
):
    frames = molecules + periodic_frames[:1]
    result = msym.infinitesimal(pair_model(cutoff=3.0), frames, ["energy", "forces"])
    assert result.torque.block().samples.column("system").tolist() == [0, 1, 2]
    assert result.antisymmetric_virial.block().samples.column("system").tolist() == [3]
    assert float(result.torque.block().values.abs().max()) < 1e-12
    assert float(result.antisymmetric_virial.block().values.abs().max()) < 1e-12
    for name in result.outputs:
        assert float(result.lie_derivative[name].block().values.abs().max()) < 1e-12
    stress = msym.infinitesimal(pair_model(cutoff=3.0), periodic_frames[:1], ["stress"])
    assert float(stress.lie_derivative["stress"].block().values.abs().max()) < 1e-12


def lab_frame_strain_gradient(atoms, strength, cutoff):
    """``d/d epsilon`` of ``a sum_{i<j} (r_ij . e_z)^2`` (``x -> x (1 + epsilon)``)
    over the pairs within ``cutoff``, periodic images included: ``2 a sum r_ij
    (r_ij . e_z)`` in column ``z``."""
    first, second, vectors = neighbor_list("ijD", atoms, cutoff)
    gradient = np.zeros((3, 3))
    # the full list counts every pair twice
    gradient[:, 2] = strength * (vectors * vectors[:, 2:]).sum(axis=0)
    return gradient


def test_lab_frame_energy_has_its_analytic_torque_and_virial(
    molecules, periodic_frames
):
    strength, cutoff = 0.3, 6.0
    frames = molecules + periodic_frames[:1]
    model = pair_model(lab_frame=strength, cutoff=cutoff)
    result = msym.infinitesimal(model, frames, ["energy"])
    torques = result.torque.block().values[..., 0]
    for structure, atoms in enumerate(molecules):
        first, second, vectors = neighbor_list("ijD", atoms, cutoff)
        # F_i = -2 a sum_j (z_i - z_j) e_z, and the torque sum_i r_i x F_i
        forces = np.zeros((len(atoms), 3))
        np.add.at(forces[:, 2], first, 2 * strength * vectors[:, 2])
        expected = np.cross(atoms.positions, forces).sum(axis=0)
        assert torques[structure].numpy() == pytest.approx(expected, abs=1e-12)
        assert np.abs(expected).max() > 0.1
    gradient = lab_frame_strain_gradient(periodic_frames[0], strength, cutoff)
    virial = -gradient
    expected = (virial - virial.T) / 2
    (computed,) = result.antisymmetric_virial.block().values[..., 0]
    assert computed.numpy() == pytest.approx(expected, abs=1e-10)
    # and L_k E = <dE/d epsilon, G_k^T> for the periodic structure
    lie = per_structure(result.lie_derivative["energy"], 3)[0, :, 0]
    total = gradient + strain_gradient_of_pairs(periodic_frames[0], cutoff)
    generators = so3_generators().numpy()
    assert lie.numpy() == pytest.approx(
        [np.sum(total * g.T) for g in generators], abs=1e-10
    )


def strain_gradient_of_pairs(atoms, cutoff):
    """``d/d epsilon`` of the invariant pair energy: symmetric."""
    first, second, vectors = neighbor_list("ijD", atoms, cutoff)
    distances = np.linalg.norm(vectors, axis=1)
    derivative = np.exp(-distances) * (
        2 * (distances - cutoff) - (distances - cutoff) ** 2
    )
    return 0.5 * np.einsum("p,pa,pb->ab", derivative / distances, vectors, vectors)


@pytest.fixture(scope="module")
def exported_pet(audit_inputs, tmp_path_factory):
    """The tiny PET of ``audit_inputs`` exported by ``mtt export`` in its own
    process."""
    path = tmp_path_factory.mktemp("infinitesimal") / "model.pt"
    process = subprocess.run(
        ["mtt", "export", str(audit_inputs / "model.ckpt"), "-o", str(path)],
        capture_output=True,
        text=True,
    )
    assert process.returncode == 0, process.stderr
    return path


def test_pet_derivatives_agree_between_methods_and_with_finite_differences(
    exported_pet, molecules, periodic_frames
):
    model = msym.load_model(exported_pet, dtype=torch.float64)
    frames = [ase.build.molecule("CH3OH"), periodic_frames[0]]
    names = ["energy", "forces", "non_conservative_force"]
    forward = msym.infinitesimal(model, frames, names, method="forward")
    backward = msym.infinitesimal(model, frames, names, method="double-backward")
    assert (forward.method, backward.method) == ("forward", "double-backward")
    for name in names:
        values = forward.lie_derivative[name].block().values
        assert float(values.abs().max()) > 1e-3, name
        other = backward.lie_derivative[name].block().values
        assert torch.allclose(values, other, atol=1e-12), name
        for structure, atoms in enumerate(frames):
            mine = per_structure(forward.lie_derivative[name], structure)
            for k in range(3):
                reference = finite_lie_derivative(model, atoms, name, k)
                scale = float(reference.abs().max())
                assert torch.allclose(mine[:, k], reference, atol=1e-7 * scale)
    # the torque is minus the energy's Lie derivative
    energy = per_structure(forward.lie_derivative["energy"], 0)[0, :, 0]
    assert torch.allclose(forward.torque.block().values[0, :, 0], -energy)
    stress = msym.infinitesimal(model, periodic_frames[:1], ["stress"])
    values = stress.lie_derivative["stress"].block().values[0]
    for k in range(3):
        reference = finite_lie_derivative(model, periodic_frames[0], "stress", k)[0]
        assert torch.allclose(
            values[k], reference, atol=1e-7 * float(values.abs().max())
        )


def test_orientation_average_is_the_spectrum_weighted_by_casimir(analytic_model):
    """Averaged over O(3), sum_k |L_k f(g x)|^2 / |f|^2 is sum lambda (lambda + 1)
    b_{lambda, sigma} over the normalized spectrum b."""
    rng = np.random.default_rng(3)
    atoms = ase.Atoms("CH3", positions=rng.normal(size=(4, 3)))
    names = ["mtt::x_z_squared", "mtt::legendre_1_3", "mtt::harmonics_1_3"]
    grid = msym.O3Grid(degree=10)
    analysis = msym.analyze(analytic_model, [atoms], names, max_lambda=4, grid=grid)
    rotated = []
    for rotation in grid.rotations.numpy():
        copy = atoms.copy()
        copy.positions = atoms.positions @ rotation.T
        rotated.append(copy)
    result = msym.infinitesimal(analytic_model, rotated, names)
    weights = grid.weights
    for name in names:
        lie = result.lie_derivative[name].block().values.reshape(len(grid), -1)
        values = torch.stack(
            [
                analytic_model([s], {name: ModelOutput(sample_kind="system")})[name]
                .block()
                .values.flatten()
                for s in _systems(analytic_model, rotated)
            ]
        )
        ratio = (weights @ lie.square().sum(dim=1)) / (
            weights @ values.square().sum(dim=1)
        )
        spectrum = analysis.spectrum[name].block()
        casimir = torch.tensor(
            [lam * (lam + 1) for lam, _ in spectrum.properties.values.tolist()]
        ).double()
        assert float(ratio) == pytest.approx(
            float(spectrum.values[0] @ casimir), rel=1e-10
        )


def _systems(model, frames):
    from metatrain_symmetry.systems import prepare_systems

    return prepare_systems(frames, model)


def test_first_order_invariant_yet_broken(analytic_model):
    """(x_1 . e_z)^2 is stationary where x_1 is along z: no Lie derivative, while
    4/9 of it is outside the invariants: the screen cannot replace the audit."""
    atoms = ase.Atoms(
        "CH3", positions=[[0, 0, 0], [0, 0, 1.1], [1.0, 0.2, -0.3], [-0.4, 1.0, -0.2]]
    )
    name = "mtt::x_z_squared"
    screen = msym.infinitesimal(analytic_model, [atoms], [name])
    assert float(screen.relative_lie_derivative[name][0]) < 1e-14
    analysis = msym.analyze(analytic_model, [atoms], [name], max_lambda=2)
    weights = analysis.spectrum[name].block().values[0]
    assert float(weights[4]) == pytest.approx(4 / 9)


def test_zero_outputs_have_no_relative_values():
    frames = [
        ase.Atoms("Cu", positions=[[0, 0, 0]]),
        ase.Atoms("Cu3", positions=[[0, 0, 0], [2.5, 0, 0], [0.2, 2.4, 0.3]]),
    ]
    result = msym.infinitesimal(
        pair_model(lab_frame=0.2, cutoff=3.0), frames, ["forces"]
    )
    assert result.zero_structures["forces"].tolist() == [True, False]
    assert np.isnan(float(result.relative_lie_derivative["forces"][0]))
    assert np.isnan(float(result.inversion_error["forces"][0]))
    assert float(result.relative_lie_derivative["forces"][1]) > 1e-3


class NoForwardModeModel(AnalyticModel):
    def forward(self, systems, outputs, selected_atoms=None):
        results = super().forward(systems, outputs, selected_atoms)
        block = results["mtt::x_z"].block()
        values = NoForwardMode.apply(block.values)
        block = TensorBlock(values, block.samples, block.components, block.properties)
        results["mtt::x_z"] = TensorMap(results["mtt::x_z"].keys, [block])
        return results


def test_falls_back_to_double_backward_once(analytic_model, molecules):
    model = msym.load_model(NoForwardModeModel(), capabilities=capabilities())
    with pytest.warns(UserWarning, match="does not support forward-mode") as caught:
        result = msym.infinitesimal(model, molecules, ["mtt::x_z"], batch_size=1)
    assert len([w for w in caught if "forward-mode" in str(w.message)]) == 1
    assert result.method == "double-backward"
    reference = msym.infinitesimal(analytic_model, molecules, ["mtt::x_z"])
    assert torch.allclose(
        result.lie_derivative["mtt::x_z"].block().values,
        reference.lie_derivative["mtt::x_z"].block().values,
        atol=1e-14,
    )
    with pytest.raises(ValueError, match="use method='double-backward'"):
        msym.infinitesimal(model, molecules, ["mtt::x_z"], method="forward")


def test_batches_give_the_same_numbers(analytic_model, molecules):
    names = ["mtt::x_z", "mtt::harmonics_2"]
    whole = msym.infinitesimal(analytic_model, molecules, names)
    single = msym.infinitesimal(analytic_model, molecules, names, batch_size=1)
    for name in names:
        assert torch.equal(
            whole.lie_derivative[name].block().values,
            single.lie_derivative[name].block().values,
        )


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"outputs": ["mtt::x_z"], "method": "finite"}, "unknown method 'finite'"),
        ({"outputs": ["nope"]}, "unknown output 'nope'"),
        ({"outputs": []}, "no outputs requested"),
        ({"outputs": ["mtt::x_z"], "batch_size": 0}, "batch_size must be a positive"),
    ],
)
def test_bad_requests(analytic_model, molecules, arguments, message):
    with pytest.raises(ValueError, match=message):
        msym.infinitesimal(analytic_model, molecules, **arguments)


def test_stress_needs_periodic_structures(molecules):
    with pytest.raises(ValueError, match="stress needs periodic structures"):
        msym.infinitesimal(pair_model(), molecules, ["stress"])


def test_same_numbers_in_inference_mode(molecules):
    # the energy's metrics need autograd, which a caller's inference mode or
    # no_grad would switch off
    from metatrain_symmetry.testing import tiny_pet

    pet = tiny_pet()
    outputs = ["energy", "forces", "non_conservative_force"]
    reference = msym.infinitesimal(pet, molecules[:2], outputs)
    for mode in (torch.inference_mode, torch.no_grad):
        with mode():
            result = msym.infinitesimal(pet, molecules[:2], outputs)
        for name in outputs:
            torch.testing.assert_close(
                result.relative_lie_derivative[name],
                reference.relative_lie_derivative[name],
            )
            assert bool(torch.isfinite(reference.relative_lie_derivative[name]).all())
