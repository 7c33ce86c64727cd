"""The equivariance loss end to end through the real ``mtt`` command: a tiny PET on
EMT copper trained with and without the penalty from the same seed, exact
reproduction of plain training at gamma = 0, ``--restart``, the readout-retraining
recipe, a soap_bpnn run through ``mtt-symmetry train`` with automatic
registration switched off, and early rejection of bad options."""

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import ase.io
import pytest
import torch

import metatrain_symmetry as msym
from metatrain_symmetry import testing
from metatrain_symmetry.demo import make_dataset


EPOCHS = 4
# the targets as they stand in the options
TARGETS = textwrap.indent(testing.PET_TARGETS, " " * 4)


def pet_options(
    loss: str, epochs: int = EPOCHS, training_extra: str = "", **extra
) -> str:
    return testing.pet_options(
        epochs,
        width=8,
        gnn_layers=1,
        batch_size=2,
        log_interval=1,
        training=training_extra + loss,
        **extra,
    )


# the generator penalty on an energy and its conservative forces; the forces'
# loss dwarfs the penalty in these units, hence the large gamma
CONSERVATIVE_GENERATORS = """\
loss:
  energy:
    type: equivariance
    gamma: 100000
    method: generators
    monitor: 2
    forces: {type: equivariance, gamma: 100000, method: generators}
"""


def equivariance_loss(
    energy_gamma: float,
    force_gamma: float,
    method: str = "rotations",
    extra="",
    both="",
) -> str:
    """The loss section; ``extra`` is added to the forces' entry, ``both`` to
    both entries."""
    copies = "n_rotations: 2" if method == "rotations" else f"method: {method}"
    energy = f"{{type: equivariance, base: mse, gamma: {energy_gamma}, {copies}{both}}}"
    force = (
        f"{{type: equivariance, gamma: {force_gamma}, method: {method}{extra}{both}}}"
    )
    return f"loss:\n  energy: {energy}\n  non_conservative_force: {force}\n"


SOAP_OPTIONS = """\
seed: 0
base_precision: 64
architecture:
  name: soap_bpnn
  model:
    soap: {max_angular: 2, max_radial: 2, cutoff: {radius: 4.0, width: 0.5}}
    bpnn: {num_hidden_layers: 1, num_neurons_per_layer: 8}
  training:
    batch_size: 2
    num_epochs: 1
    log_interval: 1
    loss:
      energy:
        type: equivariance
        gamma: 1.0
        n_rotations: 3
        gradients:
          positions: {type: equivariance, gamma: 1.0}
training_set:
  systems: {read_from: train.xyz, length_unit: angstrom}
  targets:
    energy: {key: energy, unit: eV, forces: {key: forces}, stress: false}
validation_set: 0.25
test_set: 0.0
"""


def environment(autoload: bool = True) -> dict:
    variables = dict(os.environ, OMP_NUM_THREADS="1")
    if autoload:
        variables.pop("METATRAIN_SYMMETRY_AUTOLOAD", None)
    else:
        variables["METATRAIN_SYMMETRY_AUTOLOAD"] = "0"
    return variables


