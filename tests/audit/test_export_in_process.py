"""Audited export in this process, where mutation testing reaches it: the
exported file holds the model ``mtt export`` writes and the audit of its
checkpoint, the symmetrized export the O(3) average asked for, and bad input
fails before anything is written."""

import json

import ase.io
import pytest
import torch
from metatomic.torch import (
    AtomisticModel,
    ModelMetadata,
    is_atomistic_model,
    load_atomistic_model,
)
from metatomic.torch.o3 import SymmetrizedModel
from metatomic_ase import MetatomicCalculator

import metatrain_symmetry as msym
from metatrain_symmetry.audit import AUDIT_METADATA_KEY
from metatrain_symmetry.audit.export import (
    SYMMETRIZATION_METADATA_KEY,
    is_symmetrized,
    load_for_export,
    symmetrize_model,
    with_extra_metadata,
)
from metatrain_symmetry.cli import main
from metatrain_symmetry.testing import check_clean_failure
from tests.helpers import PairPotential, pair_capabilities


def energies(model, frames):
    """The energy of each structure through metatomic's ASE calculator."""
    values = []
    for atoms in frames:
        atoms = atoms.copy()
        atoms.calc = MetatomicCalculator(model)
        values.append(atoms.get_potential_energy())
    return values


def test_export_holds_the_model_and_the_audit_of_its_checkpoint(
    audit_inputs, tmp_path, capsys
):
    checkpoint, data = audit_inputs / "model.ckpt", audit_inputs / "data.xyz"
    path = tmp_path / "audited.pt"
    result = msym.export_audited(checkpoint, path, data, grid_degree=2, max_lambda=1)
    assert [entry.name for entry in tmp_path.iterdir()] == ["audited.pt"]
    # no progress bar unless asked for
    assert "rotated copies" not in capsys.readouterr().err

    # the audit is that of the checkpoint itself, on the grid of that degree
    expected = msym.audit(checkpoint, data, max_lambda=1, grid=msym.O3Grid(2))
    assert result.summary == expected.summary
    assert result.summary["model"]["path"] == str(checkpoint)
    assert result.summary["grid"]["degree"] == 2
    assert msym.read_audit(path) == expected.summary

    # the model is what mtt export writes, with the audit added to its metadata
    exported = load_atomistic_model(str(path))
    assert msym.read_audit(exported) == expected.summary
    reference = load_for_export(checkpoint)
    assert msym.read_audit(reference) is None
    assert not is_symmetrized(exported)
    metadata, original = exported.metadata(), reference.metadata()
    assert metadata.name == original.name
    assert metadata.description == original.description
    assert metadata.authors == original.authors
    assert metadata.references == original.references
    assert dict(metadata.extra) == {
        **original.extra,
        AUDIT_METADATA_KEY: json.dumps(expected.summary),
    }
    outputs = exported.capabilities().outputs
    assert set(outputs) == set(reference.capabilities().outputs)
    frames = ase.io.read(data, ":")
    assert energies(exported, frames) == energies(reference, frames)


def test_symmetrized_export_averages_on_the_grid_asked_for(
    audit_inputs, tmp_path, capsys
):
    """The audit runs on its own grid (a random one here, with the outputs,
    targets, batches, structures and device asked for, and a progress bar); the
    averaging quadrature has the degree given."""
    checkpoint, data = audit_inputs / "model.ckpt", tmp_path / "close.xyz"
    frames = ase.io.read(audit_inputs / "close.xyz", ":")
    for atoms in frames:
        atoms.info["shifted"] = atoms.get_potential_energy() + 1.0
    ase.io.write(data, frames)
    path = tmp_path / "symmetrized.pt"
    grid = msym.O3Grid.random(12, seed=3)
    options = dict(outputs=["energy"], targets={"energy": "shifted"}, max_lambda=2)
    options.update(batch_size=5, allow_close_atoms=True)
    result = msym.export_audited(
        checkpoint,
        path,
        data,
        symmetrize=True,
        grid_degree=5,
        audit_grid=grid,
        device="cpu",
        progress=True,
        **options,
    )
    assert "3 structures x 12 rotated copies" in capsys.readouterr().err
    expected = msym.audit(checkpoint, data, grid=grid, **options)
    assert result.summary == expected.summary
    assert list(result.summary["outputs"]) == ["energy"]
    assert result.summary["outputs"]["energy"]["target"]["key"] == "shifted"
    assert msym.read_audit(path) == expected.summary

    exported = load_atomistic_model(str(path))
    assert is_symmetrized(exported)
    assert "o3::variance::energy" in exported.capabilities().outputs
    extra = exported.metadata().extra
    averaging = json.loads(extra[SYMMETRIZATION_METADATA_KEY])
    assert averaging == {"averaged": True, "grid_degree": 5}
    # metatomic's quadrature of that degree, with its default batch size
    wrapped = SymmetrizedModel.wrap(
        load_for_export(checkpoint), max_angular_momentum_grid=5
    ).module
    assert exported.module.max_angular_momentum_grid == 5
    assert torch.equal(exported.module._rotation_weights, wrapped._rotation_weights)
    assert exported.module.batch_size == wrapped.batch_size

    # an averaged model is not averaged twice
    again = tmp_path / "twice.pt"
    message = (
        f"'{path}' already predicts O(3) averages; export it without "
        "--symmetrize (symmetrize=False)"
    )
    with pytest.raises(ValueError) as error:
        msym.export_audited(path, again, data, symmetrize=True, allow_close_atoms=True)
    assert str(error.value) == message
    assert not again.exists()


