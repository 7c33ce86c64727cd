"""Start-up hook of metatrain-symmetry, imported by ``metatrain_symmetry.pth``.

It must cost nothing for processes that never import metatrain and never break
interpreter start-up: it imports only ``os`` and ``sys`` and installs a
``sys.meta_path`` finder that waits for metatrain's loss, evaluation, logging and
options modules. When metatrain imports one of them, the module's code runs as
usual, then ``metatrain_symmetry.hooks.patch_module`` registers the
``equivariance`` loss in it. Set ``METATRAIN_SYMMETRY_AUTOLOAD=0`` to switch this
off.
"""

import os
import sys


VARIABLE = "METATRAIN_SYMMETRY_AUTOLOAD"

# the metatrain modules that metatrain_symmetry.hooks patches, in the order its
# register() imports them; the hooks read this list from here
MODULES = (
    "metatrain.utils.loss",
    "metatrain.utils.evaluate_model",
    "metatrain.utils.per_atom",
    "metatrain.utils.architectures",
    "metatrain.utils.logging",
)
WATCHED = frozenset(MODULES)


def enabled() -> bool:
    """Whether automatic registration is on (``METATRAIN_SYMMETRY_AUTOLOAD`` is
    unset, or anything but ``0``, ``false``, ``no``, ``off``)."""
    value = os.environ.get(VARIABLE, "1").strip().lower()
    return value not in ("0", "false", "no", "off")


class _PatchingLoader:
    """Runs the real loader, then patches the module it produced."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        from metatrain_symmetry.hooks import patch_module

        patch_module(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class MetatrainFinder:
    """``sys.meta_path`` finder that wraps the loaders of the watched modules."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is None:
                continue
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _PatchingLoader(spec.loader)
            return spec
        return None

    def invalidate_caches(self):
        pass


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once), if enabled."""
    if not enabled():
        return
    if any(isinstance(finder, MetatrainFinder) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, MetatrainFinder())


try:
    install()
except Exception:  # never break interpreter start-up
    pass
