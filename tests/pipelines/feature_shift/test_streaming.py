"""measure_backbone streams: it never holds every image, nor any feature map.

Many more images than tf.data's look-ahead and a counter on every decode: the node
must decode each image once, in step with the probe's batches. Loading the split into
memory first decodes every image before the first batch and fails here. The probe is
a stand-in with the real probe's outputs (zeros): the node's data flow is under test,
and a probe that keeps up with decoding is the hard case, since tf.data then
prefetches furthest ahead. What the node keeps is per image one pooled vector per
depth and, per BN layer, one mean and variance per channel.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from irv2_pipeline import backbone, inputs
from irv2_pipeline.datasets import ImageFolder
from irv2_pipeline.pipelines.feature_shift import moments
from irv2_pipeline.pipelines.feature_shift.nodes import measure_backbone
from tests.conftest import project_parameters
from tests.streaming import (
    CountingModel,
    DecodeCounter,
    images_to_stream,
    lead_limit,
)

from .conftest import IMAGE_SIZE, write_images

BATCH_SIZE = 4


class ProbeStandIn:
    """Answers ``predict_on_batch`` with zeros shaped as the real probe's outputs."""

    def __init__(self, layout: moments.ProbeLayout):
        self._widths = {
            moments.MOMENTS_OUTPUT: 2 * sum(bn.channels for bn in layout.batch_norms),
            moments.FEATURES_OUTPUT: sum(layout.depth_channels),
        }

    def predict_on_batch(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """One row of zeros per image for each output."""
        return {
            name: np.zeros((len(batch), width), np.float32)
            for name, width in self._widths.items()
        }


def training_sample(root, count: int) -> tuple[ImageFolder, pd.DataFrame]:
    """``count`` noise images in two classes, all in train, as ``sample_images`` gives."""
    rng = np.random.default_rng(3)
    rows = []
    for label_index, label in enumerate(("a", "b")):
        pixels = list(rng.integers(0, 256, (count // 2, 32, 32, 3)))
        for path in write_images(root / label, pixels):
            rows.append(
                {
                    "path": path.relative_to(root).as_posix(),
                    "label": label,
                    "label_index": label_index,
                    "split": "train",
                }
            )
    return ImageFolder(root), pd.DataFrame(rows)


def test_images_are_decoded_once_in_step_with_the_probe_and_no_map_is_kept(
    tmp_path, monkeypatch, irv2_probe
):
    folder, sample = training_sample(tmp_path / "images", images_to_stream(BATCH_SIZE))
    decoded = DecodeCounter(inputs.load_resized)
    monkeypatch.setattr(inputs, "load_resized", decoded)
    probe = CountingModel(ProbeStandIn(irv2_probe.layout), decoded)
    # The session's IRv2: building it again costs seconds.
    monkeypatch.setattr(backbone, "load_irv2", lambda *_: irv2_probe.backbone)
    monkeypatch.setattr(moments, "build_probe", lambda *_: (probe, irv2_probe.layout))

    params = project_parameters("smoke")
    measured = measure_backbone(
        feature_shift_sample=sample,
        raw_images=folder,
        model={**params["model"], "image_size": IMAGE_SIZE},
        images=params["images"],
        feature_shift={**params["feature_shift"], "batch_size": BATCH_SIZE},
        finetune=params["finetune"],
    )

    assert decoded.count == len(sample)
    assert len(probe.decoded_at_batch) == -(-len(sample) // BATCH_SIZE)
    assert probe.largest_lead(BATCH_SIZE, len(sample)) <= lead_limit(BATCH_SIZE)
    # The real probe's outputs are (batch, numbers): no spatial axes leave IRv2.
    assert all(len(output.shape) == 2 for output in irv2_probe.probe.outputs)
    train = measured.splits["train"]
    layout = irv2_probe.layout
    for depth, channels in zip(layout.depths, layout.depth_channels, strict=True):
        assert train.features[depth].shape == (len(sample), channels)
    for bn in layout.batch_norms:
        assert train.bn_means[bn.name].shape == (bn.channels,)
        assert train.bn_variances[bn.name].shape == (bn.channels,)
