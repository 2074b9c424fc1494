"""Recipe benchmark: today's fine-tuning recipe against the new one, on the demo images.

"Today's recipe" is the code and conf at ``--baseline-ref`` (default
``6eaa556``, before the recipe changes of 7caa664 and the merges after it); "the new
one" is this checkout's code and conf, uncommitted changes included (the JSON says
whether there are any).

The baseline ref is checked out with ``git worktree add --detach`` in a temporary
folder (removed again afterwards, also on error). Each recipe is then copied into a
fresh project by its own checkout's ``tests/conftest.py`` ``copy_project`` (its
``conf/`` without ``conf/local``, ``pyproject.toml``, the demo images of
``data/01_raw``), plus its own ``src/``, and runs the whole DAG with ``kedro run
--env smoke`` there, as ``bench/scale.py`` runs a pipeline (its ``run_pipeline``:
one process, wall time from start to exit, Kedro and TensorFlow start-up included),
with ``PYTHONPATH`` set to that copy's ``src``. Before timing, ``import
irv2_pipeline`` under that environment must resolve to the copy's ``src``, not the
editable install; the same check imports TensorFlow, so the first timed run does
not pay alone for reading it from a cold disk. The runs go one after the other,
baseline first.

Per recipe, from that run's outputs:

- head val accuracy: ``training_history.csv``, the first stage (head only) at its
  epoch of lowest ``val_loss`` (the new recipe's head is a converged L-BFGS linear
  probe: one row);
- probe val accuracy: ``transferability.csv``, ``probe_val_accuracy`` at
  ``conv_7b`` (feature_shift's linear probe on the pooled features);
- test accuracy and its 95% interval: ``evaluation_metrics.json``;
- the stage whose weights the model kept: ``finetune_stages.csv`` ``selected`` (the
  stage of lowest validation loss); a recipe without that column keeps the last;
- the diagnosis rules that fired (``diagnosis.json``), and the wall time.

Usage::

    python bench/recipe.py [--baseline-ref 6eaa556]

It prints a table, one row per recipe, and as its last line one JSON object with
both recipes' figures, the ratios new / baseline of test accuracy and wall time
(measured in the same run), the baseline ref and both commits, and the core count.
``conf/smoke`` trains from random weights (``model.weights: null``) at 75 px for one
epoch per stage: the figures compare the recipes' mechanics, not transfer learning.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pandas as pd
from scale import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
PROBE_LAYER = "conv_7b"
OUTPUTS = {
    "history": "data/07_model_output/training_history.csv",
    "stages": "data/07_model_output/finetune_stages.csv",
    "transferability": "data/02_intermediate/transferability.csv",
    "metrics": "data/08_reporting/evaluation_metrics.json",
    "diagnosis": "data/08_reporting/diagnosis.json",
}


def git(*args: str) -> str:
    """Runs ``git <args>`` in this checkout; its stripped standard output."""
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()


@contextmanager
def checkout(commit: str, path: Path) -> Iterator[Path]:
    """A ``git worktree add --detach`` of ``commit`` at ``path``, removed afterwards.

    Removed also on error; callers end on SIGTERM through ``sys.exit`` for that.
    """
    git("worktree", "add", "--detach", str(path), commit)
    try:
        yield path
    finally:
        removed = subprocess.run(
            ["git", "worktree", "remove", "--force", str(path)],
            cwd=ROOT,
            capture_output=True,
            check=False,
        )
        if removed.returncode != 0:
            shutil.rmtree(path, ignore_errors=True)
            subprocess.run(["git", "worktree", "prune"], cwd=ROOT, check=False)


def load_conftest(root: Path, label: str) -> ModuleType:
    """The ``tests/conftest.py`` of the checkout at ``root``, as its own module.

    Its ``copy_project`` copies from that checkout (its ``PROJECT_ROOT``).
    """
    spec = importlib.util.spec_from_file_location(
        f"recipe_conftest_{label}", root / "tests" / "conftest.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prepare(root: Path, label: str, workdir: Path) -> Path:
    """A project copy of the checkout at ``root`` with its own ``src``.

    Raises:
        RuntimeError: ``irv2_pipeline`` does not import from the copy's ``src``.
    """
    project = load_conftest(root, label).copy_project(workdir / label)
    shutil.copytree(
        root / "src",
        project / "src",
        dirs_exist_ok=True,
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
    )
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import irv2_pipeline, tensorflow; print(irv2_pipeline.__file__)",
        ],
        cwd=project,
        env={
            **os.environ,
            "PYTHONPATH": str(project / "src"),
            "TF_CPP_MIN_LOG_LEVEL": "2",
        },
        capture_output=True,
        text=True,
        check=False,
    )
    imported = Path(check.stdout.strip().splitlines()[-1]) if check.stdout else None
    if (
        check.returncode != 0
        or imported is None
        or project / "src" not in imported.parents
    ):
        raise RuntimeError(
            f"{label}: irv2_pipeline imports from {imported}, not {project / 'src'}:\n"
            f"{check.stderr[-3000:]}"
        )
    print(f"{label}: irv2_pipeline from {imported}")
    return project


def figures(project: Path) -> dict:
    """The recipe's figures, read from the outputs of its finished run."""
    history = pd.read_csv(project / OUTPUTS["history"])
    head = history[history["stage_index"] == history["stage_index"].min()]
    best = head.loc[head["val_loss"].idxmin()]

    stages = pd.read_csv(project / OUTPUTS["stages"])
    if "selected" in stages.columns and stages["selected"].astype(bool).any():
        kept, rule = stages[stages["selected"].astype(bool)].iloc[0], "lowest val_loss"
    else:
        kept, rule = stages.iloc[-1], "last stage"

    transferability = pd.read_csv(project / OUTPUTS["transferability"])
    probe = transferability.loc[
        transferability["layer"] == PROBE_LAYER, "probe_val_accuracy"
    ]
    metrics = json.loads((project / OUTPUTS["metrics"]).read_text())
    findings = json.loads((project / OUTPUTS["diagnosis"]).read_text())
    if isinstance(findings, dict):  # a wrapped list
        findings = findings.get("findings", [])
    return {
        "head_stage": str(best["stage"]),
        "head_epochs": len(head),
        "head_best_epoch": int(best["epoch"]),
        "head_val_accuracy": round(float(best["val_accuracy"]), 4),
        "head_val_loss": round(float(best["val_loss"]), 4),
        "probe_val_accuracy": round(float(probe.iloc[0]), 4) if len(probe) else None,
        "test_accuracy": round(float(metrics["accuracy"]), 4),
        "test_accuracy_ci95": [round(float(x), 4) for x in metrics["accuracy_ci95"]],
        "n_test": metrics.get("n_test"),
        "stages": stages["stage"].astype(str).tolist(),
        "stage_kept": str(kept["stage"]),
        "stage_kept_by": rule,
        "stage_kept_val_loss": round(float(kept["best_val_loss"]), 4),
        "diagnosis": [
            {"rule": finding["rule"], "severity": finding["severity"]}
            for finding in findings
        ],
    }


