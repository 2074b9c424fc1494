"""A training epoch fed by ``inputs.py`` against ``fit`` on the same images in memory.

The model and step are the finetune pipeline's for its second smoke stage: IRv2
(random weights, 75 px) unfrozen from ``block8_1``, BatchNorm frozen, AdamW. Side by
side in one process, on the same compiled model, after one warm-up epoch of each:

- ``inputs.py``: ``inputs.image_dataset`` (decode through ``images.load_image``,
  resize, batch, prefetch, shuffled with a seed) as ``finetune`` feeds ``fit``;
- in memory: the very same pixels, decoded beforehand into one float32 array, fed
  to ``fit`` as arrays.

Usage::

    python bench/input_pipeline.py             # 60 demo images per class, 3 epochs each

Target (issue 5): the ``inputs.py`` epoch within 10% of the in-memory one (the input
pipeline is not the bottleneck). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from irv2_pipeline.backbone import load_irv2, set_trainable_from
from irv2_pipeline.classifier import HeadSpec, build_classifier, training_model
from irv2_pipeline.images import OpenPolicy
from irv2_pipeline.inputs import image_dataset
from irv2_pipeline.pipelines.finetune.optimizer import (
    layerwise_multipliers,
    make_optimizer,
    warmup_cosine,
)

DEMO_IMAGES = Path(__file__).resolve().parents[1] / "data" / "01_raw" / "images"
IMAGE_SIZE = 75


def demo_images(per_class: int) -> tuple[list[str], np.ndarray, list[str]]:
    classes = sorted(p.name for p in DEMO_IMAGES.iterdir() if p.is_dir())
    paths, labels = [], []
    for index, label in enumerate(classes):
        files = sorted((DEMO_IMAGES / label).glob("*.png"))[:per_class]
        paths += [str(f) for f in files]
        labels += [index] * len(files)
    return paths, np.asarray(labels, dtype=np.int32), classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    paths, labels, classes = demo_images(args.per_class)
    keras.utils.set_random_seed(0)
    backbone = load_irv2(None, IMAGE_SIZE)
    classifier = build_classifier(backbone, classes, HeadSpec(), seed=0)
    set_trainable_from(backbone, "block8_1")
    trainee = training_model(classifier, "frozen")
    optimizer = make_optimizer(
        "adamw",
        warmup_cosine(1e-4, 10, 0, 100, 0.0),
        1e-5,
        layerwise_multipliers(backbone, 1.0),
    )
    trainee.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=0.1),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )
    optimizer.build(trainee.trainable_variables)

    def pipeline(seed: int) -> tf.data.Dataset:
        return image_dataset(
            paths,
            labels,
            image_size=IMAGE_SIZE,
            batch_size=args.batch_size,
            policy=OpenPolicy(),
            shuffle_seed=seed,
        ).map(lambda x, y: (x, tf.one_hot(y, len(classes))))

    pixels = np.concatenate(
        [
            batch.numpy()
            for batch in image_dataset(
                paths,
                None,
                image_size=IMAGE_SIZE,
                batch_size=64,
                policy=OpenPolicy(),
            )
        ]
    )
    one_hot = np.eye(len(classes), dtype="float32")[labels]

    def epoch(kind: str, seed: int) -> float:
        started = time.perf_counter()
        if kind == "inputs.py":
            trainee.fit(pipeline(seed), epochs=1, verbose=0, shuffle=False)
        else:
            trainee.fit(
                pixels, one_hot, batch_size=args.batch_size, epochs=1, verbose=0
            )
        return time.perf_counter() - started

    warmup = {kind: epoch(kind, 0) for kind in ("inputs.py", "in memory")}
    times: dict[str, list[float]] = {"inputs.py": [], "in memory": []}
    for index in range(args.epochs):  # alternate, so load changes hit both alike
        for kind, values in times.items():
            values.append(epoch(kind, index + 1))
    median = {kind: statistics.median(values) for kind, values in times.items()}
    ratio = median["inputs.py"] / median["in memory"]
    print(
        f"one training epoch, {len(paths)} images, batch {args.batch_size}, IRv2 75 px"
    )
    print(f"{'':12}{'median s':>10}{'images/s':>10}{'warm-up s':>11}")
    for kind, value in median.items():
        print(
            f"{kind:12}{value:>10.2f}{len(paths) / value:>10.1f}{warmup[kind]:>11.1f}"
        )
    print(f"inputs.py / in memory = {ratio:.3f}")
    print(
        json.dumps(
            {
                "bench": "input_pipeline",
                "images": len(paths),
                "batch_size": args.batch_size,
                "epochs_each": args.epochs,
                "inputs_py_epoch_s": round(median["inputs.py"], 3),
                "in_memory_epoch_s": round(median["in memory"], 3),
                "ratio_inputs_py_to_in_memory": round(ratio, 4),
                "epoch_times_s": {
                    k: [round(t, 3) for t in v] for k, v in times.items()
                },
                "cpu_count": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
