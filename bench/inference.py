"""Inference benchmark: memory on large folders, and reference features reused vs not.

Two modes. The default, memory and streaming, on a copy of the project
(``tests/conftest.py``'s ``copy_project``):

1. ``kedro run --env smoke`` once: the demo model (IRv2, random weights, 75 px).
2. For each ``--images`` count (default 1,000 and 5,000): ``data/01_raw/new_images``
   holds that many ``--size`` px photo-like JPEGs (``bench/synthetic.py``), and
   ``kedro run --env smoke --pipeline inference`` runs as its own process, measured
   as ``bench/scale.py`` measures a command (wall time, peak RSS of the largest
   process). Memory must not grow with the folder: the images are streamed.
3. In this process, on the smaller folder, the saved model predicts the images two
   ways, side by side with the same batch size: streamed from the files through
   ``inputs.image_dataset`` (what the ``inference`` pipeline does), and from one array
   decoded beforehand (the images held in memory). A warm-up batch is run first, so
   neither pays for tracing.

``--reuse``: ``kedro run --env smoke --pipeline inference`` on ``--images`` new images
(default 1,000), three ways side by side, each its own process, after one
``kedro run --env smoke`` in each checkout's project copy:

- ``baseline``: the code at ``--baseline-ref`` (default ``a65914c``, which embedded
  the training and validation images on every inference run), checked out with
  ``git worktree add --detach`` as ``bench/recipe.py`` does, in its own project copy
  with its own ``src`` on ``PYTHONPATH``, with the model of its own smoke run (the
  same network, images and parameters: its code cannot read a model this one saves);
- ``recomputed``: this checkout with ``reference_features.npz`` deleted before the
  run, so it embeds them again (and stores them);
- ``reused``: this checkout with the stored file, as after ``kedro run``.

Every side predicts in batches of ``--batch-size`` (default 16, the smoke batch of
a65914c; conf/base's is 64; several sizes: every side at each in every round),
passed to each run as ``--params``, so the sides differ by their code only.
``--repeats`` rounds (default 3), the order of the three rotating from round to round;
the median run of each side is reported, with its nodes' wall seconds from
``node_timings.csv`` and the seconds outside the nodes (start-up, TensorFlow's import,
loading the model, saving). Each run's log must say that the features were reused or
computed, as the side expects, and the two sides of this checkout must write the same
``predictions.csv``; the baseline's (of its own model) are compared too.

The start-up of ``kedro registry list`` before and after the fast start is
``bench/startup.py``'s.

Usage::

    python bench/inference.py                    # 1,000 and 5,000 images
    python bench/inference.py --images 200 1000  # a quick run
    python bench/inference.py --reuse            # 1,000 images, 3 rounds
    python bench/inference.py --reuse --batch-size 16 64 --repeats 2
    python bench/inference.py --reuse --repeats 1 --baseline-ref a65914c

It prints a table and, as its last line, one JSON object with the figures, the
ratios measured in the same run, and the core count.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recipe import checkout, git, prepare  # noqa: E402
from scale import run_kedro  # noqa: E402
from synthetic import generate  # noqa: E402

from tests.conftest import copy_project  # noqa: E402

BATCH_SIZE = 16
REFERENCE = Path("data/07_model_output/reference_features.npz")
PREDICTIONS = Path("data/07_model_output/predictions.csv")
TIMINGS = Path("data/08_reporting/node_timings.csv")
SIDES = ("baseline", "recomputed", "reused")
# What each side's log must say about the reference features (the baseline's code
# does not log either: it embedded them on every run).
EXPECTED_LOG = {
    "recomputed": "Reference features computed",
    "reused": "Reference features reused",
}


def folder_run(project: Path, count: int, size: int, logs: Path) -> dict:
    """``kedro run --pipeline inference`` over ``count`` new images."""
    folder = project / "data" / "01_raw" / "new_images"
    shutil.rmtree(folder, ignore_errors=True)
    generate(folder, count, size)
    run = run_kedro(
        ["run", "--env", "smoke", "--pipeline", "inference"],
        project,
        logs / f"inference_{count}.log",
    )
    predictions = pd.read_csv(project / "data/07_model_output/predictions.csv")
    if len(predictions) != count:
        raise RuntimeError(f"{len(predictions)} predictions for {count} images")
    return {
        "images": count,
        "wall_seconds": round(run["seconds"], 1),
        "images_per_second": round(count / run["seconds"], 1),
        "peak_rss_mb": run["peak_rss_mb"],
    }


def streamed_vs_memory(project: Path) -> dict:
    """img/s of the saved model on the folder's images: streamed vs from memory."""
    from irv2_pipeline.datasets.atomic_model import (  # noqa: PLC0415
        AtomicTensorFlowModelDataset,
    )
    from irv2_pipeline.images import OpenPolicy, load_resized  # noqa: PLC0415
    from irv2_pipeline.inputs import image_dataset  # noqa: PLC0415
    from irv2_pipeline.predict import predict_padded  # noqa: PLC0415

    # As the catalog loads it: the dataset registers the model's preprocessing layer.
    model = AtomicTensorFlowModelDataset(
        filepath=str(project / "data/06_models/finetuned_model.keras")
    ).load()
    size = int(model.input_shape[1])
    paths = sorted(str(p) for p in (project / "data/01_raw/new_images").rglob("*.jpg"))
    warm = np.zeros((BATCH_SIZE, size, size, 3), np.float32)
    predict_padded(model, warm, BATCH_SIZE)

    started = time.perf_counter()
    streamed = image_dataset(
        paths, None, image_size=size, batch_size=BATCH_SIZE, policy=OpenPolicy()
    )
    for batch in streamed.as_numpy_iterator():
        predict_padded(model, batch, BATCH_SIZE)
    streamed_seconds = time.perf_counter() - started

    pixels = np.stack(
        [load_resized(path, OpenPolicy(), size) for path in paths]
    ).astype(np.float32)
    started = time.perf_counter()
    for first in range(0, len(pixels), BATCH_SIZE):
        predict_padded(model, pixels[first : first + BATCH_SIZE], BATCH_SIZE)
    memory_seconds = time.perf_counter() - started
    return {
        "images": len(paths),
        "streamed_images_per_second": round(len(paths) / streamed_seconds, 1),
        "memory_images_per_second": round(len(paths) / memory_seconds, 1),
        "streamed_over_memory": round(memory_seconds / streamed_seconds, 3),
    }


