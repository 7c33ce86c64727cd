"""How the ``mtt-symmetry`` program ends: in a single process with its exit
code, and in a process of ``torchrun`` or ``srun`` without the interpreter's
shutdown, once its output is flushed."""

import importlib

import pytest


# the module: the package's ``main`` is the function
main_module = importlib.import_module("metatrain_symmetry.cli.main")


class _Exit(Exception):
    pass


@pytest.mark.parametrize("world_size, exit_name", [(None, "sys"), ("2", "os")])
def test_the_program_exits_with_the_code_of_main(monkeypatch, world_size, exit_name):
    for name in ("WORLD_SIZE", "SLURM_JOB_ID", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    if world_size is not None:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setattr(main_module, "main", lambda: 2)
    calls = []

    def record(which):
        def exit(code):
            calls.append(which)
            raise _Exit(code)

        return exit

    monkeypatch.setattr(main_module.sys, "exit", record("sys"))
    monkeypatch.setattr(main_module.os, "_exit", record("os"))
    with pytest.raises(_Exit) as raised:
        main_module.entry_point()
    assert raised.value.args == (2,)
    assert calls == [exit_name]
