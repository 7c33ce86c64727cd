"""``mtt-symmetry retrain`` in this process, where mutation testing reaches it:
the checkpoints and tables it writes are those of the Python API on the same
input, each option changes them as it should, and bad input fails with one
line."""

import warnings
from functools import partial

import ase.io
import metatomic.torch  # noqa: F401 (the checkpoints' metadata class)
import pytest
import torch

import metatrain_symmetry as msym
from metatrain_symmetry.cli import retrain as retrain_command
from metatrain_symmetry.cli.main import main
from metatrain_symmetry.testing import (
    check_clean_failure,
    labelled_molecules,
    tiny_pet,
)


GAMMAS = ["--gamma", "0", "1"]
FILES = ["gamma-0.ckpt", "gamma-1.ckpt", "pareto.csv", "pareto.md", "pareto.png"]
OLD_SPELLING = (
    "--targets NAME is deprecated for the targets to retrain; use --outputs NAME "
    "(--targets OUTPUT=KEY names dataset keys, as in every command)"
)


@pytest.fixture(scope="module")
def inputs(audit_inputs, tmp_path_factory):
    """The audit inputs, with validation structures, labels under other keys
    (twice the energy and forces of ``data.xyz``) and a checkpoint whose energy
    was trained with its forces."""
    directory = tmp_path_factory.mktemp("retrain-inputs")
    for name in ("model.ckpt", "data.xyz", "close.xyz"):
        (directory / name).symlink_to(audit_inputs / name)
    validation = labelled_molecules(("H2O2", "C2H6"), seed=5)
    ase.io.write(directory / "validation.xyz", validation)
    frames = ase.io.read(audit_inputs / "data.xyz", ":")
    for atoms in frames:
        atoms.info["energy_2"] = 2 * atoms.get_potential_energy()
        atoms.arrays["forces_2"] = 2 * atoms.get_forces()
    ase.io.write(directory / "other_keys.xyz", frames)
    conservative = tiny_pet(position_gradients=True).get_checkpoint()
    torch.save(conservative, directory / "conservative.ckpt")
    return directory


def command(inputs, output, model="model.ckpt", data="data.xyz"):
    return ["retrain", str(inputs / model), str(inputs / data), "-o", str(output)]


def retrain(inputs, output, *extra, model="model.ckpt", data="data.xyz"):
    """Run the command, which must succeed."""
    arguments = command(inputs, output, model=model, data=data) + list(extra)
    assert main(arguments) == 0


def frames(inputs, name="data.xyz"):
    return ase.io.read(inputs / name, ":")


def same(first, second) -> bool:
    """Whether two values of checkpoints are equal: tensors exactly, dictionaries
    key by key."""
    if isinstance(first, torch.Tensor):
        return isinstance(second, torch.Tensor) and torch.equal(first, second)
    if isinstance(first, dict):
        return list(first) == list(second) and all(
            same(value, second[key]) for key, value in first.items()
        )
    return first == second


def same_checkpoints(first, second) -> bool:
    """Whether two retrained checkpoints hold the same weights."""
    first = torch.load(first, weights_only=False)
    second = torch.load(second, weights_only=False)
    keys = ("model_state_dict", "best_model_state_dict")
    return all(same(first[key], second[key]) for key in keys)


def test_retraining_writes_what_the_api_returns(inputs, tmp_path, capsys, monkeypatch):
    calls = []

    def retrain_last_layer(*args, **kwargs):
        calls.append(kwargs)
        return msym.retrain_last_layer(*args, **kwargs)

    monkeypatch.setattr(retrain_command, "retrain_last_layer", retrain_last_layer)
    output = tmp_path / "retrained"
    extra = ["--validation", str(inputs / "validation.xyz"), *GAMMAS]
    extra += ["--rotations", "10", "--seed", "3", "--ridge", "0.25"]
    extra += ["--batch-size", "4", "--device", "cpu"]
    retrain(inputs, output, *extra)
    # the options the API gets but whose effect is not in the numbers
    (call,) = calls
    assert call["batch_size"] == 4 and call["device"] == "cpu"
    assert call["progress"] is True and call["force"] is True
    printed = capsys.readouterr()

    expected = msym.retrain_last_layer(
        inputs / "model.ckpt",
        frames(inputs),
        validation=frames(inputs, "validation.xyz"),
        gammas=[0.0, 1.0],
        grid=msym.O3Grid.random(10, seed=3),
        ridge=0.25,
        batch_size=4,
        output=tmp_path / "api",
    )
    assert sorted(path.name for path in output.iterdir()) == FILES
    for name in ("pareto.csv", "pareto.md"):
        assert (output / name).read_text() == (tmp_path / "api" / name).read_text()
    assert "energy val RMSE" in (output / "pareto.csv").read_text()
    for path in expected.checkpoints:
        assert same_checkpoints(output / path.name, path), path.name
    assert not same_checkpoints(output / "gamma-0.ckpt", output / "gamma-1.ckpt")
    assert (output / "pareto.png").read_bytes().startswith(b"\x89PNG")
    table = (output / "pareto.md").read_text()
    assert printed.out == (
        f"{table}\n2 checkpoints and the trade-off written to {output}/\n"
    )
    # a progress bar over the training and the validation structures
    assert "3 structures x 11 rotated copies" in printed.err
    assert "2 structures x 11 rotated copies" in printed.err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["api", "retrained"]


