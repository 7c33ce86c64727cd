"""Every workflow on a CUDA device agrees with the same workflow on CPU to
round-off (float64): analysis, audit, the equivariance loss in a training step,
retraining and the exported model.

These tests carry the ``cuda`` marker (``pytest -m cuda`` runs only them) and skip
when no CUDA device is available.
"""

import pytest
import torch


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

RTOL = 1e-8
ATOL = 1e-10


def assert_maps_close(actual, expected):
    import metatensor.torch as mts

    actual = actual.to(device="cpu")
    # NaN marks the same missing values (zero outputs, unresolved spectra) on both
    assert mts.allclose(
        actual, expected.to(device="cpu"), rtol=RTOL, atol=ATOL, equal_nan=True
    )


def test_analysis(molecules):
    import metatrain_symmetry as msym
    from metatrain_symmetry.testing import tiny_pet

    grid = msym.O3Grid.random(10, seed=0)
    outputs = ["energy", "non_conservative_force", "forces"]
    features = ["mtt::feature::gnn_layers.1_node"]
    results = {}
    for device in ("cpu", "cuda"):
        model = msym.load_model(tiny_pet(), device=device)
        results[device] = msym.analyze(
            model, molecules, outputs + features, max_lambda=2, grid=grid
        )
    for name in outputs + features:
        for kind in ("variance", "character_projection", "average", "spectrum"):
            expected = getattr(results["cpu"], kind)[name]
            assert_maps_close(getattr(results["cuda"], kind)[name], expected)


def test_audit(audit_inputs):
    import metatrain_symmetry as msym

    grid = msym.O3Grid.random(10, seed=1)
    results = {
        device: msym.audit(
            audit_inputs / "model.ckpt",
            audit_inputs / "data.xyz",
            max_lambda=2,
            grid=grid,
            device=device,
        )
        for device in ("cpu", "cuda")
    }
    assert results["cuda"].outputs == results["cpu"].outputs
    for name in results["cpu"].outputs:
        assert_maps_close(
            results["cuda"].analysis.variance[name],
            results["cpu"].analysis.variance[name],
        )
        for actual, expected in zip(
            results["cuda"].predictions[name],
            results["cpu"].predictions[name],
            strict=True,
        ):
            torch.testing.assert_close(
                actual.cpu(), expected.cpu(), rtol=RTOL, atol=ATOL
            )


def training_step(device, molecules):
    """One step of metatrain's PET trainer with the equivariance loss on
    ``device``: the loss, the penalties and the parameter gradients (on CPU)."""
    from metatomic.torch import systems_to_torch
    from metatrain.pet import trainer
    from metatrain.utils.loss import LossAggregator
    from metatrain.utils.neighbor_lists import get_system_with_neighbor_lists

    from metatrain_symmetry import hooks
    from metatrain_symmetry.testing import tiny_pet, training_step_loss

    hooks.register()
    model = tiny_pet().to(device).train()
    reference = tiny_pet(seed=1).to(device).eval()
    infos = model.dataset_info.targets
    options = {
        name: {
            "type": "equivariance",
            "weight": 1.0,
            "reduction": "mean",
            "gradients": {},
            "gamma": 3.0,
        }
        for name in infos
    }
    # each aggregator's rotations come from a generator seeded with torch's
    # initial seed, on CPU: both devices draw the same rotations
    loss_fn = LossAggregator(infos, options)
    systems = [
        get_system_with_neighbor_lists(
            systems_to_torch(atoms, dtype=torch.float64, device=device),
            model.requested_neighbor_lists(),
        )
        for atoms in molecules
    ]
    with torch.no_grad():
        targets = trainer.evaluate_model(reference, systems, infos, False)
    loss = training_step_loss(model, systems, targets, infos, loss_fn)
    loss.backward()
    penalties = {name: loss.last_penalty.cpu() for name, loss in loss_fn.losses.items()}
    for penalty in penalties.values():
        assert penalty.device == torch.device("cpu")
    for term in loss_fn.losses.values():
        assert term.last_penalty.device.type == torch.device(device).type
    gradients = {
        name: parameter.grad.cpu()
        for name, parameter in model.named_parameters()
        if parameter.grad is not None
    }
    return loss.detach().cpu(), penalties, gradients


def test_equivariance_loss_training_step(molecules):
    loss_cpu, penalties_cpu, gradients_cpu = training_step("cpu", molecules)
    loss_cuda, penalties_cuda, gradients_cuda = training_step("cuda", molecules)
    torch.testing.assert_close(loss_cuda, loss_cpu, rtol=RTOL, atol=ATOL)
    assert all(float(value) > 0 for value in penalties_cpu.values())
    for name, value in penalties_cpu.items():
        torch.testing.assert_close(penalties_cuda[name], value, rtol=RTOL, atol=ATOL)
    assert gradients_cuda.keys() == gradients_cpu.keys()
    for name, gradient in gradients_cpu.items():
        torch.testing.assert_close(
            gradients_cuda[name], gradient, rtol=RTOL, atol=ATOL, msg=name
        )


