"""Registration of the ``equivariance`` loss in metatrain: the start-up hook, the
switch-off variable, explicit registration, validation when options are read, and
the loud failure when metatrain's internals differ."""

import os
import subprocess
import sys
import textwrap
import types

import pytest


def run_python(code, autoload=True, cwd=None):
    environment = dict(os.environ)
    if autoload:
        environment.pop("METATRAIN_SYMMETRY_AUTOLOAD", None)
    else:
        environment["METATRAIN_SYMMETRY_AUTOLOAD"] = "0"
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=environment,
        cwd=cwd,
    )


def test_start_up_imports_neither_torch_nor_metatrain():
    process = run_python(
        """
        import sys
        finders = [type(finder).__name__ for finder in sys.meta_path]
        assert "MetatrainFinder" in finders, finders
        heavy = [name for name in ("torch", "metatrain", "metatrain_symmetry")
                 if name in sys.modules]
        assert not heavy, heavy
        """
    )
    assert process.returncode == 0, process.stderr


def test_importing_metatrain_registers_the_loss():
    # a script using metatrain's training API, with nothing imported from here
    process = run_python(
        """
        from metatrain.utils.data.target_info import get_energy_target_info
        from metatrain.utils.loss import LossAggregator
        from metatrain.pet import trainer

        info = get_energy_target_info("energy", {"quantity": "energy", "unit": "eV"})
        config = {"energy": {"type": "equivariance", "weight": 1.0,
                             "reduction": "mean", "gamma": 2.0, "n_rotations": 3,
                             "gradients": {}}}
        aggregator = LossAggregator({"energy": info}, config)
        loss = aggregator.losses["energy"]
        print(type(loss).__name__, loss.gamma, loss.n_rotations)
        assert aggregator.equivariance_context.losses == [loss]
        assert getattr(trainer.evaluate_model, "_metatrain_symmetry_patched")
        assert getattr(trainer.average_by_num_atoms, "_metatrain_symmetry_patched")
        """
    )
    assert process.returncode == 0, process.stderr
    assert process.stdout.split() == ["EquivarianceLoss", "2.0", "3"]


def test_switch_off_and_explicit_registration():
    process = run_python(
        """
        import sys
        assert "MetatrainFinder" not in [type(f).__name__ for f in sys.meta_path]
        import metatrain.utils.loss as loss
        from metatrain.pet import trainer
        from metatrain.utils.data.target_info import get_energy_target_info

        info = get_energy_target_info("energy", {"quantity": "energy", "unit": "eV"})
        config = {"energy": {"type": "equivariance", "weight": 1.0,
                             "reduction": "mean", "gradients": {}}}
        try:
            loss.LossAggregator({"energy": info}, config)
        except ValueError as error:
            print("unregistered:", error)
        else:
            raise AssertionError("the loss should not be registered")

        from metatrain_symmetry import hooks
        assert not hooks.is_registered()
        hooks.register()
        hooks.register()
        assert hooks.is_registered()
        # modules imported before registration now use the wrappers
        assert getattr(trainer.evaluate_model, "_metatrain_symmetry_patched")
        aggregator = loss.LossAggregator({"energy": info}, config)
        print(type(aggregator.losses["energy"]).__name__)
        """,
        autoload=False,
    )
    assert process.returncode == 0, process.stderr
    assert "Unknown loss 'equivariance'" in process.stdout
    assert process.stdout.strip().endswith("EquivarianceLoss")


def test_changed_internals_fail_loudly():
    from metatrain_symmetry import hooks

    changed = types.ModuleType("metatrain.utils.loss")
    changed.create_loss = lambda loss_type, **kwargs: None
    with pytest.raises(hooks.MetatrainVersionError, match="2026.4.x") as error:
        hooks.patch_module(changed)
    assert "METATRAIN_SYMMETRY_AUTOLOAD=0" in str(error.value)

    changed = types.ModuleType("metatrain.utils.evaluate_model")
    changed.evaluate_model = lambda model, systems, outputs: None
    with pytest.raises(hooks.MetatrainVersionError, match="evaluate_model"):
        hooks.patch_module(changed)

    changed = types.ModuleType("metatrain.utils.logging")
    with pytest.raises(hooks.MetatrainVersionError, match="MetricLogger"):
        hooks.patch_module(changed)


def test_a_broken_start_up_hook_never_breaks_the_interpreter(tmp_path):
    # a failing start-up module must leave Python usable
    (tmp_path / "_metatrain_symmetry_autoload.py").write_text("raise RuntimeError\n")
    environment = dict(os.environ, PYTHONPATH=str(tmp_path))
    process = subprocess.run(
        [sys.executable, "-c", "print('alive')"],
        capture_output=True,
        text=True,
        env=environment,
    )
    assert process.returncode == 0
    assert process.stdout.strip() == "alive"
    assert process.stderr == ""
