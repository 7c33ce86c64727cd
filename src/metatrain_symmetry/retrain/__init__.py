"""Closed-form retraining of a trained model's readout with an equivariance penalty.

With the backbone frozen, every prediction of a metatrain PET is an affine function
of its readout parameters (the weights and biases of the last linear layers): for
an atom ``i`` and a target block,

.. code-block:: text

    a_i = sum_l (W_node_l f_node_l,i + b_node_l)
          + sum_l (W_edge_l f_edge_l,i + b_edge_l C_i)

where ``f`` are the last-layer features the model exposes as
``mtt::aux::<target>_last_layer_features`` and ``C_i`` is the sum of the cutoff
factors of atom ``i``'s neighbours (``mtt::feature::cutoff_factors``). The model
output is ``scale * a + baseline``. The objective ``L_mu + gamma * L_sigma`` is
therefore quadratic in the readout: one streaming pass over rotated copies of the
training structures accumulates its normal equations in float64, and every value
of ``gamma`` is one small linear solve.

Conservative forces ``-dE/dr`` of an energy trained with them are linear in the
same parameters, through the position derivatives of the summed features and
cutoff factors: a second pass with positions requiring gradients builds their
design rows (the Jacobian of the energy's design row), and they enter the
objective as a second quadratic term of the energy's parameters.

The modules of this package, in the order a retraining uses them:

- ``targets``: the terms of the objective (targets, their forces, labels, weights);
- ``data``: structures, labels and per-structure scales;
- ``designs`` and ``forces``: streaming passes giving each term's design;
- ``passes``: the one streaming pass shared by training and validation;
- ``solve``: normal equations and their minimum-norm solutions;
- ``evaluation``: validation errors of every ``gamma`` at once;
- ``result``: :py:class:`~metatrain_symmetry.RetrainResult` and the checkpoints it
  writes;
- ``files``: the trade-off tables and plot;
- ``last_layer``: :py:func:`~metatrain_symmetry.retrain_last_layer`, the recipe;
- ``objective``: :py:func:`~metatrain_symmetry.retraining_objective`, an independent
  implementation."""

from .files import plot_pareto, write_pareto_tables
from .last_layer import DEFAULT_GAMMAS, DEFAULT_N_ROTATIONS, retrain_last_layer
from .objective import retraining_objective
from .result import RetrainResult, checkpoint_name


__all__ = [
    "DEFAULT_GAMMAS",
    "DEFAULT_N_ROTATIONS",
    "RetrainResult",
    "checkpoint_name",
    "plot_pareto",
    "retrain_last_layer",
    "retraining_objective",
    "write_pareto_tables",
]
