"""Closed-form last-layer retraining: optimality, agreement with gradient training
and ``mtt train``, the accuracy/equivariance trade-off, round trips and bad input."""

import csv

import ase.io
import pytest
import torch
from metatomic.torch import ModelOutput, System

import metatrain_symmetry as msym
from metatrain_symmetry.demo import make_dataset
from metatrain_symmetry.pet import PETReadout
from metatrain_symmetry.systems import prepare_systems
from metatrain_symmetry.testing import pet_options, write_dataset
from metatrain_symmetry.testing import run_module as run


GAMMAS = [0.0, 0.1, 1.0, 10.0]
RIDGE = 1e-6
TARGETS = ["energy", "non_conservative_force"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small PET trained for one epoch with ``mtt train`` on EMT copper."""
    directory = tmp_path_factory.mktemp("retrain")
    frames = make_dataset(20)
    write_dataset(directory, frames, 14)
    (directory / "options.yaml").write_text(pet_options(1))
    process = run("metatrain", "train", "options.yaml", "-o", "model.pt", cwd=directory)
    assert process.returncode == 0, process.stderr[-2000:]
    return directory, frames[:14], frames[14:]


@pytest.fixture(scope="module")
def retrained(trained, tmp_path_factory):
    directory, train, validation = trained
    output = tmp_path_factory.mktemp("out") / "retrained"
    grid = msym.O3Grid.random(10, seed=1)
    result = msym.retrain_last_layer(
        directory / "model.ckpt",
        train,
        validation,
        gammas=GAMMAS,
        targets=TARGETS,
        grid=grid,
        ridge=RIDGE,
        output=output,
    )
    return result, output, grid


def readout_parameters(model, targets=TARGETS):
    for parameter in model.module.parameters():
        parameter.requires_grad_(False)
    parameters = []
    for target in targets:
        parameters += PETReadout(model.module, target).parameters()
    for parameter in parameters:
        parameter.requires_grad_(True)
    return parameters


def objective_and_gradient(checkpoint, train, gamma, grid, targets=None, ridge=RIDGE):
    targets = TARGETS if targets is None else targets
    model = msym.load_model(checkpoint)
    parameters = readout_parameters(model, targets)
    value = msym.retraining_objective(
        model, train, gamma, grid, targets=targets, ridge=ridge
    )
    gradient = torch.autograd.grad(value, parameters)
    return float(value.detach()), torch.cat([g.reshape(-1) for g in gradient])


def test_optimality_on_saved_checkpoint(trained, retrained):
    directory, train, _ = trained
    result, output, grid = retrained
    index = GAMMAS.index(1.0)
    value, gradient = objective_and_gradient(output / "gamma-1.ckpt", train, 1.0, grid)
    _, initial_gradient = objective_and_gradient(
        directory / "model.ckpt", train, 1.0, grid
    )
    # the forward-pass objective agrees with the solver's and is stationary
    assert value == pytest.approx(float(result.objective[index]), rel=1e-6)
    assert gradient.norm() < 1e-6 * initial_gradient.norm()


def test_saved_predictions_equal_solver(trained, retrained):
    _, _, validation = trained
    result, output, _ = retrained
    for index, gamma in enumerate(GAMMAS):
        model = msym.load_model(output / f"gamma-{gamma:g}.ckpt")
        systems = prepare_systems(validation, model)
        outputs = model(
            systems,
            {
                "energy": ModelOutput(sample_kind="system"),
                "non_conservative_force": ModelOutput(sample_kind="atom"),
            },
        )
        for name in TARGETS:
            solver = torch.cat([p[index] for p in result.validation_predictions[name]])
            torch.testing.assert_close(
                outputs[name].block().values, solver, rtol=1e-9, atol=1e-9
            )


def test_trade_off_is_monotone(retrained):
    result, _, _ = retrained
    for name in TARGETS:
        equivariance = result.training_equivariance[name]
        accuracy = result.training_mse[name]
        assert bool(torch.all(equivariance[1:] <= equivariance[:-1] * (1 + 1e-9)))
        assert bool(torch.all(accuracy[1:] >= accuracy[:-1] * (1 - 1e-9)))
        assert float(equivariance[-1]) < 0.5 * float(equivariance[0])


def test_agreement_with_gradient_retraining(trained, retrained):
    directory, train, _ = trained
    result, _, grid = retrained
    gamma = 1.0
    model = msym.load_model(directory / "model.ckpt")
    parameters = readout_parameters(model)
    optimizer = torch.optim.LBFGS(parameters, max_iter=6, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        value = msym.retraining_objective(
            model, train, gamma, grid, targets=TARGETS, ridge=RIDGE
        )
        value.backward()
        return value

    optimizer.step(closure)
    reached = float(closure())
    closed_form = float(result.objective[GAMMAS.index(gamma)])
    assert closed_form <= reached * (1 + 1e-9)


@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_agreement_with_mtt_train_heads(trained, retrained, gamma):
    directory, train, _ = trained
    result, _, grid = retrained
    loss = " mse"
    if gamma != 0.0:
        penalty = f"{{type: equivariance, base: mse, gamma: {gamma}, n_rotations: 2}}"
        loss = "".join(f"\n      {name}: {penalty}" for name in TARGETS)
    options = pet_options(3).replace(
        "    checkpoint_interval: 3\n",
        "    checkpoint_interval: 3\n"
        f"    loss:{loss}\n"
        "    finetune:\n"
        "      read_from: model.ckpt\n"
        "      method: heads\n"
        "      config: {head_modules: [], last_layer_modules: "
        "[node_last_layers, edge_last_layers]}\n",
    )
    (directory / f"heads-{gamma:g}.yaml").write_text(options)
    process = run(
        "metatrain",
        "train",
        f"heads-{gamma:g}.yaml",
        "-o",
        f"heads-{gamma:g}.pt",
        cwd=directory,
    )
    assert process.returncode == 0, process.stderr[-2000:]
    reached, _ = objective_and_gradient(
        directory / f"heads-{gamma:g}.ckpt", train, gamma, grid
    )
    closed_form = float(result.objective[GAMMAS.index(gamma)])
    assert closed_form <= reached * (1 + 1e-9)


def test_round_trip_through_mtt_export(trained, retrained, tmp_path):
    _, _, validation = trained
    result, output, grid = retrained
    index = GAMMAS.index(10.0)
    process = run(
        "metatrain", "export", output / "gamma-10.ckpt", "-o", tmp_path / "model.pt"
    )
    assert process.returncode == 0, process.stderr[-2000:]
    # equivariance errors: analyze the checkpoint on the same grid
    analysis = msym.analyze(
        output / "gamma-10.ckpt", validation, TARGETS, max_lambda=1, grid=grid
    )
    for name in TARGETS:
        equivariance = analysis.equivariance_rmse(name).mean()
        assert float(equivariance) == pytest.approx(
            float(result.validation_equivariance_rmse[name][index]), rel=1e-6
        )
    # accuracy: the exported model, evaluated through metatomic
    from metatomic.torch import ModelEvaluationOptions, load_atomistic_model

    exported = load_atomistic_model(str(tmp_path / "model.pt"))
    systems = prepare_systems(validation, msym.load_model(output / "gamma-10.ckpt"))
    options = ModelEvaluationOptions(
        length_unit="angstrom",
        outputs={
            "energy": ModelOutput(sample_kind="system"),
            "non_conservative_force": ModelOutput(sample_kind="atom"),
        },
    )
    outputs = exported(systems, options, check_consistency=True)
    energies = torch.tensor([frame.info["energy"] for frame in validation])
    forces = torch.cat([torch.tensor(frame.arrays["forces"]) for frame in validation])
    for name, reference in (("energy", energies), ("non_conservative_force", forces)):
        values = outputs[name].block().values.reshape(reference.shape)
        rmse = (values - reference).square().mean().sqrt()
        assert float(rmse) == pytest.approx(
            float(result.validation_rmse[name][index]), rel=1e-6
        )
    table = (output / "pareto.csv").read_text().splitlines()
    assert len(table) == 1 + len(GAMMAS)
    assert (output / "pareto.md").is_file() and (output / "pareto.png").is_file()


def test_bad_input(trained, tmp_path):
    directory, train, _ = trained
    checkpoint = directory / "model.ckpt"
    output = tmp_path / "out"
    with pytest.raises(ValueError, match="unknown target 'dipole'"):
        msym.retrain_last_layer(checkpoint, train, targets=["dipole"], output=output)
    with pytest.raises(ValueError, match="gamma must be"):
        msym.retrain_last_layer(checkpoint, train, gammas=[-1.0], output=output)
    assert not output.exists()
    assert list(tmp_path.iterdir()) == []


def effective_readout_hessian(checkpoint, train, grid):
    """The trained readout ``theta`` of the energy of ``checkpoint`` and the
    Hessian of the retraining objective (gamma = 0, no ridge) with respect to it,
    from forward passes and autograd."""
    model = msym.load_model(checkpoint)
    for parameter in model.module.parameters():
        parameter.requires_grad_(False)
    readout = PETReadout(model.module, "energy")
    parameters = readout.parameters()
    for parameter in parameters:
        parameter.requires_grad_(True)

    def flat(tensors):
        return torch.cat([t.reshape(-1) for t in tensors])

    # the effective readout is linear in the layers' parameters: J maps them to it
    theta = readout.theta().reshape(-1)
    jacobian = torch.stack(
        [flat(torch.autograd.grad(v, parameters, retain_graph=True)) for v in theta]
    )
    value = msym.retraining_objective(model, train, 0.0, grid, targets=["energy"])
    gradient = flat(torch.autograd.grad(value, parameters, create_graph=True))
    hessian = torch.stack(
        [flat(torch.autograd.grad(g, parameters, retain_graph=True)) for g in gradient]
    )
    # H_layers = J^T H_theta J, and J J^+ = 1
    inverse = torch.linalg.pinv(jacobian)
    return theta.detach(), inverse.T @ hessian @ inverse


def test_fixed_composition_without_ridge(trained, tmp_path):
    """Copper cells of one composition leave readout directions undetermined:
    they keep their trained values and the rest is optimal."""
    directory, train, _ = trained
    grid = msym.O3Grid.random(2, seed=3)
    result = msym.retrain_last_layer(
        directory / "model.ckpt",
        train[:6],
        gammas=[0.0],
        targets=["energy"],
        grid=grid,
        output=tmp_path / "out",
    )
    n_undetermined = int(result.undetermined["energy"][0])
    assert n_undetermined > 0
    assert (
        "energy undetermined directions" in (tmp_path / "out" / "pareto.md").read_text()
    )
    with open(tmp_path / "out" / "pareto.csv") as file:
        row = next(csv.DictReader(file))
    assert int(row["energy undetermined directions"]) == n_undetermined

    trained_theta, hessian = effective_readout_hessian(
        directory / "model.ckpt", train[:6], grid
    )
    retrained_theta, _ = effective_readout_hessian(
        tmp_path / "out" / "gamma-0.ckpt", train[:6], grid
    )
    eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (hessian + hessian.T))
    null = eigenvectors[:, eigenvalues < 1e-12 * eigenvalues[-1]]
    assert null.shape[1] == n_undetermined
    change = retrained_theta - trained_theta
    # no change along the directions the data cannot determine (a solution from
    # zero would change them by about the norm of the trained readout) ...
    assert float((null.T @ change).norm()) < 1e-6 * float(change.norm())
    assert float((null.T @ trained_theta).norm()) > 0.1 * float(trained_theta.norm())

    # ... while the objective decreases and is stationary
    value, gradient = objective_and_gradient(
        tmp_path / "out" / "gamma-0.ckpt", train[:6], 0.0, grid, ["energy"], 0.0
    )
    initial_value, initial_gradient = objective_and_gradient(
        directory / "model.ckpt", train[:6], 0.0, grid, ["energy"], 0.0
    )
    assert value <= initial_value
    assert abs(value - float(result.objective[0])) < 1e-8 * initial_value
    assert gradient.norm() < 1e-6 * initial_gradient.norm()


def test_cli_end_to_end(trained, tmp_path):
    directory, _, _ = trained
    output = tmp_path / "retrained"
    process = run(
        "metatrain_symmetry.cli",
        "retrain",
        directory / "model.ckpt",
        directory / "train.xyz",
        "--validation",
        directory / "validation.xyz",
        "--gamma",
        "0.1",
        "10",
        "--rotations",
        "4",
        "--ridge",
        "1e-6",
        "-o",
        output,
    )
    assert process.returncode == 0, process.stderr[-2000:]
    names = sorted(path.name for path in output.iterdir())
    assert names == [
        "gamma-0.1.ckpt",
        "gamma-10.ckpt",
        "pareto.csv",
        "pareto.md",
        "pareto.png",
    ]
    failing = tmp_path / "failing"
    process = run(
        "metatrain_symmetry.cli",
        "retrain",
        directory / "model.ckpt",
        directory / "train.xyz",
        "--targets",
        "dipole",
        "-o",
        failing,
    )
    assert process.returncode == 2
    assert "unknown target 'dipole'" in process.stderr
    assert "Traceback" not in process.stderr
    assert not failing.exists()


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


def test_conservative_stress_is_refused():
    from metatrain.pet import PET
    from metatrain.utils.architectures import get_default_hypers
    from metatrain.utils.data import DatasetInfo
    from metatrain.utils.data.target_info import get_energy_target_info

    from metatrain_symmetry.retrain.targets import check_gradients

    energy = get_energy_target_info(
        "energy",
        {"quantity": "energy", "unit": "eV"},
        add_position_gradients=True,
        add_strain_gradients=True,
    )
    info = DatasetInfo(
        length_unit="Angstrom", atomic_types=[29], targets={"energy": energy}
    )
    pet = PET(get_default_hypers("pet")["model"], info)
    model = msym.load_model(pet)
    with pytest.raises(ValueError, match=r"\['strain'\] \(conservative stress\)"):
        check_gradients(model, ["energy"], ignore_gradients=False)
    assert check_gradients(model, ["energy"], ignore_gradients=True) == []
