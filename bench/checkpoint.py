"""Seconds the training thread spends checkpointing per epoch, before and after.

The model is what ``finetune`` trains at ``conf/base`` size: the classifier on
InceptionResNetV2 (random weights) at 299 px, the backbone trainable from
``block8_1`` (the plan's first backbone stage), AdamW built on the trainee's
variables. No step is trained: the figures are the checkpoints', and an epoch of
training is stood in for by ``--epoch-seconds`` of sleep on the training thread (on
a GPU the host thread mostly waits for the device), during which a background
writer may write.

- before: the checkpoint the training loop wrote at each epoch end until this
  change, reproduced here (its code is gone from the package): the whole model and
  the optimizer's state, plus the whole model again as the best weights when the
  epoch improved, each file written and flushed on the training thread.
- after: the training loop's own callback (``training._EpochRecord``) with
  ``checkpoint_every_epochs: 1``: the stage's changing variables and the optimizer's
  state copied to host arrays on the training thread, the best weights sharing that
  file, written by ``CheckpointStore.save_in_background``; the training thread
  waits only when a write outlasts an epoch (and for the last one at the end).

Both run the same stage of ``--epochs`` (conf/base's backbone stages have 10), the
validation loss improving in the first half of them and not in the second, one after
the other in this process, on the same disk (``--folder``). The mean per epoch
includes, for after, the wait for the last write at the stage's end::

    python bench/checkpoint.py                      # 299 px, 10 epochs of 5 s

It prints a short table and, as the last line, one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np

from irv2_pipeline.backbone import load_irv2, set_trainable_from
from irv2_pipeline.classifier import HeadSpec, build_classifier, training_model
from irv2_pipeline.pipelines.finetune.checkpoints import (
    CheckpointStore,
    TrainingState,
    _write_npz,
    _write_text,
    optimizer_arrays,
)
from irv2_pipeline.pipelines.finetune.optimizer import (
    layerwise_multipliers,
    make_optimizer,
    warmup_cosine,
)
from irv2_pipeline.pipelines.finetune.stages import Stage
from irv2_pipeline.pipelines.finetune.training import (
    TrainingSettings,
    _EpochRecord,
    _StageGraph,
)

CLASSES = 10


def val_losses(epochs: int) -> list[float]:
    """Improving in the first half of the epochs, not in the second."""
    best = [1.0 - 0.01 * epoch for epoch in range((epochs + 1) // 2)]
    return best + [best[-1] + 0.01] * (epochs - len(best))


def build(image_size: int, unfreeze_from: str) -> tuple[_StageGraph, keras.Model]:
    """The classifier and a built AdamW, as a backbone stage of ``finetune`` has."""
    backbone = load_irv2(None, image_size)
    classifier = build_classifier(
        backbone, [f"class_{i}" for i in range(CLASSES)], HeadSpec(), seed=0
    )
    set_trainable_from(backbone, unfreeze_from)
    trainee = training_model(classifier, "frozen")
    schedule = warmup_cosine(1e-4, 10, 1, 100, 0.0)
    optimizer = make_optimizer(
        "adamw", schedule, 0.02, layerwise_multipliers(backbone, 1.0)
    )
    optimizer.build(trainee.trainable_variables)
    graph = _StageGraph(
        trainee=trainee,
        holder=classifier.model,
        train=lambda seed: None,
        val=None,
        cached=False,
    )
    graph.optimizer, graph.schedule = optimizer, schedule
    return graph, trainee


def before(
    graph: _StageGraph, folder: Path, epoch_seconds: float, losses: list[float]
) -> list[float]:
    """The old epoch-end checkpoint; returns the training thread's seconds per epoch."""
    state = TrainingState(stage_index=1)
    seconds = []
    for epoch, val_loss in enumerate(losses):
        time.sleep(epoch_seconds)
        started = time.perf_counter()
        state.epochs_done = epoch + 1
        saved = {
            "progress": graph.holder.get_weights(),
            "optimizer": optimizer_arrays(graph.optimizer),
        }
        if state.best_val_loss is None or val_loss < state.best_val_loss:
            state.best_val_loss = val_loss
            saved["best"] = saved["progress"]
        # The old CheckpointStore.save: one new file per role given, then state.json,
        # then every file state.json does not name is deleted.
        folder.mkdir(parents=True, exist_ok=True)
        state.saves += 1
        tag = f"{state.saves:05d}-s{state.stage_index}e{state.epochs_done}"
        for role, values in saved.items():
            name = f"{role}-{tag}.npz"
            _write_npz(folder / name, values)
            state.files[role] = name
        _write_text(folder / "state.json", json.dumps(asdict(state), indent=1))
        named = set(state.files.values()) | {"state.json"}
        for path in folder.iterdir():
            if path.name not in named:
                path.unlink()
        seconds.append(time.perf_counter() - started)
    return seconds


