"""What a model's rotational symmetry breaking does to simulations, and what
removing it costs.

:py:func:`~metatrain_symmetry.consequences.consequences` runs molecular dynamics
and relaxations of the user's structures with three variants side by side, on the
same initial conditions and random seeds: the model as it is (``plain``), its
O(3) average on a quadrature (``average``) and the model in a random O(3) frame at
every call (``random_rotation``); :py:func:`save_consequences` writes
``consequences.json``, ``consequences.md``, plots, trajectories and a chemiscope
file.

The modules of this package, in the order a run uses them:

- ``simulation``: the settings, ASE molecular dynamics and relaxations;
- ``ipi``: the same molecular dynamics integrated by i-PI (``--engine ipi``),
  through the i-PI driver ``_ipi_driver`` around the variants' ASE calculators;
- ``molecules``: angular momentum, torque and orientations of molecules;
- ``observables``: radial distribution functions, mean-squared displacement and
  bond orientational correlations with block-averaged errors;
- ``run``: :py:func:`consequences`, the recipe;
- ``result``: :py:class:`ConsequencesResult` and the summary's schema;
- ``markdown``, ``plots`` and ``files``: everything written.
"""

from .files import save_consequences
from .markdown import consequences_markdown
from .result import SCHEMA_VERSION, ConsequencesResult, consequences_schema
from .run import ENGINES, EXPERIMENTS, VARIANTS, consequences, select_structures
from .simulation import Settings, Trajectory


__all__ = [
    "ENGINES",
    "EXPERIMENTS",
    "SCHEMA_VERSION",
    "VARIANTS",
    "ConsequencesResult",
    "Settings",
    "Trajectory",
    "consequences",
    "consequences_markdown",
    "consequences_schema",
    "save_consequences",
    "select_structures",
]
