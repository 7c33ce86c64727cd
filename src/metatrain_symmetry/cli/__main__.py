"""``python -m metatrain_symmetry.cli``: the ``mtt-symmetry`` command."""

from .main import entry_point


entry_point()
