"""Epoch time of fine-tuning the water study's conservative PET with the
generator penalty (random directions) at fractions of the steps, against plain
fine-tuning, measured in one run.

Each fine-tuning is ``mtt train`` from the study's trained model on its 60 boxes
(batches of one, energy and forces), as the study's trade-off stage runs it, with
``gamma: 10`` on the energy and its forces. The epoch time is the median interval
between ``mtt train``'s epoch log lines (one-second timestamps, so use several
epochs); plain fine-tuning runs first and last, and the faster of the two is the
reference.

Run from the repository root on a finished study (``validation/water_study.py -o
STUDY``)::

    python benchmarks/water_penalty_speed.py STUDY --fractions 0.1 0.25
"""

import argparse
import json
import re
import statistics
import sys
import tempfile
from datetime import datetime
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "validation"))

from water_data import MODELS  # noqa: E402
from water_training import mtt_train, pet_options  # noqa: E402


EPOCH_LINE = re.compile(r"^\[\S+ (\S+)\]\[INFO\] - Epoch:", re.MULTILINE)


def loss_section(fraction: float | None) -> str:
    """The fine-tuning's loss: ``mse`` (``None``), or the sampled penalty."""
    if fraction is None:
        return "loss:\n  energy: {type: mse, gradients: {positions: {type: mse}}}\n"
    entry = (
        "type: equivariance, base: mse, gamma: 10.0, method: generators, "
        f"directions: random, fraction: {fraction}"
    )
    return f"loss:\n  energy: {{{entry}, gradients: {{positions: {{{entry}}}}}}}\n"


def epoch_seconds(study: Path, directory: Path, config: dict, fraction) -> float:
    """Fine-tune in ``directory``; the median seconds between epoch log lines."""
    targets, _ = MODELS["conservative"]
    model = study / "models" / "conservative" / "model.ckpt"
    options = pet_options(
        config,
        targets,
        config["epochs_timed"],
        training=loss_section(fraction),
        finetune=str(model),
    )
    # the study's options read its data relative to a model directory
    options = options.replace("../../data/", f"{study / 'data'}/")
    mtt_train(directory, options)
    (log,) = directory.glob("outputs/*/*/train.log")
    stamps = [
        datetime.strptime(stamp, "%H:%M:%S")
        for stamp in EPOCH_LINE.findall(log.read_text())
    ]
    intervals = [
        (later - earlier).total_seconds()
        for earlier, later in zip(stamps[:-1], stamps[1:], strict=True)
    ]
    return statistics.median(intervals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="directory of a finished study")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25])
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    study = args.study.resolve()
    config = json.loads((study / "report.json").read_text())["config"]
    config["epochs_timed"] = args.epochs

    runs = [("plain", None)] + [(f"fraction {f:g}", f) for f in args.fractions]
    runs.append(("plain, again", None))
    seconds = {}
    with tempfile.TemporaryDirectory() as scratch:
        for index, (name, fraction) in enumerate(runs):
            directory = Path(scratch) / f"run-{index}"
            seconds[name] = epoch_seconds(study, directory, config, fraction)
            print(f"{name:>14}: {seconds[name]:.1f} s per epoch", flush=True)
    plain = min(seconds["plain"], seconds["plain, again"])
    for name, fraction in runs:
        if fraction is not None:
            print(f"{name}: {seconds[name] / plain:.2f} times a plain epoch")


if __name__ == "__main__":
    main()
