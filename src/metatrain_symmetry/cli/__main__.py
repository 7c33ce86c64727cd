"""``python -m metatrain_symmetry.cli``: the ``mtt-symmetry`` command."""

import sys

from .main import main


sys.exit(main())
