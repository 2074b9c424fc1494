"""Start-up benchmark: commands that need no model, before and after the fast start.

"Before" is the code at ``--baseline-ref`` (default ``a616873``, where every
``kedro`` command imported TensorFlow through the pipeline registry); "after" is this
checkout's code, uncommitted changes included. The baseline is checked out with
``git worktree add --detach`` in a temporary folder (removed afterwards); each side
gets its own project copy with its own ``src`` on ``PYTHONPATH``, as
``bench/recipe.py`` prepares them (that check imports TensorFlow once, so neither
side pays alone for reading it from a cold disk).

Per side and command, ``--repeats`` runs (default 3), the two sides alternating, as
``bench/scale.py`` runs a command (one process, wall time from start to exit, peak
RSS of the largest process from ``wait4``); the median run is reported. Commands:

- ``kedro registry list``;
- ``kedro run --env smoke --pipeline ingestion`` on the demo images.

Usage::

    python bench/startup.py [--baseline-ref a616873] [--repeats 3]

It prints a table and, as its last line, one JSON object with both sides' figures,
the ratios after / before (measured in the same run), both commits and the core
count.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
from pathlib import Path

from recipe import checkout, git, prepare
from scale import run_kedro

COMMANDS = {
    "registry list": ["registry", "list"],
    "run ingestion": ["run", "--env", "smoke", "--pipeline", "ingestion"],
}


def median_run(runs: list[dict]) -> dict:
    """The run of median wall time (the middle one of an odd count)."""
    return sorted(runs, key=lambda run: run["seconds"])[(len(runs) - 1) // 2]


def measure(projects: dict[str, Path], repeats: int, logs: Path) -> dict:
    """Runs every command ``repeats`` times per side, sides alternating.

    Returns:
        ``{command: {side: median run}}``.
    """
    runs = {name: {side: [] for side in projects} for name in COMMANDS}
    for repeat in range(repeats):
        for name, args in COMMANDS.items():
            for side, project in projects.items():
                log = logs / f"{side}_{name.replace(' ', '_')}_{repeat}.log"
                run = run_kedro(
                    args, project, log, {"PYTHONPATH": str(project / "src")}
                )
                runs[name][side].append(run)
    return {
        name: {side: median_run(side_runs) for side, side_runs in by_side.items()}
        for name, by_side in runs.items()
    }


def ratios(results: dict) -> dict:
    """after / before of wall time and peak RSS, per command."""
    return {
        name: {
            figure: round(sides["after"][figure] / sides["before"][figure], 3)
            for figure in ("seconds", "peak_rss_mb")
        }
        for name, sides in results.items()
    }


def table(results: dict) -> None:
    """Prints one row per command and side."""
    print(f"\n{'command':<15} {'side':<7} {'wall s':>7} {'peak RSS MB':>12}")
    for name, sides in results.items():
        for side, run in sides.items():
            print(f"{name:<15} {side:<7} {run['seconds']:>7} {run['peak_rss_mb']:>12}")


def main() -> None:
    """Prepares both sides, runs the commands, prints the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-ref", default="a616873")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    # SIGTERM ends the run through checkout's cleanup, which removes the worktree.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    commits = {
        "before": git("rev-parse", "--verify", f"{args.baseline_ref}^{{commit}}"),
        "after": git("rev-parse", "HEAD"),
    }
    dirty = bool(git("status", "--porcelain", "--", "src", "conf", "pyproject.toml"))
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        workdir = Path(tmp)
        with checkout(commits["before"], workdir / "before_checkout") as before_root:
            projects = {
                "before": prepare(before_root, "before", workdir),
                "after": prepare(Path(__file__).resolve().parents[1], "after", workdir),
            }
        results = measure(projects, args.repeats, workdir)
    table(results)
    print(
        json.dumps(
            {
                "results": results,
                "ratio_after_over_before": ratios(results),
                "repeats": args.repeats,
                "commits": commits,
                "uncommitted_changes": dirty,
                "cores": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
