"""Writes tests/durations.json from the `slowest N durations` list of a pytest log.

`pytest` prints the slowest setups and calls (`--durations=25` in pyproject's
addopts; CI's log has them). tests/conftest.py hands the longest groups of tests to
the workers first, by these seconds, so that no long test starts last and runs alone
at the end. Refresh the file from a whole run on the machine CI uses:

    pytest | tee pytest.log
    python tools/test_durations.py pytest.log

A test's seconds are its setup's and its call's, summed; the ``@group`` suffix of the
id is dropped. Tests not in the list count as short.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

OUTPUT = Path(__file__).resolve().parents[1] / "tests" / "durations.json"
LINE = re.compile(r"^([0-9.]+)s (setup|call|teardown)\s+(\S+)$")


def durations(log: str) -> dict[str, float]:
    """Seconds per test id from the log's durations list, largest first."""
    seconds: dict[str, float] = {}
    listing = False
    for line in log.splitlines():
        if "slowest" in line and "durations" in line:
            listing = True
            continue
        if listing:
            match = LINE.match(line.strip())
            if match is None:
                if line.startswith("="):
                    listing = False
                continue
            test = match.group(3).split("@")[0]
            seconds[test] = round(seconds.get(test, 0.0) + float(match.group(1)), 1)
    return dict(sorted(seconds.items(), key=lambda item: -item[1]))


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        sys.exit("usage: python tools/test_durations.py PYTEST_LOG")
    found = durations(Path(argv[0]).read_text(errors="replace"))
    if not found:
        sys.exit(f"{argv[0]} has no 'slowest durations' list")
    OUTPUT.write_text(json.dumps(found, indent=2) + "\n")
    print(f"{len(found)} tests -> {OUTPUT}")  # noqa: T201


if __name__ == "__main__":
    main(sys.argv[1:])
