"""The normal equations of the objective, accumulated in float64 over rotated
copies, and their minimum-norm solutions for every ``gamma``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..estimators import CentredMoments
from ..grid import O3Grid
from .designs import back_rotate
from .result import RetrainResult
from .targets import ForceTerm, Target, term_names


# eigenvalues below this fraction of the largest make a system singular
_SINGULAR_RCOND = 1e-12


def unbiased_factor(grid: O3Grid) -> float:
    """``R / (R - 1)`` for Monte-Carlo grids (unbiased variance), 1 for
    quadrature grids."""
    n = len(grid)
    return n / (n - 1) if grid.degree is None else 1.0


@dataclass
class Quadratic:
    """``q(v) = v^T matrix v / count`` with ``v = [parameters, 1]``."""

    matrix: torch.Tensor
    count: int

    def value(self, parameters: torch.Tensor) -> torch.Tensor:
        """``parameters``: ``(P,)`` or ``(G, P)``."""
        v = torch.cat(
            [parameters, torch.ones(*parameters.shape[:-1], 1, dtype=torch.float64)],
            dim=-1,
        )
        return torch.einsum("...p,pq,...q->...", v, self.matrix, v) / self.count


class PerStructure:
    """Base of the accumulators fed by a design pass: moments of the rotated
    copies of one structure at a time, finished when the next one starts."""

    outer = False
    """second moments as outer products (see :py:class:`CentredMoments`)"""

    def __init__(self):
        self._structure = None
        self._moments: CentredMoments | None = None

    def _enter(self, structure: int) -> None:
        if structure != self._structure:
            self.finish()
            self._structure = structure
            self._moments = CentredMoments(outer=self.outer)

    def _started(self) -> CentredMoments | None:
        """The moments of the current structure, ``None`` when nothing was
        accumulated."""
        moments = self._moments
        if self._structure is None or moments is None or moments.reference is None:
            return None
        return moments

    def _done(self) -> None:
        self._structure = None
        self._moments = None

    def finish(self) -> None:
        raise NotImplementedError


class NormalEquations(PerStructure):
    """Streaming accumulation of the quadratic forms of ``L_mu`` and ``L_sigma`` of
    one target, in float64."""

    outer = True

    def __init__(self, target: Target | ForceTerm, labels, grid: O3Grid):
        super().__init__()
        size = target.n_parameters + 1
        self.target = target
        self.labels = labels
        self.mu = torch.zeros(size, size, dtype=torch.float64)
        self.sigma = torch.zeros(size, size, dtype=torch.float64)
        self.count = 0
        self.factor = unbiased_factor(grid)
        self._grid_weights = grid.weights

    def add(self, structure, info, indices, rotations, design, offset) -> None:
        target = self.target
        self._enter(structure)
        scale = target.loss_scale(info, design.shape[1:-1])
        scale = scale[None, ..., None]
        design = back_rotate(design, target.rank, rotations)
        offset = back_rotate(offset, target.rank, rotations)
        rows = torch.cat([design, offset[..., None]], dim=-1) / scale
        rows = rows.reshape(rows.shape[0], -1, rows.shape[-1])  # (c, m, P + 1)

        identity = indices == 0
        if bool(identity.any()):
            reference = self.labels[structure].reshape(-1).to(torch.float64)
            residual = rows[identity][0].clone()
            residual[:, -1] -= reference / scale.reshape(-1)
            self.mu += residual.T @ residual
            self.count += residual.shape[0]
        rows = rows[~identity]
        if rows.shape[0] == 0:
            return
        self._moments.add(self._grid_weights[indices[~identity] - 1], rows)

    def finish(self) -> None:
        moments = self._started()
        if moments is None:
            return
        if abs(moments.weight - 1.0) > 1e-9:
            raise RuntimeError(
                "internal error: grid weights of a structure do not sum to 1"
            )
        self.sigma += self.factor * moments.covariance()
        self._done()

    def quadratics(self) -> tuple[Quadratic, Quadratic]:
        self.finish()
        # both parts are averaged over the same samples and components
        return Quadratic(self.mu, self.count), Quadratic(self.sigma, self.count)


def solve(
    target: Target, terms, gammas, ridge: float, trained: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimizers of ``sum_terms weight * (L_mu + gamma L_sigma) + ridge ||theta||^2``
    closest to the trained readout.

    Directions of the parameter space that the objective does not determine (a
    bias whose contribution is the same in every structure, a feature that is
    constant or a combination of others) keep their trained values: the solution
    is ``trained + delta``, with ``delta`` the minimum-norm change, which is the
    limit gradient descent from the trained readout reaches.

    :param terms: ``(weight, mu, sigma)`` of every quadratic term in the target's
        parameters (its values, and its forces when it has them)
    :param trained: ``(n_parameters,)`` the trained readout
    :return: the solutions ``(n_gamma, n_parameters)`` and the number of
        undetermined directions at each gamma, ``(n_gamma,)`` int64
    """
    size = target.n_parameters
    solutions, undetermined = [], []
    for gamma in gammas:
        matrix = sum(
            weight * (mu.matrix / mu.count + gamma * sigma.matrix / sigma.count)
            for weight, mu, sigma in terms
        )
        hessian = matrix[:size, :size] + ridge * torch.eye(size, dtype=torch.float64)
        hessian = 0.5 * (hessian + hessian.T)
        # stationarity of the objective at trained + delta: hessian @ delta = rhs
        rhs = -(matrix[:size, size] + hessian @ trained)
        delta, n_null = _minimum_norm_solution(hessian, rhs)
        solutions.append(trained + delta)
        undetermined.append(n_null)
    return torch.stack(solutions), torch.tensor(undetermined, dtype=torch.int64)


