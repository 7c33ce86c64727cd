"""Validation on real DFT water: the findings of Langer et al. (2024) and Domina et
al. (2026) reproduced with metatrain-symmetry end to end.

    python validation/water_study.py -o DIR [--quick] [--data FILE] [--extra NAME=FILE]
        [--docs docs/src/validation]

Data: revPBE0-D3 bulk liquid water (100 boxes of 64 molecules, energies and
forces), from the data archive of Langer, Pozdnyakov and Ceriotti, Mach. Learn.:
Sci. Technol. 5, 04LT01 (2024); see ``../shared/data/water-revpbe0/README.md``.
The boxes are split into training, validation and test boxes, then:

1. a small PET is trained with ``mtt train`` twice, on energies with conservative
   forces (as Langer et al.) and on energies with non-conservative forces (as
   Domina et al.), keeping intermediate checkpoints;
2. both are audited on the test boxes, on water molecules and dimers cut out of
   them, on an ice Ih cell and on every ``--extra`` set;
3. spectra of outputs and features across epochs and layers
   (``training_dynamics``);
4. the accuracy-equivariance trade-off of the conservative model: fine-tuning
   with the ``equivariance`` loss through ``mtt train``, by rotated copies and by
   generators (the same epochs, then the same wall time), against the closed-form
   readout retraining sweep, timed;
5. the symmetrized export of the conservative model: its equivariance error and
   its cost per evaluation against the plain export.

DIR receives ``report.md``, ``report.json``, the figures, the models under
``DIR/models/`` and every audit under ``DIR/audits/``. ``--docs`` writes the
report in reStructuredText, with its figures, where the validation page of the
docs includes it.

This script holds the command and the order of the stages; the stages live next
to it: ``water_data`` (settings and structures), ``water_training``,
``water_analyses`` (audits, screen, training dynamics), ``water_tradeoff``
(fine-tuning, readout retraining, symmetrized export), ``water_consequences``
(simulations) and ``water_report``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from water_analyses import stage_audits, stage_dynamics, stage_screen
from water_consequences import stage_consequences
from water_data import CONFIGS, DEFAULT_DATA, PUBLISHED, stage_data
from water_report import finish_report
from water_tradeoff import stage_symmetrize, stage_tradeoff
from water_training import stage_train


# ------------------------------------------------------------------------ stages
class Timer:
    def __init__(self):
        self.stages = {}

    def run(self, name, function, *args, **kwargs):
        print(f"[{name}] ...", flush=True)
        start = time.perf_counter()
        value = function(*args, **kwargs)
        self.stages[name] = time.perf_counter() - start
        print(f"[{name}] done in {self.stages[name]:.1f} s", flush=True)
        return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output", required=True, type=Path)
    parser.add_argument("--quick", action="store_true", help="the small, short run")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument(
        "--extra",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="more structures to audit every model on, reported under NAME",
    )
    parser.add_argument("--force", action="store_true", help="replace DIR")
    parser.add_argument(
        "--docs",
        type=Path,
        metavar="DIR",
        help="also write the report as DIR/report.inc, with its figures, for the "
        "docs page that includes it (DIR a folder of the Sphinx source: "
        "docs/src/validation)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="redraw the figures and rewrite the report of the finished run in DIR "
        "from its report.json, data and training logs",
    )
    return parser


def prepare_output(args) -> tuple[Path, dict[str, Path]]:
    """Check the data and the ``--extra`` files, and empty the output directory
    (``--force``); the output directory and the extra sets by name."""
    if not args.data.is_file():
        raise SystemExit(
            f"water data not found at {args.data}: pass --data, or provide "
            "../shared/data/water-revpbe0/water-bulk-100.xyz next to the repository"
        )
    extras = {}
    for item in args.extra:
        name, _, path = item.partition("=")
        if not name or not path or not Path(path).is_file():
            raise SystemExit(f"--extra expects NAME=FILE with an existing file: {item}")
        extras[name] = Path(path)
    output = args.output
    if output.exists() and any(output.iterdir()):
        if not args.force:
            raise SystemExit(f"{output} is not empty (use --force to replace it)")
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    return output, extras


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.report_only:
        report_path = args.output / "report.json"
        if not report_path.is_file():
            raise SystemExit(f"--report-only: no finished run in {args.output}")
        finish_report(args.output, json.loads(report_path.read_text()), args.docs)
        print(f"report: {args.output / 'report.md'}")
        return
    output, extras = prepare_output(args)
    mode = "quick" if args.quick else "full"
    config = CONFIGS[mode]
    timer = Timer()
    start = time.perf_counter()
    train, validation, sets = timer.run(
        "data", stage_data, output, args.data, config, extras
    )
    trained = timer.run("train", stage_train, output, config)
    audits, correlations, audited = timer.run(
        "audits", stage_audits, output, config, sets
    )
    screen = timer.run("screen", stage_screen, output, sets, audited)
    dynamics = timer.run(
        "dynamics", stage_dynamics, output, config, sets["test"], trained
    )
    tradeoff, retrain = timer.run(
        "trade-off", stage_tradeoff, output, config, sets["test"]
    )
    symmetrized = timer.run(
        "symmetrized export", stage_symmetrize, output, config, sets
    )
    simulations = timer.run(
        "consequences",
        stage_consequences,
        output,
        mode,
        output / "models" / "conservative" / "model.pt",
        sets,
    )
    timer.stages["total"] = time.perf_counter() - start

    report = {
        "mode": mode,
        "config": config,
        "data": str(args.data),
        "split": {
            "train": len(train),
            "validation": len(validation),
            "test": len(sets["test"]),
        },
        "sets": {name: len(frames) for name, frames in sets.items()},
        "published": PUBLISHED,
        "training": trained,
        "audits": audits,
        "correlation": correlations,
        "screen": screen,
        "dynamics": dynamics,
        "tradeoff": tradeoff,
        "retrain": retrain,
        "symmetrized_export": symmetrized,
        "consequences": simulations,
        "timings": timer.stages,
    }
    finish_report(output, report, args.docs)
    print(f"report: {output / 'report.md'}")


if __name__ == "__main__":
    main()
