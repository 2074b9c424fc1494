"""Content keys: short hashes of what a stored result was computed from.

A result kept between runs (a training checkpoint, the reference features) is reused
only while its key is the key of the inputs at hand: another model, other images or
other settings give another key. One way of hashing for all of them, here; NumPy and
pandas only (the model comes in already loaded), so that registering the pipelines
never imports Keras.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pandas as pd

from irv2_pipeline.hints import KerasModel


def content_key(*parts: Any) -> str:
    """A short hash of JSON-able parts (data frames are hashed by their CSV text).

    The order of the parts counts; the order of a dict's keys does not.
    """
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, pd.DataFrame):
            text = part.to_csv(index=False)
        else:
            text = json.dumps(part, sort_keys=True, default=str)
        digest.update(hashlib.sha256(text.encode()).digest())
    return digest.hexdigest()[:16]


def weights_digest(model: KerasModel) -> str:
    """The SHA-256 of the model's weights: shapes, dtypes and values, in layer order."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(f"{weight.dtype.str}{weight.shape}".encode())
        digest.update(weight.tobytes())
    return digest.hexdigest()


def model_key(model: KerasModel) -> str:
    """The :func:`content_key` of a model: its weights and its architecture.

    The architecture is Keras's own serialization of the model (``to_json``): its
    layers, their settings and connections, the preprocessing layer's scaling
    included. The same file loaded twice gives the same key; a model trained again,
    or saved with another preprocessing, another.
    """
    return content_key(weights_digest(model), json.loads(model.to_json()))
