"""Nodes of the `augmentation` pipeline: augmented copies of the training images."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import textwrap
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import PurePosixPath
from typing import Any

import matplotlib
import numpy as np
import pandas as pd

from irv2_pipeline.datasets import ImageFolder
from irv2_pipeline.datasets.generated_images import ImageJobs
from irv2_pipeline.images import DRAFT_MARGIN, OpenPolicy, load_resized
from irv2_pipeline.parallel import worker_count
from irv2_pipeline.tables import frame_from_rows

from .ops import FILL_MODES, INTERPOLATIONS, Geometry, OpConfig, draw_ops, parse_ops
from .render import (
    RESIZED_ENCODING,
    Encoding,
    ResizedImage,
    SourceCopies,
    single_threaded_worker,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS = [
    "path",
    "source_path",
    "label",
    "copy",
    "seed",
    "ops",
    "source_sha256",
    "policy",
]
REQUIRED_INPUT_COLUMNS = ("path", "label", "split", "sha256")
RESIZED_COLUMNS = ["path", "file", "sha256", "image_size"]
NO_COPIES = "none"
FORMATS = ("png", "jpeg")


class AugmentationError(ValueError):
    """Parameters or inputs the pipeline cannot use; the message names them."""


@dataclass(frozen=True)
class Settings:
    """The validated ``augmentation`` parameters."""

    preset: str
    ops: tuple[OpConfig, ...]
    copies: int
    balance: bool
    max_copies_per_image: int
    encoding: Encoding
    geometry: Geometry
    workers: int | str


def plan_augmentation(
    image_manifest: pd.DataFrame, model: dict[str, Any], augmentation: dict[str, Any]
) -> pd.DataFrame:
    """Decides every copy of every training image and draws its operations.

    Only ``train`` rows are read: validation and test images are never augmented.
    Each copy's operations come from its own generator, seeded by ``model.seed``, the
    source path and the copy number, so a copy never changes when other images or
    the number of copies change.

    Args:
        image_manifest: The ingestion manifest (``path``, ``label``, ``split``,
            ``sha256``).
        model: The shared ``model`` parameters (``image_size``, ``seed``).
        augmentation: The ``augmentation`` parameters.

    Returns:
        One row per copy: ``path`` (relative to the augmented folder),
        ``source_path`` (relative to the image root), ``label``, ``copy``, ``seed``
        (of the copy's generator), ``ops`` (JSON list of ``{op, params}`` with the
        drawn values), ``source_sha256`` and ``policy`` (fingerprint of everything
        that shapes the pixels).

    Raises:
        AugmentationError: Bad parameters, missing columns or no training images.
    """
    settings = parse_settings(augmentation)
    train = _training_images(image_manifest)
    if settings.preset == NO_COPIES:
        logger.info("augmentation.preset is 'none': no copies are written")
        return pd.DataFrame(columns=MANIFEST_COLUMNS)
    seed, image_size = int(model["seed"]), int(model["image_size"])
    copies = _copies_per_image(train, settings, seed)
    policy = _policy_fingerprint(settings, seed, image_size)

    def rows():
        for source, label, sha256, count in zip(
            train["path"], train["label"], train["sha256"], copies, strict=True
        ):
            stem = _file_stem(source)
            for copy in range(count):
                copy_seed = _copy_seed(seed, source, copy)
                ops = draw_ops(settings.ops, np.random.default_rng(copy_seed))
                yield (
                    f"{label}/{stem}__c{copy}.{settings.encoding.extension}",
                    source,
                    label,
                    copy,
                    copy_seed,
                    json.dumps(ops),
                    sha256,
                    policy,
                )

    plan = frame_from_rows(rows(), MANIFEST_COLUMNS)
    _log_counts(train, plan)
    return plan


def write_augmented_images(
    augmentation_plan: pd.DataFrame,
    raw_images: ImageFolder,
    images: dict[str, Any],
    model: dict[str, Any],
    augmentation: dict[str, Any],
) -> tuple[ImageJobs, pd.DataFrame]:
    """Hands the planned copies to the augmented folder, which writes what is missing.

    The folder (``augmented_images``, a ``GeneratedImageFolderDataset``) keeps copies
    whose key is unchanged, renders missing or stale ones on ``workers`` processes
    and deletes copies that are no longer planned (images that left ``train``, a
    smaller ``copies``). A copy's key covers the policy fingerprint, the source's
    SHA-256 and its drawn operations.

    Args:
        augmentation_plan: The copies from :func:`plan_augmentation`.
        raw_images: The image root.
        images: The ``images`` parameters (how images are opened).
        model: The shared ``model`` parameters (``image_size``).
        augmentation: The ``augmentation`` parameters.

    Returns:
        The jobs for ``augmented_images`` and ``augmented_manifest`` (the plan).
    """
    settings = parse_settings(augmentation)
    open_policy = OpenPolicy.from_params(images)
    image_size = int(model["image_size"])
    # One pass over the plan sorted by source; each job keeps its copies' operations
    # as the plan's JSON text (parsed when rendered): a few hundred bytes per copy.
    outputs: dict[str, dict[str, str]] = {}
    ops: dict[str, dict[str, str]] = {}
    plan = augmentation_plan.sort_values("source_path", kind="stable")
    for row in plan.itertuples():
        outputs.setdefault(row.source_path, {})[row.path] = _copy_key(
            row.policy, row.source_sha256, row.ops
        )
        ops.setdefault(row.source_path, {})[row.path] = row.ops
    jobs = [
        SourceCopies(
            source=str(raw_images.path_of(source_path)),
            source_path=source_path,
            outputs=outputs[source_path],
            ops=ops[source_path],
            image_size=image_size,
            open_policy=open_policy,
            geometry=settings.geometry,
            encoding=settings.encoding,
        )
        for source_path in outputs
    ]
    image_jobs = ImageJobs(
        jobs=jobs,
        workers=settings.workers,
        parameter="augmentation.workers",
        initializer=single_threaded_worker,
    )
    return image_jobs, augmentation_plan.reset_index(drop=True)


def write_resized_images(
    image_manifest: pd.DataFrame,
    raw_images: ImageFolder,
    images: dict[str, Any],
    model: dict[str, Any],
    augmentation: dict[str, Any],
) -> tuple[ImageJobs, pd.DataFrame]:
    """Hands every accepted image, at ``model.image_size``, to the resized folder.

    Training and validation then read only files TensorFlow decodes in the graph
    (no Python per image and epoch): each image as ``images.load_resized`` gives it,
    stored as PNG, so the decoded pixels are exactly those. Every split is written
    (a changed split rewrites nothing; transductive BatchNorm adaptation reads the
    test images). As with the copies, a file is kept while its key (the image's
    SHA-256, the size, the open policy, the encoder and the software) is unchanged,
    written atomically otherwise, and deleted once its image leaves the manifest.

    Args:
        image_manifest: The ingestion manifest (``path``, ``sha256``).
        raw_images: The image root.
        images: The ``images`` parameters (how images are opened).
        model: The shared ``model`` parameters (``image_size``).
        augmentation: The ``augmentation`` parameters (``workers``).

    Returns:
        The jobs for ``resized_images`` and ``resized_manifest``: ``path`` (the
        manifest's), ``file`` (relative to the resized folder), ``sha256`` and
        ``image_size``.
    """
    _check_columns(image_manifest, ("path", "sha256"))
    settings = parse_settings(augmentation)
    open_policy = OpenPolicy.from_params(images)
    image_size = int(model["image_size"])
    policy = _resized_fingerprint(open_policy, image_size)
    rows = image_manifest.sort_values("path", ignore_index=True)
    # Named as the copies are: a long source name cannot make a too long file name.
    files = rows["path"].map(_resized_name)
    jobs = [
        ResizedImage(
            source=str(raw_images.path_of(path)),
            source_path=path,
            outputs={file: f"{policy}|{sha256}"},
            image_size=image_size,
            open_policy=open_policy,
        )
        for path, file, sha256 in zip(rows["path"], files, rows["sha256"], strict=True)
    ]
    image_jobs = ImageJobs(
        jobs=jobs, workers=settings.workers, parameter="augmentation.workers"
    )
    resized = pd.DataFrame(
        {
            "path": rows["path"],
            "file": files,
            "sha256": rows["sha256"],
            "image_size": image_size,
        },
        columns=RESIZED_COLUMNS,
    )
    return image_jobs, resized


def preview_augmentation(
    augmented_manifest: pd.DataFrame,
    augmented_images: ImageFolder,
    raw_images: ImageFolder,
    images: dict[str, Any],
    augmentation: dict[str, Any],
) -> plt.Figure:
    """Draws a grid: each row one training image, then its copies as written.

    Rows are spread over the classes (``preview.images`` rows, ``preview.copies``
    copies each); each copy is titled with its operations. Sources are shown at the
    copies' size.

    Args:
        augmented_manifest: The written copies.
        augmented_images: The augmented folder.
        raw_images: The image root.
        images: The ``images`` parameters.
        augmentation: The ``augmentation`` parameters (``preview``).

    Returns:
        The figure.
    """
    preview = augmentation.get("preview", {})
    rows = int(preview.get("images", 6))
    open_policy = OpenPolicy.from_params(images)
    sources = _preview_sources(augmented_manifest, rows)
    if not sources:
        figure, axis = plt.subplots(figsize=(5, 1.2))
        axis.axis("off")
        axis.text(
            0.5,
            0.5,
            f"No augmented copies (augmentation.preset: "
            f"{augmentation.get('preset')!r})",
            ha="center",
            va="center",
        )
        return figure
    most_copies = int(augmented_manifest["source_path"].value_counts().max())
    columns = 1 + min(int(preview.get("copies", 4)), most_copies)
    figure, axes = plt.subplots(
        len(sources),
        columns,
        figsize=(1.7 * columns, 1.9 * len(sources)),
        squeeze=False,
    )
    for axis in axes.flat:
        axis.axis("off")
    image_size = 0
    for row, source in enumerate(sources):
        copies = augmented_manifest[augmented_manifest["source_path"] == source]
        for column, copy in enumerate(copies.head(columns - 1).itertuples(), start=1):
            pixels = augmented_images.load(copy.path, open_policy).pixels
            image_size = pixels.shape[0]
            axes[row, column].imshow(pixels)
            axes[row, column].set_title(_describe_ops(copy.ops), fontsize=5)
        source_pixels = load_resized(
            raw_images.path_of(source), open_policy, image_size
        )
        axes[row, 0].imshow(source_pixels)
        axes[row, 0].set_title(_wrap(f"source: {source}"), fontsize=6)
    figure.suptitle(
        f"Augmented training copies (preset {augmentation.get('preset')!r}, "
        f"{image_size} px)",
        fontsize=9,
    )
    figure.tight_layout()
    return figure


def parse_settings(augmentation: dict[str, Any]) -> Settings:
    """Validates the ``augmentation`` parameters.

    Raises:
        AugmentationError: A bad value; the message names the parameter.
    """
    preset = augmentation.get("preset")
    presets = augmentation.get("presets") or {}
    if NO_COPIES in presets:
        raise AugmentationError(
            f"augmentation.presets.{NO_COPIES} is reserved (it writes no copies); "
            "give your preset another name"
        )
    if preset != NO_COPIES and preset not in presets:
        raise AugmentationError(
            f"augmentation.preset = {preset!r}: use {NO_COPIES!r} or one of "
            f"augmentation.presets ({', '.join(sorted(presets)) or 'none defined'})"
        )
    ops = (
        ()
        if preset == NO_COPIES
        else parse_ops(presets[preset], f"augmentation.presets.{preset}")
    )
    copies = _non_negative_int(augmentation.get("copies"), "augmentation.copies")
    balance = augmentation.get("balance") or {}
    file_format = str(augmentation.get("format", "jpeg")).lower()
    if file_format not in FORMATS:
        raise AugmentationError(
            f"augmentation.format = {file_format!r}: use one of {', '.join(FORMATS)}"
        )
    quality = augmentation.get("jpeg_quality", 95)
    if not isinstance(quality, int) or not 1 <= quality <= 100:
        raise AugmentationError(
            f"augmentation.jpeg_quality = {quality!r}: use 1 to 100"
        )
    fill_mode = augmentation.get("fill_mode", "reflect")
    interpolation = augmentation.get("interpolation", "bilinear")
    if fill_mode not in FILL_MODES:
        raise AugmentationError(
            f"augmentation.fill_mode = {fill_mode!r}: use one of {', '.join(FILL_MODES)}"
        )
    if interpolation not in INTERPOLATIONS:
        raise AugmentationError(
            f"augmentation.interpolation = {interpolation!r}: use one of "
            f"{', '.join(INTERPOLATIONS)}"
        )
    workers = augmentation.get("workers", "auto")
    try:
        worker_count(workers, "augmentation.workers")
    except ValueError as exc:
        raise AugmentationError(str(exc)) from None
    return Settings(
        preset=preset,
        ops=ops,
        copies=copies,
        balance=bool(balance.get("enabled", False)),
        max_copies_per_image=_non_negative_int(
            balance.get("max_copies_per_image", 20),
            "augmentation.balance.max_copies_per_image",
        ),
        encoding=Encoding(file_format, quality),
        geometry=Geometry(fill_mode, interpolation),
        workers=workers,
    )


def _non_negative_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise AugmentationError(f"{name} = {value!r}: use a whole number >= 0")
    return value


def _check_columns(image_manifest: pd.DataFrame, required: tuple[str, ...]) -> None:
    missing = [c for c in required if c not in image_manifest.columns]
    if missing:
        raise AugmentationError(
            f"image_manifest lacks the columns {missing}; run "
            "`kedro run --pipeline ingestion` to rewrite it"
        )


def _training_images(image_manifest: pd.DataFrame) -> pd.DataFrame:
    _check_columns(image_manifest, REQUIRED_INPUT_COLUMNS)
    train = image_manifest[image_manifest["split"] == "train"]
    if train.empty:
        raise AugmentationError(
            "image_manifest has no images in the train split; nothing to augment"
        )
    return train.sort_values("path", ignore_index=True)


def _copies_per_image(train: pd.DataFrame, settings: Settings, seed: int) -> list[int]:
    """``copies`` for every image or, when balancing, as many as each class needs.

    Balanced, every class reaches the training count (originals plus copies) of the
    largest class with ``copies`` copies per image. Within a class the remainder goes
    to the images first in a seeded order; no image gets more than
    ``max_copies_per_image``.
    """
    if not settings.balance:
        return [settings.copies] * len(train)
    sizes = train["label"].value_counts()
    target = int(sizes.max()) * (1 + settings.copies)
    cap = settings.max_copies_per_image
    counts = pd.Series(0, index=train.index)
    for label, size in sizes.items():
        members = train[train["label"] == label]
        base, extra = divmod(target - int(size), int(size))
        order = members["path"].map(lambda p: _copy_seed(seed, p, -1)).sort_values()
        extra_members = set(order.index[:extra])
        for index in members.index:
            counts[index] = min(cap, base + (index in extra_members))
        reached = int(size) + int(counts[members.index].sum())
        if reached < target:
            logger.warning(
                "class %r reaches %d training images of the %d wanted: "
                "augmentation.balance.max_copies_per_image = %d caps its copies",
                label,
                reached,
                target,
                cap,
            )
    return counts.tolist()


def _copy_seed(seed: int, source: str, copy: int) -> int:
    """The seed of one copy's generator (63 bits, so it fits a CSV integer column)."""
    digest = hashlib.sha256(f"{seed}:{source}:{copy}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _file_stem(source: str) -> str:
    """``<source stem>__<hash of the source path>``: unique and readable."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", PurePosixPath(source).stem).strip("._")
    digest = hashlib.sha256(source.encode()).hexdigest()[:8]
    return f"{stem[:60] or 'image'}__{digest}"


def _resized_name(source: str) -> str:
    """``<label>/<source stem>__<hash of the source path>.png``."""
    label = source.split("/", 1)[0]
    return f"{label}/{_file_stem(source)}.{RESIZED_ENCODING.extension}"


def _policy_fingerprint(settings: Settings, seed: int, image_size: int) -> str:
    """A hash of everything that shapes the pixels of a copy, software included.

    The operations run as TensorFlow graphs whatever the Keras backend (see
    ``ops.augment``), so TensorFlow's version counts, not the backend.
    """
    shaping = {
        "ops": [asdict(op) for op in settings.ops],
        "geometry": asdict(settings.geometry),
        "encoding": _encoding_fingerprint(settings.encoding),
        "seed": seed,
        "image_size": image_size,
        # How large JPEG sources are decoded (images.load_resized).
        "draft_margin": DRAFT_MARGIN,
        "software": {
            "keras": version("keras"),
            "tensorflow": version("tensorflow"),
            "pillow": version("pillow"),
        },
    }
    text = json.dumps(shaping, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _resized_fingerprint(open_policy: OpenPolicy, image_size: int) -> str:
    """A hash of everything that shapes a resized image's file, software included."""
    shaping = {
        "open_policy": asdict(open_policy),
        "image_size": image_size,
        "draft_margin": DRAFT_MARGIN,
        "encoding": _encoding_fingerprint(RESIZED_ENCODING),
        "pillow": version("pillow"),
    }
    text = json.dumps(shaping, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _encoding_fingerprint(encoding: Encoding) -> dict[str, Any]:
    """The encoding settings that apply to the chosen format."""
    if encoding.format == "jpeg":
        return {"format": "jpeg", "quality": encoding.jpeg_quality}
    return {"format": "png"}


def _copy_key(policy: str, source_sha256: str, ops: str) -> str:
    return hashlib.sha256(f"{policy}|{source_sha256}|{ops}".encode()).hexdigest()[:24]


def _log_counts(train: pd.DataFrame, plan: pd.DataFrame) -> None:
    originals = train["label"].value_counts().sort_index()
    copies = plan["label"].value_counts().reindex(originals.index, fill_value=0)
    for label in originals.index:
        logger.info(
            "%s: %d training images + %d copies = %d",
            label,
            originals[label],
            copies[label],
            originals[label] + copies[label],
        )


def _preview_sources(manifest: pd.DataFrame, rows: int) -> list[str]:
    """Up to ``rows`` sources, taking one class after another in turn."""
    by_label = [
        list(dict.fromkeys(group["source_path"]))
        for _, group in manifest.sort_values("source_path").groupby("label")
    ]
    chosen: list[str] = []
    depth = 0
    while len(chosen) < rows and any(depth < len(s) for s in by_label):
        chosen.extend(s[depth] for s in by_label if depth < len(s))
        depth += 1
    return chosen[:rows]


def _describe_ops(ops_json: str) -> str:
    ops = json.loads(ops_json)
    if not ops:
        return "(no op drawn)"
    parts = []
    for op in ops:
        values = ", ".join(
            f"{v:g}" if isinstance(v, float) else str(v)
            for k, v in op["params"].items()
            if k not in ("seed", "kernel_size")
        )
        parts.append(f"{op['op']}({values})" if values else op["op"])
    return _wrap("; ".join(parts))


def _wrap(text: str) -> str:
    return "\n".join(textwrap.wrap(text, 34))
