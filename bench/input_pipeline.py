"""The training input (``inputs.py`` as ``finetune`` feeds it), in two measurements.

``delivery``: images per second the training input delivers at
``--size`` px (299: conf/base), with no model: originals plus ``--copies`` augmented
copies each (JPEG, quality 95, as the augmentation pipeline writes them), shuffled
with a seed and batched, one epoch after another. Side by side in one process:

- before: today's originals path: decoded from the raw files in Python in
  ``tf.numpy_function`` on every epoch, at full size (``images.DRAFT_MARGIN`` set to
  0 for these epochs only: no reduced-scale decoding), the copies by TensorFlow;
- after: the originals read from ``resized_images`` (PNG at the model's size, built
  once by the augmentation pipeline's own node, whose time is reported apart), every
  file decoded by TensorFlow in the graph.

Each is measured on the originals alone and on originals plus copies. The originals
are synthetic photo-like JPEGs of ``--source-size`` px (``bench/synthetic.py``; 3464
px is 12 megapixels). Figures: images per wall-clock second, and images per CPU-second
of this process (all its threads): the rate per core, which other work on the
machine hardly changes.

``fit``: a training epoch fed by ``inputs.py`` against ``fit`` on the same
images in memory. The model and step are the finetune pipeline's for its second
smoke stage: IRv2 (random weights, 75 px) unfrozen from ``block8_1``, BatchNorm
frozen, AdamW. Side by side in one process, on the same compiled model, after one
warm-up epoch of each: ``inputs.image_dataset`` over the demo images' resized files
(as ``finetune`` reads them), and the very same pixels in one float32 array.

``passes``: a pass over test images as evaluation makes one (the occlusion test:
``--work`` forward passes of IRv2, random weights, 75 px, on each batch of 64), from
the iterator's creation to its deletion, with tf.data's autotuning on against off
(``inputs.py`` turns it off), alternating in one process. The demo originals, opened
in Python as a user's files are. Figures: each pass's seconds, and the part spent
deleting the iterator.

Usage::

    python bench/input_pipeline.py delivery --size 299 --source-size 3464
    python bench/input_pipeline.py delivery --size 299 --source-size 1024
    python bench/input_pipeline.py fit     # 60 demo images per class, 3 epochs each
    python bench/input_pipeline.py passes  # 8 passes each way, 18 forward passes a batch

Targets: ``delivery``: at least 400 images per CPU-second at 299 px, originals plus
copies; ``fit``: the ``inputs.py`` epoch within 10% of the in-memory one; ``passes``:
no pass spends over a second deleting its iterator.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from model_inputs import resize_originals, with_sha256
from synthetic import generate

from irv2_pipeline import images
from irv2_pipeline.images import OpenPolicy, load_resized
from irv2_pipeline.inputs import image_dataset
from irv2_pipeline.pipelines.augmentation.render import Encoding

DEMO_IMAGES = Path(__file__).resolve().parents[1] / "data" / "01_raw" / "images"
FIT_IMAGE_SIZE = 75
# As the augmentation pipeline writes copies (conf/base: jpeg, quality 95).
COPY_ENCODING = Encoding("jpeg", 95)
DRAFT_MARGIN = images.DRAFT_MARGIN


def write_copies(manifest: pd.DataFrame, root: Path, folder: Path, size: int, count):
    """``count`` copies of each original at ``size`` px: flipped and shifted variants."""
    paths, labels = [], []
    for path, label in zip(manifest["path"], manifest["label"], strict=True):
        pixels = load_resized(root / path, OpenPolicy(), size)
        for copy in range(count):
            variant = np.roll(pixels[:, ::-1] if copy % 2 else pixels, copy * 7, axis=0)
            target = folder / f"{path}__c{copy}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(COPY_ENCODING.encode(np.ascontiguousarray(variant)))
            paths.append(str(target))
            labels.append(label)
    return paths, labels


def one_epoch(feed: tuple, size: int, batch: int, seed: int) -> dict:
    """One shuffled, batched pass over ``(paths, labels, generated, full_decode)``.

    Returns the images and the wall-clock and CPU seconds of this process.
    """
    paths, labels, generated, full_decode = feed
    # load_resized reads the margin when it runs: 0 decodes every JPEG at full size.
    images.DRAFT_MARGIN = 0 if full_decode else DRAFT_MARGIN
    dataset = image_dataset(
        paths,
        labels,
        image_size=size,
        batch_size=batch,
        policy=OpenPolicy(),
        shuffle_seed=seed,
        generated=generated,
    )
    wall, cpu = time.perf_counter(), time.process_time()
    count = sum(int(batch.shape[0]) for batch, _ in dataset)
    images.DRAFT_MARGIN = DRAFT_MARGIN
    return {
        "images": count,
        "wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
    }


def delivery(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench_input_") as tmp:
        root = Path(tmp) / "raw"
        generate(root, args.originals, args.source_size, texture="photo")
        paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
        manifest = with_sha256(
            pd.DataFrame({"path": paths, "label": [p.split("/")[0] for p in paths]}),
            root,
        )
        classes = sorted(manifest["label"].unique())
        index = {name: i for i, name in enumerate(classes)}
        labels = [index[label] for label in manifest["label"]]
        copy_paths, copy_labels = write_copies(
            manifest, root, Path(tmp) / "copies", args.size, args.copies
        )
        copy_labels = [index[label] for label in copy_labels]
        started = time.perf_counter()
        resized = resize_originals(
            manifest, root, Path(tmp) / "resized", args.size, workers="auto"
        )
        build_s = time.perf_counter() - started

        raw = [str(root / p) for p in manifest["path"]]
        cached = [resized.path_of(p) for p in manifest["path"]]
        inputs = {
            "before, originals": (raw, labels, [False] * len(raw), True),
            "after, originals": (cached, labels, [True] * len(cached), False),
            "before, originals + copies": (
                raw + copy_paths,
                labels + copy_labels,
                [False] * len(raw) + [True] * len(copy_paths),
                True,
            ),
            "after, originals + copies": (
                cached + copy_paths,
                labels + copy_labels,
                [True] * (len(cached) + len(copy_paths)),
                False,
            ),
        }
        for feed in inputs.values():  # warm-up: file cache, graph tracing
            one_epoch(feed, args.size, args.batch_size, 0)
        runs: dict[str, list[dict]] = {name: [] for name in inputs}
        for epoch in range(args.epochs):  # alternate, so load changes hit all alike
            for name, feed in inputs.items():
                runs[name].append(
                    one_epoch(feed, args.size, args.batch_size, epoch + 1)
                )

    def rate(name: str, key: str) -> float:
        return statistics.median(r["images"] / r[key] for r in runs[name])

    figures = {
        name: {
            "images": runs[name][0]["images"],
            "images_per_second": round(rate(name, "wall_s"), 1),
            "images_per_cpu_second": round(rate(name, "cpu_s"), 1),
        }
        for name in runs
    }
    print(
        f"python bench/input_pipeline.py delivery --size {args.size} "
        f"--source-size {args.source_size} --originals {args.originals} "
        f"--copies {args.copies} --batch-size {args.batch_size} --epochs {args.epochs}"
    )
    print(
        f"training input at {args.size} px, {args.originals} originals of "
        f"{args.source_size} px + {args.copies} copies each, batch {args.batch_size}, "
        f"shuffled; {os.cpu_count()} cores; median of {args.epochs} epochs"
    )
    print(f"{'':28}{'images':>8}{'img/s':>10}{'img/CPU-s':>11}")
    for name, figure in figures.items():
        print(
            f"{name:28}{figure['images']:>8}{figure['images_per_second']:>10.1f}"
            f"{figure['images_per_cpu_second']:>11.1f}"
        )
    print(f"resized_images built once in {build_s:.1f} s (augmentation.workers auto)")
    ratio = {
        kind: round(
            figures[f"after, {kind}"]["images_per_cpu_second"]
            / figures[f"before, {kind}"]["images_per_cpu_second"],
            2,
        )
        for kind in ("originals", "originals + copies")
    }
    print(f"after / before, per CPU-second: {ratio}")
    print(
        json.dumps(
            {
                "bench": "input_pipeline_delivery",
                "size": args.size,
                "source_size": args.source_size,
                "originals": args.originals,
                "copies_per_original": args.copies,
                "batch_size": args.batch_size,
                "epochs_each": args.epochs,
                "runs": figures,
                "after_vs_before_per_cpu_second": ratio,
                "resized_build_s": round(build_s, 2),
                "cpu_count": os.cpu_count(),
                "load_average_1min": round(os.getloadavg()[0], 2),
            }
        )
    )


def demo_images(per_class: int) -> pd.DataFrame:
    classes = sorted(p.name for p in DEMO_IMAGES.iterdir() if p.is_dir())
    rows = [
        {"path": f"{label}/{f.name}", "label": label}
        for label in classes
        for f in sorted((DEMO_IMAGES / label).glob("*.png"))[:per_class]
    ]
    return with_sha256(pd.DataFrame(rows), DEMO_IMAGES)


def fit(args: argparse.Namespace) -> None:
    import keras  # noqa: PLC0415 - delivery needs no model
    import tensorflow as tf  # noqa: PLC0415

    from irv2_pipeline.backbone import load_irv2, set_trainable_from  # noqa: PLC0415
    from irv2_pipeline.classifier import (  # noqa: PLC0415
        HeadSpec,
        build_classifier,
        training_model,
    )
    from irv2_pipeline.pipelines.finetune.optimizer import (  # noqa: PLC0415
        layerwise_multipliers,
        make_optimizer,
        warmup_cosine,
    )

    manifest = demo_images(args.per_class)
    classes = sorted(manifest["label"].unique())
    labels = manifest["label"].map({c: i for i, c in enumerate(classes)}).to_numpy()
    labels = labels.astype(np.int32)
    keras.utils.set_random_seed(0)
    backbone = load_irv2(None, FIT_IMAGE_SIZE)
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

    with tempfile.TemporaryDirectory(prefix="bench_input_fit_") as tmp:
        resized = resize_originals(
            manifest, DEMO_IMAGES, Path(tmp) / "resized", FIT_IMAGE_SIZE
        )
        paths = [resized.path_of(p) for p in manifest["path"]]

        def pipeline(seed: int | None, labelled: bool = True) -> tf.data.Dataset:
            return image_dataset(
                paths,
                labels if labelled else None,
                image_size=FIT_IMAGE_SIZE,
                batch_size=args.batch_size if labelled else 64,
                policy=OpenPolicy(),
                shuffle_seed=seed,
                generated=[True] * len(paths),
            )

        pixels = np.concatenate([b.numpy() for b in pipeline(None, labelled=False)])
        one_hot = np.eye(len(classes), dtype="float32")[labels]

        def epoch(kind: str, seed: int) -> float:
            started = time.perf_counter()
            if kind == "inputs.py":
                feed = pipeline(seed).map(lambda x, y: (x, tf.one_hot(y, len(classes))))
                trainee.fit(feed, epochs=1, verbose=0, shuffle=False)
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
        f"python bench/input_pipeline.py fit --per-class {args.per_class} "
        f"--epochs {args.epochs} --batch-size {args.batch_size}"
    )
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


def passes(args: argparse.Namespace) -> None:
    import keras  # noqa: PLC0415 - delivery needs no model
    import tensorflow as tf  # noqa: PLC0415

    from irv2_pipeline.backbone import load_irv2  # noqa: PLC0415

    manifest = demo_images(args.per_class)
    paths = [DEMO_IMAGES / path for path in manifest["path"]]
    keras.utils.set_random_seed(0)
    model = load_irv2(None, FIT_IMAGE_SIZE)
    autotuned = tf.data.Options()
    autotuned.autotune.enabled = True

    def one_pass(autotune: bool) -> tuple[float, float]:
        started = time.perf_counter()
        dataset = image_dataset(
            paths, None, image_size=FIT_IMAGE_SIZE, batch_size=64, policy=OpenPolicy()
        )
        if autotune:
            dataset = dataset.with_options(autotuned)
        assert dataset.options().autotune.enabled is autotune
        iterator = iter(dataset)
        for batch in iterator:
            for _ in range(args.work):
                model.predict_on_batch(batch)
        deleting = time.perf_counter()
        del iterator
        ended = time.perf_counter()
        return ended - started, ended - deleting

    one_pass(False)  # warm-up: the model's trace
    times: dict[str, list[tuple[float, float]]] = {"autotune on": [], "off": []}
    for _ in range(args.passes):  # alternate, so load changes hit both alike
        for kind, values in times.items():
            values.append(one_pass(kind == "autotune on"))
    print(
        f"python bench/input_pipeline.py passes --per-class {args.per_class} "
        f"--passes {args.passes} --work {args.work}"
    )
    print(
        f"a pass over {len(paths)} demo originals, batch 64, {args.work} IRv2 "
        "forward passes a batch (75 px)"
    )
    print(f"{'':12}{'median s':>10}{'max s':>8}{'deleting, max s':>17}")
    for kind, values in times.items():
        total = [t for t, _ in values]
        print(
            f"{kind:12}{statistics.median(total):>10.2f}{max(total):>8.2f}"
            f"{max(d for _, d in values):>17.2f}"
        )
    print(
        json.dumps(
            {
                "bench": "input_pipeline_passes",
                "images": len(paths),
                "work": args.work,
                "pass_s": {k: [round(t, 3) for t, _ in v] for k, v in times.items()},
                "deleting_s": {
                    k: [round(d, 3) for _, d in v] for k, v in times.items()
                },
                "cpu_count": os.cpu_count(),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    deliver = modes.add_parser("delivery", help="images/s of the input alone")
    deliver.add_argument("--size", type=int, default=299)
    deliver.add_argument("--source-size", type=int, default=3464)
    deliver.add_argument("--originals", type=int, default=100)
    deliver.add_argument("--copies", type=int, default=4)
    deliver.add_argument("--batch-size", type=int, default=32)
    deliver.add_argument("--epochs", type=int, default=3)
    trained = modes.add_parser("fit", help="a training epoch against in memory")
    trained.add_argument("--per-class", type=int, default=60)
    trained.add_argument("--epochs", type=int, default=3)
    trained.add_argument("--batch-size", type=int, default=16)
    passed = modes.add_parser("passes", help="a pass's time, autotuning on and off")
    passed.add_argument("--per-class", type=int, default=16)
    passed.add_argument("--passes", type=int, default=8)
    passed.add_argument("--work", type=int, default=18)
    args = parser.parse_args()
    {"delivery": delivery, "fit": fit, "passes": passes}[args.mode](args)


if __name__ == "__main__":
    main()
