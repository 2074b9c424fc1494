"""Benchmark of ``predict.probabilities_and_features``: a first call against a second.

The model is the classifier ``finetune`` builds (``classifier.build_classifier``, IRv2
with random weights, ``--size`` px), over the first ``--images`` demo images
(``data/01_raw/images``), read from the files as the evaluation and inference nodes
read them. Side by side in one process, on one model object:

- ``first_call``: the first call, which builds the two-output view of the model
  (probabilities and pooled features) and traces its prediction graph;
- ``second_call``: the same call again, which reuses that view and its graph.

Their difference is what building and tracing the view costs, which every later call
on the same model object saves (a notebook or a service that keeps its model). In a
``kedro run`` each node loads the model file anew, so each node pays it once.
TensorFlow's one-time start-up goes to a throwaway model first. The last line
printed is one JSON object with the figures.

Usage::

    python bench/predict_reuse.py
    python bench/predict_reuse.py --images 240 --size 139
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

from irv2_pipeline.backbone import load_irv2  # noqa: E402
from irv2_pipeline.classifier import HeadSpec, build_classifier  # noqa: E402
from irv2_pipeline.images import OpenPolicy  # noqa: E402
from irv2_pipeline.predict import probabilities_and_features  # noqa: E402

ROOT = Path(__file__).resolve().parents[1] / "data" / "01_raw" / "images"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=75)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    paths = sorted(ROOT.rglob("*.png"))[: args.images]
    names = sorted({path.parent.name for path in sorted(ROOT.rglob("*.png"))})
    model = build_classifier(load_irv2(None, args.size), names, HeadSpec(), 0).model

    def call() -> tuple[float, np.ndarray]:
        started = time.perf_counter()
        outputs = probabilities_and_features(
            model,
            names,
            paths,
            image_size=args.size,
            policy=OpenPolicy(),
            batch_size=args.batch_size,
        )
        return time.perf_counter() - started, outputs.probabilities

    warm_up = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    warm_up.predict_on_batch(np.zeros((2, 4), np.float32))

    first, first_probabilities = call()
    second, second_probabilities = call()
    same = bool(np.array_equal(first_probabilities, second_probabilities))

    print(f"{len(paths)} images, {args.size} px, batch {args.batch_size}")
    print(f"{'call':<14}{'seconds':>9}")
    print(f"{'first_call':<14}{first:>9.2f}")
    print(f"{'second_call':<14}{second:>9.2f}")
    print(f"first / second = {first / second:.1f}x, same probabilities: {same}")
    figures = {
        "images": len(paths),
        "image_size": args.size,
        "batch_size": args.batch_size,
        "seconds": {"first_call": round(first, 3), "second_call": round(second, 3)},
        "first_over_second": round(first / second, 2),
        "same_probabilities": same,
        "cores": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
