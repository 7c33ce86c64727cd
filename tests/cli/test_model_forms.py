"""Every command on every form of model users have, in new processes, on files.

A PET trained by ``mtt train`` (energy with conservative forces) is used as its
checkpoint, as exported by ``mtt export`` in another process, and as a
symmetrized export; a hand-written metatomic model stands for the models that are
not PETs. The structures hold an isolated molecule with no cell, a periodic box
with a skewed cell, a slab periodic in two directions, a cluster with an atom that
has no neighbour within the cutoff, and a single atom. Each combination either
works or stops with a one-line error that says what to do instead, leaving no
output behind.
"""

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
        return ["dynamics", *models, "structures.xyz", "-o", output, *grid], output
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


@pytest.fixture(scope="module")
def runs(forms):
    """Every combination, two at a time."""

    def one(case):
        arguments, output = command_line(*case)
        return run("metatrain_symmetry.cli", *arguments, cwd=forms), output

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
