"""Lie derivatives of a training step's predictions on a real PET, periodic, with
neighbour lists: the reverse-mode energy path against the forward-mode one, and
forces and stress against central finite differences of back-rotated
predictions on rotated copies."""

import ase
import numpy as np
import pytest
import torch
from metatomic.torch import systems_to_torch
from metatrain.utils.neighbor_lists import get_system_with_neighbor_lists

from metatrain_symmetry.copies import rotated_systems
from metatrain_symmetry.generators import so3_generators
from metatrain_symmetry.lie_energies import with_strain_gradient
from metatrain_symmetry.lie_predictions import evaluate_lie_derivatives
from metatrain_symmetry.rotated_predictions import (
    TrainingStep,
    predictions_in_loss_units,
)
from metatrain_symmetry.testing import tiny_pet


@pytest.fixture(scope="module")
def step():
    model = tiny_pet(position_gradients=True).train()
    rng = np.random.default_rng(3)
    systems = []
    for symbols in ("CHHO", "OHHCH"):
        atoms = ase.Atoms(
            symbols,
            positions=rng.uniform(0.0, 4.0, size=(len(symbols), 3)),
            cell=np.diag([4.0, 4.3, 4.6]) + rng.normal(scale=0.2, size=(3, 3)),
            pbc=True,
        )
        system = systems_to_torch(atoms, dtype=torch.float64)
        systems.append(
            get_system_with_neighbor_lists(system, model.requested_neighbor_lists())
        )
    return TrainingStep(model, systems, dict(model.dataset_info.targets))


def test_energy_in_reverse_mode_equals_forward_mode(step):
    reverse = evaluate_lie_derivatives(step, {"energy": {None}})
    # with a non-energy target, the energy's values come from forward mode
    forward = evaluate_lie_derivatives(
        step, {"energy": {None}, "non_conservative_force": {None}}
    )
    assert reverse.values["energy"].shape == (3, 2)
    assert float(reverse.values["energy"].detach().abs().max()) > 1e-4
    torch.testing.assert_close(
        reverse.values["energy"], forward.values["energy"], rtol=1e-9, atol=1e-14
    )


def back_rotated_gradients(step, t: float, generator: torch.Tensor):
    """Forces and stress of the step's model on the systems rotated by exp(t G),
    rotated back, in the units of the loss."""
    rotation = torch.linalg.matrix_exp(t * generator)
    copies = [
        rotated_systems(system, rotation.unsqueeze(0))[0] for system in step.systems
    ]
    block = predictions_in_loss_units(step, copies, {"energy": step.targets["energy"]})[
        "energy"
    ].block()
    forces = block.gradient("positions").values.squeeze(-1) @ rotation
    strain = block.gradient("strain").values.squeeze(-1)
    strain = rotation.T @ strain @ rotation
    return forces.detach(), strain.detach()


def test_forces_and_stress_against_finite_differences(step):
    targets = {"energy": with_strain_gradient(step.targets["energy"])}
    step = TrainingStep(step.model, step.systems, targets)
    lie = evaluate_lie_derivatives(step, {"energy": {"positions", "strain"}})
    for k, generator in enumerate(so3_generators(torch.float64)):
        for label, index in (("energy::positions", 0), ("energy::strain", 1)):
            finite = richardson_difference(
                lambda t, g=generator, i=index: back_rotated_gradients(step, t, g)[i]
            ).reshape(-1)
            assert float(finite.abs().max()) > 1e-4
            torch.testing.assert_close(
                lie.values[label][k].detach(), finite, rtol=1e-7, atol=1e-10
            )


def richardson_difference(function, h: float = 1e-3) -> torch.Tensor:
    """d function / dt at 0 from central differences at h and h/2, combined to
    cancel their h^2 errors."""

    def central(step: float) -> torch.Tensor:
        return (function(step) - function(-step)) / (2 * step)

    return (4 * central(h / 2) - central(h)) / 3


@pytest.mark.parametrize("periodic", [True, False])
def test_energy_from_the_steps_own_gradients(step, periodic):
    # from the forces (molecules) or the stress the step computed (the strain
    # gradient a training step adds), with no model call: the same Lie
    # derivatives as from a rotated copy
    systems = step.systems
    if not periodic:
        systems = [_without_cell(system, step.model) for system in systems]
    info = step.targets["energy"]
    targets = {"energy": with_strain_gradient(info) if periodic else info}
    step = TrainingStep(step.model, systems, targets)
    predictions = predictions_in_loss_units(step, systems, targets)
    calls = []
    handle = step.model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        from_step = evaluate_lie_derivatives(
            step, {"energy": {None}}, predictions=predictions
        )
    finally:
        handle.remove()
    assert calls == []
    from_copy = evaluate_lie_derivatives(step, {"energy": {None}})
    assert float(from_copy.values["energy"].detach().abs().max()) > 1e-4
    torch.testing.assert_close(
        from_step.values["energy"], from_copy.values["energy"], rtol=1e-9, atol=1e-14
    )


def _without_cell(system, model):
    """``system`` as a molecule: no cell, no periodicity."""
    from metatomic.torch import System

    molecule = System(
        types=system.types,
        positions=system.positions,
        cell=torch.zeros_like(system.cell),
        pbc=torch.zeros_like(system.pbc),
    )
    return get_system_with_neighbor_lists(molecule, model.requested_neighbor_lists())