@pytest.fixture(scope="module")
def default_table(inputs, tmp_path_factory):
    """``pareto.csv`` of the Python API's defaults, but for two values of gamma."""
    output = tmp_path_factory.mktemp("default") / "retrained"
    msym.retrain_last_layer(
        inputs / "model.ckpt", frames(inputs), gammas=[0.0, 1.0], output=output
    )
    return (output / "pareto.csv").read_text()


def test_defaults_are_those_of_the_api(inputs, default_table, tmp_path):
    """Without options, every default gamma, on the API's random rotations."""
    output = tmp_path / "retrained"
    retrain(inputs, output)
    expected = msym.retrain_last_layer(
        inputs / "model.ckpt", frames(inputs), output=tmp_path / "api"
    )
    names = [f"gamma-{gamma:g}.ckpt" for gamma in msym.retrain.DEFAULT_GAMMAS]
    assert sorted(path.name for path in output.iterdir()) == sorted(
        [*names, "pareto.csv", "pareto.md", "pareto.png"]
    )
    table = (output / "pareto.csv").read_text()
    assert table == (tmp_path / "api" / "pareto.csv").read_text()
    assert len(expected.gammas) == len(table.splitlines()) - 1 == 5
    assert table.splitlines()[0] == default_table.splitlines()[0]


@pytest.mark.parametrize(
    "extra, settings",
    [
        (["--seed", "3"], {"seed": 3}),
        (["--rotations", "12"], {"grid": partial(msym.O3Grid.random, 12)}),
        (
            ["--rotations", "12", "--seed", "3"],
            {"grid": partial(msym.O3Grid.random, 12, seed=3)},
        ),
        (["--grid-degree", "2"], {"grid": partial(msym.O3Grid, 2)}),
        (["--ridge", "0.5"], {"ridge": 0.5}),
        (["--outputs", "energy"], {"targets": ["energy"]}),
        (
            ["--outputs", "non_conservative_force"],
            {"targets": ["non_conservative_force"]},
        ),
        (
            ["--targets", "energy=energy_2", "non_conservative_force=forces_2"],
            {
                "label_keys": {
                    "energy": "energy_2",
                    "non_conservative_force": "forces_2",
                }
            },
        ),
        (
            ["--targets", "non_conservative_force=forces_2"],
            {"label_keys": {"non_conservative_force": "forces_2"}},
        ),
    ],
)
def test_each_option_changes_the_retraining(
    inputs, default_table, tmp_path, extra, settings
):
    """Each option gives what the API gives with the same setting, and another
    table than the defaults. (Grids are built here, not when the tests are
    collected: torch would start its threads before mutation testing forks.)"""
    settings = {
        name: value() if isinstance(value, partial) else value
        for name, value in settings.items()
    }
    data = "other_keys.xyz" if "label_keys" in settings else "data.xyz"
    retrain(inputs, tmp_path / "retrained", *GAMMAS, *extra, data=data)
    msym.retrain_last_layer(
        inputs / "model.ckpt",
        frames(inputs, data),
        gammas=[0.0, 1.0],
        output=tmp_path / "api",
        **settings,
    )
    table = (tmp_path / "retrained" / "pareto.csv").read_text()
    assert table == (tmp_path / "api" / "pareto.csv").read_text()
    assert table != default_table


def test_energy_trained_with_forces(inputs, tmp_path):
    """An energy trained with its forces is retrained on both, or on energies
    alone with ``--ignore-gradients``."""
    model = "conservative.ckpt"
    for extra, ignore in (([], False), (["--ignore-gradients"], True)):
        output = tmp_path / f"ignore-{ignore}"
        retrain(inputs, output, *GAMMAS, *extra, model=model)
        api = tmp_path / f"api-{ignore}"
        msym.retrain_last_layer(
            inputs / model,
            frames(inputs),
            gammas=[0.0, 1.0],
            ignore_gradients=ignore,
            output=api,
        )
        table = (output / "pareto.csv").read_text()
        assert table == (api / "pareto.csv").read_text()
        assert ("energy/forces train L_mu" in table) is not ignore


