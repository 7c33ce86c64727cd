"""Reading structures and their reference values."""

import ase
import ase.io
import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator

from metatrain_symmetry.data import read_structures, reference_value


def test_read_structures(tmp_path):
    frames = [ase.Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.7]])] * 2
    ase.io.write(tmp_path / "two.xyz", frames)
    assert len(read_structures(tmp_path / "two.xyz")) == 2
    with pytest.raises(FileNotFoundError, match="training file '.*nope.xyz'"):
        read_structures(tmp_path / "nope.xyz", "training")
    (tmp_path / "garbage.xyz").write_text("not\na structure\n")
    with pytest.raises(ValueError, match="could not read structures"):
        read_structures(tmp_path / "garbage.xyz")
    (tmp_path / "empty.xyz").write_text("")
    with pytest.raises(ValueError, match="contains no structures|could not read"):
        read_structures(tmp_path / "empty.xyz")


def test_reference_value_lookup_order():
    atoms = ase.Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.7]])
    assert reference_value(atoms, "energy") is None
    atoms.calc = SinglePointCalculator(atoms, energy=3.0, forces=np.ones((2, 3)))
    assert float(reference_value(atoms, "energy")) == 3.0
    assert reference_value(atoms, "forces").shape == (2, 3)
    atoms.arrays["forces"] = np.zeros((2, 3))
    assert float(np.abs(reference_value(atoms, "forces")).max()) == 0.0
    atoms.info["energy"] = -1.5
    assert float(reference_value(atoms, "energy")) == -1.5
    atoms.info["label"] = "text"
    with pytest.raises(ValueError, match="'label' is not numeric"):
        reference_value(atoms, "label")
