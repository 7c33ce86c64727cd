"""
Exploring an audit in chemiscope
================================

An audit measures, structure by structure, how far a model's outputs are from
rotating with the structure, and shows the result in chemiscope: a map with one
point per structure, the structures themselves, and arrows for the deviation of
each predicted force from its rotational average. This example audits a small
PET built in memory (use the path of a trained ``model.ckpt`` or exported
``model.pt`` instead) and embeds the interactive view in the page.
"""

# %%
import ase.build
import numpy as np

import metatrain_symmetry as msym
from metatrain_symmetry.testing import tiny_pet


# %%
# A few molecules, slightly distorted so that they have no symmetry of their own
# that would hide the model's.

rng = np.random.default_rng(0)
frames = []
for name in ("H2O", "CH4", "CH3OH", "C2H6", "H2CO", "CH3CHO"):
    atoms = ase.build.molecule(name)
    atoms.rattle(0.05, seed=int(rng.integers(1000)))
    frames.append(atoms)

# %%
# Audit the energy and the non-conservative forces of the model on an exact O(3)
# grid that resolves spectra up to :math:`\lambda = 2`. The summary is what
# ``audit.json`` holds.

model = msym.load_model(tiny_pet())
result = msym.audit(
    model, frames, outputs=["energy", "non_conservative_force"], max_lambda=2
)
for name, entry in result.summary["outputs"].items():
    rmse = entry["equivariance_rmse"]["mean"]
    leakage = entry["leakage"]["mean"]
    print(f"{name}: equivariance RMSE {rmse:.3g}, leakage {leakage:.3g}")

# %%
# In a notebook, the audit shows itself as an interactive chemiscope widget; here
# it is embedded in the page. Select a point of the map to see its structure and
# the force deviations as arrows.

result.show()
