"""The demo (``mtt-symmetry demo``) end to end, as a user runs it."""

import json

import metatensor.torch as mts
import pytest
import torch

from metatrain_symmetry.testing import run_mtt_symmetry as mtt_symmetry


def test_demo_end_to_end(tmp_path):
    """The demo as a user runs it: both models learn, the penalty makes the forces
    at least three times more equivariant at a similar accuracy, and the
    closed-form sweep trades accuracy for equivariance."""
    output = tmp_path / "demo"
    process = mtt_symmetry("demo", "-o", output)
    assert process.returncode == 0, process.stdout + process.stderr
    for run in ("plain", "penalized"):
        assert (output / "training" / run / "model.pt").exists()
        audit = output / f"audit-{run}"
        for name in ("audit.json", "audit.md", "audit.html", "spectra.png"):
            assert (audit / name).stat().st_size > 0, (run, name)
        # spectra up to lambda = 2: almost all of the energy is invariant
        spectrum = mts.load(str(audit / "tensors" / "energy.spectrum.mts"))
        totals = spectrum.block().values.sum(dim=1)
        assert torch.all(totals <= 1 + 1e-9) and torch.all(totals > 0.99)
    # only the penalised run estimates and logs the penalty
    assert "L_sigma" in (output / "training" / "penalized" / "train.log").read_text()
    assert "L_sigma" not in (output / "training" / "plain" / "train.log").read_text()
    assert (output / "retrain-plain" / "pareto.png").stat().st_size > 0

    numbers = json.loads((output / "summary.json").read_text())
    plain, penalized = numbers["models"]["plain"], numbers["models"]["penalized"]
    for model in (plain, penalized):
        for entry in model.values():
            assert entry["rmse"] / entry["reference_std"] <= 0.3, numbers
            assert entry["rmse_over_reference_std"] == pytest.approx(
                entry["rmse"] / entry["reference_std"]
            )
    force = "non_conservative_force"
    assert (
        penalized[force]["equivariance_rmse"] <= plain[force]["equivariance_rmse"] / 3
    ), numbers
    assert penalized[force]["rmse"] <= 1.15 * plain[force]["rmse"], numbers
    sweep = numbers["retrain"]["outputs"][force]
    assert numbers["retrain"]["gammas"][0] == 0.0
    assert sweep["equivariance_rmse"][-1] < sweep["equivariance_rmse"][0]

    summary = (output / "summary.md").read_text()
    assert "`non_conservative_force`" in summary
    assert "equivariance penalty" in summary and "plain MSE" in summary
    assert "What the columns mean" in summary
    assert "Look at" in process.stdout