def _minimum_norm_solution(
    hessian: torch.Tensor, rhs: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """The minimum-norm ``x`` solving ``hessian @ x = rhs`` on the range of a
    symmetric positive semi-definite ``hessian`` ``(P, P)``, and the dimension of
    its numerical null space."""
    # Jacobi scaling: the rank test does not depend on the units of the individual
    # features (bias columns are much larger than the others); columns with no
    # weight at all stay unscaled and fall in the null space
    diagonal = torch.diagonal(hessian)
    active = diagonal > torch.finfo(torch.float64).eps * diagonal.max().clamp(min=0)
    inverse_scale = torch.where(active, diagonal, 1.0).rsqrt()
    scaled = hessian * inverse_scale[:, None] * inverse_scale[None, :]
    eigenvalues, eigenvectors = torch.linalg.eigh(scaled)
    tolerance = _SINGULAR_RCOND * float(eigenvalues[-1].clamp(min=0))
    determined = eigenvalues > tolerance
    if not bool(determined.any()):
        return torch.zeros_like(rhs), hessian.shape[0]
    basis = eigenvectors[:, determined]
    solution = inverse_scale * (
        basis @ ((basis.T @ (inverse_scale * rhs)) / eigenvalues[determined])
    )
    null = eigenvectors[:, ~determined]
    if null.shape[1] != 0:
        # the scaled null space, back in the model's parameters: remove the
        # solution's component along it (in the model's own metric)
        orthonormal, _ = torch.linalg.qr(inverse_scale[:, None] * null)
        solution = solution - orthonormal @ (orthonormal.T @ solution)
    return solution, int(null.shape[1])


def solve_all(
    targets: list[Target],
    equations: dict[str, NormalEquations],
    gammas: list[float],
    ridge: float,
    grid: O3Grid,
) -> RetrainResult:
    """Solve every target's normal equations at every gamma, with the training
    losses of every term at the solutions."""
    parameters = {}
    objective = torch.zeros(len(gammas), dtype=torch.float64)
    training_mse, training_equivariance, undetermined = {}, {}, {}
    gamma_values = torch.tensor(gammas, dtype=torch.float64)
    for target in targets:
        terms = [target] if target.forces is None else [target, target.forces]
        quadratics = [(t, *equations[t.name].quadratics()) for t in terms]
        solutions, undetermined[target.name] = solve(
            target,
            [(t.weight, mu, sigma) for t, mu, sigma in quadratics],
            gammas,
            ridge,
            target.trained_parameters(),
        )
        parameters[target.name] = solutions
        for term, mu, sigma in quadratics:
            training_mse[term.name] = mu.value(solutions)
            training_equivariance[term.name] = sigma.value(solutions)
            objective += term.weight * (
                training_mse[term.name]
                + gamma_values * training_equivariance[term.name]
            )
        objective += ridge * solutions.square().sum(dim=1)
    return RetrainResult(
        gammas=gammas,
        targets=[target.name for target in targets],
        terms=[name for target in targets for name in term_names(target)],
        objective=objective,
        training_mse=training_mse,
        training_equivariance=training_equivariance,
        parameters=parameters,
        undetermined=undetermined,
        grid=grid,
        ridge=ridge,
    )
