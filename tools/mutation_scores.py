"""Mutation scores per module, from the results of ``mutmut run``.

Run from the repository root after ``mutmut run`` (configured in
``pyproject.toml``): prints, per mutated module, the mutants killed by its tests
over those that ran (mutants no test reaches are counted apart), as a Markdown
table.
"""

import collections
import re
import subprocess
import sys


def scores(lines: list[str]) -> dict[str, collections.Counter]:
    """Per module, the count of mutants by status, from ``mutmut results``."""
    counts: dict[str, collections.Counter] = collections.defaultdict(
        collections.Counter
    )
    for line in lines:
        name, _, status = line.strip().rpartition(": ")
        if not name:
            continue
        # functions are named x_<name>, methods xǁ<class>ǁ<name>
        module = re.split(r"\.x[_ǁ]", name, maxsplit=1)[0]
        counts[module][status] += 1
    return counts


def main() -> int:
    output = subprocess.run(
        ["mutmut", "results", "--all", "true"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    counts = scores(output.splitlines())
    print("| module | killed | survived | no test | score |")
    print("|---|---|---|---|---|")
    for module, count in sorted(counts.items()):
        ran = count["killed"] + count["timeout"] + count["survived"]
        killed = count["killed"] + count["timeout"]
        score = f"{100 * killed / ran:.0f} %" if ran else "n/a"
        print(
            f"| `{module}` | {killed} | {count['survived']} "
            f"| {count['no tests']} | {score} |"
        )
    unfinished = {s for c in counts.values() for s in c} - {
        "killed",
        "survived",
        "no tests",
        "timeout",
    }
    if unfinished:
        print(f"also (not counted): {sorted(unfinished)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
