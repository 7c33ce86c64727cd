"""The ``mtt-symmetry`` command line: one thin module per sub-command over the
Python API, and one group of shared options.

- ``options``: the options every command shares (model, data, output directory,
  outputs and targets, ``--max-lambda``, the grid, batch size, device, dtype),
  their checks and their reading, and the all-or-nothing writing of outputs;
- ``analyze``, ``audit``, ``export``, ``dynamics``, ``retrain``, ``train``,
  ``demo``: one sub-command each (``NAME``, ``HELP``, ``DESCRIPTION``,
  ``add_arguments`` and ``run``, listed in ``main.COMMANDS``);
- ``main``: the parser, the processes of distributed runs, one-line errors.
"""

from .main import build_parser, main


__all__ = ["build_parser", "main"]
