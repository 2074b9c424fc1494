"""Nodes of the `ingestion` pipeline: validate, de-duplicate and split an image folder."""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections import Counter
from collections.abc import Iterator
from functools import partial
from typing import Any

import matplotlib
import numpy as np
import pandas as pd

from irv2_pipeline.datasets import ImageFolder
from irv2_pipeline.images import OpenPolicy, fingerprint
from irv2_pipeline.parallel import process_map
from irv2_pipeline.progress import ProgressLog
from irv2_pipeline.tables import frame_from_rows

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# What scan_images gives for each accepted image.
SCANNED_COLUMNS = [
    "path",
    "label",
    "sha256",
    "phash",
    "width",
    "height",
    "format",
    "mode",
    "mean_colour",
    "pixel_std",
    "brightness",
    "contrast",
]
# The manifest adds where each image went and why it may be doubtful.
MANIFEST_COLUMNS = [
    "path",
    "label",
    "split",
    "group",
    *SCANNED_COLUMNS[2:],
    "blank",
    "label_conflict",
]
REJECTED_COLUMNS = ["path", "reason"]
EXCLUDED_REASON = "excluded from training after label review (label_exclusions)"
DUPLICATE_COLUMNS = ["group", "kind", "size", "labels", "label_conflict", "paths"]


class IngestionError(ValueError):
    """The image folder as a whole cannot be used; the message says why."""


