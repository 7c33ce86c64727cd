"""Dataset audit: errors against targets, equivariance, leakage, predictions."""

import gzip
import hashlib
import json

import ase.build
import ase.io
import jsonschema
import metatensor.torch as mts
import numpy as np
import pytest
import torch
from analytic_models import AnalyticModel, capabilities
from metatomic.torch import AtomisticModel, ModelMetadata, ModelOutput
from metatomic_ase import MetatomicCalculator
from metatrain.utils.data.target_info import get_energy_target_info

import metatrain_symmetry as msym
from metatrain_symmetry.audit import default_targets, predict
from metatrain_symmetry.audit import audit_markdown
from metatrain_symmetry.audit import SCHEMA_VERSION, audit_schema
from metatrain_symmetry.cli import main
from metatrain_symmetry.testing import check_clean_failure, run_mtt_symmetry, tiny_pet


def exact_model():
    return msym.load_model(AnalyticModel(), capabilities=capabilities())


def test_exactly_equivariant_model_has_no_leakage_and_exact_errors(molecules):
    offset = 0.1
    for atoms in molecules:
        centered = atoms.positions - atoms.positions.mean(axis=0)
        atoms.arrays["reference_forces"] = centered + offset

    result = msym.audit(
        exact_model(),
        molecules,
        outputs=["non_conservative_force", "mtt::distance"],
        targets={"non_conservative_force": "reference_forces"},
        max_lambda=2,
    )
    force = result.summary["outputs"]["non_conservative_force"]
    assert force["target"]["mae"] == pytest.approx(offset, rel=1e-10)
    assert force["target"]["rmse"] == pytest.approx(offset, rel=1e-10)
    # the O(3) average of an equivariant output is the output itself
    assert force["target"]["symmetrized_mae"] == pytest.approx(offset, rel=1e-8)
    assert force["equivariance_rmse"]["max"] < 1e-12
    assert force["equivariance_rmse"]["fraction_of_mae"] < 1e-10
    assert force["leakage"]["irreps"] == [[1, 1]]
    assert abs(force["leakage"]["max"]) < 1e-10
    assert force["mean_spectrum"][2] == pytest.approx(1.0, abs=1e-10)
    # no expected irrep is known for a custom output, and no target was named
    distance = result.summary["outputs"]["mtt::distance"]
    assert distance["leakage"] is None and distance["target"] is None

    for deviation in result.deviations("non_conservative_force"):
        assert float(deviation.abs().max()) < 1e-12
    for errors, atoms in zip(
        result.atom_equivariance_errors("non_conservative_force"),
        molecules,
        strict=True,
    ):
        assert errors.shape == (len(atoms),)
        assert float(errors.max()) < 1e-12


@pytest.fixture(scope="module")
def pet_audit():
    """A PET audited on molecules whose targets are metatomic's predictions plus
    known offsets."""
    pet = tiny_pet()
    exported = pet.export()
    calculator = MetatomicCalculator(exported)
    frames = [ase.build.molecule(name) for name in ("CH3OH", "H2O", "CH4")]
    request = {"non_conservative_force": ModelOutput(sample_kind="atom")}
    for atoms in frames:
        atoms.calc = calculator
        atoms.info["energy"] = atoms.get_potential_energy() + 0.25
        # the raw output: the calculator's forces have their sum removed
        forces = calculator.run_model(atoms, request)["non_conservative_force"]
        atoms.arrays["forces"] = forces.block().values[..., 0].detach().numpy() - 0.5
        atoms.calc = None
    result = msym.audit(
        pet, frames, features=["mtt::feature::gnn_layers.1_node"], max_lambda=2
    )
    return pet, frames, result


def test_errors_against_metatomic_predictions(pet_audit):
    _, _, result = pet_audit
    assert result.targets == {"energy": "energy", "non_conservative_force": "forces"}
    energy = result.summary["outputs"]["energy"]
    assert energy["target"]["mae"] == pytest.approx(0.25, rel=1e-8)
    assert energy["target"]["rmse"] == pytest.approx(0.25, rel=1e-8)
    forces = result.summary["outputs"]["non_conservative_force"]
    assert forces["target"]["mae"] == pytest.approx(0.5, rel=1e-8)
    assert forces["sample_kind"] == "atom"


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