@pytest.mark.parametrize("position_gradients", [False, True])
def test_retraining(audit_inputs, tmp_path, position_gradients):
    import ase.io
    import metatomic.torch  # noqa: F401 (the classes a checkpoint's metadata needs)

    import metatrain_symmetry as msym
    from metatrain_symmetry.testing import tiny_pet

    # with position gradients, the energy's conservative forces enter the
    # objective: the force designs' backward passes run on the device too
    checkpoint = tmp_path / "model.ckpt"
    model = tiny_pet(position_gradients=position_gradients)
    torch.save(model.get_checkpoint(), checkpoint)
    frames = ase.io.read(audit_inputs / "data.xyz", ":")
    grid = msym.O3Grid.random(8, seed=2)
    results = {
        device: msym.retrain_last_layer(
            checkpoint,
            frames,
            validation=frames,
            gammas=[0.0, 1.0],
            grid=grid,
            ridge=1e-6,
            output=tmp_path / device,
            device=device,
        )
        for device in ("cpu", "cuda")
    }
    cpu, cuda = results["cpu"], results["cuda"]
    assert cuda.terms == cpu.terms
    assert ("energy/forces" in cpu.terms) == position_gradients
    # the solutions come from normal equations, which amplify round-off
    close = {"rtol": 1e-6, "atol": 1e-9}
    for name, parameters in cpu.parameters.items():
        assert cuda.parameters[name].device == torch.device("cpu")
        torch.testing.assert_close(cuda.parameters[name], parameters, **close)
    torch.testing.assert_close(cuda.objective, cpu.objective, **close)
    for kind in (
        "training_mse",
        "training_equivariance",
        "validation_rmse",
        "validation_equivariance_rmse",
    ):
        expected = getattr(cpu, kind)
        assert getattr(cuda, kind).keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(
                getattr(cuda, kind)[name], value, **close, msg=f"{kind} {name}"
            )
    # checkpoints written after a run on CUDA hold CPU tensors, and the same
    # parameters as those of the run on CPU
    for written, reference in zip(cuda.checkpoints, cpu.checkpoints, strict=True):
        state = torch.load(written, weights_only=False)["model_state_dict"]
        expected = torch.load(reference, weights_only=False)["model_state_dict"]
        for name, value in state.items():
            if not isinstance(value, torch.Tensor):
                continue
            assert value.device == torch.device("cpu"), name
            if value.is_floating_point():
                torch.testing.assert_close(value, expected[name], **close, msg=name)


def assert_json_close(actual, expected, path="summary"):
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys(), path
        for key, value in expected.items():
            assert_json_close(actual[key], value, f"{path}.{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), path
        for index, (item, value) in enumerate(zip(actual, expected, strict=True)):
            assert_json_close(item, value, f"{path}[{index}]")
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=RTOL, abs=ATOL), path
    else:
        assert actual == expected, path


def test_exported_symmetrized_model(audit_inputs, tmp_path):
    import ase.io
    from metatomic.torch import ModelOutput

    import metatrain_symmetry as msym
    from metatrain_symmetry.audit import export_audited
    from metatrain_symmetry.systems import prepare_systems

    summaries = {}
    for device in ("cpu", "cuda"):
        output = tmp_path / f"audited-on-{device}.pt"
        export_audited(
            audit_inputs / "model.ckpt",
            output,
            audit_inputs / "data.xyz",
            symmetrize=True,
            grid_degree=3,
            audit_grid=msym.O3Grid.random(10, seed=3),
            max_lambda=1,
            device=device,
        )
        summaries[device] = msym.read_audit(output)
    assert_json_close(summaries["cuda"], summaries["cpu"])
    # the model audited on CUDA is exported from CPU: it runs on either device
    frames = ase.io.read(audit_inputs / "data.xyz", ":")
    requests = {
        "energy": ModelOutput(sample_kind="system"),
        "o3::variance::energy": ModelOutput(sample_kind="system"),
    }
    predictions = {}
    for device in ("cpu", "cuda"):
        model = msym.load_model(output, dtype=torch.float64, device=device)
        systems = prepare_systems(frames, model)
        predictions[device] = model(systems, requests, None)
    for name in requests:
        assert_maps_close(predictions["cuda"][name], predictions["cpu"][name])


@pytest.mark.parametrize("method", ["forward", "double-backward"])
def test_infinitesimal(molecules, method):
    import metatrain_symmetry as msym
    from metatrain_symmetry.testing import tiny_pet

    outputs = ["energy", "non_conservative_force", "forces"]
    results = {
        device: msym.infinitesimal(
            msym.load_model(tiny_pet(), device=device),
            molecules,
            outputs,
            method=method,
        )
        for device in ("cpu", "cuda")
    }
    for name in outputs:
        expected = results["cpu"].lie_derivative[name]
        assert_maps_close(results["cuda"].lie_derivative[name], expected)
    assert_maps_close(results["cuda"].torque, results["cpu"].torque)