def reuse_run(  # noqa: PLR0913 - the side, where, and how it runs
    side: str, project: Path, logs: Path, index: int, batch_size: int
) -> dict:
    """One inference run of ``side``: wall time, peak RSS, node seconds, predictions."""
    if side == "recomputed":
        (project / REFERENCE).unlink(missing_ok=True)
    log = logs / f"{side}_{batch_size}_{index}.log"
    # The same batch on every side, whatever each side's conf/smoke says.
    batches = f"inference.batch_size={batch_size},evaluation.batch_size={batch_size}"
    run = run_kedro(
        ["run", "--env", "smoke", "--pipeline", "inference", "--params", batches],
        project,
        log,
        {"PYTHONPATH": str(project / "src")},
    )
    text = log.read_text()
    expected = EXPECTED_LOG.get(side)
    others = [line for name, line in EXPECTED_LOG.items() if name != side]
    if expected is not None and (expected not in text or others[0] in text):
        raise RuntimeError(f"{side}: the log of {log} does not say {expected!r}")
    timings = pd.read_csv(project / TIMINGS)
    nodes = {row.node: round(row.wall_s, 2) for row in timings.itertuples()}
    return {
        "wall_seconds": round(run["seconds"], 1),
        "peak_rss_mb": run["peak_rss_mb"],
        "nodes": nodes,
        "outside_nodes_seconds": round(run["seconds"] - sum(nodes.values()), 1),
        "predictions": pd.read_csv(project / PREDICTIONS),
    }


