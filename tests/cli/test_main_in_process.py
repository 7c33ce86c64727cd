"""The ``mtt-symmetry`` entry point in this process, where mutation testing
reaches it: the parser of every command, exit codes and one-line errors, and the
processes of distributed runs (faked: no process group is started)."""

import argparse
import sys

import pytest
import torch

from metatrain_symmetry.cli import audit, dynamics, retrain
from metatrain_symmetry.cli.main import COMMANDS, build_parser, entry_point, main
from metatrain_symmetry.distributed import DistributedContext, RankFailure


# the module: the package's ``main`` is the function
main_module = sys.modules["metatrain_symmetry.cli.main"]
NAMES = ["analyze", "audit", "export", "dynamics", "retrain", "consequences"]
NAMES += ["train", "demo"]


def test_parser_of_every_command(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "200")
    parser = build_parser()
    assert parser.prog == "mtt-symmetry"
    text = parser.format_help()
    assert text.startswith(f"usage: mtt-symmetry [-h] {{{','.join(NAMES)}}} ...\n")
    assert (
        "\nMeasure, train and audit the rotational symmetry of metatomic models.\n"
        in text
    )
    # every command with its help, in the order of COMMANDS
    assert [command.NAME for command in COMMANDS] == NAMES
    lines = [line.split(None, 1) for line in text.splitlines()]
    helps = {words[0]: words[1] for words in lines if len(words) == 2}
    for command in COMMANDS:
        assert helps[command.NAME] == command.HELP
    # a command is required
    with pytest.raises(SystemExit) as stop:
        parser.parse_args([])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert "error: the following arguments are required: command" in error


def test_parsed_commands_know_how_to_run():
    parser = build_parser()
    base = ["model.ckpt", "data.xyz", "-o", "out"]
    args = parser.parse_args(["audit", *base])
    assert args.command == "audit"
    assert args.run is audit.run and args.distributed is True
    args = parser.parse_args(["retrain", *base])
    assert args.run is retrain.run and args.distributed is False
    args = parser.parse_args(["dynamics", *base])
    assert args.run is dynamics.run and args.distributed is False
    assert parser.parse_args(["dynamics", *base]).paths == base[:2]


class Fake:
    """A sub-command that records its arguments and raises ``error``."""

    NAME = "fake"
    HELP = "a command of the tests"
    DESCRIPTION = "Does what the test asks."

    def __init__(self, error=None, distributed=None, device=True):
        self.error = error
        self.calls = []
        self.device = device
        if distributed is not None:
            self.DISTRIBUTED = distributed

    def add_arguments(self, parser):
        if self.device:
            parser.add_argument("--device", default=None)

    def run(self, args):
        self.calls.append(args)
        if self.error is not None:
            raise self.error


@pytest.fixture
def fake(monkeypatch):
    """Install a fake command: ``fake(error, distributed)``."""

    def install(error=None, distributed=None, device=True):
        command = Fake(error, distributed, device)
        monkeypatch.setattr(main_module, "COMMANDS", (command,))
        return command

    return install


def test_success(fake, capsys):
    command = fake()
    assert main(["fake", "--device", "cpu"]) == 0
    (args,) = command.calls
    assert args.device == "cpu" and args.distributed is False
    assert isinstance(args.context, DistributedContext)
    assert not args.context.is_distributed
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize(
    "error, line",
    [
        (ValueError("bad value\nmore details"), "bad value"),
        (TypeError("bad type"), "bad type"),
        (FileNotFoundError("no such file"), "no such file"),
        (RuntimeError("cannot run"), "cannot run"),
        (ValueError(), "ValueError"),
        # another rank's error, or this rank's with its own type
        (RankFailure("rank 1 failed: bad value"), "rank 1 failed: bad value"),
    ],
)
def test_bad_input_is_one_line(fake, capsys, error, line):
    fake(error)
    assert main(["fake"]) == 2
    assert capsys.readouterr() == ("", f"mtt-symmetry fake: error: {line}\n")


def test_rank_failure_reports_its_cause(fake, capsys):
    try:
        raise RankFailure("bad value") from FileNotFoundError("no such file")
    except RankFailure as error:
        failure = error
    fake(failure)
    assert main(["fake"]) == 2
    assert capsys.readouterr().err == "mtt-symmetry fake: error: no such file\n"
    # a bug behind the failure keeps its traceback
    try:
        raise RankFailure("bad value") from KeyError("key")
    except RankFailure as error:
        failure = error
    fake(failure)
    with pytest.raises(KeyError):
        main(["fake"])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("error", [KeyError("key"), AssertionError("bug")])
def test_bugs_keep_their_traceback(fake, capsys, error):
    fake(error)
    with pytest.raises(type(error)) as raised:
        main(["fake"])
    assert raised.value is error
    assert capsys.readouterr().err == ""


def test_interrupted(fake, capsys):
    fake(KeyboardInterrupt())
    assert main(["fake"]) == 130
    assert capsys.readouterr() == ("", "mtt-symmetry fake: interrupted\n")