def test_random_grid_audit_reports_estimates(pet_audit, tmp_path):
    """On a random grid the spectra and leakages are labelled as estimates with
    standard errors in every file, and are written unclipped."""
    import gzip

    from metatrain_symmetry.audit import write_audit_report

    pet, frames, _ = pet_audit
    result = msym.audit(
        pet,
        frames,
        features=["mtt::feature::gnn_layers.1_node"],
        max_lambda=2,
        grid=msym.O3Grid.random(16, seed=4),
    )
    analysis = result.analysis
    assert analysis.estimated
    summary = result.summary
    jsonschema.validate(summary, audit_schema())
    assert summary["grid"]["kind"] == "random" and summary["grid"]["estimated"]
    for group in ("outputs", "features"):
        for name, entry in summary[group].items():
            mean, errors = analysis.mean_spectrum(name)
            assert entry["mean_spectrum"] == pytest.approx(mean.tolist())
            assert entry["mean_spectrum_standard_error"] == pytest.approx(
                errors.tolist()
            )
            # channels of the parity absent from the response are exactly zero
            errors = entry["mean_spectrum_standard_error"]
            assert min(errors) >= 0 and max(errors) > 0
    force = summary["outputs"]["non_conservative_force"]
    leakage = result.leakage("non_conservative_force")
    assert force["leakage"]["mean"] == pytest.approx(float(leakage.mean()))
    _, error = analysis.mean_spectrum_sum("non_conservative_force", [(1, 1)])
    assert force["leakage"]["mean_standard_error"] == pytest.approx(float(error))
    spectrum_error = analysis.spectrum_error["non_conservative_force"].block().values
    torch.testing.assert_close(
        result.leakage_error("non_conservative_force"), spectrum_error[:, 2]
    )

    write_audit_report(result, tmp_path)
    written = json.loads((tmp_path / "audit.json").read_text())
    jsonschema.validate(written, audit_schema())
    assert written["files"]["spectra_standard_errors"] == "spectra_errors.mts"
    errors = mts.load(str(tmp_path / "spectra_errors.mts"))
    spectra = mts.load(str(tmp_path / "spectra.mts"))
    assert errors.keys == spectra.keys
    for index, name in enumerate(written["files"]["spectra_entries"]):
        assert torch.equal(
            spectra.block({"entry": index}).values,
            analysis.spectrum[name].block().values,
        )
        assert torch.equal(
            errors.block({"entry": index}).values,
            analysis.spectrum_error[name].block().values,
        )
    markdown = (tmp_path / "audit.md").read_text()
    assert "Monte-Carlo estimates from 8 random rotations" in markdown
    assert "±" in markdown
    assert (tmp_path / "tensors" / "energy.spectrum_error.mts").exists()
    with gzip.open(tmp_path / "audit.chemiscope.json.gz") as file:
        properties = json.load(file)["properties"]
    assert "energy: leakage standard error" in properties
    assert "energy: spectrum standard error" in properties
    assert "Monte-Carlo" in properties["energy: spectrum"]["description"]


def test_exact_grid_audit_has_no_errors(pet_audit):
    _, _, result = pet_audit
    summary = result.summary
    assert summary["grid"]["estimated"] is False
    assert summary["outputs"]["energy"]["mean_spectrum_standard_error"] is None
    assert summary["outputs"]["energy"]["leakage"]["mean_standard_error"] is None
    assert result.leakage_error("energy") is None
    assert "±" not in audit_markdown(summary)


def test_deviation_is_prediction_minus_average(pet_audit):
    _, frames, result = pet_audit
    average = result.analysis.average["non_conservative_force"].block()
    system = average.samples.column("system")
    for index, deviation in enumerate(result.deviations("non_conservative_force")):
        expected = (
            result.predictions["non_conservative_force"][index]
            - average.values[system == index][..., 0]
        )
        assert torch.allclose(deviation, expected, rtol=0, atol=1e-12)
        assert float(deviation.abs().max()) > 1e-3


