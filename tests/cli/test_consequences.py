"""``mtt-symmetry consequences`` end to end, in new processes, on models saved by
another process: an exactly invariant model keeps angular momentum and samples
orientations uniformly in every variant; a model with a lab-frame term exerts its
analytic torque and prefers orientations, and its average does not."""

import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ase
import ase.build
import ase.io
import jsonschema
import numpy as np
import pytest

from metatrain_symmetry.cli import main
from metatrain_symmetry.consequences import consequences_schema
from metatrain_symmetry.consequences.simulation import KILL_AFTER_STEPS_VARIABLE
from metatrain_symmetry.testing import check_clean_failure, run_mtt_symmetry
from tests.helpers import assert_same_numbers


LAB_FRAME = 3.0

SAVE_MODELS = textwrap.dedent(
    """\
    import sys
    sys.path.insert(0, {root!r})
    from metatomic.torch import AtomisticModel, ModelMetadata, ModelOutput
    from tests.helpers import PairPotential, pair_capabilities
    for name, lab_frame in (("exact.pt", 0.0), ("lab.pt", {lab_frame})):
        module = PairPotential(lab_frame=lab_frame, bond_length=1.0, stiffness=5.0)
        AtomisticModel(module.eval(), ModelMetadata(), pair_capabilities()).save(name)
    # a model whose only output is not an energy
    capabilities = pair_capabilities()
    capabilities.outputs = {{"mtt::pair": ModelOutput(sample_kind="system")}}
    module = PairPotential().eval()
    AtomisticModel(module, ModelMetadata(), capabilities).save("no-energy.pt")
    """
)

# a water-like molecule tilted out of every coordinate plane
MOLECULE = ase.Atoms(
    "OH2", positions=[[0.0, 0.0, 0.0], [0.9, 0.2, 0.4], [-0.5, 0.7, 0.5]]
)
# hot and long enough for the orientation test to have tens of independent samples
MOLECULAR = ("--steps", "2000", "--frames", "400", "--temperature", "1000")
MOLECULAR += ("--grid-degree", "3")
QUICK = ("--steps", "30", "--frames", "10", "--blocks", "2", "--grid-degree", "2")
ROUND_OFF_HBAR = 1e-8
# the same NVE with each engine; short, as the two programs' unit constants differ
# by about 1e-7 and a stiff molecule's dynamics amplifies that over hundreds of
# steps
NVE = ("--experiments", "molecule-nve", "--steps", "40", "--frames", "20")
NVE += ("--blocks", "2", "--grid-degree", "2")


