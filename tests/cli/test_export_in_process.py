"""``mtt-symmetry export`` in this process, where mutation testing reaches it:
the exported model holds the audit the Python API gives on the same input,
``--symmetrize`` averages on the degree asked for, and bad input fails with one
line before anything is written."""

import json

import ase.io
import pytest
import torch
from metatomic.torch import load_atomistic_model

import metatrain_symmetry as msym
from metatrain_symmetry.audit import audit_markdown
from metatrain_symmetry.audit.export import SYMMETRIZATION_METADATA_KEY, is_symmetrized
from metatrain_symmetry.cli import export as export_command
from metatrain_symmetry.cli.main import main
from metatrain_symmetry.testing import check_clean_failure


def export(inputs, path, *extra, data="data.xyz"):
    """Run the command, which must succeed."""
    arguments = [str(inputs / "model.ckpt"), "-o", str(path)]
    arguments += ["--audit", str(inputs / data), *extra]
    assert main(["export", *arguments]) == 0


def test_export_holds_the_audit_the_api_returns(
    audit_inputs, tmp_path, capsys, monkeypatch
):
    calls = []

    def export_audited(*args, **kwargs):
        calls.append(kwargs)
        return msym.export_audited(*args, **kwargs)

    monkeypatch.setattr(export_command, "export_audited", export_audited)
    path = tmp_path / "exported.pt"
    extra = ["--outputs", "energy", "--max-lambda", "1", "--rotations", "10"]
    extra += ["--seed", "3", "--batch-size", "5", "--device", "cpu"]
    export(audit_inputs, path, *extra)
    # the options the API gets but whose effect is not in the numbers
    (call,) = calls
    assert call["batch_size"] == 5 and call["device"] == "cpu"
    assert call["progress"] is True

    expected = msym.audit(
        audit_inputs / "model.ckpt",
        str(audit_inputs / "data.xyz"),
        outputs=["energy"],
        max_lambda=1,
        grid=msym.O3Grid.random(10, seed=3),
        batch_size=5,
    )
    assert msym.read_audit(path) == expected.summary
    assert list(expected.summary["outputs"]) == ["energy"]
    assert not is_symmetrized(load_atomistic_model(str(path)))
    printed = capsys.readouterr()
    assert printed.out == (
        f"{audit_markdown(expected.summary)}\n"
        f"model with its audit in metadata written to {path}\n"
    )
    # with a progress bar over the rotated copies
    assert "3 structures x 10 rotated copies" in printed.err
    assert [entry.name for entry in tmp_path.iterdir()] == ["exported.pt"]


def test_symmetrized_export(audit_inputs, tmp_path, capsys):
    """``--symmetrize`` with ``--grid-degree``: the averaging quadrature and the
    audit grid of that degree; ``--targets`` names the dataset keys."""
    frames = ase.io.read(audit_inputs / "data.xyz", ":")
    for atoms in frames:
        atoms.info["shifted"] = atoms.get_potential_energy() + 1.0
    ase.io.write(tmp_path / "shifted.xyz", frames)
    path = tmp_path / "symmetrized.pt"
    extra = ["--symmetrize", "--grid-degree", "2", "--outputs", "energy"]
    extra += ["--max-lambda", "0", "--targets", "energy=shifted"]
    arguments = [str(audit_inputs / "model.ckpt"), "-o", str(path)]
    assert (
        main(["export", *arguments, "--audit", str(tmp_path / "shifted.xyz"), *extra])
        == 0
    )

    expected = msym.audit(
        audit_inputs / "model.ckpt",
        str(tmp_path / "shifted.xyz"),
        outputs=["energy"],
        targets={"energy": "shifted"},
        max_lambda=0,
        grid=msym.O3Grid(2),
    )
    assert msym.read_audit(path) == expected.summary
    assert expected.summary["outputs"]["energy"]["target"]["key"] == "shifted"
    exported = load_atomistic_model(str(path))
    assert is_symmetrized(exported)
    averaging = json.loads(exported.metadata().extra[SYMMETRIZATION_METADATA_KEY])
    assert averaging == {"averaged": True, "grid_degree": 2}
    assert capsys.readouterr().out == (
        f"{audit_markdown(expected.summary)}\n"
        f"O(3)-averaged model with its audit in metadata written to {path}\n"
    )


def test_close_atoms_allowed(audit_inputs, tmp_path, monkeypatch):
    calls = []

    def export_audited(*args, **kwargs):
        calls.append(kwargs)
        return msym.export_audited(*args, **kwargs)

    monkeypatch.setattr(export_command, "export_audited", export_audited)
    path = tmp_path / "exported.pt"
    extra = ["--outputs", "energy", "--max-lambda", "0", "--rotations", "10"]
    with pytest.warns(UserWarning, match="0.02 Å apart") as warned:
        export(audit_inputs, path, *extra, "--allow-close-atoms", data="close.xyz")
    # once: the command's first reading leaves allowed close atoms to the audit
    assert len([w for w in warned if "apart" in str(w.message)]) == 1
    assert msym.read_audit(path)["dataset"]["n_structures"] == 3
    # the audit is told, not only the first reading of the structures
    (call,) = calls
    assert call["allow_close_atoms"] is True


def test_force_replaces_an_existing_file(audit_inputs, tmp_path, capsys):
    path = tmp_path / "exported.pt"
    path.write_text("keep")
    extra = ["--outputs", "energy", "--max-lambda", "0", "--rotations", "10"]
    arguments = [str(audit_inputs / "model.ckpt"), "-o", str(path)]
    arguments += ["--audit", str(audit_inputs / "data.xyz"), *extra]
    assert main(["export", *arguments]) == 2
    assert capsys.readouterr().err == (
        f"mtt-symmetry export: error: output '{path}' already exists; choose another "
        "name or pass --force to replace it\n"
    )
    assert path.read_text() == "keep"
    assert main(["export", *arguments, "--force"]) == 0
    assert msym.read_audit(path)["dataset"]["n_structures"] == 3


@pytest.mark.parametrize(
    "arguments, message",
    [
        (
            ["model.ckpt", "--audit", "data.xyz", "--grid-degree", "2"],
            "--grid-degree applies to --symmetrize; add --symmetrize",
        ),
        # the checkpoint is checked before the data is read
        (
            ["missing.ckpt", "--audit", "missing.xyz"],
            "checkpoint 'missing.ckpt' does not exist",
        ),
        (
            ["model.ckpt", "--audit", "missing.xyz"],
            "data file 'missing.xyz' does not exist",
        ),
        # the structures are read before the checkpoint
        (
            ["data.xyz", "--audit", "close.xyz"],
            "structure 1 has atoms 1 and 2 0.02 Å apart",
        ),
        (
            ["model.ckpt", "--audit", "data.xyz", "--device", "cuda"],
            "--device cuda was requested but CUDA is not available",
        ),
        (
            ["model.ckpt", "--audit", "data.xyz", "--targets", "energy"],
            "--targets expects OUTPUT=KEY pairs (e.g. energy=energy), got 'energy'",
        ),
    ],
)
def test_bad_input(audit_inputs, capsys, monkeypatch, arguments, message):
    monkeypatch.chdir(audit_inputs)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    arguments = ["export", *arguments, "-o", "exported.pt"]
    message = f"mtt-symmetry export: error: {message}"
    check_clean_failure(main, arguments, audit_inputs, capsys, message)
