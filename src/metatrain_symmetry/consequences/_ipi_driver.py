"""The i-PI driver of :py:mod:`metatrain_symmetry.consequences.ipi`: loaded by
i-PI as a ``custom`` PES, it evaluates the ASE calculator registered under its
``key`` parameter."""

import numpy as np
from ipi.pes._ase import ASEDriver

from metatrain_symmetry.consequences.ipi import registered_calculator


__DRIVER_NAME__ = "metatrain_symmetry"
__DRIVER_CLASS__ = "RegisteredCalculatorDriver"


class RegisteredCalculatorDriver(ASEDriver):
    """i-PI's ASE driver around a calculator registered by the running
    simulation.

    :param template: an ASE-readable file with the structure (atomic numbers)
    :param key: the calculator's key in the registry
    :param periodic: whether the structure is periodic (text, as i-PI passes
        parameters): a molecule has no stress, and gets a zero virial
    """

    def __init__(self, template, key, periodic="False", *args, **kwargs):
        self.key = key
        self.periodic = str(periodic).strip().lower() == "true"
        super().__init__(template, *args, **kwargs)

    def check_parameters(self):
        super().check_parameters()
        self.ase_calculator = registered_calculator(self.key)

    def compute_structure(self, cell, pos):
        if self.periodic:
            return super().compute_structure(cell, pos)
        cell, pos = self.convert_units(cell, pos)
        structure = self.template_ase.copy()
        structure.positions[:] = pos
        structure.calc = self.ase_calculator
        properties = structure.get_properties(["energy", "forces"])
        # i-PI's box around the molecule, for the volume of its (zero) virial
        structure.cell[:] = cell
        return self.post_process({**properties, "stress": np.zeros((3, 3))}, structure)
