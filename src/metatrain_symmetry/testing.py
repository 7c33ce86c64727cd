"""Small models, training options and command runners shared by the tests, the
demo, the examples and the benchmarks (after ``metatrain.utils.testing``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch


__all__ = [
    "CONSERVATIVE_TARGETS",
    "PET_TARGETS",
    "check_clean_failure",
    "labelled_molecules",
    "pet_model",
    "pet_options",
    "run_module",
    "run_mtt_symmetry",
    "tiny_pet",
    "training_step_loss",
    "write_dataset",
]


PET_TARGETS = """\
energy: {key: energy, unit: eV, forces: false, stress: false}
non_conservative_force:
  key: forces
  quantity: force
  unit: eV/A
  type: {cartesian: {rank: 1}}
  per_atom: true
"""
"""dataset targets of :py:func:`pet_options`: an energy without gradients and a
non-conservative force, read from the keys ``energy`` and ``forces``"""

CONSERVATIVE_TARGETS = """\
energy: {key: energy, unit: eV, forces: {key: forces}, stress: false}
"""
"""dataset targets of an energy trained with its forces"""


def pet_options(
    epochs: int,
    width: int = 16,
    gnn_layers: int = 2,
    cutoff: float = 4.0,
    batch_size: int = 8,
    learning_rate: float = 0.003,
    precision: int = 64,
    log_interval: int = 10,
    checkpoint_interval: int | None = None,
    training: str = "",
    targets: str = PET_TARGETS,
    data: str = "",
    final_eval: bool = True,
) -> str:
    """``mtt train`` options of a small PET on ``train.xyz`` and
    ``validation.xyz``.

    :param epochs: number of epochs
    :param width: ``d_pet`` and ``d_head``; ``d_node`` and ``d_feedforward`` are
        twice as large
    :param gnn_layers: number of message-passing layers
    :param cutoff: cutoff radius (A)
    :param batch_size: structures per training batch
    :param learning_rate: peak learning rate
    :param precision: ``base_precision`` (64 or 32 bits)
    :param log_interval: epochs between log lines
    :param checkpoint_interval: epochs between checkpoints (default ``epochs``)
    :param training: more options of the ``training`` section (e.g. ``loss``),
        unindented YAML
    :param targets: the dataset's targets, unindented YAML
    :param data: directory prefix of the data files, e.g. ``"../"``
    :param final_eval: let ``mtt train`` evaluate the exported model on every set
        at the end
    :return: the YAML text
    """
    if checkpoint_interval is None:
        checkpoint_interval = epochs
    return (
        textwrap.dedent(
            f"""\
            seed: 0
            base_precision: {precision}
            final_eval: {str(final_eval).lower()}
            architecture:
              name: pet
              model:
                cutoff: {cutoff}
                d_pet: {width}
                d_head: {width}
                d_node: {2 * width}
                d_feedforward: {2 * width}
                num_heads: 2
                num_attention_layers: 1
                num_gnn_layers: {gnn_layers}
              training:
                batch_size: {batch_size}
                num_epochs: {epochs}
                learning_rate: {learning_rate}
                log_interval: {log_interval}
                checkpoint_interval: {checkpoint_interval}
            """
        )
        + textwrap.indent(training, " " * 4)
        + "training_set:\n"
        + f"  systems: {{read_from: {data}train.xyz, length_unit: angstrom}}\n"
        + "  targets: &targets\n"
        + textwrap.indent(targets, " " * 4)
        + "validation_set:\n"
        + f"  systems: {{read_from: {data}validation.xyz, length_unit: angstrom}}\n"
        + "  targets: *targets\n"
        + "test_set: 0.0\n"
    )


def pet_model(
    hypers: dict,
    atomic_types=(1, 6, 8),
    dtype: torch.dtype = torch.float64,
    stress: bool = False,
    seed: int = 0,
    perturbation: float = 0.0,
    position_gradients: bool = False,
) -> torch.nn.Module:
    """A metatrain PET built in memory, with energy and non-conservative force
    (and, with ``stress``, non-conservative stress) heads.

    :param hypers: model hypers replacing PET's defaults
    :param atomic_types: atomic numbers the model knows
    :param dtype: dtype of the parameters
    :param stress: add a non-conservative stress head
    :param seed: seed of the initial parameters
    :param perturbation: move every parameter by this times a standard normal
        (untrained last layers start near zero; a perturbation makes symmetry
        breaking large and easy to resolve)
    :param position_gradients: declare the energy as trained with its position
        gradients (conservative forces), as retraining reads from a checkpoint
    """
    from metatrain.pet import PET
    from metatrain.utils.architectures import get_default_hypers
    from metatrain.utils.data import DatasetInfo
    from metatrain.utils.data.target_info import (
        get_energy_target_info,
        get_generic_target_info,
    )

    torch.manual_seed(seed)
    model_hypers = get_default_hypers("pet")["model"]
    model_hypers.update(hypers)
    targets = {
        "energy": get_energy_target_info(
            "energy",
            {"quantity": "energy", "unit": "eV"},
            add_position_gradients=position_gradients,
        ),
        "non_conservative_force": _cartesian_target(
            get_generic_target_info, "non_conservative_force", "force", 1, "atom"
        ),
    }
    if stress:
        targets["non_conservative_stress"] = _cartesian_target(
            get_generic_target_info, "non_conservative_stress", "stress", 2, "system"
        )
    info = DatasetInfo(
        length_unit="Angstrom", atomic_types=list(atomic_types), targets=targets
    )
    model = PET(model_hypers, info).to(dtype)
    if perturbation != 0.0:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(perturbation * torch.randn_like(parameter))
    return model.eval()


def tiny_pet(
    atomic_types=(1, 6, 8),
    dtype: torch.dtype = torch.float64,
    d_node: int = 16,
    stress: bool = False,
    seed: int = 0,
    position_gradients: bool = False,
) -> torch.nn.Module:
    """A very small PET (two message-passing layers of width 8, cutoff 3.5 A)
    whose parameters are perturbed by ``0.3`` times a standard normal (see
    :py:func:`pet_model`).

    ``d_node`` differs from ``d_pet`` so that the centre-token layers are active;
    the other arguments are those of :py:func:`pet_model`.
    """
    hypers = {
        "d_pet": 8,
        "d_head": 8,
        "d_node": d_node,
        "d_feedforward": 16,
        "num_heads": 2,
        "num_attention_layers": 1,
        "num_gnn_layers": 2,
        "cutoff": 3.5,
    }
    return pet_model(
        hypers,
        atomic_types,
        dtype,
        stress,
        seed,
        perturbation=0.3,
        position_gradients=position_gradients,
    )


def _cartesian_target(make, name: str, quantity: str, rank: int, sample_kind: str):
    unit = "eV/Angstrom" if rank == 1 else "eV/Angstrom^3"
    return make(
        name,
        {
            "quantity": quantity,
            "unit": unit,
            "type": {"cartesian": {"rank": rank}},
            "num_subtargets": 1,
            "sample_kind": sample_kind,
        },
    )


def write_dataset(directory, frames, n_train: int) -> None:
    """Write the first ``n_train`` structures to ``directory/train.xyz`` and the
    others to ``directory/validation.xyz`` (the files of :py:func:`pet_options`)."""
    import ase.io

    ase.io.write(Path(directory) / "train.xyz", frames[:n_train])
    ase.io.write(Path(directory) / "validation.xyz", frames[n_train:])


def run_module(module: str, *args, cwd=None) -> subprocess.CompletedProcess:
    """Run ``python -m module args...`` of this environment, capturing its
    output as text."""
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
    )


def run_mtt_symmetry(*args, cwd=None) -> subprocess.CompletedProcess:
    """Run the ``mtt-symmetry`` command of this environment."""
    return run_module("metatrain_symmetry.cli", *args, cwd=cwd)


def check_clean_failure(main, arguments: list[str], directory, capsys, message: str):
    """Run the command-line entry point ``main(arguments)`` in-process and check
    that it fails with one error line containing ``message``, writing nothing
    into ``directory``.

    :param capsys: pytest's ``capsys`` fixture
    """
    before = sorted(Path(directory).iterdir())
    status = main(arguments)
    after = sorted(Path(directory).iterdir())
    error = capsys.readouterr().err
    assert status != 0
    assert message in error
    assert len(error.strip().splitlines()) == 1, error
    assert before == after


def training_step_loss(model, systems, targets, infos, loss_fn):
    """The loss of one training step evaluated as metatrain's PET trainer does
    (``metatrain/pet/trainer.py``): predictions with ``is_training=True``, per-atom
    averages of predictions and targets, the scaler's per-property scales, then the
    loss aggregator.

    :param model: a PET, possibly wrapped in ``DistributedDataParallel``
    :param systems: systems with their neighbour lists
    :param targets: reference ``TensorMap`` per target name
    :param infos: ``TargetInfo`` per target name
    :param loss_fn: metatrain's ``LossAggregator``
    :return: the scalar loss
    """
    from metatrain.pet import trainer

    module = getattr(model, "module", model)
    infos = {key: infos[key] for key in targets}
    predictions = trainer.evaluate_model(model, systems, infos, is_training=True)
    predictions = trainer.average_by_num_atoms(predictions, systems, [])
    targets = trainer.average_by_num_atoms(targets, systems, [])
    predictions = module.scaler.apply_scales(
        systems,
        predictions,
        remove=False,
        use_per_target_scales=False,
        use_per_property_scales=True,
    )
    return loss_fn(predictions, targets, {})


def labelled_molecules(names, seed: int) -> list:
    """Molecules of ASE's collection with random energies and forces as labels.

    :param names: names known to ``ase.build.molecule``
    :param seed: seed of the labels
    :return: ``ase.Atoms`` with ``info["energy"]`` and ``arrays["forces"]``
    """
    import ase.build
    import numpy as np

    rng = np.random.default_rng(seed)
    frames = []
    for name in names:
        atoms = ase.build.molecule(name)
        atoms.info["energy"] = float(rng.normal())
        atoms.arrays["forces"] = rng.normal(size=(len(atoms), 3))
        frames.append(atoms)
    return frames
