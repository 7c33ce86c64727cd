"""Fixtures shared by the tests of several folders: structures, a tiny PET and its
audit, and small PETs trained by ``mtt train``.

Helpers that are not fixtures live in :py:mod:`tests.helpers`.
"""

import subprocess
import sys

import ase
import numpy as np
import pytest

from metatrain_symmetry.testing import labelled_molecules, run_mtt_symmetry


@pytest.fixture
def molecules():
    """Small non-planar molecules whose first four atoms are not coplanar."""
    rng = np.random.default_rng(0)
    frames = []
    for n_atoms in (4, 5, 7):
        positions = rng.normal(size=(n_atoms, 3)) * 1.2
        frames.append(ase.Atoms("C" + "H" * (n_atoms - 1), positions=positions))
    return frames


@pytest.fixture
def periodic_frames():
    """Periodic structures with skewed cells and a non-periodic one."""
    rng = np.random.default_rng(1)
    cell = np.array([[4.0, 0.0, 0.0], [1.1, 3.7, 0.0], [0.4, -0.6, 4.4]])
    bulk = ase.Atoms(
        "COHH", scaled_positions=rng.uniform(size=(4, 3)), cell=cell, pbc=True
    )
    slab = ase.Atoms(
        "OHHC",
        positions=rng.uniform(size=(4, 3)) * [3.5, 4.0, 2.0],
        cell=[[3.5, 0.0, 0.0], [0.3, 4.0, 0.0], [0.0, 0.0, 0.0]],
        pbc=[True, True, False],
    )
    return [bulk, slab]


@pytest.fixture(scope="session")
def audit_inputs(tmp_path_factory):
    """A tiny PET checkpoint and three molecules with energy and force targets
    (``data.xyz``; ``close.xyz`` has two atoms 0.02 Å apart)."""
    import ase.build
    import ase.io
    import torch

    from metatrain_symmetry.testing import tiny_pet

    directory = tmp_path_factory.mktemp("audit-inputs")
    torch.save(tiny_pet().get_checkpoint(), directory / "model.ckpt")
    frames = labelled_molecules(("CH3OH", "H2O", "CH4"), seed=2)
    ase.io.write(directory / "data.xyz", frames)
    # the same with two atoms of the water 0.02 A apart
    close = [atoms.copy() for atoms in frames]
    close[1].positions[2] = close[1].positions[1] + [0.02, 0.0, 0.0]
    ase.io.write(directory / "close.xyz", close)
    return directory


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Two checkpoints of a run of tiny PETs, ``model_3.ckpt`` and
    ``model_5.ckpt`` (different weights, epochs 3 and 5 stored); the best weights
    of the second (``best_model_state_dict``) are those of the first.

    :return: their paths, in epoch order
    """
    import torch

    from metatrain_symmetry.testing import tiny_pet

    directory = tmp_path_factory.mktemp("checkpoints")
    paths = []
    for epoch, seed in ((3, 1), (5, 2)):
        checkpoint = tiny_pet(seed=seed).get_checkpoint()
        checkpoint["epoch"] = epoch
        if paths:
            best = torch.load(paths[0], weights_only=False)["model_state_dict"]
            checkpoint["best_model_state_dict"] = best
        paths.append(directory / f"model_{epoch}.ckpt")
        torch.save(checkpoint, paths[-1])
    return paths


@pytest.fixture(scope="session")
def audit_directory(audit_inputs, tmp_path_factory):
    """The output of ``mtt-symmetry audit`` on :py:func:`audit_inputs`."""
    output = tmp_path_factory.mktemp("audit-run") / "audit"
    process = run_mtt_symmetry(
        "audit",
        audit_inputs / "model.ckpt",
        audit_inputs / "data.xyz",
        "-o",
        output,
        "--features",
        "mtt::feature::gnn_layers.1_node",
        "mtt::feature::gnn_layers.0_node",
        "--max-lambda",
        "2",
        "--infinitesimal",
    )
    assert process.returncode == 0, process.stderr
    return output


@pytest.fixture(scope="session")
def training(tmp_path_factory):
    """Three epochs of a tiny PET trained by ``mtt train`` with a checkpoint after
    every epoch (``model_<epoch>.ckpt``), and two structures in ``data.xyz``."""
    import ase.io

    from metatrain_symmetry.demo import make_dataset
    from metatrain_symmetry.testing import pet_options, write_dataset

    directory = tmp_path_factory.mktemp("training")
    frames = make_dataset(8)
    write_dataset(directory, frames, 6)
    ase.io.write(directory / "data.xyz", frames[6:])
    options = pet_options(
        3, width=8, batch_size=3, log_interval=1, checkpoint_interval=1
    )
    (directory / "options.yaml").write_text(options)
    process = subprocess.run(
        [sys.executable, "-m", "metatrain", "train", "options.yaml", "-o", "model.pt"],
        cwd=directory,
        capture_output=True,
        text=True,
    )
    assert process.returncode == 0, process.stderr[-2000:]
    (run,) = (directory / "outputs").glob("*/*")
    for epoch in range(3):
        assert (run / f"model_{epoch}.ckpt").is_file()
    assert not (run / "model_3.ckpt").exists()
    for path in run.glob("model_*.ckpt"):
        path.rename(directory / path.name)
    return directory


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A small PET trained for one epoch with ``mtt train`` on EMT copper:
    ``(directory, training structures, validation structures)``, the directory
    holding ``model.ckpt``, ``train.xyz`` and ``validation.xyz``."""
    from metatrain_symmetry.demo import make_dataset
    from metatrain_symmetry.testing import pet_options, run_module, write_dataset

    directory = tmp_path_factory.mktemp("retrain")
    frames = make_dataset(20)
    write_dataset(directory, frames, 14)
    (directory / "options.yaml").write_text(pet_options(1))
    process = run_module(
        "metatrain", "train", "options.yaml", "-o", "model.pt", cwd=directory
    )
    assert process.returncode == 0, process.stderr[-2000:]
    return directory, frames[:14], frames[14:]
