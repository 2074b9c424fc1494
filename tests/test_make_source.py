"""The pretrained sources made here: loadable by model.weights, reproducible, cached."""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from irv2_pipeline import make_source as make_source_module
from irv2_pipeline import synthetic_images
from irv2_pipeline.backbone import CARD_SUFFIX, load_irv2, weights_card
from irv2_pipeline.make_source import (
    WEIGHTS_FILE,
    SourceSettings,
    cache_key,
    cached_source,
    main,
    make_source,
)
from irv2_pipeline.pipelines.feature_shift import moments
from irv2_pipeline.pipelines.feature_shift.shift import block_shift, shift_profile


def arrays(weights) -> list[np.ndarray]:
    return load_irv2(str(weights), 75).get_weights()


def test_the_source_loads_as_model_weights_with_its_card(adabn_source):
    card = weights_card(str(adabn_source))
    assert card["kind"] == "adabn"
    assert card["image_size"] == 75
    assert card["preprocessing"] == "minus_one_to_one"
    backbone = load_irv2(str(adabn_source), card["image_size"])
    assert backbone.name == "inception_resnet_v2"


def test_its_statistics_are_those_of_its_source_images(adabn_source):
    """A source set's own images, drawn anew, hardly shift; greyscale strokes do."""
    backbone = load_irv2(str(adabn_source), 75)
    probe, layout = moments.build_probe(backbone, ["conv_7b"])

    def blocks(generator: str) -> dict[str, float]:
        images, _ = synthetic_images.image_array(
            generator, classes=6, images_per_class=8, seed=11, size=75
        )
        measured = moments.run_pass(
            probe,
            layout,
            np.array_split(images.astype("float32"), 3),
            batch_size=16,
            n_images=len(images),
            what=generator,
            logger=logging.getLogger(__name__),
        )
        profile = shift_profile(
            list(layout.batch_norms), measured.bn_means, measured.bn_variances, True
        )
        table = block_shift(profile)
        return dict(zip(table["block"], table["shift"], strict=True))

    near, far = blocks("fractal"), blocks("strokes")
    assert max(near.values()) < 0.1
    assert all(far[block] > 5 * near[block] for block in near)


def test_the_cache_reuses_a_source_and_keys_it_by_its_settings(adabn_source):
    assert cached_source("adabn", seed=0) == adabn_source
    base = SourceSettings.of("adabn", 0)
    assert cache_key(base) == cache_key(SourceSettings.of("adabn", 0))
    assert cache_key(base) != cache_key(SourceSettings.of("adabn", 1))
    assert cache_key(base) != cache_key(SourceSettings.of("trained", 0))
    assert cache_key(base) != cache_key(SourceSettings.of("adabn", 0, "strokes"))
    with pytest.raises(ValueError, match="generator 'photos': use one of fractal"):
        SourceSettings.of("adabn", 0, "photos")


def test_a_folder_with_files_is_never_overwritten(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        make_source(SourceSettings.of("adabn", 0), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_an_unknown_kind_is_named():
    with pytest.raises(ValueError, match="'imagenet'.*adabn, trained"):
        SourceSettings.of("imagenet")


@pytest.mark.slow
def test_the_command_makes_the_same_source_from_the_same_seed(
    adabn_source, tmp_path, capsys
):
    main(["--kind", "adabn", "--seed", "0", "--out", str(tmp_path / "again")])
    weights = tmp_path / "again" / adabn_source.name
    assert capsys.readouterr().out.strip() == str(weights)
    for made, cached in zip(arrays(weights), arrays(adabn_source), strict=True):
        np.testing.assert_array_equal(made, cached)
    card = json.loads((tmp_path / "again" / f"{weights.name}{CARD_SUFFIX}").read_text())
    assert (
        card["settings"]
        == json.loads(
            adabn_source.with_name(f"{adabn_source.name}{CARD_SUFFIX}").read_text()
        )["settings"]
    )


def test_makers_of_the_same_source_at_once_make_it_once(tmp_path, monkeypatch):
    """Two makers wanting one source at the same moment (two test workers): the
    second waits on the lock and finds the first one's source, made once."""
    made = []
    both_waiting = threading.Barrier(2)

    def slow_make(settings, out):
        made.append(out)
        time.sleep(0.5)  # long enough for the other maker to reach the lock
        out.mkdir(parents=True)
        (out / WEIGHTS_FILE).write_bytes(b"weights")
        (out / f"{WEIGHTS_FILE}{CARD_SUFFIX}").write_text("{}")
        return out / WEIGHTS_FILE

    monkeypatch.setattr(make_source_module, "make_source", slow_make)

    def want() -> Path:
        both_waiting.wait()
        return cached_source("adabn", seed=0, cache_dir=tmp_path)

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda _: want(), range(2))
    assert first == second
    assert first.read_bytes() == b"weights"
    assert len(made) == 1
    # Only the source and its lock remain: no scratch folder is left behind.
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
        [first.parent.name, f".{first.parent.name}.lock"]
    )