def test_symmetrized_export_on_metatomic_default_quadrature(audit_inputs, tmp_path):
    checkpoint, data = audit_inputs / "model.ckpt", audit_inputs / "data.xyz"
    path = tmp_path / "symmetrized.pt"
    result = msym.export_audited(
        checkpoint, path, data, symmetrize=True, outputs=["energy"], max_lambda=0
    )
    # without a degree, the audit has its own default grid
    assert (
        result.summary == msym.audit(checkpoint, data, ["energy"], max_lambda=0).summary
    )
    exported = load_atomistic_model(str(path))
    averaging = json.loads(exported.metadata().extra[SYMMETRIZATION_METADATA_KEY])
    assert averaging == {"averaged": True, "grid_degree": None}
    wrapped = SymmetrizedModel.wrap(load_for_export(checkpoint)).module
    assert (
        exported.module.max_angular_momentum_grid == wrapped.max_angular_momentum_grid
    )


def bad_export_inputs(directory):
    """``(arguments of export_audited, error type, message)`` of bad inputs in
    ``directory``, which holds ``model.ckpt``, ``data.xyz`` and ``close.xyz``."""
    from metatrain.utils.io import load_model as load_metatrain_model

    checkpoint, data = directory / "model.ckpt", directory / "data.xyz"
    output, text = directory / "exported.pt", directory / "model.txt"
    with pytest.raises(Exception) as unreadable:
        load_metatrain_model(str(data))
    reason = f"{type(unreadable.value).__name__}: "
    reason += str(unreadable.value).strip().splitlines()[0]
    return [
        (
            (checkpoint, text, data),
            ValueError,
            f"the exported model file must end with .pt, got '{text}'",
        ),
        (
            (checkpoint, directory / "folder.pt", data),
            ValueError,
            f"output '{directory / 'folder.pt'}' is a directory",
        ),
        (
            (directory / "missing.ckpt", output, data),
            FileNotFoundError,
            f"checkpoint '{directory / 'missing.ckpt'}' does not exist",
        ),
        (
            (directory / "folder.pt", directory / "other.pt", data),
            FileNotFoundError,
            f"checkpoint '{directory / 'folder.pt'}' does not exist",
        ),
        (
            (data, output, data),
            ValueError,
            f"could not read '{data}' as a metatrain checkpoint or exported model "
            f"({reason})",
        ),
    ]


def test_bad_input_fails_before_writing(audit_inputs, tmp_path):
    for name in ("model.ckpt", "data.xyz", "close.xyz"):
        (tmp_path / name).write_bytes((audit_inputs / name).read_bytes())
    (tmp_path / "folder.pt").mkdir()
    before = sorted(tmp_path.iterdir())
    for arguments, kind, message in bad_export_inputs(tmp_path):
        with pytest.raises(kind) as error:
            msym.export_audited(*arguments, max_lambda=1)
        assert str(error.value) == message
        assert sorted(tmp_path.iterdir()) == before

    checkpoint, output = tmp_path / "model.ckpt", tmp_path / "exported.pt"
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        msym.export_audited(checkpoint, output, tmp_path / "data.xyz", batch_size=0)
    # two atoms 0.02 A apart are refused unless allowed
    with pytest.raises(ValueError, match="closer than"):
        msym.export_audited(checkpoint, output, tmp_path / "close.xyz", max_lambda=1)
    assert sorted(tmp_path.iterdir()) == before


