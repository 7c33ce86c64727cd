"""Audits and analyses spread over processes (torchrun, srun), resumed after an
interruption, and failing cleanly when one rank fails."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import ase.build
import ase.io
import metatensor.torch as mts
import pytest
import torch

from metatrain_symmetry.diagnostics import file_stem
from metatrain_symmetry.distributed import (
    FAIL_RANK_VARIABLE,
    KILL_AFTER_SHARDS_VARIABLE,
    MANIFEST,
)
from metatrain_symmetry.testing import labelled_molecules, run_mtt_symmetry
from tests.helpers import assert_same_numbers


# every process of these tests waits at most this long for its peers
_TIMEOUT = 600
_SETTINGS = ["--max-lambda", "2"]
# the audits screen too: the infinitesimal metrics spread and resume with them
_AUDIT_SETTINGS = [*_SETTINGS, "--infinitesimal"]


def _environment(**variables) -> dict:
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("SLURM_", "MASTER_")) and name != "WORLD_SIZE"
    }
    # a rank that finishes first waits for the others at the last collective:
    # long enough for a loaded machine, short enough to fail a hung test
    environment.update(OMP_NUM_THREADS="1", MTT_SYMMETRY_DISTRIBUTED_TIMEOUT="300")
    environment.update({name: str(value) for name, value in variables.items()})
    return environment


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(*arguments, **variables) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "metatrain_symmetry.cli",
            *map(str, arguments),
        ],
        capture_output=True,
        text=True,
        env=_environment(**variables),
        timeout=_TIMEOUT,
    )


def _srun(*arguments, **variables) -> list[subprocess.CompletedProcess]:
    """Two processes with the variables ``srun`` gives the tasks of a job step
    on one node."""
    port = _free_port()
    processes = []
    for rank in range(2):
        environment = _environment(
            SLURM_JOB_ID=4242,
            SLURM_PROCID=rank,
            SLURM_LOCALID=rank,
            SLURM_NTASKS=2,
            SLURM_JOB_NODELIST="localhost",
            MASTER_PORT=port,
            **variables,
        )
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "metatrain_symmetry.cli", *map(str, arguments)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=environment,
            )
        )
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=_TIMEOUT)
        results.append(
            subprocess.CompletedProcess(
                process.args, process.returncode, stdout, stderr
            )
        )
    return results


def _files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def _assert_same_audit(directory: Path, reference: Path) -> None:
    assert _files(directory) == _files(reference)
    summary = json.loads((directory / "audit.json").read_text())
    assert_same_numbers(
        summary,
        json.loads((reference / "audit.json").read_text()),
        rel=1e-10,
        abs=1e-14,
    )
    for entry in summary["outputs"].values():
        correlation = entry["screen"]["rank_correlation"]
        assert correlation["n_structures"] == summary["dataset"]["n_structures"]


def _assert_killed_after_shards(shards: int, arguments: list, work: Path) -> None:
    """Run a command in one process that kills itself once it has saved
    ``shards`` shards in its work directory ``work``."""
    killed = subprocess.run(
        [sys.executable, "-m", "metatrain_symmetry.cli", *map(str, arguments)],
        capture_output=True,
        text=True,
        env=_environment(**{KILL_AFTER_SHARDS_VARIABLE: shards}),
        timeout=_TIMEOUT,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    saved = sorted(p.name for p in work.iterdir())
    assert saved == [MANIFEST] + [f"shard-{i:06d}.pt" for i in range(shards)]


# ---------------------------------------------------------------------- inputs
@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Two tiny PET checkpoints and molecules of different sizes with targets."""
    from metatrain_symmetry.testing import tiny_pet

    directory = tmp_path_factory.mktemp("distributed-inputs")
    torch.save(tiny_pet().get_checkpoint(), directory / "model.ckpt")
    torch.save(tiny_pet(seed=1).get_checkpoint(), directory / "other.ckpt")
    names = ("CH3OH", "H2O", "CH4", "C2H6", "CH3CHO", "H2CO", "C6H6", "HCOOH")
    ase.io.write(directory / "data.xyz", labelled_molecules(names, seed=3))
    return directory


@pytest.fixture(scope="module")
def single_audit(inputs, tmp_path_factory):
    """An audit by one process."""
    output = tmp_path_factory.mktemp("single") / "audit"
    process = run_mtt_symmetry(
        "audit",
        inputs / "model.ckpt",
        inputs / "data.xyz",
        "-o",
        output,
        *_AUDIT_SETTINGS,
    )
    assert process.returncode == 0, process.stderr
    assert not (output.parent / "audit.partial").exists()
    return output


# ------------------------------------------------------------------------ runs
def test_torchrun_audit_equals_one_process(inputs, single_audit, tmp_path):
    output = tmp_path / "audit"
    process = _torchrun(
        "audit",
        inputs / "model.ckpt",
        inputs / "data.xyz",
        "-o",
        output,
        *_AUDIT_SETTINGS,
    )
    assert process.returncode == 0, process.stderr
    _assert_same_audit(output, single_audit)
    # rank 0 alone writes and prints the report
    assert process.stdout.count("audit written to") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit"]


