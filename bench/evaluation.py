"""Benchmark of the `evaluation` pipeline: test-split prediction and the metrics.

Marks every demo image (``data/01_raw/images``, 240 images) as test and predicts it
with an IRv2 classifier (random weights, ``--size`` px), in one process:

- on a fresh model, the first ``predict_on_batch`` of a full batch (traces the
  graph), a warm call of that shape (median of three), and the first call of half
  a batch, a new shape as a short last batch is: the retrace that
  ``predict_test_split`` avoids by padding the last batch to the full shape;
- ``node_warm``: ``predict_test_split`` on the traced model (streams the images
  through ``inputs.py``), and ``memory_warm``: the same batches from memory,
  alternating for ``--rounds`` rounds (medians, and the per-round ratio: what
  streaming costs over images already in memory).

Then the time of ``score_predictions``'s figures (1,000 bootstrap resamples) for 46
and 10,000 test images. The last line printed is one JSON object with the figures.

Usage::

    python bench/evaluation.py
    python bench/evaluation.py --size 139 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402 - after the log level
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from irv2_pipeline.backbone import load_irv2, preprocessing_layer  # noqa: E402
from irv2_pipeline.datasets import ImageFolder  # noqa: E402
from irv2_pipeline.images import OpenPolicy, load_resized  # noqa: E402
from irv2_pipeline.pipelines.evaluation.metrics import (  # noqa: E402
    classification_metrics,
)
from irv2_pipeline.pipelines.evaluation.nodes import predict_test_split  # noqa: E402

ROOT = Path(__file__).resolve().parents[1] / "data" / "01_raw" / "images"


def classifier(size: int, classes: int) -> keras.Model:
    """IRv2 (random weights) with a softmax head, taking ``[0, 255]`` RGB."""
    pixels = keras.Input((size, size, 3))
    features = load_irv2(None, size)(preprocessing_layer()(pixels), training=False)
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    return keras.Model(pixels, keras.layers.Dense(classes, "softmax")(pooled))


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=75)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    paths = sorted(p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.png"))
    manifest = pd.DataFrame(
        {"path": paths, "label": [p.split("/")[0] for p in paths], "split": "test"}
    )
    classes = sorted(manifest["label"].unique())
    folder = ImageFolder(ROOT)
    policy = OpenPolicy()
    pixels = np.stack(
        [load_resized(ROOT / p, policy, args.size) for p in paths]
    ).astype(np.float32)
    starts = range(0, len(paths), args.batch_size)
    short = [pixels[i : i + args.batch_size] for i in starts]
    padded = [
        np.concatenate([b, np.repeat(b[-1:], args.batch_size - len(b), axis=0)])
        for b in short
    ]
    evaluation = {"batch_size": args.batch_size, "test_time_augmentation": False}

    def node(model: keras.Model) -> None:
        predict_test_split(
            finetuned_model=model,
            class_names=classes,
            image_manifest=manifest,
            raw_images=folder,
            model={"image_size": args.size},
            images={},
            evaluation=evaluation,
        )

    # TensorFlow's one-time start-up costs go to a throwaway model, not to the first
    # calls measured.
    warm_up = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    warm_up.predict_on_batch(np.zeros((2, 4), np.float32))

    # What padding the short last batch saves: on a fresh model, the first call
    # of each batch shape traces the prediction graph; padding keeps one shape.
    model = classifier(args.size, len(classes))
    # Half a batch stands for a short last batch whatever --batch-size divides.
    full, short_last = padded[0], padded[0][: max(1, args.batch_size // 2)]
    seconds = {"first_call_full_batch": timed(lambda: model.predict_on_batch(full))}
    seconds["warm_call_full_batch"] = float(
        np.median([timed(lambda: model.predict_on_batch(full)) for _ in range(3)])
    )
    seconds["first_call_short_batch"] = timed(
        lambda: model.predict_on_batch(short_last)
    )

    # Warm passes on the traced model, alternating; each round gives a ratio.
    warm = {"node_warm": [], "memory_warm": []}
    for _ in range(args.rounds):
        warm["node_warm"].append(timed(lambda: node(model)))
        warm["memory_warm"].append(
            timed(lambda: [model.predict_on_batch(b) for b in padded])
        )
    seconds.update({name: float(np.median(times)) for name, times in warm.items()})
    ratios = np.array(warm["node_warm"]) / np.array(warm["memory_warm"])

    rng = np.random.default_rng(0)
    for n in (46, 10_000):
        probabilities = rng.dirichlet(np.ones(3), size=n)
        truth = rng.integers(0, 3, size=n)
        seconds[f"metrics_{n}"] = timed(
            lambda p=probabilities, t=truth: classification_metrics(
                t, p, top_k=5, calibration_bins_count=15, resamples=1000, seed=0
            )
        )

    images = len(paths)
    print(f"{images} images, {args.size} px, batch {args.batch_size}")
    print(f"{'measurement':<26}{'seconds':>9}{'images/s':>10}")
    for name in (
        "first_call_full_batch",
        "warm_call_full_batch",
        "first_call_short_batch",
    ):
        print(f"{name:<26}{seconds[name]:>9.2f}")
    for name in ("node_warm", "memory_warm"):
        print(f"{name:<26}{seconds[name]:>9.2f}{images / seconds[name]:>10.1f}")
    for n in (46, 10_000):
        print(f"{f'metrics, {n} images':<26}{seconds[f'metrics_{n}']:>9.2f}")
    figures = {
        "images": images,
        "image_size": args.size,
        "batch_size": args.batch_size,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "streaming_over_memory_median": round(float(np.median(ratios)), 3),
        "streaming_over_memory_range": [
            round(float(ratios.min()), 3),
            round(float(ratios.max()), 3),
        ],
        "retrace_over_warm_batch": round(
            seconds["first_call_short_batch"] / seconds["warm_call_full_batch"], 1
        ),
        "cores": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
