"""
Symmetry across training epochs
===============================

An unconstrained model learns rotational symmetry, or not, while it trains. This
example trains a small PET for a few epochs with ``mtt train``, keeps a checkpoint
after every epoch, and follows the :math:`(\\lambda, \\sigma)` spectrum of its
outputs and of the node features after each message-passing layer from one
checkpoint to the next with :py:func:`metatrain_symmetry.training_dynamics`.

The same analysis is available on the command line::

    mtt-symmetry dynamics outputs/*/*/model_*.ckpt validation.xyz -o dynamics
"""

# %%
import subprocess
import sys
import tempfile
from pathlib import Path

import ase.io
import matplotlib.pyplot as plt

import metatrain_symmetry as msym
from metatrain_symmetry.demo import make_dataset
from metatrain_symmetry.dynamics import plot_dynamics, plot_layers
from metatrain_symmetry.testing import pet_options


# %%
# Training data: rattled and strained copper cells labelled with ASE's EMT
# calculator. ``checkpoint_interval: 1`` makes metatrain write
# ``model_<epoch>.ckpt`` after every epoch (epochs are counted from 0).

directory = Path(tempfile.mkdtemp())
frames = make_dataset(10)
ase.io.write(directory / "train.xyz", frames[:8])
ase.io.write(directory / "validation.xyz", frames[8:])

options = pet_options(3, width=8, batch_size=4, log_interval=1, checkpoint_interval=1)
(directory / "options.yaml").write_text(options)
subprocess.run(
    [sys.executable, "-m", "metatrain", "train", "options.yaml", "-o", "model.pt"],
    cwd=directory,
    check=True,
    capture_output=True,
)
checkpoints = sorted((directory / "outputs").glob("*/*/model_*.ckpt"))
print([path.name for path in checkpoints])

# %%
# Analyse every checkpoint on the validation structures. By default the outputs
# are the model's training targets and the features are the node features after
# each message-passing layer; ``features="all"`` follows every internal feature.
# The checkpoints are sorted by the epoch metatrain stores in them.

dynamics = msym.training_dynamics(checkpoints, frames[8:], max_lambda=2)
print(dynamics.epoch_source, dynamics.epochs)
print(dynamics.names)

# %%
# ``dynamics.spectrum[name]`` is a TensorMap with one row per epoch. Metatrain's
# PET trainer rotates the training structures at random, so the energy is nearly
# invariant: almost all its weight sits in :math:`(0, +1)`.

energy = dynamics.spectrum_array("energy")
for epoch, row in zip(dynamics.epochs, energy, strict=True):
    invariant = float(row[0, 0])
    print(f"epoch {epoch}: b(0,+) = {invariant:.8f}, 1 - b(0,+) = {1 - invariant:.2e}")

# %%
# Heatmaps of the spectra against epoch, one row per output or feature and one
# column per :math:`\sigma`; the colour scale is logarithmic.


def show(path, figsize):
    """Display a written figure."""
    fig, axis = plt.subplots(figsize=figsize)
    axis.imshow(plt.imread(path))
    axis.set_axis_off()
    plt.show()


plot_dynamics(dynamics, directory / "dynamics.png")
show(directory / "dynamics.png", (7, 8))

# %%
# The last checkpoint layer by layer: the node features in the order the model
# computes them, then the outputs.

plot_layers(dynamics, directory / "layers.png")
show(directory / "layers.png", (6, 4))
