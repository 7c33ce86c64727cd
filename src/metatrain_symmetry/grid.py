"""Integration grids over the orthogonal group O(3).

A grid is a set of orthogonal matrices with weights summing to one. Quadrature grids
combine a Lebedev rule on the sphere (the direction of the rotated z axis) with
equispaced in-plane rotations, exactly as metatomic's ``SymmetrizedModel`` builds
them, so that both integrate the same functions to the same numbers.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch
from metatomic.torch.o3 import O3Transformations, random_transformations

from ._utils import is_integer


__all__ = [
    "LEBEDEV_ORDERS",
    "MAX_DEGREE",
    "O3Grid",
]


# orders available in scipy.integrate.lebedev_rule
LEBEDEV_ORDERS = (
    *range(3, 33, 2),
    35,
    41,
    47,
    53,
    59,
    65,
    71,
    77,
    83,
    89,
    95,
    101,
    107,
    113,
    119,
    125,
    131,
)
MAX_DEGREE = LEBEDEV_ORDERS[-1]


class O3Grid:
    """Rotations and weights integrating functions over O(3) (or SO(3)).

    ``O3Grid(degree)`` integrates exactly every product of Wigner matrices whose
    degrees sum to at most ``degree``: the Lebedev rule of the smallest available
    order ``>= degree`` gives the direction of the rotated frame, and ``degree + 1``
    equispaced angles the rotation around it. With ``inversion=True`` (the default)
    each proper rotation is paired with its composition with the inversion, and the
    weights are split equally between both cosets.

    :param degree: integration degree, between 0 and 131. Character projections
        onto irreps up to ``lambda`` are exact when ``degree >= 2 * lambda``.
    :param inversion: include improper rotations (needed to resolve ``sigma``)

    :ivar rotations: ``(N, 3, 3)`` float64 orthogonal matrices, ``det = +1`` or ``-1``
    :ivar weights: ``(N,)`` float64 weights, summing to one
    :ivar degree: integration degree, ``None`` for Monte-Carlo grids
    :ivar inversion: whether the grid contains improper rotations
    """

    def __init__(self, degree: int, inversion: bool = True):
        if not is_integer(degree):
            raise TypeError(f"grid degree must be an integer, got {degree!r}")
        degree = int(degree)
        if degree < 0 or degree > MAX_DEGREE:
            raise ValueError(
                f"grid degree must be between 0 and {MAX_DEGREE}, got {degree}"
            )
        from scipy.integrate import lebedev_rule
        from scipy.spatial.transform import Rotation

        order = min(o for o in LEBEDEV_ORDERS if o >= degree)
        n_inplane = degree + 1
        nodes, sphere_weights = lebedev_rule(order)
        alpha = np.arctan2(nodes[1], nodes[0])
        beta = np.arccos(np.clip(nodes[2], -1.0, 1.0))
        gamma = np.linspace(0.0, 2.0 * np.pi, n_inplane, endpoint=False)
        alpha = np.repeat(alpha, n_inplane)
        beta = np.repeat(beta, n_inplane)
        gamma = np.tile(gamma, len(sphere_weights))
        rotations = (
            Rotation.from_euler("z", alpha[:, None])
            * Rotation.from_euler("y", beta[:, None])
            * Rotation.from_euler("z", gamma[:, None])
        ).as_matrix()
        weights = np.repeat(sphere_weights / (4.0 * np.pi * n_inplane), n_inplane)
        if inversion:
            rotations = np.concatenate([rotations, -rotations])
            weights = np.concatenate([weights, weights]) / 2.0

        self._init(
            torch.from_numpy(rotations),
            torch.from_numpy(weights),
            degree=degree,
            inversion=inversion,
            lebedev_order=order,
        )

    def _init(self, rotations, weights, degree, inversion, lebedev_order):
        self.rotations: torch.Tensor = rotations.to(torch.float64).contiguous()
        self.weights: torch.Tensor = weights.to(torch.float64).contiguous()
        self.degree: int | None = degree
        self.inversion: bool = inversion
        self.lebedev_order: int | None = lebedev_order

    @classmethod
    def random(cls, n: int, seed: int = 0, inversion: bool = True) -> O3Grid:
        """Monte-Carlo grid of ``n`` Haar-distributed samples with equal weights.

        With ``inversion=True``, ``n // 2`` rotations are drawn from SO(3) and each
        is paired with its composition with the inversion, so the two cosets are
        sampled equally and ``sigma`` is resolved exactly; ``n`` must then be even.
        The rotations come first, their inversions after them in the same order.
        The ``n // 2`` pairs are the independent samples: on this grid
        :py:func:`~metatrain_symmetry.analyze` returns unbiased estimates with
        standard errors and needs ``n >= 8``.

        :param n: number of samples
        :param seed: seed of the random number generator
        :param inversion: include improper rotations
        """
        if not is_integer(n) or n < 1:
            raise ValueError(f"number of random rotations must be positive, got {n}")
        n = int(n)
        if inversion and n % 2 != 0:
            raise ValueError(
                f"a random O(3) grid pairs each rotation with its inversion, so the "
                f"number of samples must be even, got {n}"
            )
        generator = torch.Generator().manual_seed(int(seed))
        n_proper = n // 2 if inversion else n
        proper = random_transformations(
            n_proper,
            device=torch.device("cpu"),
            dtype=torch.float64,
            generator=generator,
        ).matrices
        rotations = torch.cat([proper, -proper]) if inversion else proper
        grid = cls.__new__(cls)
        grid._init(
            rotations,
            torch.full((n,), 1.0 / n, dtype=torch.float64),
            degree=None,
            inversion=inversion,
            lebedev_order=None,
        )
        return grid

    @classmethod
    def identity(cls) -> O3Grid:
        """The one-element grid of the identity, with weight one: evaluating a model
        on it gives its predictions on the structures as they are."""
        grid = cls.__new__(cls)
        grid._init(
            torch.eye(3, dtype=torch.float64).unsqueeze(0),
            torch.ones(1, dtype=torch.float64),
            degree=None,
            inversion=False,
            lebedev_order=None,
        )
        return grid

    def __len__(self) -> int:
        return self.rotations.shape[0]

    def __repr__(self) -> str:
        kind = "random" if self.degree is None else f"degree={self.degree}"
        group = "O(3)" if self.inversion else "SO(3)"
        return f"O3Grid({kind}, {group}, {len(self)} elements)"

    @property
    def max_lambda(self) -> int | None:
        """Largest ``lambda`` whose character projections this grid integrates
        exactly (``degree // 2``), or ``None`` for a Monte-Carlo grid."""
        return None if self.degree is None else self.degree // 2

    @property
    def improper(self) -> torch.Tensor:
        """``(N,)`` boolean mask of the improper elements (``det = -1``)."""
        return self._improper

    @cached_property
    def _improper(self) -> torch.Tensor:
        return torch.linalg.det(self.rotations) < 0

    def check_lambda(self, max_lambda: int) -> None:
        """Raise a clear error if this grid cannot resolve irreps up to
        ``max_lambda``."""
        if self.max_lambda is not None and max_lambda > self.max_lambda:
            raise ValueError(
                f"max_lambda={max_lambda} needs an O3Grid of degree at least "
                f"{2 * max_lambda}, but this grid has degree {self.degree} "
                f"(exact up to lambda={self.max_lambda}); use "
                f"O3Grid(degree={2 * max_lambda}) or lower max_lambda"
            )

    def wigner_matrices(self, max_lambda: int) -> list:
        """Real Wigner matrices of the proper part of every element.

        :return: list indexed by ``lambda`` of ``(N, 2 lambda + 1, 2 lambda + 1)``
            float64 tensors, in metatomic's real spherical-harmonics convention
        """
        cached = self.__dict__.setdefault("_wigner_cache", {})
        if max_lambda not in cached:
            # both constructors list the improper elements as -R after the proper
            # ones, and -R has the proper part R: compute each matrix once
            half = len(self) // 2
            paired = self.inversion and torch.equal(
                self.rotations[half:], -self.rotations[:half]
            )
            proper = self.rotations[:half] if paired else self.rotations
            transformations = O3Transformations(proper, max_lambda)
            matrices = []
            for ell in range(max_lambda + 1):
                wigner = transformations.wigner_D_matrices(ell)
                if paired:
                    wigner = torch.cat([wigner, wigner])
                matrices.append(wigner.contiguous())
            cached[max_lambda] = matrices
        return cached[max_lambda]
