"""The files of an audit: ``write_audit_report`` and the spectra TensorMaps."""

import gzip
import json

import jsonschema
import metatensor.torch as mts
import pytest
import torch

import metatrain_symmetry as msym
from metatrain_symmetry.audit import (
    audit_markdown,
    audit_schema,
    spectra_error_tensormap,
    spectra_tensormap,
    write_audit_report,
)
from tests.helpers import EXACT_AUDIT_FILES


def test_random_grid_audit_reports_estimates(pet_audit, tmp_path):
    """On a random grid the spectra and leakages are labelled as estimates with
    standard errors in every file, and are written unclipped."""

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


def test_spectra_tensormap_lists_outputs_then_features(pet_audit):
    """One block per entry: the audited outputs in the order requested, then the
    features, each the spectrum of the analysis; no errors on exact grids."""
    _, _, result = pet_audit
    names = ["energy", "non_conservative_force", "mtt::feature::gnn_layers.1_node"]
    spectra = spectra_tensormap(result)
    assert spectra.keys.names == ["entry"]
    assert spectra.keys.values.reshape(-1).tolist() == [0, 1, 2]
    for index, name in enumerate(names):
        block = spectra.block({"entry": index})
        assert block.samples.names == ["system"]
        assert block.properties.names == ["chi_lambda", "chi_sigma"]
        assert torch.equal(block.values, result.analysis.spectrum[name].block().values)
    assert spectra_error_tensormap(result) is None


def test_exact_grid_report_files(pet_audit, tmp_path):
    """Every file of an audit on an exact grid, and no file of standard errors;
    ``audit.md`` is the Markdown of ``audit.json``."""
    _, _, result = pet_audit
    write_audit_report(result, tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == EXACT_AUDIT_FILES
    written = json.loads((tmp_path / "audit.json").read_text())
    assert written["files"] == {
        "spectra": "spectra.mts",
        "spectra_entries": [
            "energy",
            "non_conservative_force",
            "mtt::feature::gnn_layers.1_node",
        ],
        "spectra_standard_errors": None,
    }
    assert (tmp_path / "audit.md").read_text() == audit_markdown(written)
    saved = mts.load(str(tmp_path / "spectra.mts"))
    assert mts.equal(saved, spectra_tensormap(result))
    stems = ["energy", "non_conservative_force", "mtt-feature-gnn_layers.1_node"]
    quantities = ["average", "character_projection", "spectrum", "variance"]
    assert sorted(path.name for path in (tmp_path / "tensors").iterdir()) == sorted(
        f"{stem}.{quantity}.mts" for stem in stems for quantity in quantities
    )