def test_load_for_export_keeps_exported_models(audit_inputs, tmp_path):
    checkpoint = load_for_export(audit_inputs / "model.ckpt")
    assert is_atomistic_model(checkpoint)
    path = tmp_path / "model.pt"
    checkpoint.save(str(path))
    exported = load_for_export(path)
    assert is_atomistic_model(exported)
    frames = ase.io.read(audit_inputs / "data.xyz", ":")
    assert energies(exported, frames) == energies(checkpoint, frames)
    assert msym.read_audit(path) is None


def pair_model(metadata: ModelMetadata) -> AtomisticModel:
    return AtomisticModel(PairPotential().eval(), metadata, pair_capabilities())


def test_extra_metadata_keeps_the_rest_of_the_model():
    references = {"model": ["doi:1"], "implementation": ["doi:2", "doi:3"]}
    metadata = ModelMetadata(
        name="pair",
        description="a pair potential",
        authors=["A. Author", "B. Author"],
        references=references,
        extra={"kept": "1", "replaced": "old"},
    )
    model = pair_model(metadata)
    changed = with_extra_metadata(model, {"replaced": "new", "added": "2"})
    assert changed.module is model.module
    new = changed.metadata()
    assert (new.name, new.description) == ("pair", "a pair potential")
    assert new.authors == ["A. Author", "B. Author"]
    assert new.references["model"] == ["doi:1"]
    assert new.references["implementation"] == ["doi:2", "doi:3"]
    assert dict(new.extra) == {"kept": "1", "replaced": "new", "added": "2"}
    # the original model is left as it was
    assert dict(model.metadata().extra) == {"kept": "1", "replaced": "old"}
    capabilities, original = changed.capabilities(), model.capabilities()
    assert list(capabilities.outputs) == list(original.outputs)
    assert capabilities.atomic_types == original.atomic_types
    assert capabilities.interaction_range == original.interaction_range
    assert capabilities.length_unit == original.length_unit
    assert capabilities.dtype == original.dtype


def test_metadata_holds_strict_json():
    """A summary with a NaN, which JSON readers of other languages refuse, is
    not stored."""
    from metatrain_symmetry.audit.export import _with_audit

    model = pair_model(ModelMetadata(name="pair"))
    stored = _with_audit(model, {"value": 0.5, "missing": None}, False, None)
    assert msym.read_audit(stored) == {"value": 0.5, "missing": None}
    with pytest.raises(ValueError, match="Out of range float values"):
        _with_audit(model, {"value": float("nan")}, False, None)


def test_symmetrize_model_wraps_with_metatomic():
    model = pair_model(ModelMetadata(name="pair"))
    assert not is_symmetrized(model)
    default = symmetrize_model(model)
    assert is_symmetrized(default)
    assert set(default.capabilities().outputs) == {"energy", "o3::variance::energy"}
    reference = SymmetrizedModel.wrap(model).module
    assert default.module.batch_size == reference.batch_size
    assert (
        default.module.max_angular_momentum_grid == reference.max_angular_momentum_grid
    )
    chosen = symmetrize_model(model, grid_degree=5, batch_size=3)
    assert is_symmetrized(chosen)
    assert chosen.module.batch_size == 3
    assert chosen.module.max_angular_momentum_grid == 5


def test_interrupted_export_leaves_nothing(audit_inputs, tmp_path, monkeypatch):
    from metatrain_symmetry.audit import export as export_module

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module.os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        msym.export_audited(
            audit_inputs / "model.ckpt",
            tmp_path / "model.pt",
            audit_inputs / "data.xyz",
            max_lambda=1,
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["missing.ckpt", "--audit", "data.xyz"], "'missing.ckpt' does not exist"),
        (["model.ckpt", "--audit", "missing.xyz"], "'missing.xyz' does not exist"),
        (["data.xyz", "--audit", "data.xyz"], "could not read 'data.xyz'"),
        (
            ["model.ckpt", "--audit", "data.xyz", "--outputs", "dipole"],
            "unknown output 'dipole'",
        ),
        (
            ["model.ckpt", "--audit", "data.xyz", "--targets", "energy=nope"],
            "no target 'nope'",
        ),
        (["model.ckpt", "--audit", "data.xyz", "--grid-degree", "3"], "--symmetrize"),
        (["model.ckpt", "--audit", "data.xyz", "-o", "data.xyz"], "--force"),
        (["model.ckpt", "--audit", "data.xyz", "-o", "model.txt"], "must end with .pt"),
    ],
)
def test_export_command_bad_input(
    audit_inputs, arguments, message, capsys, monkeypatch
):
    monkeypatch.chdir(audit_inputs)
    if "-o" not in arguments:
        arguments = [*arguments, "-o", "exported.pt"]
    check_clean_failure(main, ["export", *arguments], audit_inputs, capsys, message)
