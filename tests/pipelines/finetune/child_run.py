"""Runs the ``train_classifier`` node in a process of its own, for the subprocess tests.

The backbone is ``conftest.mini_irv2`` (the real IRv2 takes minutes to trace here).
Usage::

    python tests/pipelines/finetune/child_run.py WORKDIR [--kill-at STAGE:EPOCH]
        [--logical-cpus N] [--distribution mirrored] [--top-epochs N]
        [--head-solver lbfgs|minibatch] [--checkpoints DIR] [--cluster-timeout-s S]

``--kill-at 1:1`` sends SIGKILL to this process during the first batch of the second
epoch of the second stage (both counted from 0): after the first epoch's checkpoint,
like a machine that dies. With ``--distribution multi_worker`` the process is one
worker of the cluster its ``TF_CONFIG`` describes, and the workers share
``--checkpoints``. Every epoch that starts is appended to
``WORKDIR/epochs.log``; the node's history, stage records and class names go to ``WORKDIR/result.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(PROJECT_ROOT))

STAGES = [
    {
        "name": "head",
        "unfreeze_from": None,
        "epochs": 1,
        "learning_rate": 1e-3,
        "bn_policy": "frozen",
    },
    {
        "name": "top",
        "unfreeze_from": "block8_1",
        "epochs": 3,
        "learning_rate": 1e-4,
        "bn_policy": "frozen",
    },
]


def main() -> None:
    """Sets up the devices, then :func:`run` with the command line's arguments."""
    args = _arguments()
    # The test helpers import Kedro, which configures logging on import: let it do so
    # first, then send this process's log to stderr, where the tests read it.
    import kedro.framework.project  # noqa: F401, PLC0415

    logging.basicConfig(level=logging.INFO, force=True)
    if args.logical_cpus > 1:
        # Must come before TensorFlow creates its devices: before any other TF call.
        import tensorflow as tf  # noqa: PLC0415 - ordering is the point

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * args.logical_cpus
        )
    run(
        Path(args.workdir),
        kill_at=args.kill_at,
        distribution=args.distribution,
        top_epochs=args.top_epochs,
        head_solver=args.head_solver,
        checkpoints=args.checkpoints,
        cluster_timeout_s=args.cluster_timeout_s,
    )


def run(
    workdir: Path,
    *,
    kill_at: str | None = None,
    distribution: str = "none",
    top_epochs: int = 3,
    head_solver: str = "minibatch",
    checkpoints: str | None = None,
    cluster_timeout_s: float = 300.0,
) -> dict:
    """Runs the node on the demo images with ``mini_irv2``; returns what it wrote."""
    import keras  # noqa: PLC0415 - after the device set-up

    from irv2_pipeline.datasets import ImageFolder  # noqa: PLC0415
    from irv2_pipeline.pipelines.finetune import nodes, training  # noqa: PLC0415
    from tests.conftest import planned_source  # noqa: PLC0415
    from tests.pipelines.finetune import conftest  # noqa: PLC0415

    epochs_log = workdir / "epochs.log"

    class EpochLog(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
            with open(epochs_log, "a") as log:
                log.write(f"{self.model.name} {epoch}\n")

        def on_train_batch_end(self, batch, logs=None):
            if kill_at is None:
                return
            stage, epoch = (int(part) for part in kill_at.split(":"))
            in_stage = (self.model.name == "head_on_features") == (stage == 0)
            if in_stage and self.epoch == epoch:
                os.kill(os.getpid(), signal.SIGKILL)

    finetune = conftest.load_parameters("parameters_finetune", "smoke")["finetune"]
    head, top = STAGES
    finetune.update(
        stages=[head, {**top, "epochs": top_epochs}],
        batch_size=4,
        distribution=distribution,
        cluster_timeout_s=cluster_timeout_s,
        checkpoint_dir=checkpoints or str(workdir / "checkpoints"),
        tensorboard_dir=None,
        # minibatch: the head stage has epochs, for the kill tests to stop in.
        linear_head={**finetune["linear_head"], "solver": head_solver},
    )
    # Nine images per split: with two replicas of 4 a plain last batch of one image
    # would leave a replica with an empty batch, in training and validation.
    manifest = conftest.demo_manifest(train_per_class=3, val_per_class=3)
    # The node imports run_stages from `training` when it runs: patch it there.
    run_stages, load_irv2 = training.run_stages, nodes.load_irv2
    training.run_stages = functools.partial(run_stages, callbacks=[EpochLog()])
    nodes.load_irv2 = lambda weights, image_size: conftest.mini_irv2(image_size)
    try:
        model, history, records, classes, _ = nodes.train_classifier(
            image_manifest=manifest,
            augmented_manifest=manifest.iloc[0:0],
            finetune_plan={"stages": [], "source": planned_source()},
            resized_manifest=conftest.resized_demo()[0],
            resized_images=ImageFolder(conftest.resized_demo()[1]),
            augmented_images=ImageFolder(workdir / "no_augmented_images"),
            model={"weights": None, "image_size": conftest.IMAGE_SIZE, "seed": 7},
            images={},
            finetune=finetune,
            plan_rules=conftest.load_parameters("parameters_feature_shift")[
                "feature_shift"
            ]["plan_rules"],
        )
    finally:
        training.run_stages, nodes.load_irv2 = run_stages, load_irv2
    result = {
        "history": history.to_dict(orient="records"),
        "records": records.to_dict(orient="records"),
        "classes": classes,
        "outputs": model.output_shape[-1],
    }
    (workdir / "result.json").write_text(json.dumps(result, default=str))
    return result


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--kill-at")
    parser.add_argument("--logical-cpus", type=int, default=1)
    parser.add_argument("--distribution", default="none")
    parser.add_argument("--top-epochs", type=int, default=3)
    parser.add_argument("--head-solver", default="minibatch")
    parser.add_argument("--checkpoints")
    parser.add_argument("--cluster-timeout-s", type=float, default=300.0)
    return parser.parse_args()


if __name__ == "__main__":
    main()
