"""The chemiscope dataset of an audit and its offline HTML viewer, opened in a
real (headless) browser."""

import gzip
import json
import math

import ase.io
import chemiscope
import metatensor.torch as mts
import numpy as np
import pytest

import metatrain_symmetry as msym
from metatrain_symmetry.audit import (
    audit_markdown,
    chemiscope_library,
    write_html_viewer,
)
from tests.audit.browser import open_page, pixel_spread
from tests.helpers import PairPotential, pair_capabilities


NAN = float("nan")


def load_dataset(directory):
    with gzip.open(directory / "audit.chemiscope.json.gz", "rt") as file:
        return json.load(file)


def test_chemiscope_file_passes_chemiscope_validation(audit_directory):
    data = load_dataset(audit_directory)
    # chemiscope's own reader and its input validation accept the file
    widget = chemiscope.show_input(str(audit_directory / "audit.chemiscope.json.gz"))
    assert widget is not None
    parameters = {
        name: {**value, "values": np.array(value["values"])}
        for name, value in data["parameters"].items()
    }
    validated = chemiscope.create_input(
        structures=data["structures"],
        metadata=data["meta"],
        properties=data["properties"],
        environments=[
            (e["structure"], e["center"], e["cutoff"]) for e in data["environments"]
        ],
        shapes=data["shapes"],
        settings=data["settings"],
        parameters=parameters,
    )
    assert set(validated["properties"]) == set(data["properties"])


def test_chemiscope_content_matches_the_audit(audit_directory):
    data = load_dataset(audit_directory)
    summary = json.loads((audit_directory / "audit.json").read_text())
    n_structures = summary["dataset"]["n_structures"]
    n_atoms = summary["dataset"]["n_atoms"]
    properties = data["properties"]
    assert len(data["structures"]) == n_structures

    for name in summary["outputs"]:
        variance = mts.load(str(audit_directory / "tensors" / f"{name}.variance.mts"))
        expected = msym.equivariance_rmse(variance).numpy()
        values = properties[f"{name}: equivariance RMSE"]["values"]
        assert np.allclose(values, expected, rtol=1e-12)
        leakage = np.array(properties[f"{name}: leakage"]["values"])
        assert np.mean(leakage) == pytest.approx(
            summary["outputs"][name]["leakage"]["mean"]
        )
        assert len(properties[f"{name}: error"]["values"]) == n_structures
    # spectra: one curve per structure, over all (lambda, sigma)
    spectra = mts.load(str(audit_directory / "spectra.mts"))
    entries = summary["files"]["spectra_entries"]
    for index, name in enumerate(entries):
        curve = np.array(properties[f"{name}: spectrum"]["values"])
        assert curve.shape == (n_structures, len(summary["irreps"]))
        assert np.allclose(curve, spectra.block({"entry": index}).values.numpy())
    assert data["parameters"]["irrep"]["values"] == [
        lam + (0.0 if sigma == 1 else 0.5) for lam, sigma in summary["irreps"]
    ]

    # per-atom force equivariance errors and one deviation arrow per atom
    force = "non_conservative_force"
    atom_errors = properties[f"{force}: atom equivariance error"]
    assert atom_errors["target"] == "atom" and len(atom_errors["values"]) == n_atoms
    # one (1, +1) block: the per-atom error is the root of the per-atom variance
    variance = mts.load(str(audit_directory / "tensors" / f"{force}.variance.mts"))
    expected = variance.block().values[:, 0].sqrt().numpy()
    assert np.allclose(atom_errors["values"], expected, rtol=1e-12)
    arrows = data["shapes"][f"{force}: deviation"]
    assert arrows["kind"] == "arrow"
    assert len(arrows["parameters"]["atom"]) == n_atoms
    lengths = [np.linalg.norm(a["vector"]) for a in arrows["parameters"]["atom"]]
    assert max(lengths) == pytest.approx(1.0)

    settings = data["settings"]
    for axis in ("x", "y", "color"):
        assert settings["map"][axis]["property"] in properties
    assert settings["structure"][0]["shape"] == [f"{force}: deviation"]


def test_html_viewer_is_self_contained(audit_directory):
    page = (audit_directory / "audit.html").read_text()
    assert "<script src=" not in page and "<link" not in page
    assert "http://" not in page.split("<script>")[0]
    assert len(page) > len(chemiscope_library())


def test_viewer_escapes_script_endings(tmp_path):
    """The dataset is a JavaScript literal that no string can end early, and it
    keeps the NaN of missing values, which chemiscope hides from the map."""
    dataset = {
        "meta": {"name": "</script><script>alert(1)</script>"},
        "structures": [],
        "properties": {"leakage": {"target": "structure", "values": [0.5, NAN]}},
    }
    write_html_viewer(dataset, tmp_path / "page.html")
    page = (tmp_path / "page.html").read_text()
    body = page.split("window.chemiscopeDataset = ")[1].split(";</script>")[0]
    assert "</script>" not in body
    parsed = json.loads(body)
    assert parsed["meta"] == dataset["meta"]
    assert parsed["properties"]["leakage"]["values"][0] == 0.5
    assert math.isnan(parsed["properties"]["leakage"]["values"][1])


def test_viewer_loads_structures_without_leakage(tmp_path):
    """A single atom first (its forces are zero: no leakage, one atom error) and
    a trimer: the viewer loads in Chromium without errors."""
    model = msym.load_model(PairPotential(), capabilities=pair_capabilities())
    frames = [
        ase.Atoms("Cu", positions=[[0, 0, 0]]),
        ase.Atoms("Cu3", positions=[[0, 0, 0], [2.5, 0, 0], [0.2, 2.4, 0.3]]),
    ]
    result = msym.audit(model, frames, ["energy", "forces"], max_lambda=1)
    assert result.summary["outputs"]["forces"]["zero_structures"] == 1
    leakage = result.leakage("forces")
    assert math.isnan(float(leakage[0])) and not math.isnan(float(leakage[1]))
    msym.write_audit_report(result, tmp_path)
    report = open_page(tmp_path / "audit.html")
    assert report.status == "loaded", report.errors
    assert report.errors == []


def test_viewer_renders_in_chromium(audit_directory):
    """Debian's Chromium, headless, opens audit.html from disk: the viewer
    loads without any JavaScript error and draws the map and the structure."""
    report = open_page(audit_directory / "audit.html")
    assert report.status == "loaded", report.errors
    assert report.errors == []
    dom = report.dom
    assert dom["map"]["plots"] > 0
    assert any(w > 100 and h > 100 for _, _, w, h in dom["map"]["canvases"])
    assert any(w > 100 and h > 100 for _, _, w, h in dom["structure"]["canvases"])
    assert pixel_spread(report.screenshot) > 5
    # both panels hold drawings, not blank areas
    assert pixel_spread(report.screenshot, dom["map"]["box"]) > 5
    assert pixel_spread(report.screenshot, dom["structure"]["box"]) > 5


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
