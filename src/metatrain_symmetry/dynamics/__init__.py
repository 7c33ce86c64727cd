"""How the symmetry of outputs and internal features evolves during training.

:py:func:`~metatrain_symmetry.training_dynamics` analyses a series of checkpoints of one
training run (for example the ``model_<epoch>.ckpt`` files that ``mtt train`` writes
every ``checkpoint_interval`` epochs) on the same structures and the same O(3) grid, and
collects the normalized ``(lambda, sigma)`` spectrum of every requested output and
feature against the epoch. :py:func:`plot_dynamics` draws them as epoch x lambda
heatmaps, :py:func:`plot_layers` the spectra of the features of the last checkpoint
layer by layer.

The modules of this package:

- ``result``: :py:class:`~metatrain_symmetry.TrainingDynamics`, the spectra against
  epoch;
- ``checkpoints``: loading checkpoints, their epochs, and the outputs and features
  followed by default;
- ``run``: :py:func:`~metatrain_symmetry.training_dynamics`, the compute;
- ``plots``: :py:func:`plot_dynamics` and :py:func:`plot_layers`;
- ``files``: the tables and :py:func:`save_dynamics`, which writes every file."""

from .checkpoints import layer_features, load_checkpoint
from .files import dynamics_csv, dynamics_markdown, save_dynamics
from .plots import plot_dynamics, plot_layers, short_name
from .result import EPOCH_SOURCES, WEIGHTS, TrainingDynamics
from .run import training_dynamics


__all__ = [
    "EPOCH_SOURCES",
    "WEIGHTS",
    "TrainingDynamics",
    "dynamics_csv",
    "dynamics_markdown",
    "layer_features",
    "load_checkpoint",
    "plot_dynamics",
    "plot_layers",
    "save_dynamics",
    "short_name",
    "training_dynamics",
]
