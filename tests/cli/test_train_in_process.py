"""``mtt-symmetry train`` in this process, where mutation testing reaches it: it
registers the loss, then runs ``mtt train`` with the remaining arguments, and
leaves ``sys.argv`` as it found it, also when ``mtt train`` fails. (The real
``mtt train`` through this command runs in a new process in
``tests/test_training.py``.)"""

import sys

import metatrain.__main__
import pytest

from metatrain_symmetry.cli import train as command
from metatrain_symmetry.cli.main import main


ARGUMENTS = ["options.yaml", "-o", "model.pt", "--restart", "auto"]


@pytest.fixture
def events(monkeypatch):
    """What happened, in order: the registration, and ``mtt train`` with its
    ``sys.argv``; ``events.error`` is raised by ``mtt train`` when set."""

    class Events(list):
        error = None

    recorded = Events()

    def mtt_main():
        recorded.append(("mtt", list(sys.argv)))
        if recorded.error is not None:
            raise recorded.error

    monkeypatch.setattr(command, "register", lambda: recorded.append(("register",)))
    monkeypatch.setattr(metatrain.__main__, "main", mtt_main)
    monkeypatch.setattr(sys, "argv", ["mtt-symmetry", "train", *ARGUMENTS])
    return recorded


def test_registers_the_loss_then_runs_mtt_train(events):
    assert main(["train", *ARGUMENTS]) == 0
    assert events == [("register",), ("mtt", ["mtt", "train", *ARGUMENTS])]
    assert sys.argv == ["mtt-symmetry", "train", *ARGUMENTS]


def test_a_failing_mtt_train_leaves_sys_argv_as_it_was(events):
    events.error = SystemExit(1)
    with pytest.raises(SystemExit):
        main(["train", *ARGUMENTS])
    assert events[-1] == ("mtt", ["mtt", "train", *ARGUMENTS])
    assert sys.argv == ["mtt-symmetry", "train", *ARGUMENTS]
