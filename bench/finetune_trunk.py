"""A backbone stage on the frozen layers' cached outputs against one that runs them.

Both run the pipeline's own code (``training.run_stages``) on one stage of E epochs
that unfreezes from ``--unfreeze-from`` (default ``block8_1``) over the demo images
(75 px by default), IRv2 with random weights, BN frozen: with
``cache_trunk_outputs`` (the layers below the unit run once, the rest trains on
their outputs) and without (every step runs the whole backbone). The two alternate,
``--repeats`` times each, in one process; the median of each is reported: the
stage's total seconds as a user sees them (the one pass and the tracing included)
and the median epoch after the first. Both must end with the same validation losses
(the same batches, the same gradients): the bench stops otherwise.

``--after-head``: the stage follows a head stage (one epoch on cached pooled
features, its head solved by L-BFGS), and both sides cache the stage's outputs: computed
in the head stage's pass with the pooled features (``cached``) against in a pass
of the stage's own (``plain``: the run with the head pass computing the pooled
features alone, as before ``cached_trunk.features_with_trunks``). The totals are
then those of the whole run.

Usage::

    python bench/finetune_trunk.py                     # E = 3, 60 train + 20 val per class
    python bench/finetune_trunk.py --image-size 139 --epochs 2
    python bench/finetune_trunk.py --after-head --epochs 1

The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import keras
import numpy as np
from finetune_head import DEMO_IMAGES, demo_manifest
from model_inputs import resize_originals, with_sha256

from irv2_pipeline.backbone import load_irv2
from irv2_pipeline.classifier import HeadSpec, build_classifier
from irv2_pipeline.pipelines.finetune import training
from irv2_pipeline.pipelines.finetune.cached_trunk import features_with_trunks
from irv2_pipeline.pipelines.finetune.checkpoints import CheckpointStore
from irv2_pipeline.pipelines.finetune.examples import split_examples
from irv2_pipeline.pipelines.finetune.stages import Stage
from irv2_pipeline.pipelines.finetune.training import TrainingSettings, run_stages


def head_pass_alone(classifier, later_stages, *args, **kwargs):
    """``features_with_trunks`` computing no later stage's outputs."""
    return features_with_trunks(classifier, (), *args, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--unfreeze-from", default="block8_1")
    parser.add_argument("--train-per-class", type=int, default=60)
    parser.add_argument("--val-per-class", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=75)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--after-head", action="store_true")
    args = parser.parse_args()

    manifest = with_sha256(
        demo_manifest(args.train_per_class, args.val_per_class), DEMO_IMAGES
    )
    classes = sorted(manifest["label"].unique())
    stage = Stage(
        f"from_{args.unfreeze_from}",
        args.unfreeze_from,
        args.epochs,
        1e-4,
        "frozen",
        0,
        0.02,
    )
    stages = [stage]
    if args.after_head:
        stages.insert(0, Stage("head", None, 1, 1e-3, "frozen", 0, 0.0))
    runs: dict[bool, list[dict]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as scratch:
        resized = resize_originals(
            manifest, DEMO_IMAGES, Path(scratch) / "resized", args.image_size
        )
        train = split_examples(manifest, resized, classes, "train")
        val = split_examples(manifest, resized, classes, "val")
        # Cached first, then plain first, and so on: neither always runs warm.
        order = [True, False, False, True] * args.repeats
        for number, cached in enumerate(order[: 2 * args.repeats]):
            keras.utils.set_random_seed(0)
            backbone = load_irv2(None, args.image_size)
            classifier = build_classifier(backbone, classes, HeadSpec(), seed=0)
            settings = TrainingSettings(
                image_size=args.image_size,
                seed=0,
                batch_size=args.batch_size,
                cache_trunk_outputs=cached or args.after_head,
            )
            own_pass = args.after_head and not cached
            started = time.perf_counter()
            with (
                mock.patch.object(training, "features_with_trunks", head_pass_alone)
                if own_pass
                else contextlib.nullcontext()
            ):
                state = run_stages(
                    classifier,
                    stages,
                    train=train,
                    val=val,
                    settings=settings,
                    store=CheckpointStore(scratch, f"run_{number}"),
                )
            epochs = [row["seconds"] for row in state.history if row["stage"] != "head"]
            runs[cached].append(
                {
                    "total": time.perf_counter() - started,
                    "epochs": epochs,
                    "val_losses": [row["val_loss"] for row in state.history],
                    "cached_trunk": state.stage_records[-1]["cached_trunk"],
                }
            )
            keras.backend.clear_session()

    if runs[True][0]["cached_trunk"] != args.unfreeze_from:
        raise SystemExit(f"the cached stage did not cache: {runs[True][0]}")
    np.testing.assert_allclose(
        runs[True][0]["val_losses"], runs[False][0]["val_losses"], rtol=1e-3
    )

    def median(cached: bool, key: str) -> float:
        values = [
            run["total"] if key == "total" else statistics.median(run["epochs"][1:])
            for run in runs[cached]
        ]
        return statistics.median(values)

    figures = {
        "epochs": args.epochs,
        "unfreeze_from": args.unfreeze_from,
        "image_size": args.image_size,
        "train_images": len(train),
        "val_images": len(val),
        "repeats": args.repeats,
        "after_head": args.after_head,
        "cached_total_s": round(median(True, "total"), 1),
        "plain_total_s": round(median(False, "total"), 1),
        "total_speedup": round(median(False, "total") / median(True, "total"), 2),
        "cpu_count": os.cpu_count(),
    }
    if args.epochs > 1:
        figures["cached_epoch_s"] = round(median(True, "epoch"), 2)
        figures["plain_epoch_s"] = round(median(False, "epoch"), 2)
        figures["epoch_speedup"] = round(
            median(False, "epoch") / median(True, "epoch"), 1
        )
    print_table(figures, args)
    print(json.dumps({"bench": "finetune_trunk", **figures}))


def print_table(figures: dict, args: argparse.Namespace) -> None:
    """The figures as a short table."""
    print(
        f"stage from {args.unfreeze_from}, E = {args.epochs}, {figures['train_images']} train + "
        f"{figures['val_images']} val, {args.image_size} px, {args.repeats} runs each"
    )
    sides = ("head pass", "own pass") if args.after_head else ("cached", "plain")
    print(f"{'':28}{sides[0]:>10}{sides[1]:>10}")
    total = "run total (s)" if args.after_head else "stage total (s)"
    print(
        f"{total:28}{figures['cached_total_s']:>10.1f}"
        f"{figures['plain_total_s']:>10.1f}   {figures['total_speedup']}x"
    )
    if args.epochs > 1:
        print(
            f"{'epoch after the first (s)':28}{figures['cached_epoch_s']:>10.2f}"
            f"{figures['plain_epoch_s']:>10.2f}   {figures['epoch_speedup']}x"
        )


if __name__ == "__main__":
    main()
