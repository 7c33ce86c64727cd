"""The validation study on real DFT water, run end to end in its quick form.

It reads the revPBE0-D3 water boxes from ``../shared/data`` next to the
repository (never copied into it), which the CI machines provide.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import docutils.core
import docutils.nodes
import jsonschema
import pytest

import metatrain_symmetry as msym
from metatrain_symmetry.consequences import consequences_schema


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "validation" / "water_study.py"
DATA = ROOT.parent / "shared" / "data" / "water-revpbe0" / "water-bulk-100.xyz"


def _numbers(entry: dict, keys) -> None:
    for key in keys:
        assert isinstance(entry[key], float), (key, entry)


def forces_of_models() -> dict[str, str]:
    return {"conservative": "forces", "non-conservative": "non_conservative_force"}


def test_water_study_quick(tmp_path):
    assert DATA.is_file(), (
        f"the water study needs the revPBE0-D3 water data at {DATA} (the shared "
        "data directory next to the repository)"
    )
    output = tmp_path / "study"
    extra = tmp_path / "extra.xyz"
    extra.write_text("3\n\nO 0.0 0.0 0.0\nH 0.757 0.586 0.0\nH -0.757 0.586 0.0\n")
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "src"), environment.get("PYTHONPATH", "")]
    )
    process = subprocess.run(
        [sys.executable, str(SCRIPT), "-o", str(output), "--quick"]
        + ["--extra", f"gas molecule={extra}"],
        capture_output=True,
        text=True,
        env=environment,
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]

    report = json.loads((output / "report.json").read_text())
    assert report["mode"] == "quick"
    assert (output / "report.md").is_file()
    figures = ("learning.png", "ratios.png", "tradeoff.png")
    for figure in figures:
        assert (output / figure).stat().st_size > 0

    # 1. both trainings, with intermediate checkpoints and their learning curves
    for name in ("conservative", "non-conservative"):
        training = report["training"][name]
        assert (output / training["checkpoint"]).is_file()
        assert (output / training["exported"]).is_file()
        assert len(training["intermediate_checkpoints"]) >= 2
        curve = report["learning"][name]
        assert curve["epoch"] == list(range(training["epochs"]))
        _numbers(
            {key: values[-1] for key, values in curve.items() if key != "epoch"},
            ["energy_mae_per_atom_meV", "force_mae_meV_per_A"],
        )
    # the zero-force baseline is the mean |F| of the training boxes' DFT forces
    import ase.io
    import numpy as np

    training_boxes = ase.io.read(output / "data" / "train.xyz", ":")
    assert len(training_boxes) == report["split"]["train"]
    dft_forces = np.concatenate([atoms.get_forces() for atoms in training_boxes])
    assert report["zero_force_mae"] == pytest.approx(np.abs(dft_forces).mean())

    # the infinitesimal screen against the audit, on the sets it is run on
    for name, force in forces_of_models().items():
        for set_name in ("test", "molecules", "dimers"):
            entry = report["screen"][name][set_name]
            assert entry["screen_seconds_per_structure"] > 0
            assert entry["audit_seconds_per_structure"] > 0
            for output_name in ("energy", force):
                value = entry["outputs"][output_name]
                assert value["mean_lie_rmse"] > 0
                if value["rho"] is not None:
                    assert -1.0 <= value["rho"] <= 1.0
    assert (
        "## The infinitesimal screen against the grid audit"
        in (output / "report.md").read_text()
    )

    # 2. audits of both models on every set, the extra one included
    sets = {"test", "molecules", "dimers", "ice Ih", "gas molecule"}
    forces = forces_of_models()
    for name, force in forces.items():
        audits = report["audits"][name]
        assert set(audits) == sets
        for entry in audits.values():
            assert (output / entry["directory"] / "audit.json").is_file()
            for output_name in ("energy", force):
                _numbers(entry["outputs"][output_name], ["equivariance_rmse"])
        for output_name in ("energy", force):
            entry = audits["test"]["outputs"][output_name]
            _numbers(entry, ["mae", "rmse", "equivariance_over_mae"])
            assert entry["equivariance_over_mae"] == pytest.approx(
                entry["equivariance_rmse"] / entry["mae"]
            )
            # random grids: every estimate carries its standard error
            assert entry["equivariance_rmse_standard_error"] > 0
            assert entry["leakage_standard_error"] > 0
            assert audits["molecules"]["outputs"][output_name]["mae"] is None
            correlation = report["correlation"][name][output_name]
            assert -1.0 <= correlation["rho"] <= 1.0
    # the published figures the report compares with, and where they come from
    assert "Langer" in report["published"]["source"]
    assert "Langer" in (output / "report.md").read_text()

    # 3. spectra across epochs and layers
    for name in forces:
        dynamics = report["dynamics"][name]
        assert len(dynamics["epochs"]) >= 2
        for figure in ("dynamics.png", "layers.png"):
            assert (output / dynamics["directory"] / figure).is_file()

    # 4. the trade-off: trained model, fine-tuning and retraining sweep
    methods = [row["method"] for row in report["tradeoff"]]
    assert methods.count("trained") == 1
    assert methods.count("fine-tuned") == 1
    assert methods.count("fine-tuned, generators") == 1
    assert methods.count("retrained") == 2
    # the cheaper penalty method again, for more epochs, in the other's wall time
    rows = {row["method"]: row for row in report["tradeoff"]}
    rotations, generators = rows["fine-tuned"], rows["fine-tuned, generators"]
    assert rotations["epochs"] == generators["epochs"]
    faster = min((rotations, generators), key=lambda row: row["seconds"])
    (equal_time,) = [row for row in rows.values() if row["method"].endswith("time")]
    assert equal_time["method"] == f"{faster['method']}, equal time"
    assert equal_time["epochs"] > faster["epochs"]
    for row in report["tradeoff"]:
        _numbers(
            row,
            [
                "energy_rmse",
                "energy_equivariance_rmse",
                "force_rmse",
                "force_equivariance_rmse",
            ],
        )
        if row["method"] != "trained":
            assert row["seconds"] > 0
    assert (output / report["retrain"]["directory"] / "pareto.csv").is_file()
    # the trade-off's trained model is the audited one, on the same test boxes
    (trained_row,) = [row for row in report["tradeoff"] if row["method"] == "trained"]
    conservative_test = report["audits"]["conservative"]["test"]["outputs"]
    assert trained_row["energy_rmse"] == pytest.approx(
        conservative_test["energy"]["rmse"], rel=1e-9
    )
    assert trained_row["force_rmse"] == pytest.approx(
        conservative_test["forces"]["rmse"], rel=1e-9
    )
    # the closed-form minimiser of L_mu + gamma L_sigma: a larger gamma never has
    # a larger L_sigma nor a smaller L_mu on the training boxes
    table = report["retrain"]["table"]
    for smaller, larger in zip(table[:-1], table[1:], strict=True):
        assert larger["gamma"] > smaller["gamma"]
        for term in ("energy", "energy/forces"):
            sigma, mu = f"{term} train L_sigma", f"{term} train L_mu"
            assert larger[sigma] <= smaller[sigma] * (1 + 1e-9), term
            assert larger[mu] >= smaller[mu] * (1 - 1e-9), term

    # 5. the symmetrized export: much closer to equivariant, and costlier
    exported = report["symmetrized_export"]
    for kind in ("plain", "symmetrized"):
        assert (output / exported["files"][kind]).is_file()
        _numbers(exported[kind], ["seconds_per_evaluation"])
    for name in ("energy", "forces"):
        plain = exported["plain"][name]["equivariance_rmse"]
        symmetrized = exported["symmetrized"][name]["equivariance_rmse"]
        assert symmetrized < 0.1 * plain
    # each call evaluates the model on every element of the grid (batched); the
    # ratio of wall times is a measurement that depends on the machine's load,
    # reported, not asserted (a loaded machine once timed the plain model slower)
    symmetrized_model = msym.load_model(output / exported["files"]["symmetrized"])
    size = len(msym.O3Grid(exported["grid_degree"]))
    assert symmetrized_model.evaluations_per_structure == size
    assert exported["cost_ratio"] > 0

    # 6. consequences for simulations: the molecule, the liquid and GenIce2 ice
    simulations = report["consequences"]
    variants = {"plain", "average", "random_rotation"}
    assert set(simulations["molecule"]) == variants
    for entry in simulations["molecule"].values():
        _numbers(entry, ["max_angular_momentum_change_hbar", "energy_drift_eV_per_ps"])
        assert 0.0 <= entry["uniformity_p_value"] <= 1.0
    assert set(simulations["bulk"]) == variants
    assert simulations["bulk"]["plain"]["rdf_max_difference_in_errors"] == 0.0
    ice = ase.io.read(output / "data" / "ice-genice.xyz", ":")
    assert len(ice) == 2 and all(len(atoms) == 48 for atoms in ice)
    # GenIce2's cells differ in their hydrogen-bond networks, not their oxygens
    assert np.abs(ice[0].positions - ice[1].positions).max() > 0.5
    for variant in variants:
        energies = simulations["ice"][variant]["relative_energy_meV_per_molecule"]
        assert len(energies) == 2 and min(energies) == 0.0
    for group in ("molecule", "bulk", "ice"):
        directory = output / "consequences" / group
        jsonschema.validate(
            json.loads((directory / "consequences.json").read_text()),
            consequences_schema(),
        )
    assert "## Consequences for simulations" in (output / "report.md").read_text()

    stages = report["timings"]
    for stage in (
        "data",
        "audits",
        "dynamics",
        "trade-off",
        "symmetrized export",
        "consequences",
    ):
        assert stages[stage] > 0

    # the report and its figures are redrawn from a finished run
    for name in ("report.md", *figures):
        (output / name).unlink()
    docs = tmp_path / "docs" / "validation"
    process = subprocess.run(
        [sys.executable, str(SCRIPT), "-o", str(output), "--report-only"]
        + ["--docs", str(docs)],
        capture_output=True,
        text=True,
        env=environment,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    for name in ("report.md", *figures):
        assert (output / name).stat().st_size > 0
    assert json.loads((output / "report.json").read_text()) == report
    check_docs_report(output / "report.md", docs)


def check_docs_report(markdown: Path, docs: Path) -> None:
    """The report as the docs page includes it: valid reStructuredText, every
    table and figure of ``report.md`` in it, random-grid estimates with their
    standard errors."""
    text = (docs / "report.inc").read_text()
    document = docutils.core.publish_doctree(
        text, settings_overrides={"report_level": 5, "halt_level": 5}
    )
    problems = [
        message.astext()
        for message in document.findall(docutils.nodes.system_message)
        if message["level"] >= 2
    ]
    assert problems == []
    lines = markdown.read_text().splitlines()
    tables = sum(
        line.startswith("|") and not previous.startswith("|")
        for previous, line in zip(["", *lines[:-1]], lines, strict=True)
    )
    assert text.count(".. list-table::") == tables > 5
    images = [line for line in text.splitlines() if line.startswith(".. image::")]
    assert len(images) == sum(line.startswith("![") for line in lines) == 7
    for line in images:
        assert (docs / line.split("/")[-1]).stat().st_size > 0
    assert "``energy``" in text and " ± " in text
