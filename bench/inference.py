"""Inference benchmark: a folder streamed through the model vs the same images in memory.

On a copy of the project (``tests/conftest.py``'s ``copy_project``):

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

The start-up of ``kedro registry list`` before and after the fast start is
``bench/startup.py``'s.

Usage::

    python bench/inference.py                    # 1,000 and 5,000 images
    python bench/inference.py --images 200 1000  # a quick run

It prints a table and, as its last line, one JSON object with the figures, the
ratios measured in the same run, and the core count.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scale import run_kedro  # noqa: E402
from synthetic import generate  # noqa: E402

from tests.conftest import copy_project  # noqa: E402

BATCH_SIZE = 16


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


def main() -> None:
    """Runs the smoke DAG, then inference per count, then the in-process comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    counts = sorted(args.images)
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