class Processes:
    """The launcher's environment and torch's process group, faked."""

    def __init__(self, monkeypatch, world_size):
        self.backends, self.agreed, self.destroyed = [], [], 0
        self.world_size = world_size
        monkeypatch.setattr(main_module, "environment_world_size", lambda: world_size)
        monkeypatch.setattr(main_module, "init_from_environment", self.init)
        monkeypatch.setattr(main_module, "agree", self.agree)
        monkeypatch.setattr(torch.distributed, "destroy_process_group", self.destroy)

    def init(self, backend):
        self.backends.append(backend)
        return DistributedContext(0, self.world_size)

    def agree(self, context, error):
        """As :py:func:`metatrain_symmetry.distributed.agree` on the failing
        rank."""
        self.agreed.append((context.world_size, error))
        if error is not None:
            raise RankFailure(f"own: {error}") from error

    def destroy(self):
        self.destroyed += 1


@pytest.mark.parametrize(
    "extra, backend",
    [([], "gloo"), (["--device", "cpu"], "gloo"), (["--device", "cuda"], None)],
)
def test_distributed_command_joins_the_processes(
    fake, monkeypatch, capsys, extra, backend
):
    processes = Processes(monkeypatch, world_size=2)
    command = fake(distributed=True, device=extra != [])
    assert main(["fake", *extra]) == 0
    assert processes.backends == [backend]
    (args,) = command.calls
    assert args.context.is_distributed and args.context.world_size == 2
    # every rank learns that rank 0 wrote the files
    assert processes.agreed == [(2, None)]
    assert processes.destroyed == 1


def test_distributed_errors_reach_every_rank(fake, monkeypatch, capsys):
    processes = Processes(monkeypatch, world_size=2)
    error = ValueError("bad value")
    fake(error, distributed=True)
    assert main(["fake"]) == 2
    assert processes.agreed == [(2, error)]
    assert processes.destroyed == 1
    # this rank's error, with its own message
    assert capsys.readouterr().err == "mtt-symmetry fake: error: bad value\n"
    # a failure of another rank is already known to every rank
    processes = Processes(monkeypatch, world_size=2)
    fake(RankFailure("rank 1 failed: bad value"), distributed=True)
    assert main(["fake"]) == 2
    assert processes.agreed == []
    assert processes.destroyed == 1
    assert capsys.readouterr().err == (
        "mtt-symmetry fake: error: rank 1 failed: bad value\n"
    )
    processes = Processes(monkeypatch, world_size=2)
    fake(KeyboardInterrupt(), distributed=True)
    assert main(["fake"]) == 130
    assert processes.destroyed == 1


def test_processes_that_cannot_join(fake, monkeypatch, capsys):
    """A launcher's environment that does not let the processes join is bad
    input: one line."""
    Processes(monkeypatch, world_size=2)

    def init(backend):
        raise RuntimeError("WORLD_SIZE is set but ['RANK'] are not")

    monkeypatch.setattr(main_module, "init_from_environment", init)
    command = fake(distributed=True)
    assert main(["fake"]) == 2
    assert command.calls == []
    assert capsys.readouterr().err == (
        "mtt-symmetry fake: error: WORLD_SIZE is set but ['RANK'] are not\n"
    )


@pytest.mark.parametrize("world_size, distributed", [(1, True), (2, False), (2, None)])
def test_single_process(fake, monkeypatch, world_size, distributed):
    """Commands that do not spread over processes, and any command in a single
    process, start no process group."""
    processes = Processes(monkeypatch, world_size=world_size)
    command = fake(distributed=distributed)
    assert main(["fake"]) == 0
    assert processes.backends == []
    assert not command.calls[0].context.is_distributed
    assert processes.agreed == [(1, None)]
    assert processes.destroyed == 0
    fake(ValueError("bad value"), distributed=distributed)
    assert main(["fake"]) == 2
    assert processes.agreed == [(1, None)]
    assert processes.destroyed == 0


def test_parser_keeps_the_usage_of_a_command(fake):
    """A command's ``USAGE``, when it has one, replaces argparse's."""
    command = fake()
    command.USAGE = "mtt-symmetry fake [options]"
    (action,) = [
        action
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    ]
    parser = action.choices["fake"]
    assert parser.format_usage() == "usage: mtt-symmetry fake [options]\n"
    assert parser.description == Fake.DESCRIPTION
    del command.USAGE
    (action,) = [
        action
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    ]
    assert (
        action.choices["fake"]
        .format_usage()
        .startswith("usage: mtt-symmetry fake [-h] [--device DEVICE]")
    )


@pytest.mark.parametrize("world_size", [1, 2])
def test_entry_point_exits_with_the_code(monkeypatch, world_size):
    """The program exits with the code of ``main``; a process of a distributed
    run flushes its output and ends with ``os._exit``."""
    calls = []
    monkeypatch.setattr(main_module, "main", lambda: 2)
    monkeypatch.setattr(main_module, "environment_world_size", lambda: world_size)
    monkeypatch.setattr(main_module.os, "_exit", lambda code: calls.append(code))
    monkeypatch.setattr(
        main_module.logging, "shutdown", lambda: calls.append("logging")
    )
    with pytest.raises(SystemExit) as stop:
        entry_point()
    # os._exit is faked: the process goes on to sys.exit
    assert stop.value.code == 2
    assert calls == ([] if world_size == 1 else ["logging", 2])
