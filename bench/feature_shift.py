"""Benchmark of the `feature_shift` pass: in-graph BN moments vs a plain predict.

Writes ``--images`` random-textured ``--size`` px JPEGs to a temporary folder, builds
IRv2 once (random weights unless ``--weights`` names a file) and times, side by side
over the same files, the same ``inputs.image_dataset`` batches and batch size:

- ``plain predict``: ``model.predict`` of preprocessing + IRv2 (what a user would run);
- ``plain loop``: the same model through ``predict_on_batch`` in a Python loop, the
  loop structure of the pass (so the two ratios separate the moments' cost from the
  loop's);
- ``moment pass``: ``moments.run_pass`` of the probe: every BN layer's input moments
  and the pooled features at four depths, accumulated on the host;
- ``bootstrap pass``: the same with ``--resamples`` Poisson bootstrap resamples of
  the images accumulated too, as feature_shift measures the training split.

Each method runs once untimed (tracing), then ``--repeats`` times in turn. On a shared
machine wall times swing with other processes, so the table gives the fastest and the
median wall time and the median CPU time of this process (all its threads); the
headline ratio is of the fastest runs. Target: the pass at most 1.25x a
plain predict.

Usage::

    python bench/feature_shift.py                          # 96 images at 139 px
    python bench/feature_shift.py --images 512 --size 299 --batch 64

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
from PIL import Image

from irv2_pipeline.backbone import load_irv2, preprocessing_layer
from irv2_pipeline.images import OpenPolicy
from irv2_pipeline.inputs import image_dataset
from irv2_pipeline.pipelines.feature_shift.moments import build_probe, run_pass

DEPTHS = ("mixed_5b", "mixed_6a", "mixed_7a", "conv_7b")
logger = logging.getLogger("bench.feature_shift")


def write_textures(folder: Path, count: int, size: int) -> list[Path]:
    """Writes ``count`` seeded smooth-plus-grain RGB JPEGs and returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        rng = np.random.default_rng(index)
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        smooth = np.asarray(
            Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC),
            dtype=np.int16,
        )
        grain = rng.integers(-24, 25, (size, size, 3), dtype=np.int16)
        path = folder / f"texture_{index:05d}.jpg"
        Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(
            path, "JPEG", quality=90
        )
        paths.append(path)
    return paths


def main() -> None:
    """Builds the models, times the three methods, prints the table and JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--size", type=int, default=139)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--weights", default=None, help="weights file; default random")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--resamples",
        type=int,
        default=100,
        help="bootstrap resamples of the bootstrap pass (conf/base: 100)",
    )
    args = parser.parse_args()

    keras.utils.set_random_seed(args.seed)
    backbone = load_irv2(args.weights, args.size)
    images = keras.Input((args.size, args.size, 3))
    plain = keras.Model(images, backbone(preprocessing_layer()(images)))
    probe, layout = build_probe(backbone, DEPTHS)

    with tempfile.TemporaryDirectory(prefix="bench_feature_shift_") as tmp:
        paths = write_textures(Path(tmp), args.images, args.size)

        def batches():
            return image_dataset(
                paths,
                None,
                image_size=args.size,
                batch_size=args.batch,
                policy=OpenPolicy(),
            )

        def plain_predict() -> None:
            plain.predict(batches(), verbose=0)

        def plain_loop() -> None:
            for batch in batches().as_numpy_iterator():
                plain.predict_on_batch(batch)

        def moment_pass(resamples: int = 0) -> None:
            run_pass(
                probe,
                layout,
                batches(),
                batch_size=args.batch,
                n_images=len(paths),
                what="bench",
                logger=logger,
                resamples=resamples,
                seed=args.seed,
            )

        methods = {
            "plain predict": plain_predict,
            "plain loop": plain_loop,
            "moment pass": moment_pass,
            "bootstrap pass": lambda: moment_pass(args.resamples),
        }
        traced = {}
        for name, method in methods.items():
            start = time.perf_counter()
            method()
            traced[name] = time.perf_counter() - start
        wall: dict[str, list[float]] = {name: [] for name in methods}
        cpu: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(args.repeats):
            for name, method in methods.items():
                start, start_cpu = time.perf_counter(), time.process_time()
                method()
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)

    fastest = {name: min(values) for name, values in wall.items()}
    median = {name: statistics.median(values) for name, values in wall.items()}
    median_cpu = {name: statistics.median(values) for name, values in cpu.items()}
    print(
        f"{args.images} images, {args.size} px, batch {args.batch}, "
        f"{args.repeats} repeats, {os.cpu_count()} cores"
    )
    print(
        f"{'method':<14} {'fastest s':>9} {'median s':>9} {'cpu s':>7} "
        f"{'images/s':>9} {'vs predict':>11} {'cpu vs':>7} {'trace s':>8}"
    )
    for name in methods:
        print(
            f"{name:<14} {fastest[name]:>9.2f} {median[name]:>9.2f} "
            f"{median_cpu[name]:>7.1f} {args.images / fastest[name]:>9.1f} "
            f"{fastest[name] / fastest['plain predict']:>10.2f}x "
            f"{median_cpu[name] / median_cpu['plain predict']:>6.2f}x "
            f"{traced[name]:>8.1f}"
        )
    print(
        json.dumps(
            {
                "benchmark": "feature_shift_pass",
                "images": args.images,
                "size_px": args.size,
                "batch": args.batch,
                "repeats": args.repeats,
                "weights": args.weights,
                "wall_seconds": {
                    name: [round(value, 3) for value in values]
                    for name, values in wall.items()
                },
                "cpu_seconds": {
                    name: [round(value, 3) for value in values]
                    for name, values in cpu.items()
                },
                "trace_seconds": {
                    name: round(value, 1) for name, value in traced.items()
                },
                "pass_vs_predict": round(
                    fastest["moment pass"] / fastest["plain predict"], 3
                ),
                "pass_vs_predict_median": round(
                    median["moment pass"] / median["plain predict"], 3
                ),
                "pass_vs_predict_cpu": round(
                    median_cpu["moment pass"] / median_cpu["plain predict"], 3
                ),
                "pass_vs_loop": round(
                    fastest["moment pass"] / fastest["plain loop"], 3
                ),
                "resamples": args.resamples,
                "bootstrap_vs_pass": round(
                    fastest["bootstrap pass"] / fastest["moment pass"], 3
                ),
                "bootstrap_vs_pass_cpu": round(
                    median_cpu["bootstrap pass"] / median_cpu["moment pass"], 3
                ),
                "cpu_count": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