def test_conservative_forces_and_stress_by_autograd(periodic_frames):
    """Derived forces and stress equal metatomic's ASE calculator on the same
    model (both are derivatives of the same energy)."""
    pet = tiny_pet()
    calculator = MetatomicCalculator(pet.export())
    model = msym.load_model(pet)
    bulk = periodic_frames[:1]
    predicted = predict(model, bulk, ["forces", "stress"])
    for index, atoms in enumerate(bulk):
        atoms.calc = calculator
        forces = atoms.get_forces()
        stress = atoms.get_stress(voigt=False)
        assert np.allclose(predicted["forces"][index].numpy(), forces, atol=1e-10)
        # the calculator reports the symmetric part; the antisymmetric part of
        # dE/d(strain) only exists for a model that is not rotationally invariant
        ours = predicted["stress"][index].numpy().reshape(3, 3)
        assert np.allclose((ours + ours.T) / 2, stress, atol=1e-10)
        assert np.abs(ours - ours.T).max() > 1e-6


def test_force_output_mapping():
    model = msym.load_model(tiny_pet())
    assert default_targets(model) == {
        "energy": "energy",
        "non_conservative_force": "forces",
    }
    # a model whose energy was trained with forces gets the conservative forces
    pet = tiny_pet()
    pet.dataset_info.targets["energy"] = get_energy_target_info(
        "energy", {"quantity": "energy", "unit": "eV"}, add_position_gradients=True
    )
    assert default_targets(msym.load_model(pet))["forces"] == "forces"
    # no dataset information, no non-conservative force: conservative forces
    bare = tiny_pet().export()
    capabilities = bare.capabilities()
    outputs = {"energy": capabilities.outputs["energy"]}
    capabilities.outputs = outputs
    energy_only = AtomisticModel(bare.module, ModelMetadata(), capabilities)
    assert "forces" in default_targets(msym.load_model(energy_only))


def test_bad_input(molecules):
    model = exact_model()
    with pytest.raises(ValueError, match="has no target 'nothing'"):
        msym.audit(
            model,
            molecules,
            outputs=["non_conservative_force"],
            targets={"non_conservative_force": "nothing"},
        )
    for atoms in molecules:
        atoms.info["wrong_size"] = 1.0
    with pytest.raises(ValueError, match="has 1 values"):
        msym.audit(
            model,
            molecules,
            outputs=["non_conservative_force"],
            targets={"non_conservative_force": "wrong_size"},
        )
    with pytest.raises(ValueError, match="not audited outputs"):
        msym.audit(
            model, molecules, outputs=["mtt::distance"], targets={"other": "energy"}
        )
    with pytest.raises(ValueError, match="no structures"):
        msym.audit(model, [], outputs=["mtt::distance"])
    with pytest.raises(ValueError, match="not periodic"):
        msym.audit(tiny_pet(), molecules, outputs=["stress"])


