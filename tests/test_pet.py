"""What the package knows of metatrain's PET: which modules are PETs, their
readout layout, feature messages and the clean-up of capture hooks."""

import ase.build
import pytest
import torch
from metatomic.torch import ModelOutput

import metatrain_symmetry as msym
from metatrain_symmetry.pet import (
    PETReadout,
    capture_cleanup,
    is_pet,
    trainable_pet,
    unknown_feature_message,
)
from metatrain_symmetry.systems import prepare_systems
from metatrain_symmetry.testing import pet_model, tiny_pet


def residual_pet():
    """A tiny PET whose readout reads the features of each of its two
    message-passing layers (``tiny_pet`` reads those of the last one only)."""
    hypers = {
        "d_pet": 8,
        "d_head": 8,
        "d_node": 16,
        "d_feedforward": 16,
        "num_heads": 2,
        "num_attention_layers": 1,
        "num_gnn_layers": 2,
        "cutoff": 3.5,
        "featurizer_type": "residual",
    }
    return pet_model(hypers, perturbation=0.3)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The TorchScript module of an exported PET, read from its file."""
    path = tmp_path_factory.mktemp("pet") / "model.pt"
    tiny_pet().export().save(str(path))
    module = msym.load_model(path).module
    assert isinstance(module, torch.jit.ScriptModule)
    return module


def test_which_modules_are_trainable_pets(exported):
    pet = tiny_pet()
    assert is_pet(pet)
    assert not is_pet(exported) and not is_pet(torch.nn.Linear(2, 1))
    assert trainable_pet(pet) is pet
    with pytest.raises(ValueError, match="'m.pt' is an exported model, whose weights"):
        trainable_pet(exported, "m.pt")
    with pytest.raises(ValueError, match="needs a metatrain PET checkpoint.*Linear"):
        trainable_pet(torch.nn.Linear(2, 1))


def test_feature_messages(exported):
    pet = tiny_pet()
    features = msym.load_model(pet).features
    message = unknown_feature_message(pet, features, "mtt::feature::nope")
    assert message.startswith("unknown feature 'mtt::feature::nope'")
    assert f"exposes {len(features)} features" in message
    centre = "mtt::feature::gnn_layers.0.trans.center_contraction"
    assert "centre-token layers" in unknown_feature_message(pet, features, centre)
    assert "exported models cannot expose" in unknown_feature_message(
        exported, [], "mtt::feature::x"
    )
    assert "exposes no internal features" in unknown_feature_message(
        torch.nn.Linear(2, 1), [], "mtt::feature::x"
    )


def energy(model, atoms) -> torch.Tensor:
    systems = prepare_systems([atoms], model)
    outputs = model(systems, {"energy": ModelOutput(sample_kind="system")})
    return outputs["energy"].block().values.detach().reshape(())


def test_readout_layout_and_round_trip():
    """Two message-passing layers of width 8: node and edge weights of each layer,
    then the summed node and edge biases; written back, biases are split equally
    between layers."""
    # the readout of the last layer's features alone
    assert PETReadout(tiny_pet(), "energy").theta().shape == (1, 2 * 8 + 2)
    readout = PETReadout(residual_pet(), "energy")
    assert readout.n_layers == 2 and readout.d_head == 8
    assert readout.n_features == 2 * 2 * 8
    assert len(readout.parameters()) == 2 * 2 * 2
    theta = readout.theta()
    assert theta.shape == (1, 32 + 2) and theta.dtype == torch.float64
    kinds = [kind for kind, _ in readout.linears()]
    assert kinds == ["node", "edge", "node", "edge"]

    generator = torch.Generator().manual_seed(0)
    new = torch.randn(1, 34, dtype=torch.float64, generator=generator)
    readout.assign(new)
    torch.testing.assert_close(readout.theta(), new, rtol=0, atol=1e-15)
    for index, (kind, linear) in enumerate(readout.linears()):
        torch.testing.assert_close(
            linear.weight.detach(), new[:, 8 * index : 8 * (index + 1)]
        )
        bias = new[:, 32] if kind == "node" else new[:, 33]
        torch.testing.assert_close(linear.bias.detach(), bias / 2)
    with pytest.raises(ValueError, match="has no readout for target 'dipole'"):
        PETReadout(tiny_pet(), "dipole")


def test_predictions_are_affine_in_the_readout():
    """With the backbone fixed, the energy of a structure is an affine function
    of the effective readout: mixing two readouts mixes the energies."""
    model = msym.load_model(residual_pet())
    readout = PETReadout(model.module, "energy")
    atoms = ase.build.molecule("CH3OH")
    generator = torch.Generator().manual_seed(1)
    first = torch.randn(1, 34, dtype=torch.float64, generator=generator)
    second = torch.randn(1, 34, dtype=torch.float64, generator=generator)
    energies = []
    for theta in (first, second, 0.25 * first + 0.75 * second):
        readout.assign(theta)
        energies.append(energy(model, atoms))
    mixed = 0.25 * energies[0] + 0.75 * energies[1]
    torch.testing.assert_close(energies[2], mixed, rtol=1e-10, atol=1e-12)
    assert abs(float(energies[0] - energies[1])) > 1e-3


def test_capture_cleanup_drops_the_hooks_of_a_failed_block():
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    kept = module[0].register_forward_hook(lambda *args: None)
    with pytest.raises(RuntimeError, match="capture failed"):
        with capture_cleanup(module):
            module[0].register_forward_hook(lambda *args: None)
            module[1].register_forward_hook(lambda *args: None)
            raise RuntimeError("capture failed")
    assert list(module[0]._forward_hooks) == [kept.id]
    assert len(module[1]._forward_hooks) == 0
    # hooks added by a block that succeeds are the caller's to remove
    with capture_cleanup(module):
        module[1].register_forward_hook(lambda *args: None)
    assert len(module[1]._forward_hooks) == 1


def test_last_layer_features_without_their_target():
    """PET runs a target's last layers only when the target is requested: their
    features are listed for every target and captured without it, equal to the
    capture made alongside the target."""
    model = msym.load_model(tiny_pet(), dtype=torch.float64)
    last = [name for name in model.features if "_last_layers." in name]
    assert sorted(last) == [
        f"mtt::feature::{kind}_last_layers.{target}.0.{target}___0"
        for kind in ("edge", "node")
        for target in ("energy", "non_conservative_force")
    ]
    systems = prepare_systems([ase.build.molecule("CH3OH")], model)
    alone = model(systems, {name: ModelOutput(sample_kind="atom") for name in last})
    assert sorted(alone) == sorted(last)
    for name in last:
        target = name.split(".")[1]
        both = model(
            systems,
            {
                name: ModelOutput(sample_kind="atom"),
                target: model.module.outputs[target],
            },
        )
        values = alone[name].block().values
        assert values.shape[0] >= 6 and values.abs().max() > 0
        assert torch.equal(values, both[name].block().values)
