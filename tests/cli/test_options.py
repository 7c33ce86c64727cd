"""The options the commands share: grids, dtypes, targets, deprecated spellings
and the defaults ``--help`` shows."""

import argparse
import os
import warnings
from pathlib import Path

import pytest
import torch

import metatrain_symmetry as msym
from metatrain_symmetry.cli.main import build_parser
from metatrain_symmetry.cli.options import (
    check_device,
    check_output_file,
    dtype_from_args,
    features_from_args,
    grid_from_args,
    output_directory,
    parse_targets,
    write_output,
)
from metatrain_symmetry.demo import DEFAULT_EPOCHS, DEFAULT_GAMMA
from metatrain_symmetry.diagnostics import DEFAULT_MAX_LAMBDA, MIN_RANDOM_ELEMENTS
from metatrain_symmetry.engine import CPU_ATOMS_PER_BATCH, DEFAULT_ATOMS_PER_BATCH
from metatrain_symmetry.retrain import DEFAULT_GAMMAS, DEFAULT_N_ROTATIONS
from metatrain_symmetry.testing import run_mtt_symmetry


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


def parse(*arguments):
    return build_parser().parse_args([str(argument) for argument in arguments])


def commands() -> dict:
    """The sub-command parsers of ``mtt-symmetry``, by name."""
    (action,) = [
        action
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    ]
    return action.choices


def test_grid_from_arguments():
    audit = ["audit", "model.ckpt", "data.xyz", "-o", "out"]
    assert grid_from_args(parse(*audit)) is None
    grid = grid_from_args(parse(*audit, "--grid-degree", "4"))
    assert grid.degree == 4 and len(grid) == len(msym.O3Grid(4))
    grid = grid_from_args(parse(*audit, "--rotations", "16", "--seed", "3"))
    expected = msym.O3Grid.random(16, seed=3)
    assert grid.degree is None
    assert torch.equal(grid.rotations, expected.rotations)
    # the seed matters
    other = grid_from_args(parse(*audit, "--rotations", "16", "--seed", "4"))
    assert not torch.equal(other.rotations, expected.rotations)
    both = parse(*audit, "--grid-degree", "4", "--rotations", "16")
    with pytest.raises(ValueError, match="either --grid-degree or --rotations"):
        grid_from_args(both)


def test_deprecated_n_rotations_is_rotations():
    """``retrain --n-rotations N`` still works, with a FutureWarning, and asks
    for the grid of ``--rotations N``."""
    retrain = ["retrain", "model.ckpt", "data.xyz", "-o", "out", "--seed", "2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = parse(*retrain, "--rotations", "12")
    with pytest.warns(FutureWarning, match="--n-rotations is deprecated.*--rotations"):
        old = parse(*retrain, "--n-rotations", "12")
    assert old.rotations == new.rotations == 12
    assert torch.equal(grid_from_args(old).rotations, grid_from_args(new).rotations)
    assert len(grid_from_args(old)) == 12


def test_help_of_every_command_shows_the_api_defaults(capsys, monkeypatch):
    """Every ``--help`` exits 0; the defaults it shows are the constants of the
    Python API."""
    monkeypatch.setenv("COLUMNS", "1000")
    parsers = commands()
    expected_commands = ["analyze", "audit", "export", "dynamics", "retrain"]
    expected_commands += ["consequences", "train", "demo"]
    assert sorted(parsers) == sorted(expected_commands)
    with pytest.raises(SystemExit) as stop:
        parse("--help")
    assert stop.value.code == 0
    text = capsys.readouterr().out
    for name in parsers:
        assert name in text

    texts = {}
    for name in parsers:
        with pytest.raises(SystemExit) as stop:
            parse(name, "--help")
        assert stop.value.code == 0, name
        texts[name] = " ".join(capsys.readouterr().out.split())
        assert texts[name].startswith("usage:"), name
    for name in ("analyze", "audit", "export", "dynamics"):
        assert f"(default: {DEFAULT_MAX_LAMBDA})" in texts[name], name
    for name in ("analyze", "audit", "export", "dynamics", "retrain"):
        assert f"at least {MIN_RANDOM_ELEMENTS}" in texts[name], name
        batches = f"about {CPU_ATOMS_PER_BATCH} atoms on a CPU, "
        assert batches + f"{DEFAULT_ATOMS_PER_BATCH} on a GPU" in texts[name], name
    gammas = " ".join(f"{gamma:g}" for gamma in DEFAULT_GAMMAS)
    assert f"(default: {gammas})" in texts["retrain"]
    assert f"default: {DEFAULT_N_ROTATIONS})" in texts["retrain"]
    assert "--max-lambda" not in texts["retrain"]
    assert f"(default: {DEFAULT_EPOCHS})" in texts["demo"]
    assert f"(default: {DEFAULT_GAMMA:g})" in texts["demo"]


def test_help_of_the_module_entry_point():
    process = run_mtt_symmetry("--help")
    assert process.returncode == 0, process.stderr
    assert process.stdout.startswith("usage: mtt-symmetry")
    assert "audit" in process.stdout


def test_parse_targets():
    assert parse_targets(None) is None
    assert parse_targets(["energy=free_energy", "forces=dft_forces"]) == {
        "energy": "free_energy",
        "forces": "dft_forces",
    }
    # only the first '=' separates the output from the key
    assert parse_targets(["energy=a=b"]) == {"energy": "a=b"}
    for pair in ("energy", "=energy", "energy="):
        with pytest.raises(ValueError, match=f"OUTPUT=KEY pairs .*got '{pair}'"):
            parse_targets([pair])


def test_other_readings():
    audit = ["audit", "model.ckpt", "data.xyz", "-o", "out"]
    assert dtype_from_args(parse(*audit)) is None
    assert dtype_from_args(parse(*audit, "--dtype", "float32")) is torch.float32
    assert features_from_args(["all"]) == "all"
    assert features_from_args(None) is None
    assert features_from_args(["a", "b"]) == ["a", "b"]
    check_device(None)
    check_device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            check_device("cuda")


def test_output_checks(tmp_path):
    existing = tmp_path / "model.pt"
    existing.write_text("model")
    with pytest.raises(ValueError, match="already exists.*--force"):
        check_output_file(existing, force=False)
    assert check_output_file(existing, force=True) == existing
    assert check_output_file(tmp_path / "new.pt", force=False) == tmp_path / "new.pt"

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("user data")
    arguments = parse("analyze", "model.ckpt", "data.xyz", "-o", busy)
    with pytest.raises(ValueError, match="not empty.*--force"):
        output_directory(arguments)
    assert (busy / "keep.txt").read_text() == "user data"


def test_write_output_replaces_the_directory_at_once(tmp_path):
    output = tmp_path / "out"
    work = tmp_path / "out.partial"
    work.mkdir()

    def fail(directory):
        (directory / "half.txt").write_text("half")
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        write_output(output, fail, work)
    # nothing written, and the work directory is kept for a rerun
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.partial"]

    write_output(output, lambda directory: (directory / "a.txt").write_text("a"), work)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]
    assert [path.name for path in output.iterdir()] == ["a.txt"]