# ------------------------------------------------------------- command line
def test_audit_command_writes_every_file(audit_directory, audit_inputs):
    names = sorted(path.name for path in audit_directory.iterdir())
    assert names == [
        "audit.chemiscope.json.gz",
        "audit.html",
        "audit.json",
        "audit.md",
        "spectra.mts",
        "spectra.png",
        "tensors",
    ]
    summary = json.loads((audit_directory / "audit.json").read_text())
    jsonschema.validate(summary, audit_schema())
    assert summary["schema_version"] == SCHEMA_VERSION
    checkpoint = (audit_inputs / "model.ckpt").read_bytes()
    assert summary["model"]["sha256"] == hashlib.sha256(checkpoint).hexdigest()
    assert list(summary["outputs"]) == ["energy", "non_conservative_force"]
    # features in the order the model computes them, not the order requested
    assert list(summary["features"]) == [
        "mtt::feature::gnn_layers.0_node",
        "mtt::feature::gnn_layers.1_node",
    ]
    assert summary["outputs"]["energy"]["target"]["key"] == "energy"

    spectra = mts.load(str(audit_directory / "spectra.mts"))
    entries = summary["files"]["spectra_entries"]
    assert len(spectra) == len(entries) == 4
    for index, name in enumerate(entries):
        group = "outputs" if name in summary["outputs"] else "features"
        mean = spectra.block({"entry": index}).values.mean(dim=0)
        assert mean.tolist() == pytest.approx(summary[group][name]["mean_spectrum"])
    assert "`non_conservative_force`" in (audit_directory / "audit.md").read_text()
    assert (audit_directory / "spectra.png").read_bytes()[:4] == b"\x89PNG"


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


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["missing.ckpt", "data.xyz"], "model file 'missing.ckpt' does not exist"),
        (["model.ckpt", "missing.xyz"], "data file 'missing.xyz' does not exist"),
        (["model.ckpt", "model.ckpt"], "could not read structures from 'model.ckpt'"),
        (["data.xyz", "data.xyz"], "could not read 'data.xyz'"),
        (["model.ckpt", "data.xyz", "--outputs", "dipole"], "unknown output 'dipole'"),
        (
            ["model.ckpt", "data.xyz", "--features", "mtt::feature::nope"],
            "unknown feature 'mtt::feature::nope'",
        ),
        (
            ["model.ckpt", "data.xyz", "--targets", "energy=free_energy"],
            "structure 0 has no target 'free_energy'",
        ),
        (["model.ckpt", "data.xyz", "--targets", "energy"], "OUTPUT=KEY"),
    ],
)
def test_audit_command_bad_input(audit_inputs, arguments, message, capsys, monkeypatch):
    """One clear line, non-zero exit, nothing written (run in-process: the
    command's main function is the entry point)."""
    monkeypatch.chdir(audit_inputs)
    arguments = ["audit", *arguments, "-o", "result"]
    check_clean_failure(main, arguments, audit_inputs, capsys, message)


