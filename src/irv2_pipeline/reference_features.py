"""The reference features: the fine-tuned model's view of the training and validation images.

Two pipelines need the pooled features (the classifier's ``avg_pool`` output) of the
images the model was trained and validated on: ``evaluation``'s label-issue pass
(every training original) and ``inference``'s unfamiliar-image flag (training
originals to fit the OOD score, validation images to calibrate its threshold). One
node computes them, :func:`embed_reference_images`, in one pass over every training
original and validation image, and it is the same node in both pipelines
(:func:`reference_node`): pipelines summed into one run (``kedro run --pipelines
evaluation,inference``) hold it once and embed the images once.

The catalog keeps them (``reference_features``, ``data/07_model_output/
reference_features.npz``) with the key of what they were computed from (see
:func:`reference_about`): the model's weights and architecture (its preprocessing
layer included), the manifest's rows of those images (path, label, split, group,
content hash), ``model.image_size``, how images are opened (``images``), the pooled
layer, the layout of the file and this package's version. The node reads the file as
the run found it (``stored_reference_features``, the same file; ``None`` when absent)
and reuses it when its key is the key of the run's inputs; otherwise it embeds the
images again and logs why. So ``kedro run --pipeline inference`` after ``kedro run``
embeds nothing, and a project that never ran ``evaluation`` embeds once and then
reuses. Settings that do not change a feature are not in the key: the batch size
(the model runs in inference mode, each image alone), flip test-time augmentation
(the reference features are of the images as they are) and
``inference.max_reference_images`` (a sample drawn from the stored features, at
fit time).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import numpy as np
import pandas as pd
from kedro.pipeline import Node

import irv2_pipeline
from irv2_pipeline.datasets import ImageFolder
from irv2_pipeline.datasets.feature_cache import ABOUT, KEY
from irv2_pipeline.hints import KerasModel
from irv2_pipeline.images import OpenPolicy
from irv2_pipeline.inputs import model_classes
from irv2_pipeline.keys import content_key, model_key
from irv2_pipeline.predict import pooled_layer_name, probabilities_and_features

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")
# The manifest's columns stored with the features (path, label, group) or that say
# what the file's pixels were (sha256): a change to any of them is a change of rows.
ROW_COLUMNS = ["path", "label", "split", "group", "sha256"]
# The layout of the stored arrays; a new layout is a new key.
LAYOUT = 1

# Why the stored features are not reused, per part of the key that differs.
_CHANGES = {
    "model": "finetuned_model changed (other weights or another architecture)",
    "rows": "image_manifest's training or validation images changed",
    "image_size": "model.image_size changed",
    "open_policy": "the images parameters (how images are opened) changed",
    "pooled_layer": "the model's pooled-feature layer changed",
    "layout": "the stored file has an older layout",
    "version": "they were computed by another version of irv2_pipeline",
}


class ReferenceFeaturesError(ValueError):
    """The reference images cannot be embedded; the message says what to change."""


def reference_node() -> Node:
    """The node, one definition for ``evaluation`` and ``inference`` alike.

    Kedro takes two nodes of the same name, inputs and outputs as one node when
    pipelines are added, so a run of both pipelines runs it once.
    """
    return Node(
        embed_reference_images,
        inputs={
            "finetuned_model": "finetuned_model",
            "class_names": "class_names",
            "image_manifest": "image_manifest",
            "raw_images": "raw_images",
            "stored_reference_features": "stored_reference_features",
            "model": "params:model",
            "images": "params:images",
            "evaluation": "params:evaluation",
        },
        outputs="reference_features",
        name="embed_reference_images",
    )


def embed_reference_images(
    *,
    finetuned_model: KerasModel,
    class_names: list[str],
    image_manifest: pd.DataFrame,
    raw_images: ImageFolder,
    stored_reference_features: dict[str, Any] | None,
    model: dict[str, Any],
    images: dict[str, Any],
    evaluation: dict[str, Any],
) -> dict[str, Any]:
    """Pooled features of every training original and validation image, reused when current.

    Augmented copies are left out: a copy carries its source's label (a wrong label
    is the source's), and embedding copies would cost a pass per copy.

    Args:
        finetuned_model: Takes ``[0, 255]`` RGB, outputs softmax probabilities.
        class_names: The model's output order.
        image_manifest: The ingestion manifest (``path``, ``label``, ``split``,
            ``group``, ``sha256``).
        raw_images: The image root.
        stored_reference_features: The stored file as the run found it (this
            node's earlier output), or ``None``.
        model: The ``model`` parameters (``image_size``).
        images: The ``images`` parameters.
        evaluation: The ``evaluation`` parameters (``batch_size``).

    Returns:
        ``key``, ``about`` (the parts of the key), and per split ``s`` of ``train``
        and ``val``: ``s`` (``float32`` features, one row per image, in manifest
        order), ``s_paths``, ``s_labels`` (class names) and ``s_groups``.

    Raises:
        ReferenceFeaturesError: A model whose classes do not match the manifest's.
    """
    classes = model_classes(class_names, image_manifest, ReferenceFeaturesError)
    rows = {
        split: image_manifest.loc[image_manifest["split"] == split, ROW_COLUMNS]
        for split in SPLITS
    }
    about = reference_about(finetuned_model, rows, model, images)
    key = content_key(about)
    counts = f"{len(rows['train'])} training, {len(rows['val'])} validation images"
    if stored_reference_features is not None and stored_reference_features[KEY] == key:
        logger.info(
            "Reference features reused (%s; key %s): the stored ones were computed "
            "from this model, these images and these settings",
            counts,
            key,
        )
        return stored_reference_features
    logger.info(
        "Reference features computed (%s): %s",
        counts,
        why_computed(stored_reference_features, about),
    )
    ordered = pd.concat([rows[split] for split in SPLITS])
    features = probabilities_and_features(
        finetuned_model,
        classes,
        [raw_images.path_of(path) for path in ordered["path"]],
        image_size=int(model["image_size"]),
        policy=OpenPolicy.from_params(images),
        batch_size=int(evaluation["batch_size"]),
        error=ReferenceFeaturesError,
        what="training and validation images embedded",
    ).features.astype(np.float32)
    result: dict[str, Any] = {KEY: key, ABOUT: about}
    start = 0
    for split in SPLITS:
        chosen = rows[split]
        result[split] = features[start : start + len(chosen)]
        result[f"{split}_paths"] = chosen["path"].to_numpy(dtype=str)
        result[f"{split}_labels"] = chosen["label"].to_numpy(dtype=str)
        result[f"{split}_groups"] = chosen["group"].astype(str).to_numpy(dtype=str)
        start += len(chosen)
    return result


def reference_about(
    finetuned_model: KerasModel,
    rows: dict[str, pd.DataFrame],
    model: dict[str, Any],
    images: dict[str, Any],
) -> dict[str, Any]:
    """What the reference features are computed from: the parts of their key.

    Args:
        finetuned_model: The model (its weights and architecture are hashed).
        rows: Per split, the manifest's rows (:data:`ROW_COLUMNS`), in order.
        model: The ``model`` parameters (``image_size``).
        images: The ``images`` parameters.

    Returns:
        A JSON-able dict: ``model`` and ``rows`` as content keys, the settings as
        they are.
    """
    about = {
        "model": model_key(finetuned_model),
        "rows": content_key(*(rows[split] for split in SPLITS)),
        "image_size": int(model["image_size"]),
        "open_policy": dataclasses.asdict(OpenPolicy.from_params(images)),
        "pooled_layer": pooled_layer_name(finetuned_model, ReferenceFeaturesError),
        "layout": LAYOUT,
        "version": irv2_pipeline.__version__,
    }
    # As the file gives it back (tuples become lists), so that parts compare equal.
    return json.loads(json.dumps(about))


def why_computed(stored: dict[str, Any] | None, about: dict[str, Any]) -> str:
    """The sentence the log gives for embedding the images again."""
    if stored is None:
        return (
            "none are stored (evaluation has not run in this project, or the file "
            "was removed)"
        )
    before = stored.get(ABOUT) or {}
    changed = [
        reason
        for part, reason in _CHANGES.items()
        if before.get(part) != about.get(part)
    ]
    return "; ".join(changed) or "the stored key differs"