def start(directory: Path, options: str, *extra: str, command=None, autoload=True):
    """Start ``mtt train`` (or ``command``) in ``directory`` with the data there."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("train.xyz", "validation.xyz"):
        (directory / name).write_bytes((directory.parent / name).read_bytes())
    (directory / "options.yaml").write_text(options)
    if command is None:
        command = [sys.executable, "-m", "metatrain", "train"]
    log = open(directory / "run.log", "w")
    process = subprocess.Popen(
        [*command, "options.yaml", "-o", "model.pt", *extra],
        cwd=directory,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=environment(autoload),
    )
    return process, log


def finish(runs) -> None:
    for directory, (process, log) in runs.items():
        process.wait()
        log.close()
        if process.returncode != 0:
            tail = (directory / "run.log").read_text()[-3000:]
            raise AssertionError(f"training in {directory} failed:\n{tail}")


def metrics(directory: Path) -> list[dict]:
    (path,) = directory.glob("outputs/*/*/train.csv")
    with open(path) as file:
        rows = list(csv.DictReader(file))
    return rows[1:]  # the first row holds units


def output_directory(directory: Path) -> Path:
    (path,) = directory.glob("outputs/*/*/")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    frames = make_dataset(12, seed=0)
    ase.io.write(root / "train.xyz", frames[:8])
    ase.io.write(root / "validation.xyz", frames[8:])

    mtt_symmetry = [sys.executable, "-m", "metatrain_symmetry.cli", "train"]
    first = {
        root / "soap": start(
            root / "soap", SOAP_OPTIONS, command=mtt_symmetry, autoload=False
        ),
        root / "plain": start(root / "plain", pet_options("")),
        root / "gamma0": start(root / "gamma0", pet_options(equivariance_loss(0, 0))),
        root / "penalised": start(
            root / "penalised", pet_options(equivariance_loss(30, 30))
        ),
        root / "generators": start(
            root / "generators",
            pet_options(equivariance_loss(30, 30, "generators", ", monitor: 2")),
        ),
    }
    finish(first)

    baseline = output_directory(root / "gamma0")
    readout = textwrap.dedent(
        f"""\
        finetune:
          read_from: {root / "gamma0" / "model.ckpt"}
          method: heads
          config:
            head_modules: []
            last_layer_modules: [node_last_layers, edge_last_layers]
        atomic_baseline: {baseline / "composition_model.ckpt"}
        fixed_scaling_weights: {baseline / "scaler.ckpt"}
        """
    )
    second = {
        root / "restart": start(
            root / "restart",
            pet_options(equivariance_loss(30, 30), epochs=EPOCHS + 1),
            "--restart",
            str(root / "penalised" / "model.ckpt"),
        ),
        root / "readout": start(
            root / "readout",
            pet_options(equivariance_loss(0, 30), training_extra=readout),
        ),
        root / "conservative": start(
            root / "conservative",
            pet_options("", targets=testing.CONSERVATIVE_TARGETS),
        ),
        root / "random_generators": start(
            root / "random_generators",
            pet_options(
                equivariance_loss(30, 30, "generators", both=", directions: random")
            ),
        ),
        root / "sampled_generators": start(
            root / "sampled_generators",
            pet_options(
                equivariance_loss(
                    30, 30, "generators", both=", directions: random, fraction: 0.5"
                )
            ),
        ),
        root / "conservative_generators": start(
            root / "conservative_generators",
            pet_options(CONSERVATIVE_GENERATORS, targets=testing.CONSERVATIVE_TARGETS),
        ),
    }
    exports = {}
    for name in ("gamma0", "penalised"):
        exports[name] = subprocess.Popen(
            [sys.executable, "-m", "metatrain", "export", "model.ckpt"]
            + ["-o", "exported.pt"],
            cwd=root / name,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=environment(),
        )
    finish(second)
    for process in exports.values():
        output = process.communicate()[0]
        assert process.returncode == 0, output[-2000:]
    return root


def force_error(checkpoint: Path, frames) -> float:
    model = msym.load_model(checkpoint)
    result = msym.analyze(
        model,
        frames,
        ["non_conservative_force"],
        max_lambda=1,
        grid=msym.O3Grid.random(64, seed=3),
    )
    return float(result.equivariance_rmse("non_conservative_force").mean())


def force_error_ratio(runs, name: str) -> float:
    """The force equivariance error of run ``name`` over that of ``gamma0``."""
    frames = ase.io.read(runs / "validation.xyz", ":")
    plain = force_error(runs / "gamma0" / "model.ckpt", frames)
    return force_error(runs / name / "model.ckpt", frames) / plain


def test_penalty_lowers_the_equivariance_error(runs):
    assert force_error_ratio(runs, "penalised") < 0.9

    rows = metrics(runs / "penalised")
    assert len(rows) == EPOCHS
    for row in rows:
        assert float(row["training L_sigma(non_conservative_force)"]) > 0
        assert float(row["training L_sigma(energy)"]) >= 0
    # validation is metatrain's own: no penalty columns
    assert not any(key.startswith("validation L_sigma") for key in rows[0])
    log = (runs / "penalised" / "run.log").read_text()
    assert "training L_sigma(non_conservative_force):" in log


def test_generator_penalty_lowers_the_equivariance_error(runs):
    assert force_error_ratio(runs, "generators") < 0.9
    rows = metrics(runs / "generators")
    assert float(rows[-1]["training L_sigma(non_conservative_force)"]) < float(
        rows[0]["training L_sigma(non_conservative_force)"]
    )


def test_random_direction_penalty_lowers_the_equivariance_error(runs):
    """``directions: random`` (one copy along a random direction instead of
    three along the generators) also teaches the symmetry."""
    assert force_error_ratio(runs, "random_generators") < 0.9
    rows = metrics(runs / "random_generators")
    assert len(rows) == EPOCHS
    assert all(
        float(row["training L_sigma(non_conservative_force)"]) > 0 for row in rows
    )


def test_a_penalty_at_a_fraction_of_the_steps_acts(runs):
    """``fraction: 0.5`` evaluates the penalty at about half of the 16 steps. A
    run whose penalty never acted would train as ``gamma0`` does (the draws come
    from the penalty's own generator, not torch's): its equivariance error is
    lower, and the steps it penalised are in the log."""
    assert force_error_ratio(runs, "sampled_generators") < 0.99
    rows = metrics(runs / "sampled_generators")
    assert len(rows) == EPOCHS
    penalties = [float(row["training L_sigma(non_conservative_force)"]) for row in rows]
    assert max(penalties) > 0


def test_generator_penalty_of_conservative_forces(runs):
    frames = ase.io.read(runs / "validation.xyz", ":")
    errors = {}
    for name in ("conservative", "conservative_generators"):
        result = msym.analyze(
            msym.load_model(runs / name / "model.ckpt"),
            frames,
            ["energy", "forces"],
            max_lambda=1,
            grid=msym.O3Grid.random(64, seed=3),
        )
        errors[name] = {
            output: float(result.equivariance_rmse(output).mean())
            for output in ("energy", "forces")
        }
    for output in ("energy", "forces"):
        ratio = (
            errors["conservative_generators"][output] / errors["conservative"][output]
        )
        assert ratio < 0.5, (output, errors)

    rows = metrics(runs / "conservative_generators")
    for label in ("energy", "energy::positions"):
        values = [float(row[f"training L_sigma({label})"]) for row in rows]
        assert values[-1] < values[0] and all(value > 0 for value in values)
    # the monitor follows the trained model (not metatrain's composition model,
    # which is evaluated on the same structures and is exactly invariant)
    monitored = [float(row["validation L_lie(energy)"]) for row in rows]
    assert all(value > 0 for value in monitored)
    assert monitored[-1] < monitored[0]


def test_validation_monitor(runs):
    # monitor: 2 logs L_lie of the force on two validation structures per epoch
    rows = metrics(runs / "generators")
    monitored = [float(row["validation L_lie(non_conservative_force)"]) for row in rows]
    assert len(monitored) == EPOCHS and all(value > 0 for value in monitored)
    assert monitored[-1] < monitored[0]
    assert (
        "validation L_lie(non_conservative_force):"
        in (runs / "generators" / "run.log").read_text()
    )
    # and only where it is asked for
    assert not any("L_lie" in key for key in metrics(runs / "penalised")[0])


def test_exports_with_plain_mtt_export(runs):
    for name in ("gamma0", "penalised"):
        path = runs / name / "exported.pt"
        assert path.is_file()
        model = msym.load_model(path)
        assert "non_conservative_force" in model.outputs


def test_gamma_zero_reproduces_plain_training(runs):
    assert metrics(runs / "gamma0") == metrics(runs / "plain")
    import metatomic.torch  # noqa: F401  (classes stored in checkpoints)

    plain = torch.load(runs / "plain" / "model.ckpt", weights_only=False)
    zero = torch.load(runs / "gamma0" / "model.ckpt", weights_only=False)
    compared = 0
    for key, value in plain["model_state_dict"].items():
        # parameters, composition weights and scales (integer buffers such as
        # lookup tables may hold uninitialised entries)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert torch.equal(value, zero["model_state_dict"][key]), key
            compared += 1
    assert compared > 10


def test_restart_continues_with_the_penalty(runs):
    rows = metrics(runs / "restart")
    assert [int(row["Epoch"]) for row in rows] == [EPOCHS]
    assert float(rows[0]["training L_sigma(non_conservative_force)"]) > 0
    log = (runs / "restart" / "run.log").read_text()
    assert "Restarting training" in log
    assert "'type': 'equivariance'" in log


def test_readout_retraining_recipe(runs):
    import metatomic.torch  # noqa: F401

    before = torch.load(runs / "gamma0" / "model.ckpt", weights_only=False)
    after = torch.load(runs / "readout" / "model.ckpt", weights_only=False)
    changed = [
        key
        for key, value in before["model_state_dict"].items()
        if isinstance(value, torch.Tensor)
        and not torch.equal(value, after["model_state_dict"][key])
    ]
    assert changed, "the readout did not change"
    assert all("last_layers" in key for key in changed), changed
    assert any("non_conservative_force" in key for key in changed)

    frames = ase.io.read(runs / "validation.xyz", ":")
    start = force_error(runs / "gamma0" / "model.ckpt", frames)
    retrained = force_error(runs / "readout" / "model.ckpt", frames)
    assert retrained < 0.9 * start


def test_soap_bpnn_with_explicit_registration(runs):
    rows = metrics(runs / "soap")
    assert len(rows) == 1
    # SOAP-BPNN is invariant by construction: energy and forces have no penalty
    # beyond round-off, but both are evaluated and logged
    energy = float(rows[0]["training L_sigma(energy)"])
    forces = float(rows[0]["training L_sigma(energy::positions)"])
    assert 0 <= energy < 1e-20
    assert 0 <= forces < 1e-20


def test_bad_options_are_rejected_before_loading_data(tmp_path):
    # the other options are checked by the same function (see test_losses.py)
    entry, option = "{type: equivariance, gamma: -1.0}", "training.loss.energy.gamma"
    frames = make_dataset(2, seed=0)
    ase.io.write(tmp_path / "train.xyz", frames)
    ase.io.write(tmp_path / "validation.xyz", frames)
    loss = f"loss:\n  energy: {entry}\n"
    (tmp_path / "options.yaml").write_text(pet_options(loss))
    process = subprocess.run(
        [sys.executable, "-m", "metatrain", "train", "options.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=environment(),
    )
    assert process.returncode != 0
    output = process.stdout + process.stderr
    assert option in output
    assert "Setting up training set" not in output


# every spelling of a penalised energy's gradients that docs/src/training.rst shows
GRADIENT_SPELLINGS = {
    "gradients": "gradients: {positions: {type: equivariance, gamma: 1.0}, "
    "strain: {type: equivariance, gamma: 1.0}}",
    "shorthands": "forces: {type: equivariance, gamma: 1.0}, "
    "stress: {type: equivariance, gamma: 1.0}",
    "types only": "forces: equivariance, virial: equivariance",
}


@pytest.fixture(scope="module")
def spelling_runs(tmp_path_factory):
    """The same penalised training with conservative forces and stress, with the
    gradient entries spelled in each way metatrain accepts."""
    from ase.calculators.emt import EMT

    root = tmp_path_factory.mktemp("spellings")
    frames = make_dataset(6, seed=1)
    for atoms in frames:
        atoms.calc = EMT()
        atoms.info["stress"] = atoms.get_stress(voigt=False)
        atoms.calc = None
    ase.io.write(root / "train.xyz", frames[:4])
    ase.io.write(root / "validation.xyz", frames[4:])
    targets = "energy: {key: energy, unit: eV, forces: false, stress: false}"
    with_gradients = (
        "energy: {key: energy, unit: eV, forces: {key: forces}, stress: {key: stress}}"
    )
    started = {}
    for name, gradients in GRADIENT_SPELLINGS.items():
        loss = f"loss:\n  energy: {{type: equivariance, gamma: 1.0, {gradients}}}\n"
        options = (
            pet_options(loss, epochs=1)
            .replace(TARGETS, f"    {with_gradients}\n")
            .replace(targets, with_gradients)
        )
        started[root / name] = start(root / name, options)
    finish(started)
    return root


def test_every_gradient_spelling_trains_the_same(spelling_runs):
    rows = {name: metrics(spelling_runs / name) for name in GRADIENT_SPELLINGS}
    reference = rows["gradients"]
    assert float(reference[0]["training L_sigma(energy::positions)"]) > 0
    assert float(reference[0]["training L_sigma(energy::strain)"]) > 0
    for name, other in rows.items():
        assert other == reference, name
