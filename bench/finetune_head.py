"""The head-only stage on cached features against plain ``fit`` of the full model.

Both run the pipeline's own code (``training.run_stages``) on one head-only stage of
E epochs over the demo images (75 px by default), IRv2 with random weights, BN frozen: once with
``cache_head_features`` (the backbone runs once, the head trains on pooled features)
and once without (every epoch runs the frozen backbone through ``fit``). The unit of
cost is one warm backbone pass over the same training and validation images.

Each stage's steady cost leaves out one-off tracing: the plain stage's epochs after the
first, scaled to E; the cached stage's warm feature pass plus its head epochs after the
first, scaled to E. The totals as a user sees them (tracing included) are printed too.

Usage::

    python bench/finetune_head.py                    # E = 10, 60 train + 20 val per class
    python bench/finetune_head.py --image-size 139   # a larger input, the same images

Each epoch of the cached stage has a fixed cost (Keras ``fit`` and its validation)
that does not grow with the images, so the ratio is at its worst for few, small
images, and approaches 1 as the backbone pass grows.

Target: the cached stage costs at most 1.3 backbone passes. The last line
printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import keras
import pandas as pd
from model_inputs import resize_originals, with_sha256

from irv2_pipeline.backbone import load_irv2, set_trainable_from
from irv2_pipeline.classifier import HeadSpec, build_classifier
from irv2_pipeline.pipelines.finetune.cached_head import pooled_features
from irv2_pipeline.pipelines.finetune.checkpoints import CheckpointStore
from irv2_pipeline.pipelines.finetune.examples import split_examples
from irv2_pipeline.pipelines.finetune.stages import Stage
from irv2_pipeline.pipelines.finetune.training import TrainingSettings, run_stages

DEMO_IMAGES = Path(__file__).resolve().parents[1] / "data" / "01_raw" / "images"


def demo_manifest(train_per_class: int, val_per_class: int) -> pd.DataFrame:
    rows = []
    for folder in sorted(DEMO_IMAGES.iterdir()):
        files = sorted(folder.glob("*.png"))[: train_per_class + val_per_class]
        for index, file in enumerate(files):
            split = "train" if index < train_per_class else "val"
            rows.append(
                {
                    "path": f"{folder.name}/{file.name}",
                    "label": folder.name,
                    "split": split,
                }
            )
    return pd.DataFrame(rows)


def steady(seconds: list[float], epochs: int) -> float:
    """E epochs at the median pace of the epochs after the first (tracing)."""
    return statistics.median(seconds[1:]) * epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--train-per-class", type=int, default=60)
    parser.add_argument("--val-per-class", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=75)
    parser.add_argument(
        "--steps-per-execution", type=int, default=32, help="conf/base's: 32"
    )
    args = parser.parse_args()

    manifest = with_sha256(
        demo_manifest(args.train_per_class, args.val_per_class), DEMO_IMAGES
    )
    classes = sorted(manifest["label"].unique())
    stage = Stage("head", None, args.epochs, 1e-3, "frozen", 0, 1e-5)
    keras.utils.set_random_seed(0)
    backbone = load_irv2(None, args.image_size)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        resized = resize_originals(
            manifest, DEMO_IMAGES, Path(scratch) / "resized", args.image_size
        )
        train = split_examples(manifest, resized, classes, "train")
        val = split_examples(manifest, resized, classes, "val")
        for cached in (True, False):
            classifier = build_classifier(backbone, classes, HeadSpec(), seed=0)
            settings = TrainingSettings(
                image_size=args.image_size,
                seed=0,
                batch_size=args.batch_size,
                cache_head_features=cached,
                # Epochs of the optimizer, the way this bench compares; the default
                # L-BFGS head costs one backbone pass and no epochs at all.
                head_solver="minibatch",
                steps_per_execution=args.steps_per_execution,
            )
            started = time.perf_counter()
            state = run_stages(
                classifier,
                [stage],
                train=train,
                val=val,
                settings=settings,
                store=CheckpointStore(scratch, f"cached_{cached}"),
            )
            results[cached] = {
                "total": time.perf_counter() - started,
                "epochs": [row["seconds"] for row in state.history],
                "classifier": classifier,
                "settings": settings,
            }
        # The unit: one warm pass of the frozen backbone over train + val images.
        classifier, settings = results[True]["classifier"], results[True]["settings"]
        set_trainable_from(backbone, None)
        started = time.perf_counter()
        for examples in (train, val):
            pooled_features(
                classifier,
                examples,
                image_size=settings.image_size,
                policy=settings.policy,
                batch_size=args.batch_size,
            )
        one_pass = time.perf_counter() - started

    cached_steady = one_pass + steady(results[True]["epochs"], args.epochs)
    plain_steady = steady(results[False]["epochs"], args.epochs)
    figures = {
        "epochs": args.epochs,
        "steps_per_execution": args.steps_per_execution,
        "image_size": args.image_size,
        "train_images": len(train),
        "val_images": len(val),
        "backbone_pass_s": round(one_pass, 2),
        "cached_stage_s": round(cached_steady, 2),
        "plain_fit_stage_s": round(plain_steady, 2),
        "cached_backbone_passes": round(cached_steady / one_pass, 3),
        "plain_fit_backbone_passes": round(plain_steady / one_pass, 3),
        "speedup": round(plain_steady / cached_steady, 2),
        "cached_total_with_tracing_s": round(results[True]["total"], 1),
        "plain_total_with_tracing_s": round(results[False]["total"], 1),
        "total_speedup_with_tracing": round(
            results[False]["total"] / results[True]["total"], 2
        ),
        "cpu_count": os.cpu_count(),
    }
    print(
        f"head-only stage, E = {args.epochs}, {len(train)} train + {len(val)} val, "
        f"{args.image_size} px"
    )
    print(f"{'':28}{'cached':>10}{'plain fit':>12}")
    print(
        f"{'steady cost (s)':28}{cached_steady:>10.1f}{plain_steady:>12.1f}"
        f"   (one backbone pass: {one_pass:.1f} s)"
    )
    print(
        f"{'backbone passes':28}{figures['cached_backbone_passes']:>10.2f}"
        f"{figures['plain_fit_backbone_passes']:>12.2f}"
    )
    print(
        f"{'total with tracing (s)':28}{results[True]['total']:>10.1f}"
        f"{results[False]['total']:>12.1f}"
    )
    print(
        f"speedup {figures['speedup']}x steady, {figures['total_speedup_with_tracing']}x total"
    )
    print(json.dumps({"bench": "finetune_head", **figures}))


if __name__ == "__main__":
    main()
