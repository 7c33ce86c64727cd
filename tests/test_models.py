import ase.build
import pytest
import torch
from metatomic.torch import ModelOutput

import metatrain_symmetry as msym
from metatrain_symmetry.systems import prepare_systems
from metatrain_symmetry.testing import tiny_pet


CENTER = "mtt::feature::gnn_layers.0.trans.layers.0.center_contraction"


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("models")
    pet = tiny_pet()
    torch.save(pet.get_checkpoint(), directory / "model.ckpt")
    tiny_pet().export().save(str(directory / "model.pt"))
    return directory


def test_load_every_kind_of_model(model_files):
    from_checkpoint = msym.load_model(model_files / "model.ckpt")
    from_export = msym.load_model(str(model_files / "model.pt"))
    from_atomistic = msym.load_model(tiny_pet().export())
    from_instance = msym.load_model(tiny_pet())
    for model in (from_checkpoint, from_export, from_atomistic, from_instance):
        assert {"energy", "non_conservative_force"} <= set(model.outputs)
        assert model.atomic_types == [1, 6, 8]
        assert model.natural_sample_kind("energy") == "system"
        assert model.natural_sample_kind("non_conservative_force") == "atom"
    # exported TorchScript models cannot capture internal features
    assert from_export.features == []
    assert "mtt::feature::gnn_layers.0_node" in from_checkpoint.features
    assert "mtt::feature::gnn_layers.1_edge" in from_instance.features
    # the same weights give the same predictions through every route
    frames = [ase.build.molecule("CH3OH")]
    energies = [
        msym.analyze(model, frames, ["energy"], 1, grid=msym.O3Grid(2))
        .average["energy"]
        .block()
        .values
        for model in (from_checkpoint, from_instance)
    ]
    assert torch.allclose(energies[0], energies[1])


def test_features_are_in_execution_order_without_centre_tokens():
    features = msym.load_model(tiny_pet()).features
    assert features.index("mtt::feature::gnn_layers.0_node") < features.index(
        "mtt::feature::gnn_layers.1_node"
    )
    assert not any("center_" in name for name in features)


def test_centre_token_features_are_refused_and_hooks_never_leak():
    model = msym.load_model(tiny_pet())
    frames = [ase.build.molecule("CH3OH")]
    with pytest.raises(ValueError, match="centre-token"):
        msym.analyze(model, frames, [CENTER], 1)

    # PET itself fails on this request once an atom has two neighbours ...
    systems = prepare_systems(frames, model)
    with pytest.raises(IndexError):
        model(systems, {CENTER: ModelOutput(sample_kind="atom")})
    # ... but the failed call leaves no hook behind, so the model keeps working
    result = msym.analyze(
        model, frames, ["energy", "mtt::feature::gnn_layers.0_node"], 1
    )
    assert result.variance["energy"].block().values.shape == (1, 1)


def test_bad_model_files(tmp_path, model_files):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        msym.load_model(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a model")
    with pytest.raises(ValueError, match="could not read"):
        msym.load_model(garbage)
    with pytest.raises(ValueError, match="unknown feature"):
        msym.load_model(tiny_pet()).check_names(["mtt::feature::no.such.module"])
    exported = msym.load_model(model_files / "model.pt")
    with pytest.raises(ValueError, match="load the metatrain checkpoint"):
        exported.check_names(["mtt::feature::gnn_layers.0_node"])


def test_per_atom_energies_and_pair_features():
    model = msym.load_model(tiny_pet())
    frames = [ase.build.molecule("CH3OH"), ase.build.molecule("H2O")]
    grid = msym.O3Grid(4)
    total = msym.analyze(model, frames, ["energy"], 2, grid=grid)
    per_atom = msym.analyze(
        model,
        frames,
        ["energy", "mtt::feature::gnn_layers.0_edge"],
        2,
        grid=grid,
        per_atom=True,
    )
    atoms = per_atom.average["energy"].block()
    assert atoms.samples.names == ["system", "atom"]
    # averaging is linear: per-atom averages add up to the structure's average
    summed = torch.zeros(2, dtype=torch.float64)
    summed.index_add_(0, atoms.samples.column("system").long(), atoms.values[:, 0])
    assert torch.allclose(summed, total.average["energy"].block().values[:, 0])
    edges = per_atom.variance["mtt::feature::gnn_layers.0_edge"].block()
    assert edges.samples.names[:3] == ["system", "first_atom", "second_atom"]
    spectrum = per_atom.spectrum["mtt::feature::gnn_layers.0_edge"].block().values
    # content above max_lambda is missing from the sum, never added to it
    assert bool(torch.all(spectrum.sum(dim=1) <= 1 + 1e-12))
    assert bool(torch.all(spectrum.sum(dim=1) > 0.9))
