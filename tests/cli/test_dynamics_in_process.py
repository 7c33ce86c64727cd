"""``mtt-symmetry dynamics`` in this process, where mutation testing reaches it:
the files and the summary it writes are those of the Python API on the same
checkpoints, ``--weights`` and ``--features`` change what they should, and bad
input fails with one line."""

import ase.io
import metatensor.torch as mts
import pytest
import torch

import metatrain_symmetry as msym
from metatrain_symmetry.cli.main import main
from metatrain_symmetry.diagnostics import file_stem
from metatrain_symmetry.dynamics import dynamics_csv, dynamics_markdown
from metatrain_symmetry.testing import check_clean_failure


LAYERS = ["mtt::feature::gnn_layers.0_node", "mtt::feature::gnn_layers.1_node"]
GRID = ["--max-lambda", "1", "--grid-degree", "2"]
QUANTITIES = {"spectrum": "dynamics", "structure_spectrum": "dynamics_per_structure"}


@pytest.fixture(scope="module")
def run(checkpoints, audit_inputs, tmp_path_factory):
    """A directory with the checkpoints of epochs 3 and 5 and the audit inputs'
    structures (``data.xyz``, and ``close.xyz`` with close atoms)."""
    directory = tmp_path_factory.mktemp("dynamics-run")
    for path in checkpoints:
        (directory / path.name).symlink_to(path)
    for name in ("data.xyz", "close.xyz"):
        (directory / name).symlink_to(audit_inputs / name)
    return directory


def dynamics(run, output, *extra, checkpoints=("model_5.ckpt", "model_3.ckpt")):
    """Run the command on the checkpoints (out of order: the result is sorted by
    epoch) and ``data.xyz``; it must succeed."""
    paths = [str(run / name) for name in (*checkpoints, "data.xyz")]
    assert main(["dynamics", *paths, "-o", str(output), *extra]) == 0


def api(run, checkpoints=("model_5.ckpt", "model_3.ckpt"), **settings):
    """The Python API on the same checkpoints and structures."""
    frames = ase.io.read(run / "data.xyz", ":")
    paths = [str(run / name) for name in checkpoints]
    return msym.training_dynamics(paths, frames, **settings)


def assert_written(output, expected):
    """The TensorMaps and tables in ``output`` are those of ``expected``, and there
    is nothing else."""
    names = ["dynamics.csv", "dynamics.md", "dynamics.png", "layers.png"]
    for name in expected.names:
        for quantity, suffix in QUANTITIES.items():
            path = output / f"{file_stem(name)}.{suffix}.mts"
            names.append(path.name)
            tensor = getattr(expected, quantity)[name]
            written = mts.load(str(path))
            assert mts.allclose(written, tensor, rtol=1e-12, atol=1e-15), path.name
    assert sorted(path.name for path in output.iterdir()) == sorted(names)
    assert (output / "dynamics.md").read_text() == dynamics_markdown(expected)
    assert (output / "dynamics.csv").read_text() == dynamics_csv(expected)


def epoch_rows(output, name):
    """The spectrum of ``name`` at each epoch, from the file written."""
    block = mts.load(str(output / f"{file_stem(name)}.dynamics.mts")).block()
    assert block.samples.column("epoch").tolist() == [3, 5]
    return block.values


def test_dynamics_writes_what_the_api_returns(run, tmp_path, capsys):
    output = tmp_path / "dynamics"
    dynamics(run, output, "--outputs", "energy", *GRID)
    expected = api(run, outputs=["energy"], max_lambda=1, grid=msym.O3Grid(2))
    # by default, the node features after each message-passing layer
    assert expected.names == ["energy", *LAYERS]
    assert expected.epochs == [3, 5] and expected.weights == "epoch"
    assert_written(output, expected)
    for name in ("dynamics.png", "layers.png"):
        assert (output / name).read_bytes().startswith(b"\x89PNG")
    printed = capsys.readouterr()
    table = dynamics_markdown(expected)
    assert printed.out == f"{table}\nresults written to {output}/\n"
    # with a progress bar over the checkpoints
    assert "checkpoints: 100%" in printed.err
    assert "2/2" in printed.err
    # the weights of epochs 3 and 5 differ
    energy = epoch_rows(output, "energy")
    assert not torch.allclose(energy[0], energy[1], rtol=1e-6)
    assert [path.name for path in tmp_path.iterdir()] == ["dynamics"]


