"""Benchmark of the `augmentation` pipeline: writing copies, and reading them back.

Generates ``--images`` random-textured ``--size`` px JPEGs (10 classes;
``bench/synthetic.py``) in a temporary folder, all in the train split, then:

1. Writes ``--copies`` augmented copies of each at 299 px with conf/base's
   ``standard`` preset, through the pipeline's own nodes and dataset: PNG on 2
   worker processes and on 1 (in process), JPEG (quality 95) on 2. Each write runs in
   a fresh Python process; its time includes starting the workers (TensorFlow
   import), reported apart as well. The PNG files of 2 workers and of 1 are compared
   byte for byte.
2. Reads the copies with ``inputs.image_dataset`` (tf.data, 299 px, batches of 32,
   one full pass after a warm-up batch), PNG and JPEG, and, in the same process, the
   source JPEGs with Keras's legacy ``ImageDataGenerator.flow_from_directory``
   applying the same kinds of augmentation on the fly (rotation, shifts, zoom,
   horizontal flip, brightness; the textbook recipe). Keras 3 no longer exports
   ``keras.preprocessing.image.ImageDataGenerator``; ``tf.keras`` in TF 2.21 is Keras
   3 and still serves its legacy class, which is what this uses.

Usage::

    python bench/augmentation.py                  # 200 images, 2 copies each
    python bench/augmentation.py --images 1000

Target: reading materialized copies at 5x (aim 8x) the images per second
of ImageDataGenerator. The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from synthetic import CLASSES, generate

IMAGE_SIZE = 299
BATCH = 32
ROOT = Path(__file__).resolve().parents[1]
WRITES = (("png", 2), ("png", 1), ("jpeg", 2))


def manifest_of(root: Path):
    """An image manifest with every image in train."""
    import pandas as pd  # noqa: PLC0415

    rows = []
    for path in sorted(root.rglob("*.jpg")):
        rel = path.relative_to(root).as_posix()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        rows.append(
            {
                "path": rel,
                "label": rel.split("/")[0],
                "split": "train",
                "sha256": digest,
            }
        )
    return pd.DataFrame(rows)


def augmentation_params(file_format: str, workers: int, copies: int) -> dict:
    params = yaml.safe_load(
        (ROOT / "conf/base/parameters_augmentation.yml").read_text()
    )
    params = params["augmentation"]
    params.update(preset="standard", copies=copies, format=file_format, workers=workers)
    return params


def measure_write(
    root: Path, output: Path, file_format: str, workers: int, copies: int
) -> dict:
    """Plans and writes the copies in this process; returns the figures."""
    from irv2_pipeline.datasets import GeneratedImageFolderDataset, ImageFolder  # noqa: PLC0415
    from irv2_pipeline.parallel import process_map  # noqa: PLC0415
    from irv2_pipeline.pipelines.augmentation.nodes import (  # noqa: PLC0415
        plan_augmentation,
        write_augmented_images,
    )
    from irv2_pipeline.pipelines.augmentation.render import (  # noqa: PLC0415
        single_threaded_worker,
    )

    params = augmentation_params(file_format, workers, copies)
    model = {"image_size": IMAGE_SIZE, "seed": 42}
    plan = plan_augmentation(manifest_of(root), model, params)
    jobs, _ = write_augmented_images(plan, ImageFolder(root), {}, model, params)

    start = time.perf_counter()
    GeneratedImageFolderDataset(path=str(output)).save(jobs)
    seconds = time.perf_counter() - start

    startup = 0.0
    if workers > 1:
        # What starting the workers alone costs: each imports Keras and TensorFlow.
        begin = time.perf_counter()
        list(
            process_map(
                _import_keras,
                range(workers),
                workers,
                chunksize=1,
                initializer=single_threaded_worker,
            )
        )
        startup = time.perf_counter() - begin
    return {
        "format": file_format,
        "workers": workers,
        "copies": len(plan),
        "seconds": round(seconds, 2),
        "images_per_second": round(len(plan) / seconds, 1),
        "worker_startup_seconds": round(startup, 2),
        "images_per_second_after_startup": round(len(plan) / (seconds - startup), 1),
        "bytes_per_copy": round(
            sum(p.stat().st_size for p in output.rglob("*.*") if p.suffix != ".json")
            / len(plan)
        ),
    }


def _import_keras(_: int) -> str:
    import keras  # noqa: PLC0415

    time.sleep(0.5)  # so that each worker takes one of the jobs
    return keras.__version__


def write_in_subprocess(
    root: Path, output: Path, file_format: str, workers: int, copies: int
) -> dict:
    completed = subprocess.run(
        [
            sys.executable,
            __file__,
            "--measure-write",
            str(root),
            "--output",
            str(output),
            "--format",
            file_format,
            "--workers",
            str(workers),
            "--copies",
            str(copies),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def read_with_inputs(folder: Path) -> dict:
    """One pass of ``inputs.image_dataset`` over every copy in ``folder``."""
    from irv2_pipeline.images import OpenPolicy  # noqa: PLC0415
    from irv2_pipeline.inputs import image_dataset  # noqa: PLC0415

    paths = sorted(p for p in folder.rglob("*.*") if p.suffix in (".png", ".jpg"))
    labels = [int(p.parent.name.split("_")[1]) for p in paths]
    # The copies are files this project wrote: finetune reads them the same way.
    dataset = image_dataset(
        paths,
        labels,
        image_size=IMAGE_SIZE,
        batch_size=BATCH,
        policy=OpenPolicy(),
        generated=[True] * len(paths),
    )
    next(iter(dataset))  # warm-up: builds the tf.data pipeline
    start = time.perf_counter()
    count = sum(int(images.shape[0]) for images, _ in dataset)
    seconds = time.perf_counter() - start
    return {
        "images": count,
        "seconds": round(seconds, 2),
        "images_per_second": round(count / seconds, 1),
    }


def read_with_image_data_generator(root: Path) -> dict:
    """One epoch of the legacy ``ImageDataGenerator`` with augmentation, on the sources."""
    import tensorflow as tf  # noqa: PLC0415

    generator = tf.keras.preprocessing.image.ImageDataGenerator(
        rotation_range=20,
        width_shift_range=0.1,
        height_shift_range=0.1,
        zoom_range=0.2,
        horizontal_flip=True,
        brightness_range=(0.9, 1.1),
        fill_mode="reflect",
    )
    flow = generator.flow_from_directory(
        str(root),
        target_size=(IMAGE_SIZE, IMAGE_SIZE),
        batch_size=BATCH,
        class_mode="sparse",
        seed=1,
    )
    flow[0]  # warm-up, as for tf.data
    start = time.perf_counter()
    count = sum(int(flow[i][0].shape[0]) for i in range(len(flow)))
    seconds = time.perf_counter() - start
    return {
        "images": count,
        "seconds": round(seconds, 2),
        "images_per_second": round(count / seconds, 1),
    }


def digest_files(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*.*") if p.suffix != ".json"):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def main() -> None:
    """Generates the images, writes and reads, prints the table and the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--copies", type=int, default=2)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--measure-write", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--format", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure_write:
        figures = measure_write(
            args.measure_write, args.output, args.format, args.workers, args.copies
        )
        print(json.dumps(figures))
        return

    with tempfile.TemporaryDirectory(prefix="bench_augmentation_") as tmp:
        root = Path(tmp) / "images"
        generate(root, args.images, args.size, texture="grain")
        print(f"generated {args.images} {args.size} px JPEGs in {CLASSES} classes")
        writes = {}
        for file_format, workers in WRITES:
            output = Path(tmp) / f"{file_format}_{workers}"
            writes[(file_format, workers)] = write_in_subprocess(
                root, output, file_format, workers, args.copies
            )
        identical = digest_files(Path(tmp) / "png_2") == digest_files(
            Path(tmp) / "png_1"
        )
        reads = {
            "inputs_png": read_with_inputs(Path(tmp) / "png_2"),
            "inputs_jpeg": read_with_inputs(Path(tmp) / "jpeg_2"),
            "image_data_generator": read_with_image_data_generator(root),
        }

    print(
        f"\nwriting {args.copies} copies per image at {IMAGE_SIZE} px (standard preset)"
    )
    print(
        f"{'format':>6} {'workers':>7} {'copies':>6} {'seconds':>8} {'img/s':>6} {'start-up s':>10} {'img/s after':>11} {'KB/copy':>8}"
    )
    for run in writes.values():
        print(
            f"{run['format']:>6} {run['workers']:>7} {run['copies']:>6} {run['seconds']:>8.1f} "
            f"{run['images_per_second']:>6.1f} {run['worker_startup_seconds']:>10.1f} "
            f"{run['images_per_second_after_startup']:>11.1f} {run['bytes_per_copy'] / 1024:>8.1f}"
        )
    print(f"PNG copies from 2 workers and from 1 byte-identical: {identical}")
    print(f"\nreading at {IMAGE_SIZE} px, batches of {BATCH}")
    print(f"{'reader':>22} {'images':>6} {'seconds':>8} {'img/s':>7}")
    for name, run in reads.items():
        print(
            f"{name:>22} {run['images']:>6} {run['seconds']:>8.2f} {run['images_per_second']:>7.1f}"
        )
    baseline = reads["image_data_generator"]["images_per_second"]
    ratios = {
        f"read_ratio_{fmt}_vs_image_data_generator": round(
            reads[f"inputs_{fmt}"]["images_per_second"] / baseline, 2
        )
        for fmt in ("png", "jpeg")
    }
    for name, ratio in ratios.items():
        print(f"{name}: {ratio}x")
    png2, png1 = writes[("png", 2)], writes[("png", 1)]
    print(
        json.dumps(
            {
                "benchmark": "augmentation",
                "images": args.images,
                "copies_per_image": args.copies,
                "source_px": args.size,
                "output_px": IMAGE_SIZE,
                "writes": {f"{f}_workers_{w}": run for (f, w), run in writes.items()},
                "write_speedup_2_vs_1_workers": round(
                    png1["seconds"] / png2["seconds"], 2
                ),
                "write_speedup_2_vs_1_workers_after_startup": round(
                    png2["images_per_second_after_startup"] / png1["images_per_second"],
                    2,
                ),
                "png_2_and_1_workers_byte_identical": identical,
                "reads": reads,
                **ratios,
                "cpu_count": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
