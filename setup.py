"""Ship ``metatrain_symmetry_autoload.pth`` at the top of site-packages.

Python runs the ``import`` line of every ``.pth`` file in site-packages at start-up;
this one imports ``_metatrain_symmetry_autoload``, which registers the
``equivariance`` loss type when metatrain is imported (see ``docs/src/training.rst``).
Project metadata lives in ``pyproject.toml``.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


PTH_FILE = "metatrain_symmetry_autoload.pth"


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        source = Path(__file__).parent / "src" / PTH_FILE
        target = Path(self.build_lib) / PTH_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)

    def get_outputs(self, include_bytecode=True):
        return [
            *super().get_outputs(include_bytecode),
            str(Path(self.build_lib) / PTH_FILE),
        ]

    def get_output_mapping(self):
        mapping = super().get_output_mapping()
        mapping[str(Path(self.build_lib) / PTH_FILE)] = str(Path("src") / PTH_FILE)
        return mapping


cmdclass = {"build_py": build_py_with_pth}

try:
    from setuptools.command.editable_wheel import editable_wheel
except ImportError:  # pragma: no cover - setuptools without PEP 660 support
    editable_wheel = None


if editable_wheel is not None and hasattr(editable_wheel, "_select_strategy"):

    class _StrategyWithPth:
        """Adds the start-up ``.pth`` file to an editable wheel."""

        def __init__(self, strategy):
            self._strategy = strategy

        def __call__(self, wheel, files, mapping):
            self._strategy(wheel, files, mapping)
            content = (Path(__file__).parent / "src" / PTH_FILE).read_bytes()
            wheel.writestr(PTH_FILE, content)

        def __enter__(self):
            self._strategy.__enter__()
            return self

        def __exit__(self, *args):
            return self._strategy.__exit__(*args)

    class editable_wheel_with_pth(editable_wheel):
        def _select_strategy(self, *args, **kwargs):
            return _StrategyWithPth(super()._select_strategy(*args, **kwargs))

    cmdclass["editable_wheel"] = editable_wheel_with_pth


setup(cmdclass=cmdclass)
