"""The summary of an audit (``audit.json``): its numbers, the identities of the
model and the dataset, the units of the outputs and the JSON schema."""

import hashlib
import json

import ase.io
import jsonschema
import pytest
import torch
from metatomic.torch import ModelOutput

import metatrain_symmetry as msym
from metatrain_symmetry.audit import (
    SCHEMA_VERSION,
    audit_markdown,
    audit_schema,
    dataset_identity,
    describe_outputs,
    model_identity,
)
from metatrain_symmetry.testing import labelled_molecules, tiny_pet
from tests.helpers import AnalyticModel, PairPotential, capabilities, pair_capabilities


def test_summary_statistics_follow_the_analysis(pet_audit):
    _, frames, result = pet_audit
    analysis = result.analysis
    for name in ("energy", "non_conservative_force"):
        entry = result.summary["outputs"][name]
        rmse = analysis.equivariance_rmse(name)
        assert entry["equivariance_rmse"]["mean"] == pytest.approx(float(rmse.mean()))
        assert entry["equivariance_rmse"]["max"] == pytest.approx(float(rmse.max()))
        ratio = entry["equivariance_rmse"]["mean"] / entry["target"]["mae"]
        assert entry["equivariance_rmse"]["fraction_of_mae"] == pytest.approx(ratio)
        spectrum = analysis.spectrum[name].block().values
        column = 0 if name == "energy" else 2
        leakage = 1 - spectrum[:, column]
        assert entry["leakage"]["mean"] == pytest.approx(float(leakage.mean()))
        assert 0 < entry["leakage"]["mean"] < 1
    name = "mtt::feature::gnn_layers.1_node"
    feature = result.summary["features"][name]
    mean = analysis.spectrum[name].block().values.mean(dim=0)
    assert feature["mean_spectrum"] == pytest.approx(mean.tolist())
    assert result.summary["dataset"]["n_atoms"] == sum(len(a) for a in frames)
    assert result.summary["grid"]["n_elements"] == len(analysis.grid)
    table = audit_markdown(result.summary)
    assert "`non_conservative_force`" in table and "`energy`" in table


def test_exact_grid_audit_has_no_errors(pet_audit):
    _, _, result = pet_audit
    summary = result.summary
    assert summary["grid"]["estimated"] is False
    assert summary["outputs"]["energy"]["mean_spectrum_standard_error"] is None
    assert summary["outputs"]["energy"]["leakage"]["mean_standard_error"] is None
    assert result.leakage_error("energy") is None
    assert "±" not in audit_markdown(summary)


def test_schema_rejects_malformed_summaries(audit_directory):
    summary = json.loads((audit_directory / "audit.json").read_text())
    broken = json.loads(json.dumps(summary))
    del broken["outputs"]["energy"]["equivariance_rmse"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, audit_schema())
    broken = json.loads(json.dumps(summary))
    broken["schema_version"] = "2.0"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, audit_schema())


def test_identities_record_the_files_read(tmp_path):
    """A model and a dataset read from files are identified by path and SHA-256
    of the bytes on disk; made in memory, by ``None``."""
    torch.save(tiny_pet().get_checkpoint(), tmp_path / "model.ckpt")
    frames = labelled_molecules(("H2O", "CH4"), seed=0)
    ase.io.write(tmp_path / "data.xyz", frames)

    model = msym.load_model(tmp_path / "model.ckpt")
    identity = model_identity(model, tmp_path / "model.ckpt")
    digest = hashlib.sha256((tmp_path / "model.ckpt").read_bytes()).hexdigest()
    assert identity["path"] == str(tmp_path / "model.ckpt")
    assert identity["sha256"] == digest
    assert identity["atomic_types"] == [1, 6, 8]
    assert identity["dtype"] == "float64"
    in_memory = model_identity(msym.load_model(tiny_pet()), None)
    assert in_memory["path"] is None and in_memory["sha256"] is None

    dataset = dataset_identity(frames, tmp_path / "data.xyz")
    digest = hashlib.sha256((tmp_path / "data.xyz").read_bytes()).hexdigest()
    assert dataset == {
        "path": str(tmp_path / "data.xyz"),
        "sha256": digest,
        "n_structures": 2,
        "n_atoms": 3 + 5,
    }
    assert dataset_identity(frames, None)["sha256"] is None