def test_shared_options_parse_to_the_api_arguments():
    """Every shared option, given and left out, reads as the Python API's keyword
    arguments (values, types and defaults)."""
    from metatrain_symmetry.cli.options import shared_settings

    audit = ["audit", "model.ckpt", "data.xyz", "-o", "out"]
    defaults = parse(*audit)
    assert (defaults.model, defaults.data, defaults.output) == (
        "model.ckpt",
        "data.xyz",
        "out",
    )
    assert defaults.force is False and defaults.allow_close_atoms is False
    # an audit analyses no feature unless asked; no device means the CPU
    assert shared_settings(defaults) == {
        "features": [],
        "targets": None,
        "max_lambda": DEFAULT_MAX_LAMBDA,
        "grid": None,
        "batch_size": None,
        "device": None,
        "dtype": None,
    }
    given = parse(
        *audit,
        *("--force", "--allow-close-atoms", "--outputs", "energy", "forces"),
        *("--features", "all", "--targets", "energy=E", "forces=F"),
        *("--max-lambda", "3", "--rotations", "12", "--seed", "5"),
        *("--batch-size", "7", "--device", "cpu", "--dtype", "float32"),
    )
    assert given.force is True and given.allow_close_atoms is True
    assert given.outputs == ["energy", "forces"]
    settings = shared_settings(given)
    grid = settings.pop("grid")
    assert len(grid) == 12 and grid.degree is None
    assert torch.equal(grid.rotations, msym.O3Grid.random(12, seed=5).rotations)
    assert settings == {
        "features": "all",
        "targets": {"energy": "E", "forces": "F"},
        "max_lambda": 3,
        "batch_size": 7,
        "device": "cpu",
        "dtype": torch.float32,
    }
    named = parse(*audit, "--features", "mtt::feature::a", "mtt::feature::b")
    assert shared_settings(named)["features"] == ["mtt::feature::a", "mtt::feature::b"]
    # a command without a shared option does not read it
    export = parse("export", "model.ckpt", "-o", "m.pt", "--audit", "data.xyz")
    assert "features" not in shared_settings(export)
    for missing in (audit[:-2], audit[:2]):
        with pytest.raises(SystemExit):
            parse(*missing)
    with pytest.raises(SystemExit):
        parse(*audit, "--max-lambda", "two")
    with pytest.raises(SystemExit):
        parse(*audit, "--device", "tpu")


HELP_SNAPSHOT = Path(__file__).with_name("help.txt")
UPDATE_HELP = "MTT_SYMMETRY_UPDATE_HELP"


def test_help_of_every_command_is_the_documented_one(monkeypatch):
    """The ``--help`` of every sub-command (usage, options, defaults, wording) is
    the interface users read: it changes only on purpose, by regenerating
    ``tests/cli/help.txt`` with ``MTT_SYMMETRY_UPDATE_HELP=1 pytest
    tests/cli/test_options.py``."""
    monkeypatch.setenv("COLUMNS", "88")
    text = "".join(
        f"=== mtt-symmetry {name}\n{parser.format_help()}\n"
        for name, parser in commands().items()
    )
    if os.environ.get(UPDATE_HELP) == "1":
        HELP_SNAPSHOT.write_text(text)
    assert HELP_SNAPSHOT.read_text() == text, (
        f"the help changed: check it, then regenerate with {UPDATE_HELP}=1"
    )
