"""
Symmetry of outputs and internal features of a PET model
========================================================

This example measures how far an unconstrained PET model is from being
rotationally equivariant, output by output and layer by layer. The model is
built in memory with random weights so that the example needs no download; use
:py:func:`metatrain_symmetry.load_model` with the path of a trained checkpoint
(``model.ckpt``) or exported model (``model.pt``) to analyse a real one.
"""

# %%
import ase.build
import matplotlib.pyplot as plt
import torch

import metatrain_symmetry as msym
from metatrain_symmetry.testing import pet_model


# %%
# A small PET predicting an energy and non-conservative forces. Its forces are
# three unconstrained numbers per atom, so nothing forces them to rotate with the
# structure.

hypers = {
    "d_pet": 16,
    "d_head": 16,
    "d_node": 32,
    "d_feedforward": 32,
    "num_gnn_layers": 2,
}
pet = pet_model(hypers, atomic_types=[1, 6, 8])
model = msym.load_model(pet)
print(model)
print(len(model.features), "internal features, for example", model.features[:3])

# %%
# Analyse a few molecules on an O(3) grid of degree 8, which resolves irreps up
# to :math:`\lambda = 4` exactly. Every output and feature is computed in one
# pass over the 684 rotated copies of each molecule.

frames = [ase.build.molecule(name) for name in ("H2O", "CH3OH", "CH4", "HCOOH")]
layers = [
    "mtt::feature::gnn_layers.0_node",
    "mtt::feature::gnn_layers.1_node",
]
names = ["mtt::feature::edge_vectors", *layers, "energy", "non_conservative_force"]
result = msym.analyze(model, frames, names, max_lambda=4, grid=msym.O3Grid(8))

for name in names:
    rmse = result.equivariance_rmse(name)
    print(f"{name:40s} equivariance RMSE per structure: {rmse.numpy().round(4)}")

# %%
# The normalized spectrum tells which irreducible representations carry the
# response of each output to rotations. Edge vectors are pure :math:`(1, +1)`;
# an invariant energy would be pure :math:`(0, +1)`, and an equivariant force
# pure :math:`(1, +1)`.

labels = [f"{lam}{'+' if s == 1 else '-'}" for lam in range(5) for s in (1, -1)]
spectra = torch.stack(
    [result.spectrum[name].block().values.mean(dim=0) for name in names]
)
fig, axis = plt.subplots(figsize=(7, 3))
image = axis.imshow(spectra.clamp(min=1e-6).log10(), aspect="auto", vmin=-6, vmax=0)
axis.set_xticks(range(len(labels)), labels)
axis.set_yticks(range(len(names)), [n.replace("mtt::feature::", "") for n in names])
axis.set_xlabel(r"$(\lambda, \sigma)$")
fig.colorbar(image, label=r"$\log_{10} b_{\lambda\sigma}$")
fig.tight_layout()
plt.show()