def _box():
    box = ase.build.bulk("Cu", "fcc", a=3.0, cubic=True)
    box.rattle(0.05, seed=0)
    return box


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The models, written by another process, and the runs of the command."""
    root = tmp_path_factory.mktemp("consequences")
    repository = str(Path(__file__).resolve().parents[2])
    source = SAVE_MODELS.format(root=repository, lab_frame=LAB_FRAME)
    process = subprocess.run(
        [sys.executable, "-c", source], cwd=root, capture_output=True, text=True
    )
    assert process.returncode == 0, process.stderr
    ase.io.write(root / "molecule.xyz", MOLECULE)
    ase.io.write(root / "box.xyz", _box())
    ase.io.write(root / "mixed.xyz", [MOLECULE, _box()])
    commands = {
        "exact": ["exact.pt", "molecule.xyz", "--experiments", "molecule-nve"]
        + ["orientations", *MOLECULAR],
        "lab": ["lab.pt", "molecule.xyz", *MOLECULAR],
        "mixed": ["lab.pt", "mixed.xyz", *QUICK],
        "mixed-ipi": ["lab.pt", "mixed.xyz", *QUICK, "--engine", "ipi"],
        "nve-ase": ["lab.pt", "molecule.xyz", *NVE],
        "nve-ipi": ["lab.pt", "molecule.xyz", *NVE, "--engine", "ipi"],
    }

    def one(name):
        return run_mtt_symmetry("consequences", *commands[name], "-o", name, cwd=root)

    with ThreadPoolExecutor(2) as pool:
        processes = dict(zip(commands, pool.map(one, commands), strict=True))
    for name, process in processes.items():
        assert process.returncode == 0, f"{name}: {process.stderr[-3000:]}"
    return root


def _summary(runs, name):
    return json.loads((runs / name / "consequences.json").read_text())


def _analytic_torque(atoms) -> np.ndarray:
    """Torque of ``a sum_{i<j} (r_ij . e_z)^2``: ``-2 a sum d_z (d x e_z)``."""
    torque = np.zeros(3)
    for i in range(len(atoms)):
        for j in range(i + 1, len(atoms)):
            d = atoms.positions[j] - atoms.positions[i]
            torque -= 2 * LAB_FRAME * d[2] * np.cross(d, [0.0, 0.0, 1.0])
    return torque


def test_an_invariant_model_keeps_angular_momentum_and_uniformity(runs):
    summary = _summary(runs, "exact")
    jsonschema.validate(summary, consequences_schema())
    experiments = summary["experiments"]
    assert list(experiments) == ["molecule_nve", "orientations"]
    for variant, entry in experiments["molecule_nve"]["variants"].items():
        (record,) = entry["structures"]
        assert record["max_angular_momentum_change_hbar"] < ROUND_OFF_HBAR, variant
        np.testing.assert_allclose(record["initial_torque_eV"], 0.0, atol=1e-10)
        assert record["time_to_kT_ps"] is None
    for variant, entry in experiments["orientations"]["variants"].items():
        (record,) = entry["structures"]
        assert record["uniformity_p_value"] > 1e-3, variant
        assert record["n_samples"] >= 15


def test_a_lab_frame_term_spins_the_molecule_and_orients_it(runs):
    summary = _summary(runs, "lab")
    jsonschema.validate(summary, consequences_schema())
    experiments = summary["experiments"]
    assert list(experiments) == ["molecule_nve", "orientations", "relax"]
    nve = experiments["molecule_nve"]["variants"]
    (plain,) = nve["plain"]["structures"]
    np.testing.assert_allclose(
        plain["initial_torque_eV"], _analytic_torque(MOLECULE), rtol=1e-10, atol=1e-12
    )
    assert plain["max_angular_momentum_change_hbar"] > 1.0
    assert plain["time_to_kT_ps"] is not None
    (average,) = nve["average"]["structures"]
    assert average["max_angular_momentum_change_hbar"] < ROUND_OFF_HBAR
    np.testing.assert_allclose(average["initial_torque_eV"], 0.0, atol=1e-10)

    orientations = experiments["orientations"]["variants"]
    assert orientations["plain"]["structures"][0]["uniformity_p_value"] < 1e-3
    assert orientations["average"]["structures"][0]["uniformity_p_value"] > 1e-3
    report = (runs / "lab" / "consequences.md").read_text()
    assert "| 0 | plain |" in report and "**not uniform**" in report


def test_every_file_is_written_and_readable(runs):
    """All four experiments on a molecule and a box: the schema, the plots, the
    trajectories and the chemiscope file."""
    directory = runs / "mixed"
    summary = _summary(runs, "mixed")
    jsonschema.validate(summary, consequences_schema())
    assert summary["selected"] == {
        "molecule-nve": [0],
        "orientations": [0],
        "observables": [1],
        "relax": [0, 1],
    }
    for name in ("angular_momentum", "orientations", "rdf", "relax"):
        assert (directory / f"{name}.png").stat().st_size > 0
    observables = summary["experiments"]["observables"]["variants"]["plain"]
    assert set(observables["rdf"]) == {"Cu-Cu"}
    trajectory = ase.io.read(
        directory / "trajectories" / "molecule_nve-plain-0.xyz", index=":"
    )
    assert len(trajectory) == 11
    assert trajectory[-1].info["time_ps"] == pytest.approx(30 * 0.5e-3)
    relaxed = ase.io.read(directory / "trajectories" / "relax-average-1.xyz")
    assert len(relaxed) == len(_box())
    with gzip.open(directory / "consequences.chemiscope.json.gz", "rt") as handle:
        dataset = json.load(handle)
    n_frames = 3 * (11 + 11 + 11)
    assert len(dataset["structures"]) == n_frames
    assert len(dataset["properties"]["variant"]["values"]) == n_frames
    relax = summary["experiments"]["relax"]
    assert isinstance(relax["ranking_changed"], bool)
    for variant in ("plain", "random_rotation"):
        assert relax["variants"][variant]["cost_per_step_relative"] > 0


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["no-energy.pt", "molecule.xyz"], "has no 'energy' output"),
        (
            ["exact.pt", "box.xyz", "--experiments", "molecule-nve"],
            "structure 0 is periodic, but molecule-nve simulates isolated",
        ),
        (
            ["exact.pt", "molecule.xyz", "--experiments", "observables"],
            "observables needs a periodic structure",
        ),
        (["exact.pt", "molecule.xyz", "--time-step", "0"], "--time-step must be a"),
        (["exact.pt", "molecule.xyz", "--temperature", "-5"], "--temperature must"),
        (["exact.pt", "molecule.xyz", "--steps", "0"], "--steps must be a positive"),
        (["exact.pt", "missing.xyz"], "missing.xyz"),
    ],
)
def test_bad_input_is_refused_before_any_work(
    runs, monkeypatch, capsys, arguments, message
):
    monkeypatch.chdir(runs)
    command = ["consequences", *arguments, "-o", "refused"]
    check_clean_failure(main, command, runs, capsys, message)


def test_unknown_experiment_and_engine_exit_with_an_error(runs):
    for option in (["--experiments", "melting"], ["--engine", "lammps"]):
        process = run_mtt_symmetry(
            "consequences", "exact.pt", "molecule.xyz", "-o", "x", *option, cwd=runs
        )
        assert process.returncode == 2
        assert "invalid choice" in process.stderr
        assert not (runs / "x").exists()


def test_ipi_integrates_the_same_nve_as_ase(runs):
    """From the same initial state, i-PI's velocity Verlet gives ASE's
    trajectory to round-off: the same torque, spin-up and energy drift, and the
    average keeps the angular momentum."""
    ase_run, ipi_run = _summary(runs, "nve-ase"), _summary(runs, "nve-ipi")
    jsonschema.validate(ipi_run, consequences_schema())
    assert (ase_run["engine"], ipi_run["engine"]) == ("ase", "ipi")
    # the energy drift is a slope of differences: relative 1e-4
    timings = ("seconds_per_step", "cost_per_step_relative")
    assert_same_numbers(
        ase_run["experiments"], ipi_run["experiments"], 1e-4, 1e-9, timings
    )
    nve = ipi_run["experiments"]["molecule_nve"]["variants"]
    (plain,) = nve["plain"]["structures"]
    # forces through i-PI's units and back: its constants, to 1e-7
    np.testing.assert_allclose(
        plain["initial_torque_eV"], _analytic_torque(MOLECULE), rtol=1e-7, atol=1e-12
    )
    assert plain["max_angular_momentum_change_hbar"] > 1.0
    (average,) = nve["average"]["structures"]
    assert average["max_angular_momentum_change_hbar"] < ROUND_OFF_HBAR


def test_ipi_writes_what_ase_writes(runs):
    """Every experiment through i-PI: the same files and keys (the thermostat's
    noise differs, so thermostatted numbers do)."""
    ase_run, ipi_run = _summary(runs, "mixed"), _summary(runs, "mixed-ipi")
    jsonschema.validate(ipi_run, consequences_schema())

    def keys(entry):
        if isinstance(entry, dict):
            return {key: keys(value) for key, value in entry.items()}
        if isinstance(entry, list) and entry and isinstance(entry[0], dict):
            return [keys(value) for value in entry]
        return None

    assert keys(ipi_run["experiments"]) == keys(ase_run["experiments"])
    assert sorted(path.name for path in (runs / "mixed-ipi").rglob("*")) == sorted(
        path.name for path in (runs / "mixed").rglob("*")
    )
    observables = ipi_run["experiments"]["observables"]["variants"]["plain"]
    assert observables["msd_A2"][0] == 0.0 and observables["msd_A2"][-1] > 0.0


@pytest.mark.parametrize("engine", ["ase", "ipi"])
def test_an_interrupted_run_continues_its_trajectory(runs, tmp_path, engine):
    """Killed in the middle of a trajectory, the command started again continues
    it from its last saved step: the same numbers as the run never stopped."""
    for name in ("lab.pt", "molecule.xyz"):
        (tmp_path / name).write_bytes((runs / name).read_bytes())
    arguments = ["consequences", "lab.pt", "molecule.xyz", *NVE, "-o", "result"]
    arguments += ["--engine", engine]
    killed = subprocess.run(
        [sys.executable, "-m", "metatrain_symmetry.cli", *arguments],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, KILL_AFTER_STEPS_VARIABLE: "20"},
    )
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "result").exists()
    saved = list((tmp_path / "result.partial" / "trajectories").glob("*.npz"))
    assert [path.name for path in saved] == ["molecule-nve-plain-0.npz"]
    # i-PI's working directory, left by the killed run in the work directory
    left = list((tmp_path / "result.partial" / "trajectories").glob("ipi-*"))
    assert len(left) == (engine == "ipi")

    resumed = run_mtt_symmetry(*arguments, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "continuing molecule-nve plain #0" in resumed.stderr
    assert not (tmp_path / "result.partial").exists()
    timings = ("seconds_per_step", "cost_per_step_relative")
    assert_same_numbers(
        _summary(tmp_path, "result")["experiments"],
        _summary(runs, f"nve-{engine}")["experiments"],
        1e-12,
        1e-14,
        timings,
    )
