"""Images per second of the finetune pipeline's exact model and training step.

The model is what ``finetune`` trains: ``[0, 255]`` RGB -> IRv2's preprocessing ->
InceptionResNetV2 (random weights) -> pooling -> head, trained as one stage of the
pipeline trains it (``classifier.training_model`` with the stage's BatchNorm policy,
``LayerwiseAdamW`` with the warm-up + cosine schedule, label-smoothed cross-entropy,
``fit``). The data are synthetic arrays in memory, so the figure is the model's and
the step's, not the input pipeline's (``bench/input_pipeline.py`` measures that).

Only Keras is used here, so it runs on any backend::

    python bench/train_step.py                                   # TensorFlow, CPU
    KERAS_BACKEND=jax python bench/train_step.py --image-size 299 --batch-size 64 \\
        --precision mixed_bfloat16 --jit                         # a GPU box

It prints a short table and, as the last line, one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import keras
import numpy as np

from irv2_pipeline.backbone import load_irv2, set_trainable_from
from irv2_pipeline.classifier import HeadSpec, build_classifier, training_model
from irv2_pipeline.pipelines.finetune.optimizer import (
    layerwise_multipliers,
    make_optimizer,
    warmup_cosine,
)

CLASSES = 10


def build_trainee(
    backbone: keras.Model,
    unfreeze_from: str | None,
    bn_policy: str,
    jit: bool,
) -> keras.Model:
    """The model one stage trains, compiled as ``finetune`` compiles it."""
    classifier = build_classifier(
        backbone, [f"class_{i}" for i in range(CLASSES)], HeadSpec(), seed=0
    )
    set_trainable_from(backbone, unfreeze_from)
    trainee = training_model(classifier, bn_policy)
    optimizer = make_optimizer(
        "adamw",
        warmup_cosine(1e-4, 10, 1, 100, 0.0),
        1e-5,
        layerwise_multipliers(backbone, 0.8),
    )
    trainee.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=0.1),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        jit_compile=jit,
    )
    optimizer.build(trainee.trainable_variables)
    return trainee


def measure(
    trainee: keras.Model, batch_size: int, warmup_steps: int, steps: int
) -> dict[str, float]:
    """Trains ``warmup_steps`` (tracing, compiling), then times ``steps`` more."""
    size = trainee.input_shape[1]
    rng = np.random.default_rng(0)
    count = batch_size * max(steps, warmup_steps)
    pixels = rng.integers(0, 256, (count, size, size, 3)).astype("float32")
    labels = np.eye(CLASSES, dtype="float32")[rng.integers(0, CLASSES, count)]
    started = time.perf_counter()
    trainee.fit(
        pixels[: batch_size * warmup_steps],
        labels[: batch_size * warmup_steps],
        batch_size=batch_size,
        epochs=1,
        verbose=0,
    )
    warmup = time.perf_counter() - started
    started = time.perf_counter()
    trainee.fit(
        pixels[: batch_size * steps],
        labels[: batch_size * steps],
        batch_size=batch_size,
        epochs=1,
        verbose=0,
        shuffle=False,
    )
    seconds = time.perf_counter() - started
    return {
        "images_per_second": batch_size * steps / seconds,
        "seconds_per_step": seconds / steps,
        "warmup_seconds": warmup,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=75)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--unfreeze-from", default="block8_1")
    parser.add_argument("--bn-policy", default="frozen")
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--jit", action="store_true")
    args = parser.parse_args()
    unfreeze_from = None if args.unfreeze_from == "none" else args.unfreeze_from

    keras.config.set_dtype_policy(args.precision)
    trainee = build_trainee(
        load_irv2(None, args.image_size), unfreeze_from, args.bn_policy, args.jit
    )
    figures = measure(trainee, args.batch_size, args.warmup_steps, args.steps)
    trainable = sum(int(np.prod(w.shape)) for w in trainee.trainable_weights)
    devices = [str(d) for d in keras.distribution.list_devices()]
    print(f"backend        {keras.backend.backend()}")
    print(f"devices        {', '.join(devices)}")
    print(
        f"model          IRv2 {args.image_size} px from {unfreeze_from}, BN {args.bn_policy}"
    )
    print(f"trainable      {trainable:,} parameters")
    print(f"precision      {args.precision}, XLA {args.jit}")
    print(f"batch x steps  {args.batch_size} x {args.steps}")
    print(f"images/s       {figures['images_per_second']:.1f}")
    print(f"s/step         {figures['seconds_per_step']:.3f}")
    print(f"warm-up        {figures['warmup_seconds']:.1f} s (tracing, compiling)")
    print(
        json.dumps(
            {
                "bench": "train_step",
                "backend": keras.backend.backend(),
                "devices": devices,
                "image_size": args.image_size,
                "batch_size": args.batch_size,
                "steps": args.steps,
                "unfreeze_from": unfreeze_from,
                "bn_policy": args.bn_policy,
                "precision": args.precision,
                "jit": args.jit,
                "trainable_params": trainable,
                **{k: round(v, 4) for k, v in figures.items()},
                "cpu_count": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