def measure(root: Path, label: str, workdir: Path) -> dict:
    """Copies the checkout at ``root``, runs its smoke DAG, reads its figures."""
    project = prepare(root, label, workdir)
    print(f"{label}: kedro run --env smoke in {project} ...", flush=True)
    run = run_pipeline(
        project,
        None,
        workdir / f"{label}.log",
        extra_env={"PYTHONPATH": str(project / "src")},
    )
    print(f"{label}: {run['seconds']} s", flush=True)
    return {
        **figures(project),
        "wall_seconds": run["seconds"],
        "cpu_seconds": run["cpu_seconds"],
        "peak_rss_mb": run["peak_rss_mb"],
    }


def ratio(new: float | None, old: float | None) -> float | None:
    """new / old, rounded; ``None`` when either is missing or old is 0."""
    return round(new / old, 3) if new is not None and old else None


def table(results: dict[str, dict], commits: dict[str, str]) -> None:
    """Prints one row per recipe."""
    print(
        f"\n{'recipe':<9} {'commit':<8} {'head val':>8} {'probe val':>9} "
        f"{'test acc [95% CI]':>22} {'kept':<14} {'wall s':>7}  diagnosis"
    )
    for label, row in results.items():
        low, high = row["test_accuracy_ci95"]
        probe = row["probe_val_accuracy"]
        probe = "-" if probe is None else f"{probe:.3f}"
        test = f"{row['test_accuracy']:.3f} [{low:.3f}, {high:.3f}]"
        print(
            f"{label:<9} {commits[label][:7]:<8} {row['head_val_accuracy']:>8.3f} "
            f"{probe:>9} {test:>22} "
            f"{row['stage_kept']:<14} {row['wall_seconds']:>7.1f}  "
            f"{', '.join(f['rule'] for f in row['diagnosis']) or '-'}"
        )


def main() -> None:
    """Runs both recipes, prints the table and the JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-ref", default="6eaa556")
    args = parser.parse_args()
    # SIGTERM ends the run through the finally below, which removes the worktree.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    commits = {
        "baseline": git("rev-parse", "--verify", f"{args.baseline_ref}^{{commit}}"),
        "current": git("rev-parse", "HEAD"),
    }
    dirty = bool(git("status", "--porcelain", "--", "src", "conf", "pyproject.toml"))
    same_images = (
        subprocess.run(
            ["git", "diff", "--quiet", commits["baseline"], "--", "data/01_raw"],
            cwd=ROOT,
            check=False,
        ).returncode
        == 0
    )
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_recipe_") as tmp:
        workdir = Path(tmp)
        baseline_root = workdir / "baseline_checkout"
        with checkout(commits["baseline"], baseline_root):
            results = {
                "baseline": measure(baseline_root, "baseline", workdir),
                "current": measure(ROOT, "current", workdir),
            }
    load_after = os.getloadavg()[0]

    table(results, commits)
    baseline, current = results["baseline"], results["current"]
    print(
        json.dumps(
            {
                "benchmark": "recipe",
                "env": "smoke",
                "baseline_ref": args.baseline_ref,
                "baseline_commit": commits["baseline"],
                "current_commit": commits["current"],
                # Uncommitted changes to src, conf or pyproject.toml ran too.
                "current_dirty": dirty,
                "demo_images_identical": same_images,
                "recipes": results,
                "ratios": {
                    "test_accuracy_new_over_baseline": ratio(
                        current["test_accuracy"], baseline["test_accuracy"]
                    ),
                    "wall_seconds_new_over_baseline": ratio(
                        current["wall_seconds"], baseline["wall_seconds"]
                    ),
                },
                "cpu_count": os.cpu_count(),
                "sched_affinity_cores": len(os.sched_getaffinity(0)),
                # Other work on the machine slows the wall-clock figures.
                "load_average_1min": [round(load_before, 2), round(load_after, 2)],
            }
        )
    )


if __name__ == "__main__":
    main()
