"""Closed-form retraining of an energy trained with its conservative forces: the
force designs' terms of the objective."""

import ase.io
import pytest
import torch
from metatomic.torch import ModelOutput, System

import metatrain_symmetry as msym
from metatrain_symmetry.demo import make_dataset
from metatrain_symmetry.pet import PETReadout
from metatrain_symmetry.systems import prepare_systems
from metatrain_symmetry.testing import pet_options
from metatrain_symmetry.testing import run_module as run


RIDGE = 1e-6


@pytest.fixture(scope="module")
def trained_with_forces(tmp_path_factory):
    """A small PET whose energy is trained with conservative forces (position
    gradients, loss weight 0.5), one epoch of ``mtt train``, retrained in closed
    form."""
    directory = tmp_path_factory.mktemp("forces")
    frames = make_dataset(6)
    train, validation = frames[:4], frames[4:]
    ase.io.write(directory / "train.xyz", train)
    ase.io.write(directory / "validation.xyz", validation)
    options = (
        pet_options(1)
        .replace("forces: false", "forces: true")
        .replace("batch_size: 8", "batch_size: 2")
        .replace("d_head: 16", "d_head: 8")
        .replace(
            "    checkpoint_interval: 1\n",
            "    checkpoint_interval: 1\n"
            "    loss:\n"
            "      energy: {gradients: {positions: {weight: 0.5}}}\n",
        )
    )
    (directory / "options.yaml").write_text(options)
    process = run("metatrain", "train", "options.yaml", "-o", "model.pt", cwd=directory)
    assert process.returncode == 0, process.stderr[-2000:]
    grid = msym.O3Grid.random(2, seed=2)
    result = msym.retrain_last_layer(
        directory / "model.ckpt",
        train,
        validation,
        gammas=[0.0, 1.0],
        targets=["energy"],
        grid=grid,
        ridge=RIDGE,
        output=directory / "retrained",
    )
    return directory, train, validation, result, grid


def test_conservative_forces(trained_with_forces):
    directory, train, validation, result, grid = trained_with_forces
    assert result.terms == ["energy", "energy/forces"]
    # the saved checkpoint's autograd forces are the solver's forces
    model = msym.load_model(directory / "retrained" / "gamma-1.ckpt")
    solver = result.validation_predictions["energy/forces"]
    for frame, predicted in zip(validation, solver, strict=True):
        (system,) = prepare_systems([frame], model)
        positions = system.positions.detach().requires_grad_(True)
        (system,) = prepare_systems(
            [
                System(
                    types=system.types,
                    positions=positions,
                    cell=system.cell,
                    pbc=system.pbc,
                )
            ],
            model,
        )
        outputs = model([system], {"energy": ModelOutput(sample_kind="system")})
        energy = outputs["energy"]
        (gradient,) = torch.autograd.grad(energy.block().values.sum(), positions)
        torch.testing.assert_close(
            -gradient, predicted[1].reshape(-1, 3), rtol=1e-9, atol=1e-9
        )

    # stationarity of the objective with the force term (weight 0.5 from the
    # checkpoint's loss options), evaluated by forward passes and autograd
    def objective(checkpoint):
        model = msym.load_model(checkpoint)
        for parameter in model.module.parameters():
            parameter.requires_grad_(False)
        parameters = PETReadout(model.module, "energy").parameters()
        for parameter in parameters:
            parameter.requires_grad_(True)
        value = msym.retraining_objective(
            model,
            train,
            1.0,
            grid,
            targets=["energy"],
            ridge=RIDGE,
            weights={"energy/forces": 0.5},
        )
        gradient = torch.autograd.grad(value, parameters)
        return float(value.detach()), torch.cat(
            [g.reshape(-1) for g in gradient]
        ).norm()

    value, gradient = objective(directory / "retrained" / "gamma-1.ckpt")
    _, initial_gradient = objective(directory / "model.ckpt")
    assert value == pytest.approx(float(result.objective[1]), rel=1e-6)
    assert gradient < 1e-6 * initial_gradient
    # ignoring the gradients retrains the energy alone
    energy_only = msym.retrain_last_layer(
        directory / "model.ckpt",
        train,
        gammas=[1.0],
        targets=["energy"],
        grid=grid,
        ridge=RIDGE,
        ignore_gradients=True,
    )
    assert energy_only.terms == ["energy"]
