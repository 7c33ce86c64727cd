"""Reading structures and their reference values."""

import ase
import ase.io
import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator

from metatrain_symmetry.data import (
    CLOSE_ATOMS_DISTANCE,
    check_close_atoms,
    read_structures,
    reference_value,
)


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


def test_close_atoms_are_refused_with_the_structure_and_pair(tmp_path):
    """Atoms closer than the threshold, directly or through a periodic image, are
    an error naming the structure and the pair; ``allow`` turns it into a
    warning."""
    fine = ase.Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.7]])
    close = ase.Atoms("H3", positions=[[0, 0, 0], [0, 0, 0.7], [0.01, 0, 0.7]])
    # 0.05 A apart through the periodic boundary only
    periodic = ase.Atoms(
        "H2", positions=[[0.02, 1, 1], [2.97, 1, 1]], cell=[3, 3, 3], pbc=True
    )
    check_close_atoms([fine])
    with pytest.raises(ValueError, match=r"structure 1 has atoms 1 and 2 0.01 Å"):
        check_close_atoms([fine, close])
    with pytest.raises(ValueError, match=r"structure 0 has atoms 0 and 1 0.05 Å"):
        check_close_atoms([periodic])
    at_threshold = ase.Atoms("H2", positions=[[0, 0, 0], [0, 0, CLOSE_ATOMS_DISTANCE]])
    check_close_atoms([at_threshold])
    with pytest.warns(UserWarning, match="structure 0 has atoms 1 and 2"):
        check_close_atoms([close], allow=True)

    ase.io.write(tmp_path / "close.xyz", [fine, close])
    with pytest.raises(ValueError, match="pass --allow-close-atoms"):
        read_structures(tmp_path / "close.xyz")
    with pytest.warns(UserWarning, match="structure 1"):
        assert len(read_structures(tmp_path / "close.xyz", allow_close_atoms=True)) == 2


def _workflows(checkpoints):
    """Every public function that takes structures in memory, on tiny PETs."""
    import metatrain_symmetry as msym

    model = msym.load_model(checkpoints[0])
    grid = {"max_lambda": 0, "grid": msym.O3Grid(1)}
    return {
        "analyze": lambda frames, **kw: msym.analyze(
            model, frames, ["energy"], **grid, **kw
        ),
        "infinitesimal": lambda frames, **kw: msym.infinitesimal(
            model, frames, ["energy"], **kw
        ),
        "training_dynamics": lambda frames, **kw: msym.training_dynamics(
            checkpoints, frames, ["energy"], features=[], **grid, **kw
        ),
    }


def test_workflows_refuse_close_atoms_given_in_memory(checkpoints):
    """analyze, infinitesimal and training_dynamics refuse structures with close
    atoms before any work; allowed, they warn once per structure (the dynamics
    analyses both checkpoints) and give the result."""
    import warnings

    fine = ase.Atoms(
        "CH4",
        positions=[
            [0, 0, 0],
            [0.6, 0.6, 0.6],
            [-0.6, -0.6, 0.6],
            [-0.6, 0.6, -0.6],
            [0.6, -0.6, -0.6],
        ],
    )
    close = fine.copy()
    close.positions[2] = close.positions[1] + [0.03, 0, 0]
    for name, run in _workflows(checkpoints).items():
        with pytest.raises(ValueError, match="structure 1 has atoms 1 and 2 0.03 Å"):
            run([fine, close])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            assert run([fine, close], allow_close_atoms=True) is not None
        messages = [str(w.message) for w in caught if "apart" in str(w.message)]
        assert len(messages) == 1, (name, messages)
        assert messages[0].startswith("structure 1 has atoms 1 and 2 0.03 Å apart")
