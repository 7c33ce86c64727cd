"""The demo (``mtt-symmetry demo``) end to end, as a user runs it."""

import json
import subprocess
import sys

import metatensor.torch as mts
import pytest
import torch


LEARNED = 0.2
"""largest RMSE / reference std the demo promises for every model and output"""


@pytest.fixture(scope="module")
def demos(tmp_path_factory):
    """The demo run twice with the same command, at the same time, as a user
    runs it: the processes and the output directories."""
    directory = tmp_path_factory.mktemp("demo")
    outputs = [directory / "first", directory / "second"]
    command = [sys.executable, "-m", "metatrain_symmetry.cli", "demo", "-o"]
    running = [
        subprocess.Popen(
            [*command, str(output)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for output in outputs
    ]
    processes = []
    for process in running:
        stdout, _ = process.communicate()
        processes.append((process.returncode, stdout))
    return list(zip(processes, outputs, strict=True))


def significant(value: float, digits: int = 3) -> str:
    return f"{value:.{digits - 1}e}"


def test_demo_repeats_to_three_digits(demos):
    """Seeded data, training and rotations: two runs of the same command give
    the same numbers, so that no promise hangs on round-off."""
    summaries = []
    for (returncode, stdout), output in demos:
        assert returncode == 0, stdout[-3000:]
        summaries.append(json.loads((output / "summary.json").read_text()))
    first, second = summaries
    for model in ("plain", "penalized"):
        for name, entry in first["models"][model].items():
            other = second["models"][model][name]
            for key, value in entry.items():
                if isinstance(value, float):
                    assert significant(value) == significant(other[key]), (
                        model,
                        name,
                        key,
                    )
    assert first["retrain"]["gammas"] == second["retrain"]["gammas"]
    for name, sweep in first["retrain"]["outputs"].items():
        for key, values in sweep.items():
            other = second["retrain"]["outputs"][name][key]
            assert list(map(significant, values)) == list(map(significant, other))


def test_demo_end_to_end(demos):
    """The demo as a user runs it: both models learn with margin, the penalty
    makes the forces at least 2.5 times more equivariant at a similar accuracy,
    and the closed-form sweep trades accuracy for equivariance."""
    (returncode, stdout), output = demos[0]
    assert returncode == 0, stdout[-3000:]
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
            assert entry["rmse"] / entry["reference_std"] <= LEARNED, numbers
            assert entry["rmse_over_reference_std"] == pytest.approx(
                entry["rmse"] / entry["reference_std"]
            )
    force = "non_conservative_force"
    assert (
        penalized[force]["equivariance_rmse"] <= plain[force]["equivariance_rmse"] / 2.5
    ), numbers
    assert penalized[force]["rmse"] <= 1.15 * plain[force]["rmse"], numbers
    sweep = numbers["retrain"]["outputs"][force]
    assert numbers["retrain"]["gammas"][0] == 0.0
    assert sweep["equivariance_rmse"][-1] < sweep["equivariance_rmse"][0]

    summary = (output / "summary.md").read_text()
    assert "`non_conservative_force`" in summary
    assert "equivariance penalty" in summary and "plain MSE" in summary
    assert "What the columns mean" in summary
    assert "Look at" in stdout