def scan_images(
    raw_images: ImageFolder, images: dict[str, Any], ingestion: dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Validates every file under the image root, on all cores.

    Each file is fully decoded through ``images.load_image``; hashes, sizes and pixel
    statistics come from the decoded, upright image. Images whose pixels hardly vary
    are flagged ``blank``, or rejected with ``ingestion.blank.reject``.

    Args:
        raw_images: The image root.
        images: The ``images`` parameters (pixel limit, minimum size, background).
        ingestion: The ``ingestion`` parameters (``workers``, ``blank``).

    Returns:
        The accepted images (``SCANNED_COLUMNS`` and ``blank``) and the rejected files
        (``path``, ``reason``).
    """
    policy = OpenPolicy.from_params(images)
    candidates, rejected = [], []
    for entry in raw_images.entries():
        if entry.reason is not None:
            rejected.append((entry.path, entry.reason))
        elif "/" not in entry.path:
            rejected.append(
                (entry.path, "not inside a label folder (root/<label>/...)")
            )
        else:
            candidates.append(entry.path)
    if not candidates and not rejected:
        raise IngestionError(f"The image folder {raw_images.root} is empty.")

    progress = ProgressLog("images validated", len(candidates), logger)
    # fingerprint lives in images.py: spawned workers import only that light module.
    jobs = (str(raw_images.path_of(path)) for path in candidates)
    results = process_map(
        partial(fingerprint, policy=policy),
        jobs,
        ingestion.get("workers", "auto"),
        parameter="ingestion.workers",
    )

    def accepted_rows():
        for path, result in zip(candidates, results, strict=True):
            progress.advance()
            if isinstance(result, str):
                rejected.append((path, result))
            else:
                label = path.split("/", 1)[0]
                yield (path, label, *(result[c] for c in SCANNED_COLUMNS[2:]))

    accepted_df, blank_rejections = _flag_blank(
        frame_from_rows(accepted_rows(), SCANNED_COLUMNS), ingestion["blank"]
    )
    rejected_df = pd.concat(
        [pd.DataFrame(rejected, columns=REJECTED_COLUMNS), blank_rejections],
        ignore_index=True,
    )
    logger.info(
        "%d images accepted, %d files rejected", len(accepted_df), len(rejected_df)
    )
    return accepted_df, rejected_df.sort_values("path", ignore_index=True)


def group_duplicates(
    scanned_images: pd.DataFrame, ingestion: dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Groups exact duplicates, near duplicates and images sharing a user key.

    Exact duplicates share a SHA-256; near duplicates have perceptual hashes within
    ``duplicates.max_hamming`` bits; ``duplicates.group_key_pattern`` (a regular
    expression on the path, its first group is the key) joins images of one subject.
    Near duplicates also need mean colours within ``duplicates.max_colour_distance``.
    Blank images are nobody's duplicates. Duplicates (exact or near) that carry
    different labels are a label conflict; a user key alone never makes one, since one
    subject may rightly carry several labels.

    Args:
        scanned_images: The accepted images from ``scan_images``.
        ingestion: The ``ingestion`` parameters.

    Returns:
        The images with ``group`` and ``label_conflict`` columns, and the duplicate
        report: one row per group of two or more images.
    """
    settings = ingestion["duplicates"]
    images = scanned_images.reset_index(drop=True)
    keys = _group_keys(images["path"], settings.get("group_key_pattern"))
    # A union-find forest in one integer array: each image points at a member of its
    # group. Array operations, not Python objects per image: those would cost several
    # times the manifest's own memory (bench/scale.py).
    blank = images["blank"].to_numpy(dtype=bool)
    # Equal hashes of blank frames say nothing about what they show.
    parents = _first_of_each(images["sha256"].mask(blank))
    max_hamming = settings.get("max_hamming")
    if max_hamming is not None and len(images) > 1:
        for i, j in _near_duplicates(
            images, int(max_hamming), settings.get("max_colour_distance")
        ):
            _union(parents, i, j)
    duplicate_of = _roots(parents)
    tokens = "h:" + images["sha256"]
    # Byte-identical blank images are separate groups: the path keeps their ids apart.
    copied_blank = blank & images["sha256"].duplicated(keep=False).to_numpy()
    tokens = tokens.mask(copied_blank, tokens + " " + images["path"])
    if keys is not None:
        with_key = np.flatnonzero(keys.notna().to_numpy())
        for i, first in zip(
            with_key.tolist(), _first_of_each(keys.iloc[with_key]).tolist(), strict=True
        ):
            _union(parents, i, int(with_key[first]))
        tokens = ("k:" + keys).where(keys.notna(), tokens)
    roots = _roots(parents)
    images["group"] = _group_ids(tokens, roots)
    label_counts = images.groupby(duplicate_of)["label"].transform("nunique")
    images["label_conflict"] = label_counts > 1
    report = _duplicate_report(images, duplicate_of, roots)
    logger.info(
        "%d duplicate groups (%d with label conflicts)",
        len(report),
        int(report["label_conflict"].sum()) if len(report) else 0,
    )
    return images, report


def split_images(
    grouped_images: pd.DataFrame,
    scan_rejections: pd.DataFrame,
    duplicate_groups: pd.DataFrame,
    label_exclusions: pd.DataFrame,
    ingestion: dict[str, Any],
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Assigns every group to train, val or test by a seeded hash of its id.

    A group never straddles splits and rerunning gives the same split. Each label's
    groups fall into the splits at the configured fractions; a class the hash leaves
    without a split gets the group(s) nearest to it moved in (``_assign_splits``), so
    adding images moves no existing image of another class. With
    ``apply_label_exclusions``, the training images that ``label_exclusions`` lists
    are left out after the split, so no other image changes split.

    Args:
        grouped_images: Images with ``group`` and ``label_conflict``.
        scan_rejections: Files rejected while scanning.
        duplicate_groups: The duplicate report, to which the split is added.
        label_exclusions: Paths a person reviewed and wants out of training
            (``path`` column).
        ingestion: The ``ingestion`` parameters (``split``, ``duplicates``,
            ``apply_label_exclusions``).

    Returns:
        ``image_manifest``, ``rejected_images`` and ``duplicate_report``.
    """
    split = ingestion["split"]
    fractions = _fractions(split)
    images = grouped_images.copy()
    rejected = [scan_rejections]
    if ingestion["duplicates"].get("exclude_label_conflicts", True):
        conflicted = images[images["label_conflict"]]
        if len(conflicted):
            labels = conflicted.groupby("group")["label"].agg(
                lambda s: ", ".join(sorted(set(s)))
            )
            rejected.append(
                pd.DataFrame(
                    {
                        "path": conflicted["path"],
                        "reason": "label conflict: duplicate group "
                        + conflicted["group"]
                        + " is labelled "
                        + conflicted["group"].map(labels),
                    }
                )
            )
        images = images[~images["label_conflict"]]

    _check_classes(images)
    images["split"] = _assign_splits(images, int(split["seed"]), fractions)
    images, excluded = _exclude_reviewed(
        images, label_exclusions, bool(ingestion["apply_label_exclusions"])
    )
    if len(excluded):
        rejected.append(excluded)
    _check_split_counts(images, fractions, int(split.get("min_images_per_class", 3)))

    manifest = images[MANIFEST_COLUMNS].sort_values("path", ignore_index=True)
    all_rejected = pd.concat(rejected, ignore_index=True).sort_values(
        "path", ignore_index=True
    )
    group_split = dict(zip(images["group"], images["split"], strict=True))
    report = duplicate_groups.assign(
        split=duplicate_groups["group"].map(group_split).fillna("excluded")
    )
    return manifest, all_rejected, report


def summarize_dataset(
    image_manifest: pd.DataFrame,
    rejected_images: pd.DataFrame,
    duplicate_report: pd.DataFrame,
    ingestion: dict[str, Any],
) -> tuple[dict[str, Any], plt.Figure]:
    """Counts what the folder held and plots the class distribution.

    Args:
        image_manifest: The accepted, split images.
        rejected_images: Rejected files with reasons.
        duplicate_report: The duplicate groups.
        ingestion: The ``ingestion`` parameters (``imbalance_warning_ratio``).

    Returns:
        The summary (a JSON-able dict) and a bar chart of images per class and split.
    """
    counts = pd.crosstab(image_manifest["label"], image_manifest["split"]).reindex(
        columns=list(SPLITS), fill_value=0
    )
    per_class = counts.sum(axis=1)
    ratio = float(per_class.max() / per_class.min())
    limit = float(ingestion.get("imbalance_warning_ratio", 3.0))
    warnings = []
    if ratio > limit:
        warnings.append(
            f"classes are imbalanced: the largest has {ratio:.1f}x the images of the "
            f"smallest ({per_class.idxmax()}: {per_class.max()}, {per_class.idxmin()}: "
            f"{per_class.min()}), above ingestion.imbalance_warning_ratio = {limit}"
        )
    blank = sorted(image_manifest.loc[image_manifest["blank"], "path"])
    if blank:
        warnings.append(
            f"{len(blank)} blank or near-constant images are kept (the manifest's "
            "blank column, summary blank_images); ingestion.blank.reject leaves "
            "them out"
        )
    for warning in warnings:
        logger.warning(warning)
    conflicts = duplicate_report[duplicate_report["label_conflict"]]
    summary = {
        "n_images": len(image_manifest),
        "n_rejected": len(rejected_images),
        "classes": sorted(per_class.index),
        "counts": {label: counts.loc[label].to_dict() for label in counts.index},
        "split_totals": counts.sum(axis=0).to_dict(),
        "rejected_by_reason": _reason_counts(rejected_images["reason"]),
        "duplicate_groups": len(duplicate_report),
        "images_in_duplicate_groups": int(duplicate_report["size"].sum()),
        "label_conflict_groups": len(conflicts),
        "label_conflict_images_kept": int(image_manifest["label_conflict"].sum()),
        "blank_images": blank,
        "image_size": {
            column: {
                "min": int(image_manifest[column].min()),
                "median": float(image_manifest[column].median()),
                "max": int(image_manifest[column].max()),
            }
            for column in ("width", "height")
        },
        "imbalance_ratio": round(ratio, 3),
        "warnings": warnings,
    }
    return _json_ready(summary), _class_distribution_plot(counts)


def _exclude_reviewed(
    images: pd.DataFrame, label_exclusions: pd.DataFrame, apply: bool
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Leaves out the training images a person listed after reviewing label_issues.

    Only training images are left out: validation and test labels are the yardstick
    of every figure, and dropping the images a model disagrees with would flatter
    it. Listed held-out images and paths not in the folder are named in a warning.

    Args:
        images: Split images.
        label_exclusions: The reviewed list (a ``path`` column, relative to the image
            root as in ``label_issues``).
        apply: ``ingestion.apply_label_exclusions``.

    Returns:
        The images left and the rejected rows (``path``, ``reason``).

    Raises:
        IngestionError: The list has no ``path`` column.
    """
    if "path" not in label_exclusions.columns:
        raise IngestionError(
            "label_exclusions (data/01_raw/label_exclusions.csv) needs a `path` "
            f"column, as label_issues.csv has; it has {list(label_exclusions.columns)}"
        )
    listed = set(label_exclusions["path"].dropna().astype(str))
    none = pd.DataFrame(columns=REJECTED_COLUMNS)
    if not listed:
        return images, none
    if not apply:
        logger.info(
            "label_exclusions lists %d images; ingestion.apply_label_exclusions is "
            "false, so none is excluded",
            len(listed),
        )
        return images, none
    is_listed = images["path"].isin(listed)
    excluded = is_listed & (images["split"] == "train")
    held_out = images.loc[is_listed & ~excluded, "path"]
    if len(held_out):
        logger.warning(
            "%d images in label_exclusions are validation or test images and stay "
            "(only training images are excluded; fix their labels in the folder), "
            "e.g. %s",
            len(held_out),
            held_out.iloc[0],
        )
    unknown = sorted(listed - set(images["path"]))
    if unknown:
        logger.warning(
            "%d paths in label_exclusions are not in the image folder (or were "
            "rejected), e.g. %s",
            len(unknown),
            unknown[0],
        )
    logger.info("%d training images excluded (label_exclusions)", int(excluded.sum()))
    return images[~excluded], pd.DataFrame(
        {"path": images.loc[excluded, "path"], "reason": EXCLUDED_REASON}
    )


def _flag_blank(
    images: pd.DataFrame, settings: dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Flags images whose pixel variation is below ``blank.min_pixel_std``.

    Args:
        images: Scanned images with ``pixel_std``.
        settings: The ``ingestion.blank`` parameters.

    Returns:
        The images with a ``blank`` column (without the blank ones when
        ``blank.reject``) and the rejected blank images.
    """
    threshold = float(settings["min_pixel_std"])
    flagged = images.assign(blank=images["pixel_std"] < threshold)
    rejected = flagged["blank"] & bool(settings["reject"])
    reasons = pd.DataFrame(
        {
            "path": flagged.loc[rejected, "path"],
            "reason": "blank or near-constant image (pixel standard deviation below "
            f"ingestion.blank.min_pixel_std = {threshold:g})",
        }
    )
    return flagged[~rejected], reasons


def _group_keys(paths: pd.Series, pattern: str | None) -> pd.Series | None:
    if not pattern:
        return None
    regex = re.compile(pattern)
    if regex.groups < 1:
        raise IngestionError(
            f"ingestion.duplicates.group_key_pattern {pattern!r} needs a capturing "
            "group, for example 'patient_(\\d+)'"
        )
    keys = paths.map(lambda path: (m := regex.search(path)) and m.group(1))
    unmatched = int(keys.isna().sum())
    if unmatched:
        logger.warning(
            "%d images do not match group_key_pattern %r; each stays in its own group",
            unmatched,
            pattern,
        )
    return keys.astype(object)


def _near_pairs(phashes: pd.Series, max_hamming: int, budget: int = 1 << 20):
    """Index pairs whose 64-bit perceptual hashes differ in at most ``max_hamming`` bits.

    Each block of rows is compared with the rows from its own start on, in at most
    ``budget`` distances at a time, in buffers made once: memory stays flat however
    many images there are.
    """
    # The hashes are 16 hex digits each: one join and one parse, not an int per image.
    values = np.frombuffer(bytes.fromhex("".join(phashes)), dtype=">u8").astype(
        np.uint64
    )
    chunk = max(1, min(len(values), budget // max(1, len(values))))
    distances = np.empty(chunk * len(values), dtype=np.uint64)
    close = np.empty(chunk * len(values), dtype=bool)
    for start in range(0, len(values), chunk):
        block = values[start : start + chunk]
        # Row r and column c are images start + r and start + c.
        shape = (len(block), len(values) - start)
        size = shape[0] * shape[1]
        block_distances = distances[:size].reshape(shape)
        np.bitwise_xor(block[:, None], values[None, start:], out=block_distances)
        np.bitwise_count(block_distances, out=block_distances)
        block_close = close[:size].reshape(shape)
        np.less_equal(block_distances, max_hamming, out=block_close)
        # Each image matches itself (c == r); only more matches need locating.
        if np.count_nonzero(block_close) > len(block):
            rows, cols = np.nonzero(block_close)
            keep = rows < cols
            yield from zip(
                (rows[keep] + start).tolist(),
                (cols[keep] + start).tolist(),
                strict=True,
            )


def _near_duplicates(
    images: pd.DataFrame, max_hamming: int, max_colour_distance: float | None
) -> Iterator[tuple[int, int]]:
    """Index pairs of non-blank images with close perceptual hashes and mean colours.

    pHash sees only the structure of the grey image, not its colour or mean: a red
    and a blue print of one pattern hash alike. ``max_colour_distance`` (Euclidean,
    0-255 RGB; None: no limit) keeps them apart.
    """
    candidates = np.flatnonzero(~images["blank"].to_numpy(dtype=bool)).tolist()
    colours = (
        np.frombuffer(bytes.fromhex("".join(images["mean_colour"].str[1:])), np.uint8)
        .reshape(-1, 3)
        .tolist()
    )
    for i, j in _near_pairs(images["phash"].iloc[candidates], max_hamming):
        first, second = candidates[i], candidates[j]
        if (
            max_colour_distance is None
            or math.dist(colours[first], colours[second]) <= max_colour_distance
        ):
            yield first, second


def _first_of_each(values: pd.Series) -> np.ndarray:
    """For each position, the first position holding the same value (itself if none)."""
    present = values.notna().to_numpy()
    positions = np.arange(len(values))
    # NumPy on Python strings, not pandas' factorize: Arrow's allocator keeps what
    # its hash table took, a few hundred bytes per image (bench/scale.py).
    _, first, codes = np.unique(
        values[present].to_numpy(dtype=object), return_index=True, return_inverse=True
    )
    result = positions.copy()
    result[present] = positions[present][first][codes]
    return result


def _roots(parents: np.ndarray) -> np.ndarray:
    """Each node's root: pointers are followed in steps that double until all stop."""
    roots = parents.copy()
    while not np.array_equal(hops := roots[roots], roots):
        roots = hops
    return roots


def _find(parents: np.ndarray, i: int) -> int:
    while parents[i] != i:
        parents[i] = parents[parents[i]]
        i = parents[i]
    return int(i)


def _union(parents: np.ndarray, i: int, j: int) -> None:
    root_i, root_j = _find(parents, i), _find(parents, j)
    if root_i != root_j:
        parents[max(root_i, root_j)] = min(root_i, root_j)


def _group_ids(tokens: pd.Series, roots: np.ndarray) -> pd.Series:
    """``g`` + 12 hex digits of the SHA-256 of the smallest member token of each group.

    The smallest token keeps a group's id while its members stay, whatever is added
    to the folder elsewhere; one hash per group, not per image.
    """
    uniques, codes = np.unique(tokens.to_numpy(dtype=object), return_inverse=True)
    smallest = np.full(len(tokens), len(uniques))
    np.minimum.at(smallest, roots, codes)
    group_codes, inverse = np.unique(smallest[roots], return_inverse=True)
    names = np.array(
        [
            "g" + hashlib.sha256(uniques[code].encode()).hexdigest()[:12]
            for code in group_codes.tolist()
        ],
        dtype=object,
    )
    return pd.Series(names[inverse], index=tokens.index, dtype="str")


def _duplicate_report(
    images: pd.DataFrame, duplicate_of: np.ndarray, roots: np.ndarray
) -> pd.DataFrame:
    """One row per group of two or more: ``exact``, ``near`` or (user) ``key``."""
    rows = []
    # Only groups of two or more: iterating over every single image would be slow.
    shared = np.bincount(roots, minlength=len(roots))[roots] > 1
    for group, members in images[shared].groupby("group"):
        if members["sha256"].nunique() == 1:
            kind = "exact"
        elif len(set(duplicate_of[members.index])) == 1:
            kind = "near"
        else:
            kind = "key"
        rows.append(
            {
                "group": group,
                "kind": kind,
                "size": len(members),
                "labels": ", ".join(sorted(members["label"].unique())),
                "label_conflict": bool(members["label_conflict"].any()),
                "paths": "; ".join(sorted(members["path"])),
            }
        )
    return pd.DataFrame(rows, columns=DUPLICATE_COLUMNS)


def _fractions(split: dict[str, Any]) -> tuple[float, float, float]:
    fractions = tuple(float(split[name]) for name in SPLITS)
    if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise IngestionError(
            f"ingestion.split fractions train/val/test = {fractions} must be "
            "non-negative and sum to 1"
        )
    return fractions


def _assign_splits(
    images: pd.DataFrame, seed: int, fractions: tuple[float, float, float]
) -> pd.Series:
    """Each image's split: its group's hash position, then each class's gaps filled.

    A class with at least as many groups as there are splits, which the hash leaves
    without one, gets the group whose position lies nearest that split's range moved
    into it, from the split holding most of the class's groups. Only groups of that
    class alone move, so no other class's images change split.

    Args:
        images: Images with ``group`` and ``label``.
        seed: ``ingestion.split.seed``.
        fractions: The train, val and test fractions.

    Returns:
        The split of each image, on ``images``' index.
    """
    positions = {group: _position(group, seed) for group in images["group"].unique()}
    splits = {group: _split_at(p, fractions) for group, p in positions.items()}
    ranges = _ranges(fractions)
    one_label = images.groupby("group")["label"].nunique() == 1
    for _, groups in images.groupby("label")["group"]:
        own = sorted(set(groups))
        for missing, (low, high) in ranges.items():
            held = Counter(splits[group] for group in own)
            if held[missing] or len(own) < len(ranges):
                continue
            donor = max(SPLITS, key=held.__getitem__)
            movable = [g for g in own if splits[g] == donor and one_label[g]]
            if movable:
                # Positions outside [low, high): the distance to its nearer end.
                nearest = min(
                    movable,
                    key=lambda g: (max(low - positions[g], positions[g] - high), g),
                )
                splits[nearest] = missing
    return images["group"].map(splits)


def _position(group: str, seed: int) -> float:
    """Where a group falls in [0, 1): a seeded hash of its id."""
    digest = hashlib.sha256(f"{seed}:{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _split_at(position: float, fractions: tuple[float, float, float]) -> str:
    train, val, _ = fractions
    if position < train:
        return "train"
    return "val" if position < train + val else "test"


def _ranges(fractions: tuple[float, float, float]) -> dict[str, tuple[float, float]]:
    """The position range of each split with a share, as ``_split_at`` cuts them."""
    train, val, _ = fractions
    edges = (0.0, train, train + val, 1.0)
    return {
        split: (low, high)
        for split, low, high in zip(SPLITS, edges[:-1], edges[1:], strict=True)
        if high > low
    }


def _check_classes(images: pd.DataFrame) -> None:
    labels = sorted(images["label"].unique())
    if len(labels) < 2:
        found = f"only {labels[0]!r}" if labels else "no usable images"
        raise IngestionError(
            f"Classification needs at least two classes (label folders); found {found}."
        )


def _check_split_counts(
    images: pd.DataFrame, fractions: tuple[float, float, float], minimum: int
) -> None:
    counts = pd.crosstab(images["label"], images["split"]).reindex(
        columns=list(SPLITS), fill_value=0
    )
    groups = images.groupby("label")["group"].nunique()
    needed = sum(f > 0 for f in fractions)
    problems = []
    for label, row in counts.iterrows():
        total = int(row.sum())
        empty = [
            s for s, f in zip(SPLITS, fractions, strict=True) if f > 0 and row[s] == 0
        ]
        if total < minimum or empty:
            problems.append(
                f"class {label!r} has {total} usable images in {groups[label]} groups"
                + (f" and none in {'/'.join(empty)}" if empty else "")
            )
    if problems:
        raise IngestionError(
            "Too few images to split: "
            + "; ".join(problems)
            + f". Each class needs at least {minimum} images "
            f"(min_images_per_class) in at least {needed} groups, one for each split "
            "(duplicates, and images sharing a group key, are one group). Add images, "
            f"or change ingestion.split (fractions {fractions})."
        )


def _reason_counts(reasons: pd.Series) -> dict[str, int]:
    kinds = reasons.map(lambda r: re.split(r"[:(]", r, maxsplit=1)[0].strip())
    return {str(k): int(v) for k, v in Counter(kinds).most_common()}


def _class_distribution_plot(counts: pd.DataFrame) -> plt.Figure:
    figure, axis = plt.subplots(figsize=(max(4.0, 0.6 * len(counts) + 2), 3.5))
    bottom = np.zeros(len(counts))
    for split in SPLITS:
        axis.bar(counts.index, counts[split], bottom=bottom, label=split)
        bottom += counts[split].to_numpy()
    axis.set_ylabel("images")
    axis.set_title("Images per class and split")
    axis.legend()
    axis.tick_params(axis="x", rotation=45)
    figure.tight_layout()
    return figure


def _json_ready(value):
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value