def test_audit_command_refuses_a_busy_directory(audit_inputs, tmp_path, capsys):
    output = tmp_path / "busy"
    output.mkdir()
    (output / "keep.txt").write_text("user data")
    arguments = [audit_inputs / "model.ckpt", audit_inputs / "data.xyz"]
    status = main(["audit", *map(str, arguments), "-o", str(output)])
    assert status != 0
    assert "--force" in capsys.readouterr().err
    assert [p.name for p in output.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


def test_interrupted_audit_leaves_nothing(audit_inputs, tmp_path, monkeypatch):
    from metatrain_symmetry.audit import viewer

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    # the last file written: everything else is already in the staging directory
    monkeypatch.setattr(viewer, "write_html_viewer", interrupt)
    arguments = [audit_inputs / "model.ckpt", audit_inputs / "data.xyz"]
    output = tmp_path / "audit"
    status = main(
        ["audit", *map(str, arguments), "-o", str(output), "--max-lambda", "1"]
    )
    assert status == 130
    # no output directory; the completed shards are kept for a rerun to resume
    assert [p.name for p in tmp_path.iterdir()] == ["audit.partial"]
    assert (tmp_path / "audit.partial" / "manifest.json").is_file()


def test_audit_command_with_random_rotations(audit_inputs, tmp_path):
    """``--rotations N`` audits on N random elements: the equivariance error comes
    with its standard error, the report says it is an estimate, and the workload
    is announced in atoms before the pass."""
    model, data = audit_inputs / "model.ckpt", audit_inputs / "data.xyz"
    output = tmp_path / "audit"
    random_grid = ["--rotations", "16", "--seed", "3", "--max-lambda", "2"]
    process = run_mtt_symmetry("audit", model, data, "-o", output, *random_grid)
    assert process.returncode == 0, process.stderr
    n_atoms = sum(len(atoms) for atoms in ase.io.read(audit_inputs / "data.xyz", ":"))
    assert f"3 structures x 16 rotated copies = 48 copies, {16 * n_atoms} atoms" in (
        process.stderr
    )
    summary = json.loads((output / "audit.json").read_text())
    assert summary["grid"]["kind"] == "random"
    assert summary["grid"]["n_elements"] == 16
    for entry in summary["outputs"].values():
        error = entry["equivariance_rmse"]["mean_standard_error"]
        assert error is not None and 0 < error < entry["equivariance_rmse"]["mean"]
    markdown = (output / "audit.md").read_text()
    assert "16 Haar-random elements (an estimate)" in markdown
    assert " ± " in markdown
    with gzip.open(output / "audit.chemiscope.json.gz") as file:
        properties = json.load(file)["properties"]
    for name in summary["outputs"]:
        errors = properties[f"{name}: equivariance RMSE standard error"]["values"]
        # unbiased variance estimates can fall below zero: reported as 0
        assert len(errors) == 3 and min(errors) >= 0 and max(errors) > 0

    failing = tmp_path / "failing"
    process = run_mtt_symmetry(
        "audit", model, data, "-o", failing, *random_grid, "--grid-degree", "4"
    )
    assert process.returncode == 2
    assert "either --grid-degree or --rotations" in process.stderr
    assert not failing.exists()


@pytest.mark.parametrize("command", ["audit", "analyze"])
def test_dtype_option(audit_inputs, tmp_path, command):
    """``--dtype`` runs the model in the precision asked: the float64 checkpoint
    in float32 draws the float32 warning."""
    model, data = audit_inputs / "model.ckpt", audit_inputs / "data.xyz"
    arguments = [model, data, "--max-lambda", "1", "--grid-degree", "2"]
    for dtype, warns in (("float32", True), ("float64", False)):
        output = tmp_path / f"{command}-{dtype}"
        process = run_mtt_symmetry(command, *arguments, "--dtype", dtype, "-o", output)
        assert process.returncode == 0, process.stderr
        assert ("the model runs in float32" in process.stderr) == warns


@pytest.mark.filterwarnings("ignore:the mean square")
def test_random_rotations_equivariance_error_is_unbiased_with_its_error(molecules):
    """Over seeds, the per-structure equivariance RMSE of random grids scatters as
    much as its reported standard error says, around the exact grid's value."""
    model = msym.load_model(AnalyticModel(), capabilities=capabilities())
    name = "mtt::x_z_squared"
    exact = msym.analyze(model, molecules, [name], max_lambda=2, grid=msym.O3Grid(8))
    values, errors, means, mean_errors = [], [], [], []
    for seed in range(40):
        result = msym.analyze(
            model,
            molecules,
            [name],
            max_lambda=2,
            grid=msym.O3Grid.random(16, seed=seed),
        )
        values.append(result.equivariance_rmse(name))
        errors.append(result.equivariance_rmse_error[name])
        means.append(float(values[-1].mean()))
        mean_errors.append(result.mean_equivariance_rmse_error[name])
    values, errors = torch.stack(values), torch.stack(errors)
    spread = values.std(dim=0)
    reported = errors.mean(dim=0)
    assert bool(torch.all((reported / spread - 1).abs() < 0.35))
    assert abs(np.mean(mean_errors) / np.std(means) - 1) < 0.35
    # sqrt of an unbiased estimate: within a few standard errors of the mean
    truth = exact.equivariance_rmse(name)
    assert bool(torch.all((values.mean(dim=0) - truth).abs() < 4 * spread / 40**0.5))


def test_reports_name_the_model_and_dataset_files(audit_directory, audit_inputs):
    with gzip.open(audit_directory / "audit.chemiscope.json.gz") as file:
        dataset = json.load(file)
    title = "Symmetry audit of model.ckpt on data.xyz"
    assert dataset["meta"]["name"] == title
    assert f"<title>{title}</title>" in (audit_directory / "audit.html").read_text()
    # a model loaded from a file before the audit keeps its file name
    model = msym.load_model(audit_inputs / "model.ckpt")
    frames = ase.io.read(audit_inputs / "data.xyz", ":")
    result = msym.audit(model, frames, max_lambda=1)
    assert result.summary["model"]["path"] == str(audit_inputs / "model.ckpt")
    assert "model.ckpt" in audit_markdown(result.summary)


def test_audit_shows_itself_as_a_chemiscope_widget(audit_inputs):
    import chemiscope

    result = msym.audit(
        audit_inputs / "model.ckpt", audit_inputs / "data.xyz", max_lambda=1
    )
    widget = result.show()
    assert isinstance(widget, chemiscope.widget.ChemiscopeWidgetBase)
    assert len(result.frames) == 3
    map_widget = result.show(mode="map")
    assert type(map_widget) is not type(widget)
