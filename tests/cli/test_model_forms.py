"""Every command on every form of model users have, in new processes, on files.

A PET trained by ``mtt train`` (energy with conservative forces) is used as its
checkpoint, as exported by ``mtt export`` in another process, and as a
symmetrized export; a hand-written metatomic model stands for the models that are
not PETs. The structures hold an isolated molecule with no cell, a periodic box
with a skewed cell, a slab periodic in two directions, a cluster with an atom that
has no neighbour within the cutoff, and a single atom. Each combination either
works or stops with a one-line error that says what to do instead, leaving no
output behind; where they work, the numbers agree across forms as they must (the
exported model is its checkpoint, the symmetrized one its O(3) average, the
hand-written one exactly invariant).
"""

import csv
import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ase
import ase.build
import ase.io
import numpy as np
import pytest
from ase.calculators.emt import EMT

from metatrain_symmetry.demo import make_dataset
from metatrain_symmetry.testing import (
    CONSERVATIVE_TARGETS,
    pet_options,
    write_dataset,
)
from tests.helpers import assert_same_numbers


OPTIONS = pet_options(
    2,
    width=8,
    batch_size=4,
    log_interval=1,
    checkpoint_interval=1,
    targets=CONSERVATIVE_TARGETS,
)

# a hand-written model saved as an AtomisticModel in its own process
SAVE_PAIR_POTENTIAL = textwrap.dedent(
    """\
    import sys
    sys.path.insert(0, {root!r})
    from metatomic.torch import AtomisticModel, ModelMetadata
    from tests.helpers import PairPotential, pair_capabilities
    model = AtomisticModel(PairPotential().eval(), ModelMetadata(), pair_capabilities())
    model.save("pair.pt")
    """
)

# small grids: these tests are about what runs, not about numbers
GRID = ("--max-lambda", "1", "--grid-degree", "2")
# a symmetrized model evaluates its own grid on every call
SYMMETRIZED_GRID = GRID


def _labelled(atoms: ase.Atoms) -> ase.Atoms:
    atoms.calc = EMT()
    atoms.info["energy"] = atoms.get_potential_energy()
    atoms.arrays["forces"] = atoms.get_forces()
    atoms.calc = None
    return atoms


def structure_kinds() -> list[ase.Atoms]:
    """Copper structures of every kind, with EMT energies and forces."""
    molecule = ase.Atoms(
        "Cu4",
        positions=[[0, 0, 0], [2.5, 0.1, 0], [0.2, 2.4, 0.1], [0.3, 0.2, 2.6]],
    )
    box = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True)
    skew = np.array([[1.0, 0.0, 0.0], [0.3, 1.0, 0.0], [0.1, -0.2, 1.0]])
    box.set_cell(box.cell @ skew, scale_atoms=True)
    box.rattle(0.05, seed=1)
    slab = ase.build.fcc111("Cu", size=(2, 2, 2), a=3.6)
    slab.pbc = [True, True, False]
    slab.rattle(0.05, seed=2)
    slab.info.clear()
    lonely = molecule.copy()
    lonely += ase.Atom("Cu", (12.0, 0.0, 0.0))
    single = ase.Atoms("Cu", positions=[[0.0, 0.0, 0.0]])
    return [_labelled(atoms) for atoms in (molecule, box, slab, lonely, single)]


