"""Nodes of the `ingestion` pipeline: validate, de-duplicate and split an image folder."""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
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
]
# The manifest adds where each image went and why it may be doubtful.
MANIFEST_COLUMNS = [
    "path",
    "label",
    "split",
    "group",
    *SCANNED_COLUMNS[2:],
    "label_conflict",
]
REJECTED_COLUMNS = ["path", "reason"]
DUPLICATE_COLUMNS = ["group", "kind", "size", "labels", "label_conflict", "paths"]


class IngestionError(ValueError):
    """The image folder as a whole cannot be used; the message says why."""


def scan_images(
    raw_images: ImageFolder, images: dict[str, Any], ingestion: dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Validates every file under the image root, on all cores.

    Each file is fully decoded through ``images.load_image``; hashes and sizes come
    from the decoded, upright image.

    Args:
        raw_images: The image root.
        images: The ``images`` parameters (pixel limit, minimum size, background).
        ingestion: The ``ingestion`` parameters (``workers``).

    Returns:
        The accepted images (``path``, ``label``, ``sha256``, ``phash``, ``width``,
        ``height``, ``format``, ``mode``) and the rejected files (``path``, ``reason``).
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

    accepted_df = frame_from_rows(accepted_rows(), SCANNED_COLUMNS)
    rejected_df = pd.DataFrame(rejected, columns=REJECTED_COLUMNS)
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
    Duplicates (exact or near) that carry different labels are a label conflict; a
    user key alone never makes one, since one subject may rightly carry several labels.

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
    parents = _first_of_each(images["sha256"])
    max_hamming = settings.get("max_hamming")
    if max_hamming is not None and len(images) > 1:
        for i, j in _near_pairs(images["phash"], int(max_hamming)):
            _union(parents, i, j)
    duplicate_of = _roots(parents)
    tokens = "h:" + images["sha256"]
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
    ingestion: dict[str, Any],
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Assigns every group to train, val or test by a seeded hash of its id.

    A group never straddles splits, rerunning gives the same split, and adding images
    never moves an existing group. Each label's groups fall into the splits at the
    configured fractions.

    Args:
        grouped_images: Images with ``group`` and ``label_conflict``.
        scan_rejections: Files rejected while scanning.
        duplicate_groups: The duplicate report, to which the split is added.
        ingestion: The ``ingestion`` parameters (``split``, ``duplicates``).

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
    images["split"] = images["group"].map(
        lambda group: _split_of(group, split["seed"], fractions)
    )
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


def _split_of(group: str, seed: int, fractions: tuple[float, float, float]) -> str:
    digest = hashlib.sha256(f"{seed}:{group}".encode()).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    train, val, _ = fractions
    if position < train:
        return "train"
    return "val" if position < train + val else "test"


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
    problems = []
    for label, row in counts.iterrows():
        total = int(row.sum())
        empty = [
            s for s, f in zip(SPLITS, fractions, strict=True) if f > 0 and row[s] == 0
        ]
        if total < minimum or empty:
            problems.append(
                f"class {label!r} has {total} usable images"
                + (f" and none in {'/'.join(empty)}" if empty else "")
            )
    if problems:
        raise IngestionError(
            "Too few images to split: "
            + "; ".join(problems)
            + f". Add images, or change ingestion.split (fractions {fractions}, "
            f"min_images_per_class {minimum})."
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
