"""A pretrained IRv2 source made on this machine, from formula-driven images.

ImageNet weights cannot be had everywhere (air-gapped machines, CI), yet the measured
path (BatchNorm shift against the source's statistics, the plan built from it, the
``domain_gap`` finding, the ranking of candidate sources) only means something on a
backbone whose statistics describe some source. Two kinds are made here, on generated
images (:mod:`irv2_pipeline.synthetic_images`: fractals by default, or strokes or
textures for a source far from fractal targets), reproducibly from a seed:

- ``adabn`` (seconds): random IRv2 whose BatchNorm statistics are set by AdaBN on the
  source images, so the shift of a target measures how far it is from them;
- ``trained`` (minutes): IRv2 trained from scratch at 75 px to tell fractal classes
  apart, then its statistics refreshed on the source (the moving averages lag the
  last weights after a short training).

Each is saved as ``irv2_notop.weights.h5`` (what ``model.weights: PATH`` loads) with a
card beside it, ``irv2_notop.weights.h5.json`` (:data:`CARD_SUFFIX`), that names its
kind, seed, image size and preprocessing. Neither is ImageNet: use them to test how
the pipelines behave on a pretrained backbone (order, direction, outcome), not to
set thresholds for ImageNet.

Made once per content: :func:`cached_source` keys the folder by the settings, the
Keras and TensorFlow versions and the code that makes it, so a test suite pays once.

Command line::

    python -m irv2_pipeline.make_source --kind trained --seed 0 --out sources/trained
    python -m irv2_pipeline.make_source --kind adabn --images strokes
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from irv2_pipeline import synthetic_images
from irv2_pipeline.backbone import CARD_SUFFIX, adapt_batchnorm

logger = logging.getLogger(__name__)

KINDS = ("adabn", "trained")
WEIGHTS_FILE = "irv2_notop.weights.h5"
CACHE_ENV = "IRV2_SOURCE_CACHE"
DEFAULT_CACHE = Path("~/.cache/irv2_pipeline/sources")


@dataclass(frozen=True)
class SourceSettings:
    """What a source is made from; the same settings make the same source."""

    kind: str
    seed: int = 0
    generator: str = "fractal"
    classes: int = 20
    images_per_class: int = 16
    image_size: int = 75
    epochs: int = 0
    batch_size: int = 32
    learning_rate: float = 1e-3

    @classmethod
    def of(cls, kind: str, seed: int = 0, generator: str = "fractal") -> SourceSettings:
        """The settings of ``kind`` on images of ``generator``
        (``synthetic_images.GENERATORS``): a few hundred images for AdaBN, 2,000 to
        train. Two generators make a near and a far source for the same target."""
        if kind not in KINDS:
            raise ValueError(f"source kind {kind!r}: use one of {', '.join(KINDS)}")
        if generator not in synthetic_images.GENERATORS:
            raise ValueError(
                f"generator {generator!r}: use one of "
                f"{', '.join(synthetic_images.GENERATORS)}"
            )
        if kind == "trained":
            return cls(kind, seed, generator, images_per_class=100, epochs=3)
        return cls(kind, seed, generator)


def make_source(settings: SourceSettings, out: str | Path) -> Path:
    """Makes the source of ``settings`` into the folder ``out``.

    Args:
        settings: Which source (:meth:`SourceSettings.of`).
        out: A folder that does not exist yet or is empty: nothing is overwritten.

    Returns:
        The weights file, for ``model.weights``.

    Raises:
        FileExistsError: ``out`` holds files.
    """
    import keras  # noqa: PLC0415 - TensorFlow loads in seconds; the CLI needs it anyway

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new folder for the source")
    keras.utils.set_random_seed(settings.seed)
    images, labels = synthetic_images.image_array(
        settings.generator,
        classes=settings.classes,
        images_per_class=settings.images_per_class,
        seed=settings.seed,
        size=settings.image_size,
    )
    backbone = keras.applications.InceptionResNetV2(
        include_top=False,
        weights=None,
        input_shape=(settings.image_size, settings.image_size, 3),
    )
    accuracy = _train(backbone, images, labels, settings) if settings.epochs else None
    order = np.random.default_rng(settings.seed).permutation(len(images))
    batches = np.array_split(
        images[order].astype("float32"), max(1, len(images) // settings.batch_size)
    )
    adapt_batchnorm(backbone, batches)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS_FILE
    backbone.save_weights(weights)
    card = {
        "kind": settings.kind,
        "settings": dataclasses.asdict(settings),
        "image_size": settings.image_size,
        "preprocessing": "minus_one_to_one",
        "training_accuracy": accuracy,
        "keras": keras.__version__,
    }
    Path(f"{weights}{CARD_SUFFIX}").write_text(json.dumps(card, indent=2) + "\n")
    logger.info("Source %s made in %s", settings.kind, out)
    return weights


def _train(
    backbone, images: np.ndarray, labels: np.ndarray, settings: SourceSettings
) -> float:
    """Trains ``backbone`` with a softmax head on the source classes; returns the
    last epoch's training accuracy."""
    import keras  # noqa: PLC0415

    from irv2_pipeline.backbone import preprocessing_layer  # noqa: PLC0415

    size = settings.image_size
    inputs = keras.Input((size, size, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(
        backbone(preprocessing_layer()(inputs))
    )
    outputs = keras.layers.Dense(settings.classes, activation="softmax")(pooled)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(settings.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    history = model.fit(
        images.astype("float32"),
        labels,
        batch_size=settings.batch_size,
        epochs=settings.epochs,
        shuffle=True,
        verbose=2,
    )
    return float(history.history["accuracy"][-1])


def cache_key(settings: SourceSettings) -> str:
    """A digest of everything the source depends on: settings, library versions and
    the code that makes it (a change to the generator makes a new source)."""
    import keras  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    digest = hashlib.sha256()
    digest.update(json.dumps(dataclasses.asdict(settings), sort_keys=True).encode())
    digest.update(f"keras {keras.__version__} tf {tf.__version__}".encode())
    for module in (__file__, synthetic_images.__file__):
        digest.update(Path(module).read_bytes())
    return digest.hexdigest()[:16]


def cached_source(
    kind: str,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    generator: str = "fractal",
) -> Path:
    """The weights file of source ``kind``, made on first use and then reused.

    Args:
        kind: One of :data:`KINDS`.
        seed: Seed of the source images, the initial weights and the training.
        cache_dir: Where sources are kept; default ``$IRV2_SOURCE_CACHE`` or
            ``~/.cache/irv2_pipeline/sources``.
        generator: The images it is made on (``synthetic_images.GENERATORS``).

    Returns:
        ``<cache_dir>/<kind>-<key>/irv2_notop.weights.h5``.
    """
    settings = SourceSettings.of(kind, seed, generator)
    root = Path(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()
    folder = root / f"{kind}-{cache_key(settings)}"
    weights = folder / WEIGHTS_FILE
    if _is_made(weights):
        return weights
    root.mkdir(parents=True, exist_ok=True)
    # Processes that want the same source at once (test workers, parallel jobs) make
    # it once: the first holds the lock while it makes it, the others wait for it and
    # then find it made.
    with exclusive_lock(root / f".{folder.name}.lock"):
        if _is_made(weights):
            return weights
        # Made aside and moved into place, so an interrupted run leaves no half source
        # and a process that does not take the lock never reads a half-written one.
        scratch = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=root))
        try:
            make_source(settings, scratch / "source")
            try:
                (scratch / "source").rename(folder)
            except OSError:
                if not weights.is_file():
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return weights


def _is_made(weights: Path) -> bool:
    """Whether a source's weights and its card are both in place."""
    return weights.is_file() and Path(f"{weights}{CARD_SUFFIX}").is_file()


@contextlib.contextmanager
def exclusive_lock(lock_file: Path) -> Iterator[None]:
    """Holds an exclusive lock on ``lock_file`` (created if need be) until the block
    ends. The system drops the lock when the process dies, so a killed maker leaves
    no stale lock. Where there is no ``fcntl`` (Windows) nothing is locked: the
    move into place still keeps every source whole."""
    try:
        import fcntl  # noqa: PLC0415 - POSIX only
    except ImportError:
        yield
        return
    with lock_file.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def main(argv: list[str] | None = None) -> None:
    """``python -m irv2_pipeline.make_source``: makes a source, prints its weights."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=KINDS, default="trained")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--images",
        choices=synthetic_images.GENERATORS,
        default="fractal",
        help="the generated images the source is made on",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="an empty folder for the source; default: the cache "
        f"(${CACHE_ENV} or {DEFAULT_CACHE})",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.out is None:
        weights = cached_source(args.kind, args.seed, generator=args.images)
    else:
        weights = make_source(
            SourceSettings.of(args.kind, args.seed, args.images), args.out
        )
    sys.stdout.write(f"{weights}\n")


if __name__ == "__main__":
    main()
