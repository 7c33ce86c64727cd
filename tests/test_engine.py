"""The engine's rotated copies, and the forces and stress it derives from the
energy, against independent evaluations of freshly built rotated structures."""

import ase
import ase.build
import numpy as np
import pytest
import torch
from metatomic.torch import ModelOutput, System, systems_to_torch

import metatrain_symmetry as msym
from metatrain_symmetry.engine import RotatedEvaluator
from metatrain_symmetry.systems import attach_neighbor_lists, prepare_systems
from metatrain_symmetry.testing import tiny_pet
from tests.helpers import PairPotential, pair_capabilities


def copper_cell():
    atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.1, seed=3)
    atoms.set_cell(atoms.cell @ (np.eye(3) + 0.04 * np.arange(9).reshape(3, 3) / 9))
    return atoms


def reference_derivatives(model, atoms, rotation):
    """Energy, forces and stress of ``atoms`` rotated by ``rotation``, from a
    neighbour list computed from scratch and autograd through positions and
    strain."""
    rotated = atoms.copy()
    rotated.positions = atoms.positions @ rotation.T
    rotated.cell = atoms.cell.array @ rotation.T
    system = systems_to_torch(rotated, dtype=torch.float64)
    positions = system.positions.detach().requires_grad_(True)
    strain = torch.zeros((3, 3), dtype=torch.float64, requires_grad=True)
    deformation = torch.eye(3, dtype=torch.float64) + strain
    system = System(
        types=system.types,
        positions=positions @ deformation,
        cell=system.cell @ deformation,
        pbc=system.pbc,
    )
    attach_neighbor_lists(model, [system])
    energy = model([system], {"energy": ModelOutput(sample_kind="system")})
    energy = energy["energy"].block().values.sum()
    forces, virial = torch.autograd.grad(energy, [positions, strain])
    volume = abs(float(np.linalg.det(rotated.cell.array)))
    return energy.detach(), -forces, virial / volume


@pytest.mark.parametrize("which", ["pair", "pet"])
def test_forces_and_stress_of_rotated_copies(which):
    if which == "pair":
        model = msym.load_model(PairPotential(), capabilities=pair_capabilities())
    else:
        model = msym.load_model(tiny_pet(atomic_types=(29,)))
    atoms = copper_cell()
    grid = msym.O3Grid.random(4, seed=5)
    requests = {
        "energy": ModelOutput(sample_kind="system"),
        "forces": ModelOutput(sample_kind="atom"),
        "stress": ModelOutput(sample_kind="system"),
    }
    evaluator = RotatedEvaluator(model, grid, batch_size=3)
    systems = prepare_systems([atoms], model)
    chunks = list(evaluator.stream(systems, requests))
    seen = 0
    for chunk in chunks:
        for copy, index in enumerate(chunk.rotations.tolist()):
            rotation = grid.rotations[index].numpy()
            energy, forces, stress = reference_derivatives(model, atoms, rotation)
            ours = {
                name: chunk.outputs[name].blocks[0].values[copy].squeeze(-1)
                for name in requests
            }
            assert not ours["forces"].requires_grad
            torch.testing.assert_close(ours["energy"].sum(), energy, rtol=1e-12, atol=0)
            torch.testing.assert_close(ours["forces"], forces, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(
                ours["stress"][0], stress, rtol=1e-10, atol=1e-12
            )
            seen += 1
    assert seen == len(grid)


def test_forces_of_invariant_energy_are_equivariant(molecules):
    model = msym.load_model(PairPotential(), capabilities=pair_capabilities())
    result = msym.analyze(model, [*molecules, copper_cell()], ["forces"], max_lambda=2)
    rmse = result.equivariance_rmse("forces")
    average = result.average["forces"].block().values
    assert float(rmse.max()) < 1e-10 * float(average.abs().max())
    # the forces of an invariant energy are pure (1, +1) in the direct response
    spectrum = result.spectrum["forces"].block()
    column = spectrum.properties.position([1, 1])
    values = spectrum.values
    torch.testing.assert_close(values[:, column], torch.ones(4, dtype=torch.float64))
    stress = msym.analyze(model, [copper_cell()], ["stress"], max_lambda=2)
    keys = stress.variance["stress"].keys
    assert keys.names == ["o3_lambda", "o3_sigma"]
    for block in stress.variance["stress"].blocks():
        assert float(block.values.abs().max()) < 1e-20


def test_derived_output_errors(molecules):
    model = msym.load_model(PairPotential(), capabilities=pair_capabilities())
    with pytest.raises(ValueError, match="stress needs periodic structures"):
        msym.analyze(model, molecules, ["stress"], max_lambda=1)
    pet = msym.load_model(tiny_pet())
    result = msym.analyze(pet, molecules[:1], ["forces"], max_lambda=1)
    assert result.variance["forces"].block().samples.names == ["system", "atom"]


def test_forces_need_an_energy():
    from tests.helpers import AnalyticModel, capabilities

    model = msym.load_model(AnalyticModel(), capabilities=capabilities())
    atoms = ase.Atoms("CH3", positions=np.random.default_rng(0).normal(size=(4, 3)))
    with pytest.raises(ValueError, match="derivative of the energy"):
        msym.analyze(model, [atoms], ["forces"], max_lambda=1)


@pytest.mark.parametrize("output", ["non_conservative_force", "forces"])
def test_the_stream_leaves_the_callers_autograd_mode(molecules, output):
    # the stream evaluates in inference mode (or with gradients for forces);
    # between chunks, the consumer's code runs in its own mode
    model = msym.load_model(tiny_pet())
    evaluator = RotatedEvaluator(model, msym.O3Grid(degree=3), batch_size=5)
    systems = prepare_systems(molecules[:2], model)
    requests = {output: ModelOutput(sample_kind="atom")}
    chunks = 0
    with torch.no_grad():
        for _ in evaluator.stream(systems, requests):
            assert not torch.is_inference_mode_enabled()
            assert not torch.is_grad_enabled()
            chunks += 1
    assert chunks > 2
    for _ in evaluator.stream(systems, requests):
        assert not torch.is_inference_mode_enabled()
        assert torch.is_grad_enabled()