@pytest.mark.filterwarnings("ignore:output 'energy' has an empty unit")
def test_units_of_derived_outputs():
    """Forces and stress that are derivatives of the energy get the energy's unit
    over the length unit (cubed for the stress); declared outputs keep their
    own."""
    # tiny_pet's energy is in eV, its length unit Angstrom
    model = msym.load_model(tiny_pet())
    described = describe_outputs(
        model, ["energy", "forces", "stress", "non_conservative_force"]
    )
    assert described == {
        "energy": {"unit": "eV", "sample_kind": "system"},
        "forces": {"unit": "eV/Angstrom", "sample_kind": "atom"},
        "stress": {"unit": "eV/Angstrom^3", "sample_kind": "system"},
        "non_conservative_force": {"unit": "eV/Angstrom", "sample_kind": "atom"},
    }
    # an energy without a unit gives derivatives without one
    capabilities = pair_capabilities()
    capabilities.outputs = {"energy": ModelOutput(sample_kind="system")}
    unitless = msym.load_model(PairPotential(), capabilities=capabilities)
    assert describe_outputs(unitless, ["forces"])["forces"]["unit"] == ""


def test_summary_of_an_in_memory_audit_follows_the_schema(molecules):
    """An audit of a model and structures made in memory: valid against the
    schema, without file identities, with the grid it ran on."""
    model = msym.load_model(AnalyticModel(), capabilities=capabilities())
    result = msym.audit(
        model,
        molecules,
        outputs=["non_conservative_force", "mtt::distance"],
        max_lambda=1,
        grid=msym.O3Grid(3),
    )
    summary = result.summary
    jsonschema.validate(summary, audit_schema())
    assert summary["schema_version"] == SCHEMA_VERSION
    assert summary["model"]["path"] is None and summary["model"]["sha256"] is None
    assert summary["dataset"]["path"] is None
    assert summary["dataset"]["n_atoms"] == sum(len(atoms) for atoms in molecules)
    grid = summary["grid"]
    assert grid["kind"] == "lebedev" and grid["degree"] == 3
    assert grid["n_elements"] == len(msym.O3Grid(3))
    assert summary["irreps"] == [[0, 1], [0, -1], [1, 1], [1, -1]]
    # no target was found: no errors, and no fractions of them
    force = summary["outputs"]["non_conservative_force"]
    assert force["target"] is None
    assert "fraction_of_mae" not in force["equivariance_rmse"]
    assert force["unit"] == "" and force["sample_kind"] == "atom"


def test_target_errors_are_the_known_offsets(pet_audit):
    """The fixture's targets are the model's predictions moved by known
    offsets (energy +0.25 eV, every force component -0.5 eV/A): the errors are
    these offsets, and the fractions divide the mean equivariance RMSE by them."""
    _, _, result = pet_audit
    for name, offset in (("energy", 0.25), ("non_conservative_force", 0.5)):
        entry = result.summary["outputs"][name]
        target = entry["target"]
        assert target["mae"] == pytest.approx(offset, rel=1e-9)
        assert target["rmse"] == pytest.approx(offset, rel=1e-9)
        equivariance = entry["equivariance_rmse"]
        assert set(equivariance) == {
            "mean",
            "median",
            "max",
            "mean_standard_error",
            "fraction_of_mae",
            "fraction_of_rmse",
        }
        for measure in ("mae", "rmse"):
            assert equivariance[f"fraction_of_{measure}"] == pytest.approx(
                equivariance["mean"] / offset
            )
    # the errors of the O(3) average, from the analysis and the targets
    _, frames, _ = pet_audit
    average = result.analysis.average["energy"].block().values.reshape(-1)
    reference = torch.tensor([atoms.info["energy"] for atoms in frames])
    target = result.summary["outputs"]["energy"]["target"]
    difference = average - reference
    assert target["symmetrized_mae"] == pytest.approx(float(difference.abs().mean()))
    assert target["symmetrized_rmse"] == pytest.approx(
        float(difference.square().mean().sqrt())
    )
    feature = result.summary["features"]["mtt::feature::gnn_layers.1_node"]
    assert set(feature) == {
        "equivariance_rmse",
        "zero_structures",
        "unresolved_structures",
        "mean_spectrum",
        "mean_spectrum_standard_error",
    }
    rmse = result.analysis.equivariance_rmse("mtt::feature::gnn_layers.1_node")
    assert feature["equivariance_rmse"]["max"] == pytest.approx(float(rmse.max()))
    assert feature["zero_structures"] == feature["unresolved_structures"] == 0


