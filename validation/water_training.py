"""Training of the water study's models with ``mtt train``: options,
processes, checkpoints and learning curves.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from water_data import MODELS

from metatrain_symmetry.testing import pet_options as testing_pet_options


def pet_options(config, targets, epochs, training="", finetune=None):
    """``mtt train`` options of the study's PET (files relative to the run
    directory ``models/<name>``), with ``config["checkpoints"]`` intermediate
    checkpoints."""
    if finetune is not None:
        training = f"finetune: {{read_from: {finetune}, method: full}}\n" + training
    return testing_pet_options(
        epochs,
        width=config["width"],
        gnn_layers=config["gnn_layers"],
        cutoff=config["cutoff"],
        batch_size=config["batch_size"],
        learning_rate=config["learning_rate"],
        precision=config["precision"],
        log_interval=1,
        checkpoint_interval=max(1, epochs // config["checkpoints"]),
        training=training,
        targets=targets,
        data="../../data/",
        final_eval=False,
    )


def mtt_train(directory: Path, options: str) -> float:
    """Run ``mtt train`` in ``directory``; return its wall time in seconds."""
    return wait_for(start_training(directory, options))


def start_training(directory: Path, options: str, threads: int | None = None):
    """Start ``mtt train`` in ``directory`` (``threads``: its CPU threads)."""
    directory.mkdir(parents=True)
    (directory / "options.yaml").write_text(options)
    command = [sys.executable, "-m", "metatrain", "train", "options.yaml"]
    command += ["-o", "model.pt"]
    environment = dict(os.environ)
    if threads is not None:
        environment["OMP_NUM_THREADS"] = str(threads)
    log = open(directory / "train.log", "w")
    process = subprocess.Popen(
        command, cwd=directory, stdout=log, stderr=subprocess.STDOUT, env=environment
    )
    return directory, process, log, time.perf_counter()


def wait_for(training) -> float:
    """Wait for a training of :py:func:`start_training`; its wall time."""
    directory, process, log, start = training
    returncode = process.wait()
    elapsed = time.perf_counter() - start
    log.close()
    if returncode != 0:
        tail = (directory / "train.log").read_text().splitlines()[-8:]
        raise RuntimeError(f"'mtt train' failed in {directory}:\n" + "\n".join(tail))
    return elapsed


def intermediate_checkpoints(directory: Path) -> list[Path]:
    """The ``model_<epoch>.ckpt`` files ``mtt train`` wrote under ``outputs/``."""
    return sorted(
        directory.glob("outputs/*/*/model_*.ckpt"),
        key=lambda path: int(path.stem.split("_")[-1]),
    )


def stage_train(output, config):
    """Train both models at the same time, one thread each."""
    started = {}
    for name, (targets, _) in MODELS.items():
        options = pet_options(config, targets, config["epochs"][name])
        started[name] = start_training(output / "models" / name, options, threads=1)
    trained = {}
    for name, training in started.items():
        seconds = wait_for(training)
        directory = output / "models" / name
        trained[name] = {
            "seconds": seconds,
            "epochs": config["epochs"][name],
            "checkpoint": str((directory / "model.ckpt").relative_to(output)),
            "exported": str((directory / "model.pt").relative_to(output)),
            "intermediate_checkpoints": [
                str(path.relative_to(output))
                for path in intermediate_checkpoints(directory)
            ],
        }
    return trained


def learning_curves(output):
    """Validation MAE of energy (per atom) and forces against epoch, for each
    model, from the ``train.csv`` that ``mtt train`` writes."""
    import csv

    curves = {}
    for name, (_, force) in MODELS.items():
        (path,) = (output / "models" / name).glob("outputs/*/*/train.csv")
        with open(path, newline="") as file:
            rows = list(csv.reader(file))
        header, rows = [column.strip() for column in rows[0]], rows[2:]

        def column(label, header=header, rows=rows):
            index = header.index(label)
            return [float(row[index]) for row in rows]

        force_label = next(
            label for label in header if label.startswith(f"validation {force} MAE")
        )
        curves[name] = {
            "epoch": [int(value) for value in column("Epoch")],
            "energy_mae_per_atom_meV": column("validation energy MAE (per atom)"),
            "force_mae_meV_per_A": column(force_label),
        }
    return curves
