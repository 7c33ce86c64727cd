"""``mtt-symmetry demo`` in this process, where mutation testing reaches it: its
flags reach the demo, and bad values and an existing output directory fail with
one line before any work. (The demo itself runs in a new process in
``tests/test_demo.py``.)"""

from pathlib import Path

import pytest

from metatrain_symmetry.cli import demo as command
from metatrain_symmetry.cli.main import main
from metatrain_symmetry.demo import DEFAULT_EPOCHS, DEFAULT_GAMMA
from metatrain_symmetry.testing import check_clean_failure


@pytest.fixture
def demos(monkeypatch):
    """The arguments of every run of the demo by the command (which does not
    train)."""
    recorded = []

    def run_demo(output, **settings):
        recorded.append((output, settings))

    monkeypatch.setattr(command, "run_demo", run_demo)
    return recorded


def test_defaults(demos, tmp_path):
    assert main(["demo", "-o", str(tmp_path / "demo")]) == 0
    assert demos == [
        (tmp_path / "demo", {"epochs": DEFAULT_EPOCHS, "gamma": DEFAULT_GAMMA})
    ]
    assert isinstance(demos[0][0], Path)


def test_flags_reach_the_demo(demos, tmp_path):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "old.txt").write_text("")
    arguments = ["demo", "-o", str(tmp_path / "demo"), "--force"]
    assert main([*arguments, "--epochs", "3", "--gamma", "0.5"]) == 0
    assert demos == [(tmp_path / "demo", {"epochs": 3, "gamma": 0.5})]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--epochs", "0"], "--epochs must be positive, got 0"),
        (["--gamma", "-1"], "--gamma must be positive, got -1.0"),
    ],
)
def test_bad_values_fail_before_any_work(tmp_path, capsys, extra, message):
    arguments = ["demo", "-o", str(tmp_path / "demo"), *extra]
    check_clean_failure(main, arguments, tmp_path, capsys, message)


def test_an_existing_output_is_refused(demos, tmp_path, capsys):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "old.txt").write_text("")
    arguments = ["demo", "-o", str(tmp_path / "demo")]
    check_clean_failure(main, arguments, tmp_path, capsys, "--force")
    assert demos == []
