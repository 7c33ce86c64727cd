"""Audited export in new processes: the model ``mtt export`` writes, with the
audit in its metadata; the symmetrized export run through metatomic's ASE
calculator. The tests in this process are in ``test_export_in_process.py``."""

import json
import subprocess
import sys

import ase
import ase.io
import jsonschema
import numpy as np
import pytest
from metatomic.torch import ModelOutput, load_atomistic_model
from metatomic_ase import MetatomicCalculator

import metatrain_symmetry as msym
from metatrain_symmetry.audit import AUDIT_METADATA_KEY, audit_schema
from metatrain_symmetry.engine import (
    CPU_ATOMS_PER_BATCH,
    DEFAULT_ATOMS_PER_BATCH,
    RotatedEvaluator,
    default_atoms_per_batch,
)
from metatrain_symmetry.testing import run_mtt_symmetry


@pytest.fixture(scope="module")
def exported(audit_inputs, tmp_path_factory):
    directory = tmp_path_factory.mktemp("export")
    process = run_mtt_symmetry(
        "export",
        audit_inputs / "model.ckpt",
        "-o",
        directory / "audited.pt",
        "--audit",
        audit_inputs / "data.xyz",
        "--max-lambda",
        "2",
    )
    assert process.returncode == 0, process.stderr
    reference = subprocess.run(
        [
            sys.executable,
            "-m",
            "metatrain",
            "export",
            str(audit_inputs / "model.ckpt"),
            "-o",
            str(directory / "reference.pt"),
        ],
        capture_output=True,
        text=True,
        cwd=directory,
    )
    assert reference.returncode == 0, reference.stderr
    return directory


def test_metadata_carries_a_valid_audit(exported, audit_inputs):
    model = load_atomistic_model(str(exported / "audited.pt"))
    summary = json.loads(model.metadata().extra[AUDIT_METADATA_KEY])
    jsonschema.validate(summary, audit_schema())
    assert summary == msym.read_audit(exported / "audited.pt")
    assert summary["model"]["path"] == str(audit_inputs / "model.ckpt")
    assert summary["dataset"]["n_structures"] == 3
    assert summary["outputs"]["energy"]["target"]["key"] == "energy"
    assert msym.read_audit(exported / "reference.pt") is None


def test_export_equals_mtt_export(exported, audit_inputs):
    audited = load_atomistic_model(str(exported / "audited.pt"))
    reference = load_atomistic_model(str(exported / "reference.pt"))
    assert audited.metadata().name == reference.metadata().name
    assert audited.metadata().references == reference.metadata().references
    assert set(audited.capabilities().outputs) == set(reference.capabilities().outputs)
    for atoms in ase.io.read(audit_inputs / "data.xyz", ":2"):
        energies = []
        for model in (audited, reference):
            copy = atoms.copy()
            copy.calc = MetatomicCalculator(model)
            energies.append(copy.get_potential_energy())
        assert energies[0] == energies[1]


def octahedral_transformations():
    """Elements of the octahedral group with inversion, which map the O(3)
    quadrature onto itself, so that the average over it is exactly invariant
    under them (for any other rotation it is invariant up to the quadrature
    error)."""
    quarter_z = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    quarter_x = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    return [quarter_z @ quarter_x, -quarter_x @ quarter_z]


def test_symmetrized_export_through_the_ase_calculator(audit_inputs, tmp_path):
    path = tmp_path / "symmetrized.pt"
    process = run_mtt_symmetry(
        "export",
        audit_inputs / "model.ckpt",
        "-o",
        path,
        "--audit",
        audit_inputs / "data.xyz",
        "--symmetrize",
        "--grid-degree",
        "3",
        "--max-lambda",
        "1",
    )
    assert process.returncode == 0, process.stderr
    model = load_atomistic_model(str(path))
    assert "o3::variance::energy" in model.capabilities().outputs
    assert msym.read_audit(path)["grid"]["degree"] == 3

    variance_request = {"o3::variance::energy": ModelOutput(sample_kind="system")}
    calculator = MetatomicCalculator(model, additional_outputs=variance_request)
    atoms = ase.io.read(audit_inputs / "data.xyz", "0")
    atoms.calc = calculator
    energy = atoms.get_potential_energy()
    forces = atoms.get_forces()
    variance = calculator.additional_outputs["o3::variance::energy"]
    variance = float(variance.block().values.detach().reshape(()))

    # the same quantities from the analysis engine on the same grid
    result = msym.analyze(
        audit_inputs / "model.ckpt",
        [atoms],
        ["energy"],
        max_lambda=1,
        grid=msym.O3Grid(3),
    )
    average = float(result.average["energy"].block().values.reshape(()))
    expected_variance = float(result.variance["energy"].block().values.reshape(()))
    assert energy == pytest.approx(average, rel=1e-8)
    assert variance == pytest.approx(expected_variance, rel=1e-8)
    assert variance > 1e-6

    for rotation in octahedral_transformations():
        rotated = atoms.copy()
        rotated.positions = atoms.positions @ rotation.T
        rotated.calc = MetatomicCalculator(model)
        assert rotated.get_potential_energy() == pytest.approx(energy, abs=1e-10)
        assert np.allclose(rotated.get_forces(), forces @ rotation.T, atol=1e-9)

    # each call of the averaged model evaluates the underlying one on the 24
    # rotations of the degree-3 quadrature and their inversions: the engine's
    # batches of a 192-atom box held 21 copies, 1008 box evaluations with their
    # autograd graphs, and ran out of memory
    loaded = msym.load_model(path)
    assert loaded.evaluations_per_structure == len(msym.O3Grid(3)) == 48
    assert msym.load_model(audit_inputs / "model.ckpt").evaluations_per_structure == 1
    box = ase.Atoms("H" * 192)
    evaluator = RotatedEvaluator(loaded, msym.O3Grid(3))
    assert evaluator.copies_per_batch([box]) == 1
    small = ase.Atoms("H" * 4)
    # on this CPU model, the CPU's default: smaller calls than on a GPU
    assert evaluator.copies_per_batch([small]) == CPU_ATOMS_PER_BATCH // (4 * 48)
    assert default_atoms_per_batch("cpu") == CPU_ATOMS_PER_BATCH
    assert default_atoms_per_batch("cuda:1") == DEFAULT_ATOMS_PER_BATCH


def test_metadata_holds_what_the_audit_command_writes(exported, audit_inputs, tmp_path):
    """The audit stored in the model is the ``audit.json`` of the same audit
    (but for the list of files, which only a written audit has)."""
    output = tmp_path / "audit"
    process = run_mtt_symmetry(
        "audit",
        audit_inputs / "model.ckpt",
        audit_inputs / "data.xyz",
        "-o",
        output,
        "--max-lambda",
        "2",
    )
    assert process.returncode == 0, process.stderr
    written = json.loads((output / "audit.json").read_text())
    assert written.pop("files")["spectra"] == "spectra.mts"
    assert msym.read_audit(exported / "audited.pt") == written
