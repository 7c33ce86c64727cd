"""Infinitesimal symmetry metrics: one model call per structure instead of one
per grid element.

For the generators ``G_k`` of rotations about ``x``, ``y`` and ``z`` (``G_k r =
e_k x r``), the Lie derivative of an output ``f`` is ``L_k f(x) = d/dt
[rho(exp(-t G_k)) f(exp(t G_k) x)]`` at ``t = 0``; it vanishes for an equivariant
output. For a conservative energy, ``L_k E`` is minus the net torque of a
molecule, and the antisymmetric part of the virial of a periodic structure; both
come with the forces.

The generators and how they act on each kind of output block are in
:py:mod:`metatrain_symmetry.generators`. The modules of this package:
``derivatives`` (the derivatives on one batch of
structures, by forward mode or double backward), ``run``
(:py:func:`~metatrain_symmetry.infinitesimal.infinitesimal`), ``result``
(:py:class:`~metatrain_symmetry.InfinitesimalResult`), ``shards`` (results of
shards of structures as tensors, merged in order: runs spread over processes and
resumed) and ``files`` (the result on disk)."""

from .files import infinitesimal_csv, infinitesimal_table, save_infinitesimal
from .result import InfinitesimalResult
from .run import METHODS, infinitesimal


__all__ = [
    "METHODS",
    "InfinitesimalResult",
    "infinitesimal",
    "infinitesimal_csv",
    "infinitesimal_table",
    "save_infinitesimal",
]