def after(
    graph: _StageGraph,
    trainee: keras.Model,
    folder: Path,
    epoch_seconds: float,
    losses: list[float],
) -> tuple[list[float], float]:
    """The training loop's callback; returns the training thread's seconds per epoch
    (the final wait added to the last) and the seconds of the last background write."""
    store = CheckpointStore(folder, "run")
    state = TrainingState(stage_index=1)
    settings = TrainingSettings(image_size=299, seed=0, batch_size=32)
    run = SimpleNamespace(settings=settings, store=store)
    stage = Stage(
        name="top",
        unfreeze_from="block8_1",
        epochs=len(losses),
        learning_rate=1e-4,
        bn_policy="frozen",
        warmup_epochs=0,
        weight_decay=0.02,
    )
    record = _EpochRecord(run, 1, stage, graph, state, best=None)
    record.set_model(trainee)
    seconds = []
    for epoch, val_loss in enumerate(losses):
        record.on_epoch_begin(epoch)
        time.sleep(epoch_seconds)
        logs = {"loss": 1.0, "accuracy": 0.5, "val_loss": val_loss, "val_accuracy": 0.5}
        started = time.perf_counter()
        record.on_epoch_end(epoch, logs)
        seconds.append(time.perf_counter() - started)
    # How long the last write takes alone, then the training thread's wait for it.
    written = time.perf_counter()
    store.wait()
    write_seconds = time.perf_counter() - written
    seconds[-1] += write_seconds
    return seconds, write_seconds


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=299)
    parser.add_argument("--unfreeze-from", default="block8_1")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--epoch-seconds", type=float, default=5.0)
    parser.add_argument(
        "--folder", type=Path, default=None, help="where to write (default: a temp dir)"
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_checkpoint_", dir=args.folder))
    graph, trainee = build(args.image_size, args.unfreeze_from)
    losses = val_losses(args.epochs)
    try:
        old = before(graph, root / "before", args.epoch_seconds, losses)
        old_bytes = folder_bytes(root / "before")
        new, write_seconds = after(
            graph, trainee, root / "after", args.epoch_seconds, losses
        )
        new_bytes = folder_bytes(root / "after")
    finally:
        shutil.rmtree(root)
    model_bytes = sum(w.nbytes for w in graph.holder.get_weights())
    old_mean, new_mean = float(np.mean(old)), float(np.mean(new))
    # Epochs other than the last, whose figure holds the stage end's wait.
    old_median, new_median = float(np.median(old[:-1])), float(np.median(new[:-1]))
    print(f"command          python {' '.join(sys.argv)}")
    print(
        f"model            IRv2 {args.image_size} px from {args.unfreeze_from}, "
        f"{model_bytes / 1e6:.0f} MB of weights"
    )
    print(f"epochs           {args.epochs} of {args.epoch_seconds:g} s (sleep)")
    print("                 training-thread s/epoch: mean, median  per epoch  kept")
    print(
        f"before           {old_mean:6.3f} {old_median:6.3f}  {np.round(old, 2).tolist()}  {old_bytes / 1e6:.0f} MB"
    )
    print(
        f"after            {new_mean:6.3f} {new_median:6.3f}  {np.round(new, 2).tolist()}  {new_bytes / 1e6:.0f} MB"
    )
    print(
        f"ratio            {old_mean / new_mean:.1f}x less on the training thread "
        f"(mean), {old_median / new_median:.1f}x (median epoch)"
    )
    print(f"last write       {write_seconds:.3f} s in the background")
    print(
        json.dumps(
            {
                "bench": "checkpoint",
                "image_size": args.image_size,
                "unfreeze_from": args.unfreeze_from,
                "epochs": args.epochs,
                "epoch_seconds": args.epoch_seconds,
                "model_mb": round(model_bytes / 1e6, 1),
                "before_seconds_per_epoch": round(old_mean, 4),
                "after_seconds_per_epoch": round(new_mean, 4),
                "before_per_epoch": [round(s, 4) for s in old],
                "after_per_epoch": [round(s, 4) for s in new],
                "ratio": round(old_mean / new_mean, 2),
                "before_median_seconds": round(old_median, 4),
                "after_median_seconds": round(new_median, 4),
                "median_ratio": round(old_median / new_median, 2),
                "before_kept_mb": round(old_bytes / 1e6, 1),
                "after_kept_mb": round(new_bytes / 1e6, 1),
                "last_background_write_seconds": round(write_seconds, 4),
                "cpu_count": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