def test_srun_analysis_equals_one_process(inputs, tmp_path):
    import metatrain_symmetry as msym

    output = tmp_path / "analysis"
    arguments = ["analyze", inputs / "model.ckpt", inputs / "data.xyz", "-o", output]
    arguments += ["--outputs", "energy", "non_conservative_force", *_SETTINGS]
    processes = _srun(*arguments)
    for process in processes:
        assert process.returncode == 0, process.stderr
    assert "results written" in processes[0].stdout
    assert processes[1].stdout == ""

    reference = msym.analyze(
        inputs / "model.ckpt",
        ase.io.read(inputs / "data.xyz", ":"),
        ["energy", "non_conservative_force"],
        max_lambda=2,
    )
    for name in ("energy", "non_conservative_force"):
        for kind in ("variance", "character_projection", "average", "spectrum"):
            saved = mts.load(output / f"{file_stem(name)}.{kind}.mts")
            expected = getattr(reference, kind)[name]
            mts.equal_metadata_raise(saved, expected)
            for key, block in expected.items():
                torch.testing.assert_close(
                    saved.block(key).values, block.values, rtol=1e-10, atol=1e-14
                )
    assert not (tmp_path / "analysis.partial").exists()


def test_interrupted_audit_resumes_on_other_processes(inputs, single_audit, tmp_path):
    output = tmp_path / "audit"
    work = tmp_path / "audit.partial"
    arguments = ["audit", inputs / "model.ckpt", inputs / "data.xyz", "-o", output]
    _assert_killed_after_shards(3, [*arguments, *_AUDIT_SETTINGS], work)
    assert not output.exists()
    saved = sorted(p.name for p in work.iterdir())
    before = {name: (work / name).stat().st_mtime_ns for name in saved}

    # another run's settings or model are refused, touching nothing
    refused = run_mtt_symmetry(*arguments, *_AUDIT_SETTINGS, "--rotations", "16")
    assert refused.returncode == 2
    error = refused.stderr.strip().splitlines()
    assert len(error) == 1, refused.stderr
    assert "another grid" in error[0] and "audit.partial" in error[0]
    assert "remove it" in error[0]
    other = ["audit", inputs / "other.ckpt", *arguments[2:]]
    refused = run_mtt_symmetry(*other, *_AUDIT_SETTINGS)
    assert refused.returncode == 2
    assert "another model" in refused.stderr
    assert not output.exists()
    assert {p.name: p.stat().st_mtime_ns for p in work.iterdir()} == before

    resumed = _torchrun(*arguments, *_AUDIT_SETTINGS)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming: 3 of" in resumed.stderr
    _assert_same_audit(output, single_audit)
    assert not work.exists()


def test_interrupted_screen_finishes_under_torchrun(inputs, tmp_path):
    import metatrain_symmetry as msym

    output = tmp_path / "screen"
    work = tmp_path / "screen.partial"
    names = ["energy", "forces", "non_conservative_force"]
    arguments = ["analyze", inputs / "model.ckpt", inputs / "data.xyz", "-o", output]
    arguments += ["--outputs", *names, "--infinitesimal"]
    _assert_killed_after_shards(2, arguments, work)
    assert not output.exists()

    resumed = _torchrun(*arguments)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming: 2 of" in resumed.stderr
    assert resumed.stdout.count("results written to") == 1
    assert not work.exists()
    expected = msym.infinitesimal(
        inputs / "model.ckpt", ase.io.read(inputs / "data.xyz", ":"), names
    )
    for name in names:
        saved = mts.load(str(output / f"{file_stem(name)}.lie_derivative.mts"))
        mts.equal_metadata_raise(saved, expected.lie_derivative[name])
        assert mts.allclose(saved, expected.lie_derivative[name], rtol=1e-10)
    torque = mts.load(str(output / "torque.mts"))
    assert mts.allclose(torque, expected.torque, rtol=1e-10)
    rows = (output / "infinitesimal.csv").read_text().splitlines()
    assert len(rows) == 1 + len(expected.relative_lie_derivative["energy"])


def test_a_failing_rank_fails_every_rank(inputs, tmp_path):
    output = tmp_path / "audit"
    arguments = ["audit", inputs / "model.ckpt", inputs / "data.xyz", "-o", output]
    processes = _srun(*arguments, *_AUDIT_SETTINGS, **{FAIL_RANK_VARIABLE: 1})
    for process in processes:
        assert process.returncode != 0
    assert "rank 1 failed: test failure requested on rank 1" in processes[0].stderr
    assert "test failure requested on rank 1" in processes[1].stderr
    assert not output.exists()

    # the shards rank 0 completed are kept for a rerun
    work = tmp_path / "audit.partial"
    assert (work / MANIFEST).exists()
    shutil.rmtree(work)
    assert sorted(tmp_path.iterdir()) == []