def test_summary_of_a_random_grid_audit(molecules):
    """A random grid: its kind, estimated values with standard errors, and the
    statistics of a single structure (mean = median = max)."""
    model = msym.load_model(AnalyticModel(), capabilities=capabilities())
    result = msym.audit(
        model,
        molecules[:1],
        outputs=["non_conservative_force", "mtt::x_z_squared"],
        max_lambda=2,
        grid=msym.O3Grid.random(64, seed=0),
    )
    summary = result.summary
    jsonschema.validate(summary, audit_schema())
    assert summary["grid"] == {
        "kind": "random",
        "degree": None,
        "n_elements": 64,
        "inversion": True,
        "estimated": True,
    }
    entry = summary["outputs"]["mtt::x_z_squared"]
    statistics = entry["equivariance_rmse"]
    (value,) = result.analysis.equivariance_rmse("mtt::x_z_squared").tolist()
    assert statistics["mean"] == statistics["median"] == statistics["max"] == value
    error = result.analysis.mean_equivariance_rmse_error["mtt::x_z_squared"]
    assert statistics["mean_standard_error"] == pytest.approx(float(error))
    assert statistics["mean_standard_error"] > 0
    errors = entry["mean_spectrum_standard_error"]
    assert len(errors) == len(entry["mean_spectrum"]) == 6
    assert all(error >= 0 for error in errors) and max(errors) > 0
    # the exactly equivariant force: no leakage beyond its standard error
    leakage = summary["outputs"]["non_conservative_force"]["leakage"]
    assert leakage["irreps"] == [[1, 1]]
    assert leakage["mean_standard_error"] > 0
    assert abs(leakage["mean"]) < 4 * leakage["mean_standard_error"] + 1e-12
    assert entry["zero_structures"] == entry["unresolved_structures"] == 0


@pytest.mark.filterwarnings("ignore:output 'energy' has an empty unit")
def test_summary_of_an_output_zero_everywhere_is_valid_json():
    """The forces on a single atom are zero: no leakage, no spectrum, counted in
    ``zero_structures``, and the summary is strict JSON (no NaN)."""
    import ase

    model = msym.load_model(PairPotential(), capabilities=pair_capabilities())
    single = ase.Atoms("Cu", positions=[[0.0, 0.0, 0.0]])
    result = msym.audit(model, [single], outputs=["energy", "forces"], max_lambda=1)
    forces = result.summary["outputs"]["forces"]
    assert forces["zero_structures"] == 1 and forces["unresolved_structures"] == 0
    assert forces["leakage"]["mean"] is None and forces["leakage"]["max"] is None
    assert forces["leakage"]["median"] is None
    assert forces["mean_spectrum"] == [None] * 4
    assert forces["equivariance_rmse"]["max"] == 0.0
    json.dumps(result.summary, allow_nan=False)
    jsonschema.validate(result.summary, audit_schema())
    assert describe_outputs(model, ["mtt::unknown"])["mtt::unknown"]["unit"] == ""
