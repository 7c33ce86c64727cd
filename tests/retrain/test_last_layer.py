"""Closed-form last-layer retraining: optimality, agreement with gradient training
and ``mtt train``, the accuracy/equivariance trade-off, round trips and bad input
(on the PET of the ``trained`` fixture of ``tests/conftest.py``)."""

import csv

import pytest
import torch
from metatomic.torch import ModelOutput

import metatrain_symmetry as msym
from metatrain_symmetry.pet import PETReadout
from metatrain_symmetry.systems import prepare_systems
from metatrain_symmetry.testing import pet_options
from metatrain_symmetry.testing import run_module as run


GAMMAS = [0.0, 0.1, 1.0, 10.0]
RIDGE = 1e-6
TARGETS = ["energy", "non_conservative_force"]


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


def test_agreement_with_gradient_retraining(trained, tmp_path):
    """L-BFGS on the same objective, run to convergence, reaches the closed-form
    minimum and the same readout weights: agreement both ways, not only an
    improvement over an unconverged optimiser (on three structures with a ridge
    that makes the problem well conditioned, so that L-BFGS converges quickly)."""
    directory, train, _ = trained
    train, gamma, ridge = train[:3], 1.0, 1e-1
    grid = msym.O3Grid.random(10, seed=2)
    result = msym.retrain_last_layer(
        directory / "model.ckpt",
        train,
        gammas=[gamma],
        targets=TARGETS,
        grid=grid,
        ridge=ridge,
        output=tmp_path / "closed-form",
    )
    model = msym.load_model(directory / "model.ckpt")
    parameters = readout_parameters(model)
    optimizer = torch.optim.LBFGS(
        parameters,
        max_iter=300,
        history_size=50,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        value = msym.retraining_objective(
            model, train, gamma, grid, targets=TARGETS, ridge=ridge
        )
        value.backward()
        return value

    optimizer.step(closure)
    reached = float(closure().detach())
    assert reached == pytest.approx(float(result.objective[0]), rel=1e-8)
    # the minimum is unique (ridge): the weights agree too
    solved = msym.load_model(tmp_path / "closed-form" / f"gamma-{gamma:g}.ckpt")
    for gradient, closed_form in zip(
        parameters, readout_parameters(solved), strict=True
    ):
        scale = float(closed_form.detach().abs().max())
        torch.testing.assert_close(
            gradient.detach(), closed_form.detach(), rtol=0, atol=1e-3 * scale
        )


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
