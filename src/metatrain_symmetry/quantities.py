"""The single source of truth for what the package knows about output names.

Every module that needs to know whether an output is per structure or per atom,
which irreducible representations it should carry, which outputs are derived from
the energy, or under which key a dataset stores its reference values, reads it from
the table :py:data:`QUANTITIES` below (after metatomic's ``o3/_quantities.py``).
To support a new kind of output, add one row.

Names are looked up by their base (the part before a ``/variant``), and every name
starting with ``energy`` (``energy_ensemble``, ``energy_uncertainty``, ...) behaves
as an energy.
"""

from __future__ import annotations

from dataclasses import dataclass


__all__ = [
    "DERIVED_OUTPUTS",
    "FEATURE_PREFIX",
    "NON_CONSERVATIVE_FORCES",
    "QUANTITIES",
    "Quantity",
    "default_label_key",
    "expected_irreps",
    "quantity",
    "standard_lambda",
]


FEATURE_PREFIX = "mtt::feature::"
"""prefix of the internal features a model can expose, ``mtt::feature::<path>``"""


@dataclass(frozen=True)
class Quantity:
    """What is known about one output name."""

    sample_kind: str
    """``"system"`` (one value per structure) or ``"atom"``"""
    rank: int
    """Cartesian rank: 0 (scalar), 1 (vector), 2 (rank-2 tensor); the largest
    angular momentum ``lambda`` the quantity carries"""
    irreps: tuple[tuple[int, int], ...] | None = None
    """irreps ``(lambda, sigma)`` its direct response carries when the model is
    equivariant, ``None`` when not known from the name"""
    label_key: str | None = None
    """the key under which datasets store its reference values by default"""
    derived: bool = False
    """computed by the package from the energy by automatic differentiation"""


_INVARIANT = ((0, 1),)
_VECTOR = ((1, 1),)
_STRESS = ((0, 1), (2, 1))

QUANTITIES: dict[str, Quantity] = {
    "energy": Quantity("system", 0, _INVARIANT, label_key="energy"),
    # derived from the energy: forces -dE/dr and stress (1/V) dE/d(strain)
    "forces": Quantity("atom", 1, _VECTOR, label_key="forces", derived=True),
    "stress": Quantity("system", 2, _STRESS, label_key="stress", derived=True),
    "non_conservative_force": Quantity("atom", 1, _VECTOR, label_key="forces"),
    "non_conservative_forces": Quantity("atom", 1, _VECTOR, label_key="forces"),
    "non_conservative_stress": Quantity("system", 2, _STRESS, label_key="stress"),
    "heat_flux": Quantity("system", 1),
    "charge": Quantity("system", 0),
    "spin_multiplicity": Quantity("system", 0),
    "position": Quantity("atom", 1),
    "positions": Quantity("atom", 1),
    "velocity": Quantity("atom", 1),
    "velocities": Quantity("atom", 1),
    "momentum": Quantity("atom", 1),
    "momenta": Quantity("atom", 1),
    "mass": Quantity("atom", 0),
    "masses": Quantity("atom", 0),
}
"""every known output name (a base name, before any ``/variant``) and what is known
about it"""

DERIVED_OUTPUTS: tuple[str, ...] = tuple(
    name for name, quantity in QUANTITIES.items() if quantity.derived
)
"""outputs the engine derives from the model's energy: ``("forces", "stress")``"""

NON_CONSERVATIVE_FORCES = ("non_conservative_force", "non_conservative_forces")
"""spellings of a directly predicted (non-conservative) force output"""


def quantity(name: str) -> Quantity | None:
    """The row of :py:data:`QUANTITIES` for an output name (by its base, with
    energy-like names as ``energy``), or ``None`` for unknown names and
    features."""
    base = name.split("/", 1)[0]
    if base in QUANTITIES:
        return QUANTITIES[base]
    if base.startswith("energy"):
        return QUANTITIES["energy"]
    return None


def expected_irreps(name: str) -> list[tuple[int, int]] | None:
    """Irreps ``(lambda, sigma)`` that the direct response of an output should carry
    (energy: ``(0, +1)``; force: ``(1, +1)``; stress: ``(0, +1)`` and ``(2, +1)``),
    or ``None`` when the output's symmetry is not known from its name."""
    row = quantity(name)
    if row is None or row.irreps is None:
        return None
    return list(row.irreps)


def standard_lambda(name: str) -> int:
    """The largest angular momentum of a known Cartesian quantity (0 when
    unknown)."""
    row = quantity(name)
    return 0 if row is None else row.rank


def default_label_key(name: str) -> str:
    """The dataset key of an output's reference values: ``energy``, ``forces`` for
    every force, ``stress`` for every stress, else the output name itself."""
    row = QUANTITIES.get(name)
    if row is None or row.label_key is None:
        return name
    return row.label_key
