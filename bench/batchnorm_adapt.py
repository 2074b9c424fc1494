"""Seconds of the AdaBN pass (``bn_policy: adapt``), the backbone run eagerly and traced.

``backbone.adapt_batchnorm`` re-estimates every BatchNorm layer's moving statistics
with one pass of IRv2 in training mode over the training images. Both ways run here
on the same backbone (random weights, restored between them) and the same images,
one after the other in this process:

- eager: ``backbone(images, training=True)`` called op by op, as the pass ran until
  this change (reproduced here; its code is gone from the package);
- traced: the package's pass (``backbone._training_forward``), traced once by
  ``tf.function`` for any batch size; the figure includes the tracing.

It also checks that both leave the same statistics (largest absolute difference)::

    python bench/batchnorm_adapt.py                       # 600 images at 75 px
    python bench/batchnorm_adapt.py --image-size 299 --images 128

It prints a short table and, as the last line, one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from irv2_pipeline import backbone as irv2
from irv2_pipeline.backbone import adapt_batchnorm, batchnorm_layers, load_irv2


def eager_forward(backbone, preprocess):
    """The pass as it ran before: IRv2 called eagerly in training mode."""
    return lambda images: backbone(preprocess(images), training=True)


def statistics(backbone) -> list[np.ndarray]:
    layers = batchnorm_layers(backbone)
    return [np.array(layer.moving_mean) for layer in layers] + [
        np.array(layer.moving_variance) for layer in layers
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=75)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pixels = np.random.default_rng(args.seed).uniform(
        0, 255, (args.images, args.image_size, args.image_size, 3)
    )
    batches = [
        pixels[start : start + args.batch_size].astype("float32")
        for start in range(0, args.images, args.batch_size)
    ]
    backbone = load_irv2(None, args.image_size)
    initial = backbone.get_weights()
    traced_forward = irv2._training_forward
    seconds, kept = {}, {}
    for name, forward in (("eager", eager_forward), ("traced", traced_forward)):
        backbone.set_weights(initial)
        irv2._training_forward = forward
        try:
            started = time.perf_counter()
            adapt_batchnorm(backbone, batches)
            seconds[name] = time.perf_counter() - started
        finally:
            irv2._training_forward = traced_forward
        kept[name] = statistics(backbone)
    difference = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(kept["eager"], kept["traced"], strict=True)
    )
    ratio = seconds["eager"] / seconds["traced"]
    print(f"command          python {' '.join(sys.argv)}")
    print(
        f"pass             {args.images} images at {args.image_size} px, "
        f"batches of {args.batch_size}, IRv2 random weights"
    )
    for name in ("eager", "traced"):
        print(
            f"{name:<16} {seconds[name]:7.1f} s  "
            f"{args.images / seconds[name]:6.1f} img/s"
        )
    print(f"ratio            {ratio:.1f}x faster traced (tracing included)")
    print(f"statistics       largest absolute difference {difference:.3g}")
    print(
        json.dumps(
            {
                "bench": "batchnorm_adapt",
                "image_size": args.image_size,
                "images": args.images,
                "batch_size": args.batch_size,
                "eager_seconds": round(seconds["eager"], 2),
                "traced_seconds": round(seconds["traced"], 2),
                "ratio": round(ratio, 2),
                "largest_statistic_difference": difference,
                "cpu_count": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