def test_validation_and_training_with_close_atoms(inputs, tmp_path):
    """``--allow-close-atoms`` lets both files through, with a warning each."""
    output = tmp_path / "retrained"
    close = str(inputs / "close.xyz")
    extra = ["--validation", close, *GAMMAS, "--allow-close-atoms"]
    with pytest.warns(UserWarning, match="0.02 Å apart") as caught:
        retrain(inputs, output, *extra, data="close.xyz")
    assert sum("0.02 Å apart" in str(warning.message) for warning in caught) == 2
    assert "energy val RMSE" in (output / "pareto.csv").read_text()


def test_force_replaces_a_non_empty_output(inputs, tmp_path, capsys):
    output = tmp_path / "retrained"
    output.mkdir()
    (output / "keep.txt").write_text("keep")
    message = (
        f"mtt-symmetry retrain: error: output directory '{output}' exists and is not "
        "empty; choose another one or pass --force to replace it\n"
    )
    assert main(command(inputs, output) + GAMMAS) == 2
    assert capsys.readouterr().err == message
    assert [path.name for path in output.iterdir()] == ["keep.txt"]
    retrain(inputs, output, *GAMMAS, "--force")
    assert sorted(path.name for path in output.iterdir()) == FILES


def test_old_spelling_of_the_targets_to_retrain(inputs, tmp_path):
    """``--targets NAME`` without a key still names the targets to retrain, with a
    FutureWarning, and retrains exactly what ``--outputs NAME`` does."""
    with pytest.warns(FutureWarning) as caught:
        retrain(inputs, tmp_path / "old", *GAMMAS, "--targets", "energy")
    assert [str(warning.message) for warning in caught] == [OLD_SPELLING]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        retrain(inputs, tmp_path / "new", *GAMMAS, "--outputs", "energy")
    old = (tmp_path / "old" / "pareto.csv").read_text()
    assert old == (tmp_path / "new" / "pareto.csv").read_text()
    header = old.splitlines()[0].split(",")
    assert "energy train L_mu" in header
    assert not any(column.startswith("non_conservative_force") for column in header)


TARGETS = "the checkpoint was trained on ['energy', 'non_conservative_force']"


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--outputs", "energy", "--targets", "energy"],
            "--targets NAME (the old spelling of --outputs) cannot be combined with "
            "--outputs: name the targets to retrain with --outputs only",
        ),
        (
            ["--targets", "energy", "non_conservative_force=forces"],
            "--targets expects OUTPUT=KEY pairs (e.g. energy=energy), got 'energy'",
        ),
        (["--outputs", "dipole"], f"unknown target 'dipole': {TARGETS}"),
        (["--targets", "dipole"], f"unknown target 'dipole': {TARGETS}"),
        (
            ["--outputs", "energy", "--targets", "energy=missing_key"],
            "training structure 0 has no 'missing_key' label",
        ),
        (
            ["--validation", "missing.xyz"],
            "validation file 'missing.xyz' does not exist",
        ),
        (
            ["--validation", "close.xyz"],
            "structure 1 has atoms 1 and 2 0.02 Å apart",
        ),
        (
            ["--grid-degree", "2", "--rotations", "10"],
            "give either --grid-degree or --rotations, not both",
        ),
        (["--gamma", "-1"], "gamma must be a finite number >= 0, got -1.0"),
        (["--ridge", "-1"], "ridge must be a finite number >= 0, got -1.0"),
        (
            ["--device", "cuda"],
            "--device cuda was requested but CUDA is not available",
        ),
    ],
)
def test_bad_input(inputs, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(inputs)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    arguments = ["retrain", "model.ckpt", "data.xyz", "-o", "result", *extra]
    message = f"mtt-symmetry retrain: error: {message}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        check_clean_failure(main, arguments, inputs, capsys, message)


@pytest.mark.parametrize(
    "data, message",
    [
        ("missing.xyz", "training file 'missing.xyz' does not exist"),
        ("close.xyz", "structure 1 has atoms 1 and 2 0.02 Å apart"),
    ],
)
def test_bad_training_data(inputs, capsys, monkeypatch, data, message):
    monkeypatch.chdir(inputs)
    arguments = ["retrain", "model.ckpt", data, "-o", "result"]
    message = f"mtt-symmetry retrain: error: {message}"
    check_clean_failure(main, arguments, inputs, capsys, message)