def test_best_weights(run, tmp_path):
    """``--weights best`` analyses the best weights so far, which at epoch 5 are
    those of epoch 3."""
    output = tmp_path / "dynamics"
    dynamics(run, output, "--weights", "best", "--features", *GRID)
    expected = api(run, weights="best", features=[], max_lambda=1, grid=msym.O3Grid(2))
    assert expected.names == ["energy", "non_conservative_force"]
    assert expected.weights == "best"
    assert_written(output, expected)
    assert "(best weights)" in (output / "dynamics.md").read_text()
    for name in expected.names:
        spectra = epoch_rows(output, name)
        torch.testing.assert_close(spectra[0], spectra[1], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    "extra, settings",
    [
        # no features, and the model's training targets
        (["--features"], {"features": []}),
        (["--features", LAYERS[1]], {"features": [LAYERS[1]]}),
        (
            ["--outputs", "--features", LAYERS[0]],
            {"outputs": [], "features": LAYERS[:1]},
        ),
    ],
)
def test_features_and_outputs(run, tmp_path, extra, settings):
    output = tmp_path / "dynamics"
    dynamics(run, output, *extra, *GRID)
    expected = api(run, **settings, max_lambda=1, grid=msym.O3Grid(2))
    outputs = settings.get("outputs", ["energy", "non_conservative_force"])
    assert expected.names == [*outputs, *settings["features"]]
    assert_written(output, expected)


def test_one_checkpoint_in_float32_on_random_rotations(run, tmp_path):
    """One checkpoint is enough; ``--dtype`` and ``--rotations`` reach the
    analysis."""
    output = tmp_path / "dynamics"
    extra = ["--outputs", "energy", "--features", "--max-lambda", "0"]
    extra += ["--rotations", "10", "--seed", "3", "--dtype", "float32"]
    with pytest.warns(UserWarning, match="the model runs in float32"):
        dynamics(run, output, *extra, checkpoints=["model_3.ckpt"])
    with pytest.warns(UserWarning, match="the model runs in float32"):
        expected = api(
            run,
            ["model_3.ckpt"],
            outputs=["energy"],
            features=[],
            max_lambda=0,
            grid=msym.O3Grid.random(10, seed=3),
            dtype=torch.float32,
        )
    assert expected.epochs == [3]
    assert_written(output, expected)
    assert "10 Haar-random O(3) elements" in (output / "dynamics.md").read_text()


def test_close_atoms_allowed_warn_once(run, tmp_path, recwarn):
    output = tmp_path / "dynamics"
    paths = [str(run / name) for name in ("model_3.ckpt", "model_5.ckpt")]
    arguments = ["dynamics", *paths, str(run / "close.xyz"), "-o", str(output)]
    arguments += ["--outputs", "energy", "--features", "--allow-close-atoms", *GRID]
    assert main(arguments) == 0
    close = [str(warning.message) for warning in recwarn]
    close = [message for message in close if "0.02 Å apart" in message]
    assert close == [
        "structure 1 has atoms 1 and 2 0.02 Å apart (closer than 0.1 Å), so its "
        "numbers mean nothing"
    ]
    assert (output / "energy.dynamics.mts").is_file()


def test_force_replaces_a_non_empty_output(run, tmp_path, capsys):
    output = tmp_path / "dynamics"
    output.mkdir()
    (output / "keep.txt").write_text("keep")
    extra = ["--outputs", "energy", "--features", *GRID]
    paths = [str(run / name) for name in ("model_3.ckpt", "data.xyz")]
    assert main(["dynamics", *paths, "-o", str(output), *extra]) == 2
    assert capsys.readouterr().err == (
        f"mtt-symmetry dynamics: error: output directory '{output}' exists and is "
        "not empty; choose another one or pass --force to replace it\n"
    )
    assert [path.name for path in output.iterdir()] == ["keep.txt"]
    assert main(["dynamics", *paths, "-o", str(output), *extra, "--force"]) == 0
    assert not (output / "keep.txt").exists()
    assert (output / "energy.dynamics.mts").is_file()


@pytest.mark.parametrize(
    "paths, extra, message",
    [
        (
            ["data.xyz"],
            [],
            "give at least one checkpoint and then the data file: mtt-symmetry "
            "dynamics CHECKPOINT [CHECKPOINT ...] DATA -o DIR",
        ),
        # the checkpoints are checked before the data is read
        (
            ["model_3.ckpt", "missing.ckpt", "missing.xyz"],
            [],
            "checkpoint 'missing.ckpt' does not exist",
        ),
        (["model_3.ckpt", "missing.xyz"], [], "data file 'missing.xyz' does not exist"),
        (
            ["model_3.ckpt", "close.xyz"],
            [],
            "structure 1 has atoms 1 and 2 0.02 Å apart",
        ),
        (
            ["model_3.ckpt", "data.xyz"],
            ["--outputs", "dipole"],
            "checkpoint 'model_3.ckpt': unknown output 'dipole'",
        ),
        (
            ["model_3.ckpt", "data.xyz"],
            ["--grid-degree", "2", "--rotations", "10"],
            "give either --grid-degree or --rotations, not both",
        ),
    ],
)
def test_bad_input(run, capsys, monkeypatch, paths, extra, message):
    monkeypatch.chdir(run)
    arguments = ["dynamics", *paths, "-o", "result", *extra]
    message = f"mtt-symmetry dynamics: error: {message}"
    check_clean_failure(main, arguments, run, capsys, message)