def median_of(runs: list[dict]) -> dict:
    """The run of median wall time, without its predictions, plus every wall time."""
    middle = sorted(runs, key=lambda run: run["wall_seconds"])[(len(runs) - 1) // 2]
    summary = {k: v for k, v in middle.items() if k != "predictions"}
    summary["wall_seconds_all"] = [run["wall_seconds"] for run in runs]
    return summary


def same_predictions(reused: pd.DataFrame, other: pd.DataFrame) -> dict:
    """How far another side's predictions are from the reused side's."""
    numbers = reused.select_dtypes("number").columns
    return {
        "identical": bool(reused.equals(other)),
        "same_predicted": bool((reused["predicted"] == other["predicted"]).all()),
        "same_ood_flags": bool((reused["ood_flag"] == other["ood_flag"]).all()),
        "max_abs_difference": float(
            (reused[numbers] - other[numbers]).abs().to_numpy().max()
        ),
    }


def reuse_main(args: argparse.Namespace) -> None:
    """Baseline, recomputed and reused inference runs, side by side."""
    # SIGTERM ends the run through checkout's cleanup, which removes the worktree.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    count = args.images[0] if args.images else 1000
    commits = {
        "baseline": git("rev-parse", "--verify", f"{args.baseline_ref}^{{commit}}"),
        "current": git("rev-parse", "HEAD"),
    }
    dirty = bool(git("status", "--porcelain", "--", "src", "conf", "pyproject.toml"))
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_inference_reuse_") as tmp:
        workdir = Path(tmp)
        logs = workdir / "logs"
        logs.mkdir()
        with checkout(commits["baseline"], workdir / "baseline_checkout") as old:
            projects = {
                "baseline": prepare(old, "baseline", workdir),
                "current": prepare(ROOT, "current", workdir),
            }
        current = projects["current"]
        print("kedro run --env smoke (the demo model, this checkout) ...", flush=True)
        run_kedro(
            ["run", "--env", "smoke"],
            current,
            logs / "smoke.log",
            {"PYTHONPATH": str(current / "src")},
        )
        if not (current / REFERENCE).is_file():
            raise RuntimeError("the smoke run stored no reference features")
        # The baseline trains its own model of the same network on the same images:
        # its code cannot read a model saved by this one (the preprocessing layer
        # took the grayscale rule later).
        print("kedro run --env smoke (the baseline's model) ...", flush=True)
        run_kedro(
            ["run", "--env", "smoke"],
            projects["baseline"],
            logs / "smoke_baseline.log",
            {"PYTHONPATH": str(projects["baseline"] / "src")},
        )
        for project in projects.values():
            folder = project / "data" / "01_raw" / "new_images"
            shutil.rmtree(folder, ignore_errors=True)
            generate(folder, count, args.size)
        where = {
            "baseline": projects["baseline"],
            "recomputed": current,
            "reused": current,
        }
        batches = args.batch_size
        runs: dict[tuple[int, str], list[dict]] = {
            (batch, side): [] for batch in batches for side in SIDES
        }
        for index in range(args.repeats):
            order = SIDES[index % 3 :] + SIDES[: index % 3]
            for batch in batches:
                for side in order:
                    print(f"round {index + 1}, batch {batch}: {side} ...", flush=True)
                    runs[batch, side].append(
                        reuse_run(side, where[side], logs, index, batch)
                    )
        agreement = {}
        for batch in batches:
            reused = runs[batch, "reused"][0]["predictions"]
            agreement[batch] = {
                side: same_predictions(reused, runs[batch, side][0]["predictions"])
                for side in ("recomputed", "baseline")
            }
            if not agreement[batch]["recomputed"]["identical"]:
                raise RuntimeError(
                    f"batch {batch}: recomputed and reused features predicted "
                    "differently"
                )
        # The same model in other batches: float rounding only.
        across_batches = {
            batch: same_predictions(
                runs[batches[0], "reused"][0]["predictions"],
                runs[batch, "reused"][0]["predictions"],
            )
            for batch in batches[1:]
        }
    load_after = os.getloadavg()[0]
    results = {
        batch: {side: median_of(runs[batch, side]) for side in SIDES}
        for batch in batches
    }
    for batch in batches:
        reuse_table(results[batch], count, batch)

    def ratio(batch: int, side: str) -> float:
        return round(
            results[batch][side]["wall_seconds"]
            / results[batch]["reused"]["wall_seconds"],
            3,
        )

    print(
        json.dumps(
            {
                "benchmark": "inference_reuse",
                "images": count,
                "image_size": args.size,
                "repeats": args.repeats,
                "results": results,
                "ratios": {
                    batch: {
                        "baseline_over_reused": ratio(batch, "baseline"),
                        "recomputed_over_reused": ratio(batch, "recomputed"),
                    }
                    for batch in batches
                },
                "reused_over_batch": {
                    batch: round(
                        results[batch]["reused"]["wall_seconds"]
                        / results[batches[0]]["reused"]["wall_seconds"],
                        3,
                    )
                    for batch in batches[1:]
                },
                "predictions_against_reused": agreement,
                "reused_predictions_against_first_batch": across_batches,
                "commits": commits,
                "uncommitted_changes": dirty,
                "cores": os.cpu_count(),
                "sched_affinity_cores": len(os.sched_getaffinity(0)),
                # Other work on the machine slows the wall-clock figures.
                "load_average_1min": [round(load_before, 2), round(load_after, 2)],
            }
        )
    )


def reuse_table(results: dict, count: int, batch: int) -> None:
    """The three sides' medians, and their nodes' wall seconds."""
    print(
        f"\nkedro run --env smoke --pipeline inference on {count} new images, "
        f"batch {batch}"
    )
    print(f"{'side':<12} {'wall s':>8} {'outside nodes s':>16} {'peak RSS MB':>12}")
    for side, result in results.items():
        print(
            f"{side:<12} {result['wall_seconds']:>8} "
            f"{result['outside_nodes_seconds']:>16} {result['peak_rss_mb']:>12}"
        )
    names = sorted({name for result in results.values() for name in result["nodes"]})
    print(f"\n{'node (wall s)':<28}" + "".join(f"{side:>12}" for side in results))
    for name in names:
        cells = "".join(
            f"{result['nodes'].get(name, '-'):>12}" for result in results.values()
        )
        print(f"{name:<28}{cells}")


def main() -> None:
    """Runs the smoke DAG, then inference per count, then the in-process comparison
    (or, with ``--reuse``, the three inference runs side by side)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=None)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--baseline-ref", default="a65914c")
    parser.add_argument("--repeats", type=int, default=3)
    # --reuse: every side predicts in batches of this many (16: the smoke batch of
    # a65914c; 64: conf/base's); several: each in every round.
    parser.add_argument("--batch-size", type=int, nargs="+", default=[16])
    args = parser.parse_args()
    if args.reuse:
        reuse_main(args)
        return
    counts = sorted(args.images or [1000, 5000])
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as tmp:
        workdir = Path(tmp)
        project = copy_project(workdir / "project")
        logs = workdir / "logs"
        logs.mkdir()
        print("kedro run --env smoke (the demo model) ...", flush=True)
        run_kedro(["run", "--env", "smoke"], project, logs / "smoke.log")
        runs = [folder_run(project, count, args.size, logs) for count in counts]
        # The smallest folder again, for the in-process comparison.
        folder_run(project, counts[0], args.size, logs)
        speed = streamed_vs_memory(project)

    print(f"\n{'images':>8} {'wall s':>8} {'img/s':>8} {'peak RSS MB':>12}")
    for run in runs:
        print(
            f"{run['images']:>8} {run['wall_seconds']:>8} "
            f"{run['images_per_second']:>8} {run['peak_rss_mb']:>12}"
        )
    print(
        f"\nsaved model on {speed['images']} images, batch {BATCH_SIZE}: streamed "
        f"{speed['streamed_images_per_second']} img/s, from memory "
        f"{speed['memory_images_per_second']} img/s "
        f"(streamed / memory {speed['streamed_over_memory']})"
    )
    figures = {
        "benchmark": "inference",
        "runs": runs,
        "rss_growth_mb": round(runs[-1]["peak_rss_mb"] - runs[0]["peak_rss_mb"], 1),
        "rss_ratio_largest_over_smallest": round(
            runs[-1]["peak_rss_mb"] / runs[0]["peak_rss_mb"], 3
        ),
        "speed": speed,
        "image_size": args.size,
        "cores": os.cpu_count(),
        "sched_affinity_cores": len(os.sched_getaffinity(0)),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
