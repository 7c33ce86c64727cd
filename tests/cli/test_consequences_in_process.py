"""``mtt-symmetry consequences`` in this process, where mutation testing reaches
it: every flag reaches what it names, the files written are those of the result
the Python API returns, and bad settings fail with one line naming the flag."""

import gzip
import json

import ase
import ase.io
import pytest
import torch
from metatomic.torch import AtomisticModel, ModelMetadata

import metatrain_symmetry as msym
from metatrain_symmetry.cli import consequences as command
from metatrain_symmetry.cli.main import main
from metatrain_symmetry.consequences import (
    Settings,
    consequences_markdown,
    save_consequences,
)
from metatrain_symmetry.distributed import work_directory
from metatrain_symmetry.testing import check_clean_failure
from tests.helpers import PairPotential, pair_capabilities


# every setting away from its default
FLAGS = ["--steps", "6", "--time-step", "0.25", "--temperature", "450"]
FLAGS += ["--friction", "0.02", "--fmax", "0.5", "--frames", "3", "--blocks", "2"]
FLAGS += ["--seed", "7"]
SETTINGS = Settings(
    steps=6,
    time_step_fs=0.25,
    temperature_K=450.0,
    seed=7,
    friction_per_fs=0.02,
    fmax=0.5,
    frames=3,
    blocks=2,
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A model with a lab-frame term (``lab.pt``), a molecule and a box."""
    directory = tmp_path_factory.mktemp("consequences-in-process")
    module = PairPotential(lab_frame=3.0, bond_length=1.0, stiffness=5.0).eval()
    model = AtomisticModel(module, ModelMetadata(), pair_capabilities())
    model.save(str(directory / "lab.pt"))
    molecule = ase.Atoms(
        "OH2", positions=[[0.0, 0.0, 0.0], [0.9, 0.2, 0.4], [-0.5, 0.7, 0.5]]
    )
    ase.io.write(directory / "molecule.xyz", molecule)
    box = ase.Atoms("Cu4", cell=[3.0, 3.0, 3.0], pbc=True)
    box.set_scaled_positions([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    ase.io.write(directory / "mixed.xyz", [molecule, box])
    return directory


@pytest.fixture
def calls(monkeypatch):
    """The arguments of every call of the API by the command, with its result;
    ``calls.run = False`` returns ``None`` instead of running (as on the ranks
    other than 0 of a distributed run)."""

    class Calls(list):
        run = True

    recorded = Calls()
    api = command.consequences

    def recording(*args, **kwargs):
        result = api(*args, **kwargs) if recorded.run else None
        recorded.append((args, kwargs, result))
        return result

    monkeypatch.setattr(command, "consequences", recording)
    return recorded


def consequences(inputs, output, *extra, data="molecule.xyz"):
    arguments = [str(inputs / "lab.pt"), str(inputs / data), "-o", str(output)]
    return main(["consequences", *arguments, *extra])


def test_the_files_are_those_of_the_result(inputs, tmp_path, calls, capsys):
    output = tmp_path / "consequences"
    extra = ["--experiments", "molecule-nve", "relax", *FLAGS, "--grid-degree", "2"]
    assert consequences(inputs, output, *extra) == 0
    ((arguments, settings, result),) = calls
    assert arguments == (str(inputs / "lab.pt"), str(inputs / "molecule.xyz"))
    assert settings["settings"] == SETTINGS
    assert settings["experiments"] == ["molecule-nve", "relax"]
    torch.testing.assert_close(settings["grid"].rotations, msym.O3Grid(2).rotations)
    assert settings["progress"] is True and settings["distributed"] is False

    expected = tmp_path / "expected"
    save_consequences(result, expected)
    written = sorted(path.relative_to(output) for path in output.rglob("*"))
    assert written == sorted(path.relative_to(expected) for path in expected.rglob("*"))
    for name in ("consequences.json", "consequences.md"):
        assert (output / name).read_text() == (expected / name).read_text()
    for path in (expected / "trajectories").iterdir():
        assert (output / "trajectories" / path.name).read_text() == path.read_text()
    with gzip.open(output / "consequences.chemiscope.json.gz", "rt") as handle:
        chemiscope = json.load(handle)
    with gzip.open(expected / "consequences.chemiscope.json.gz", "rt") as handle:
        assert chemiscope == json.load(handle)
    summary = json.loads((output / "consequences.json").read_text())
    nve = summary["experiments"]["molecule_nve"]["variants"]["plain"]["structures"]
    assert len(nve[0]["angular_momentum_hbar"]) == SETTINGS.frames + 1

    printed = capsys.readouterr().out
    assert printed == f"{consequences_markdown(result)}\nresults written to {output}/\n"
    # the work directory of the resumable runner is gone
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "consequences",
        "expected",
    ]


def test_defaults_reach_the_api(inputs, tmp_path, calls):
    calls.run = False
    assert consequences(inputs, tmp_path / "default") == 0
    ((_, settings, _),) = calls
    assert settings["settings"] == Settings()
    assert settings["experiments"] is None
    assert settings["grid"] is None
    assert settings["engine"] == "ase"
    assert settings["observables_structure"] is None
    assert settings["batch_size"] is None and settings["device"] is None
    assert settings["allow_close_atoms"] is False
    # completed tasks are kept next to the output, for an interrupted run to resume
    assert settings["work_dir"] == work_directory(tmp_path / "default")
    # without a result (another rank's), nothing is written
    assert list(tmp_path.iterdir()) == []


def test_options_reach_the_api(inputs, tmp_path, calls):
    calls.run = False
    extra = ["--engine", "ipi", "--observables-structure", "1", "--rotations", "4"]
    extra += ["--seed", "3", "--batch-size", "5", "--device", "cpu"]
    extra += ["--allow-close-atoms"]
    assert consequences(inputs, tmp_path / "x", *extra, data="mixed.xyz") == 0
    ((_, settings, _),) = calls
    assert settings["engine"] == "ipi"
    assert settings["observables_structure"] == 1
    torch.testing.assert_close(
        settings["grid"].rotations, msym.O3Grid.random(4, seed=3).rotations
    )
    assert settings["settings"].seed == 3
    assert settings["batch_size"] == 5 and settings["device"] == "cpu"
    assert settings["allow_close_atoms"] is True


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--steps", "0"),
        ("--frames", "-1"),
        ("--blocks", "0"),
        ("--time-step", "-0.5"),
        ("--temperature", "0"),
        ("--friction", "0"),
        ("--fmax", "-1"),
    ],
)
def test_a_bad_setting_names_its_flag(inputs, tmp_path, calls, capsys, flag, value):
    arguments = [str(inputs / "lab.pt"), str(inputs / "molecule.xyz")]
    command_line = ["consequences", *arguments, "-o", str(tmp_path / "x"), flag, value]
    check_clean_failure(main, command_line, tmp_path, capsys, f"{flag} must be a")
    assert calls == []