def run(*command, cwd, umask=None):
    return subprocess.run(
        [sys.executable, "-m", *map(str, command)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        preexec_fn=None if umask is None else (lambda: os.umask(umask)),
    )


def check(process, what: str) -> None:
    assert process.returncode == 0, f"{what} failed:\n{process.stderr[-3000:]}"


@pytest.fixture(scope="module")
def forms(tmp_path_factory):
    """The model files, written by separate processes, and the structures."""
    root = tmp_path_factory.mktemp("forms")
    frames = make_dataset(10)
    write_dataset(root, frames, 8)
    ase.io.write(root / "structures.xyz", structure_kinds())
    (root / "options.yaml").write_text(OPTIONS)
    check(run("metatrain", "train", "options.yaml", cwd=root), "mtt train")
    (first,) = root.glob("outputs/*/*/model_0.ckpt")
    (root / "epoch-0.ckpt").write_bytes(first.read_bytes())

    # the repository, from which the hand-written model imports ``tests.helpers``
    repository = str(Path(__file__).resolve().parents[2])
    with ThreadPoolExecutor(2) as pool:
        jobs = [
            pool.submit(
                run, "metatrain", "export", "model.ckpt", "-o", "model.pt", cwd=root
            ),
            pool.submit(
                run, "metatrain", "export", "epoch-0.ckpt", "-o", "epoch-0.pt", cwd=root
            ),
            pool.submit(
                subprocess.run,
                [sys.executable, "-c", SAVE_PAIR_POTENTIAL.format(root=repository)],
                cwd=root,
                capture_output=True,
                text=True,
            ),
            pool.submit(
                run,
                "metatrain_symmetry.cli",
                "export",
                "model.ckpt",
                "-o",
                "symmetrized.pt",
                "--audit",
                "structures.xyz",
                "--symmetrize",
                *SYMMETRIZED_GRID,
                cwd=root,
            ),
        ]
        whats = ["export", "export", "pair", "symmetrize"]
        for job, what in zip(jobs, whats, strict=True):
            check(job.result(), what)
    return root


FORMS = {
    "checkpoint": "model.ckpt",
    "exported": "model.pt",
    "symmetrized": "symmetrized.pt",
    "hand-written": "pair.pt",
}

# (command, form): None when it must work, else the expected error's words
EXPECTED = {
    ("retrain", "exported"): "is an exported model, whose weights cannot be changed",
    ("retrain", "symmetrized"): "is an exported model, whose weights cannot be",
    ("retrain", "hand-written"): "is an exported model, whose weights cannot be",
    ("export-symmetrized", "symmetrized"): "already predicts O(3) averages",
}


def command_line(command: str, form: str) -> tuple[list[str], str]:
    """The arguments of one run and the name of what it writes."""
    model = FORMS[form]
    grid = SYMMETRIZED_GRID if form == "symmetrized" else GRID
    output = f"{command}-{form}"
    if command in ("analyze", "audit"):
        return [command, model, "structures.xyz", "-o", output, *grid], output
    if command == "analyze-infinitesimal":
        arguments = ["analyze", model, "structures.xyz", "-o", output]
        return arguments + ["--infinitesimal", "--outputs", "energy", "forces"], output
    if command in ("export", "export-symmetrized"):
        output += ".pt"
        arguments = ["export", model, "-o", output, "--audit", "structures.xyz"]
        if command == "export":
            return arguments + ["--max-lambda", "1"], output
        return arguments + ["--symmetrize", *grid], output
    if command == "dynamics":
        models = {
            "checkpoint": ["epoch-0.ckpt", "model.ckpt"],
            "exported": ["epoch-0.pt", "model.pt"],
        }.get(form, [model])
        arguments = ["dynamics", *models, "structures.xyz", "-o", output, *grid]
        if form == "checkpoint":
            # the weights that mtt export exports, to compare with exported models
            arguments += ["--weights", "best"]
        return arguments, output
    if command == "consequences":
        arguments = ["consequences", model, "structures.xyz", "-o", output]
        steps = ("--steps", "3", "--frames", "3", "--blocks", "2")
        return arguments + [*steps, "--grid-degree", "2"], output
    assert command == "retrain"
    arguments = ["retrain", model, "structures.xyz", "--gamma", "0", "1"]
    return arguments + ["--rotations", "2", "-o", output], output


COMMANDS = [
    "analyze",
    "analyze-infinitesimal",
    "audit",
    "export",
    "export-symmetrized",
    "dynamics",
    "retrain",
    "consequences",
]
CASES = [(command, form) for command in COMMANDS for form in FORMS]


# the console script that installing the package puts next to the interpreter
MTT_SYMMETRY = Path(sys.executable).with_name("mtt-symmetry")


@pytest.fixture(scope="module")
def runs(forms):
    """Every combination, two at a time, through the installed ``mtt-symmetry``
    command, as users run it."""
    assert MTT_SYMMETRY.is_file(), f"{MTT_SYMMETRY} is missing: install the package"

    def one(case):
        arguments, output = command_line(*case)
        process = subprocess.run(
            [str(MTT_SYMMETRY), *arguments],
            cwd=forms,
            capture_output=True,
            text=True,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        return process, output

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(CASES, pool.map(one, CASES), strict=True))


@pytest.mark.parametrize("command, form", CASES, ids=[f"{c}-{f}" for c, f in CASES])
def test_command_on_model_form(forms, runs, command, form):
    process, output = runs[(command, form)]
    expected_error = EXPECTED.get((command, form))
    if expected_error is None:
        assert process.returncode == 0, process.stderr[-3000:]
        assert (forms / output).exists()
        return
    assert process.returncode == 2, process.stderr[-3000:]
    (line,) = [line for line in process.stderr.splitlines() if "error:" in line]
    assert expected_error in line
    assert "Traceback" not in process.stderr
    assert not (forms / output).exists()


def test_exported_model_audits_like_its_checkpoint(forms, runs):
    """The exported PET knows in any process that its forces are conservative,
    and gives the numbers of its checkpoint."""
    summaries = {}
    for form in ("checkpoint", "exported"):
        _, output = runs[("audit", form)]
        summaries[form] = json.loads((forms / output / "audit.json").read_text())
    checkpoint, exported = summaries["checkpoint"], summaries["exported"]
    assert list(exported["outputs"]) == list(checkpoint["outputs"])
    assert "forces" in exported["outputs"]
    for name, entry in checkpoint["outputs"].items():
        other = exported["outputs"][name]
        assert other["target"]["rmse"] == pytest.approx(
            entry["target"]["rmse"], rel=1e-8
        )
        assert other["equivariance_rmse"]["mean"] == pytest.approx(
            entry["equivariance_rmse"]["mean"], rel=1e-6
        )


def test_files_get_the_umask_permissions(forms):
    """Files and directories written atomically get the umask's permissions."""
    for umask, file_mode, directory_mode in (
        (0o022, 0o644, 0o755),
        (0o027, 0o640, 0o750),
    ):
        output = f"audit-umask-{umask:o}"
        process = run(
            "metatrain_symmetry.cli",
            "audit",
            "pair.pt",
            "structures.xyz",
            "-o",
            output,
            *GRID,
            cwd=forms,
            umask=umask,
        )
        check(process, "audit")
        for path in [forms / output, *(forms / output).rglob("*")]:
            mode = directory_mode if path.is_dir() else file_mode
            assert path.stat().st_mode & 0o777 == mode, path.name
        exported = f"exported-umask-{umask:o}.pt"
        process = run(
            "metatrain_symmetry.cli",
            "export",
            "pair.pt",
            "-o",
            exported,
            "--audit",
            "structures.xyz",
            "--max-lambda",
            "1",
            cwd=forms,
            umask=umask,
        )
        check(process, "export")
        assert (forms / exported).stat().st_mode & 0o777 == file_mode


# ------------------------------------------------------------ numbers across forms
# what depends on the run rather than on the model's numbers
RUN_DEPENDENT = {"model", "seconds_per_step", "cost_per_step_relative", "path"}


def assert_same_run_numbers(first, second, rel: float) -> None:
    """The same JSON structure and numbers (to ``rel``, with an absolute floor of
    ``rel``), but for run-dependent keys."""
    assert_same_numbers(first, second, rel, rel, RUN_DEPENDENT)


def assert_same_tensor_maps(first: Path, second: Path, rel: float) -> None:
    """The ``.mts`` files of the second output directory are in the first, with
    the same values (an exported PET exposes no internal features, so that
    ``dynamics`` analyses the features of checkpoints only)."""
    import metatensor.torch as mts

    names = sorted(path.name for path in second.glob("*.mts"))
    assert names and set(names) <= {path.name for path in first.glob("*.mts")}
    for name in names:
        a, b = mts.load(str(first / name)), mts.load(str(second / name))
        assert mts.allclose(a, b, rtol=rel, atol=rel * 1e-3), name


def output_of(runs, forms, command: str, form: str) -> Path:
    process, output = runs[(command, form)]
    assert process.returncode == 0, process.stderr[-3000:]
    return forms / output


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize("command", ["analyze", "analyze-infinitesimal", "dynamics"])
def test_exported_tensors_equal_the_checkpoints(forms, runs, command):
    """``mtt export`` in another process changes no number of any analysis."""
    assert_same_tensor_maps(
        output_of(runs, forms, command, "checkpoint"),
        output_of(runs, forms, command, "exported"),
        rel=1e-8,
    )


def test_exported_simulations_equal_the_checkpoints(forms, runs):
    """Same seeds, same model: the same trajectories and relaxations."""
    first, second = (
        read_json(output_of(runs, forms, "consequences", form) / "consequences.json")
        for form in ("checkpoint", "exported")
    )
    assert_same_run_numbers(first["experiments"], second["experiments"], rel=1e-8)


def test_exported_audits_in_metadata_equal_the_checkpoints(forms, runs):
    import metatrain_symmetry as msym

    first, second = (
        msym.read_audit(output_of(runs, forms, "export", form))
        for form in ("checkpoint", "exported")
    )
    assert_same_run_numbers(first["outputs"], second["outputs"], rel=1e-6)


def test_symmetrized_export_is_the_checkpoints_average(forms, runs):
    """The symmetrized model predicts what the analyses of its checkpoint call
    the O(3) average on the same grid, in audits and in simulations."""
    checkpoint = read_json(output_of(runs, forms, "audit", "checkpoint") / "audit.json")
    symmetrized = read_json(
        output_of(runs, forms, "audit", "symmetrized") / "audit.json"
    )
    for name, entry in checkpoint["outputs"].items():
        target = symmetrized["outputs"][name]["target"]
        for error in ("mae", "rmse"):
            expected = entry["target"][f"symmetrized_{error}"]
            assert target[error] == pytest.approx(expected, rel=1e-9), (name, error)
        # averaged once more on a grid that is not a group: closer to
        # equivariant, but not exactly
        equivariance = symmetrized["outputs"][name]["equivariance_rmse"]["mean"]
        assert 0 < equivariance < entry["equivariance_rmse"]["mean"]

    # the symmetrized model run plainly is the checkpoint's average variant
    plain, average = (
        read_json(output_of(runs, forms, "consequences", form) / "consequences.json")
        for form in ("symmetrized", "checkpoint")
    )
    fields = {
        "molecule_nve": ("initial_torque_eV", "angular_momentum_hbar", "torque_eV"),
        "relax": ("energy_eV", "n_steps"),
    }
    for experiment, names in fields.items():
        for first, second in zip(
            plain["experiments"][experiment]["variants"]["plain"]["structures"],
            average["experiments"][experiment]["variants"]["average"]["structures"],
            strict=True,
        ):
            for name in names:
                assert_same_run_numbers(first[name], second[name], 1e-8)


def test_invariant_model_shows_no_breaking_in_any_command(forms, runs):
    """The hand-written pair potential is exactly invariant: every command sees
    round-off where the PET shows its breaking."""
    audit = read_json(output_of(runs, forms, "audit", "hand-written") / "audit.json")
    pet = read_json(output_of(runs, forms, "audit", "checkpoint") / "audit.json")
    for name, entry in audit["outputs"].items():
        scale = entry["target"]["rmse"]
        assert entry["equivariance_rmse"]["max"] < 1e-12 * scale, name
        assert pet["outputs"][name]["equivariance_rmse"]["max"] > 1e-6 * scale, name

    import metatensor.torch as mts

    screen = output_of(runs, forms, "analyze-infinitesimal", "hand-written")
    for name in ("energy.lie_derivative.mts", "forces.lie_derivative.mts"):
        values = mts.load(str(screen / name)).block().values
        assert float(values.abs().max()) < 1e-10, name
    torque = mts.load(str(screen / "torque.mts")).block().values
    assert float(torque.abs().max()) < 1e-10

    simulation = read_json(
        output_of(runs, forms, "consequences", "hand-written") / "consequences.json"
    )
    experiments = simulation["experiments"]
    for variant in experiments["molecule_nve"]["variants"].values():
        for structure in variant["structures"]:
            assert structure["max_angular_momentum_change_hbar"] < 1e-10
    relaxed = experiments["relax"]["variants"]
    for variant in ("average", "random_rotation"):
        assert_same_run_numbers(
            [s["energy_eV"] for s in relaxed[variant]["structures"]],
            [s["energy_eV"] for s in relaxed["plain"]["structures"]],
            rel=1e-10,
        )
    assert experiments["relax"]["ranking_changed"] is False


def test_retraining_trades_accuracy_for_equivariance(forms, runs):
    """The sweep's table: a larger gamma is more equivariant and less accurate on
    its training structures."""
    retrained = output_of(runs, forms, "retrain", "checkpoint")
    with (retrained / "pareto.csv").open() as table:
        rows = list(csv.DictReader(table))
    assert [float(row["gamma"]) for row in rows] == [0.0, 1.0]
    unpenalized, penalized = rows
    for term in ("energy", "energy/forces"):
        mu, sigma = f"{term} train L_mu", f"{term} train L_sigma"
        assert float(penalized[sigma]) < float(unpenalized[sigma]), term
        assert float(penalized[mu]) >= float(unpenalized[mu]), term
    # the minimised objective is L_mu + gamma L_sigma, summed over the terms
    for row in rows:
        gamma = float(row["gamma"])
        total = sum(
            float(row[f"{term} train L_mu"])
            + gamma * float(row[f"{term} train L_sigma"])
            for term in ("energy", "energy/forces")
        )
        assert float(row["objective"]) == pytest.approx(total, rel=1e-6)
