"""The candidate sources a run reads from ``model.sources`` (or ``model.weights``)."""

from __future__ import annotations

import json

import pytest

from irv2_pipeline.backbone import CARD_SUFFIX
from irv2_pipeline.sources import (
    Source,
    SourceError,
    candidate_sources,
    forced_source,
    planned_source,
    training_preprocessing,
)

MODEL = {"weights": "imagenet", "image_size": 299, "seed": 42}


@pytest.fixture
def carded_weights(tmp_path):
    """A weights file (its bytes are never read here) with a card naming caffe."""
    weights = tmp_path / "rad.h5"
    weights.write_bytes(b"")
    card = {"image_size": 256, "preprocessing": "caffe_then_div_255"}
    (tmp_path / f"rad.h5{CARD_SUFFIX}").write_text(json.dumps(card))
    return str(weights)


def test_model_weights_alone_is_the_one_candidate():
    (source,) = candidate_sources(MODEL, {})
    assert source == Source("imagenet", "imagenet", "minus_one_to_one", 299)
    (random,) = candidate_sources(
        {**MODEL, "weights": None}, {"input_scaling": "caffe"}
    )
    assert (random.name, random.preprocessing, random.pretrained) == (
        "random",
        "caffe",
        False,
    )


def test_listed_sources_take_their_card_unless_given(carded_weights):
    model = {
        **MODEL,
        "sources": [
            {"name": "imagenet", "weights": "imagenet"},
            {"name": "rad", "weights": carded_weights, "grayscale": "luminance"},
        ],
    }
    imagenet, rad = candidate_sources(model, {"input_scaling": "zero_to_one"})
    # finetune.input_scaling is the one-source setting: a listed source has its own.
    assert imagenet == Source("imagenet", "imagenet", "minus_one_to_one", 299)
    assert rad == Source(
        "rad", carded_weights, "caffe_then_div_255", 256, grayscale="luminance"
    )
    assert Source.from_dict(json.loads(json.dumps(rad.as_dict()))) == rad


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "a"}, r"model.sources\[0\] must be a mapping with at least"),
        (
            {"name": "a", "weights": "imagenet", "preprocesing": "caffe"},
            r"unknown keys \['preprocesing'\]",
        ),
        (
            {"name": "a", "weights": "imagenet", "preprocessing": "torch"},
            "preprocessing = 'torch'; use one of minus_one_to_one, zero_to_one, caffe",
        ),
        (
            {"name": "a", "weights": "imagenet", "preprocessing": "caffe"},
            "the weights' card says they were trained with 'minus_one_to_one'",
        ),
        (
            {"name": "a", "weights": "imagenet", "grayscale": "average"},
            "model.sources `a`: .*'average'",
        ),
        (
            {"name": "a", "weights": "imagenet", "image_size": 64},
            "image_size = 64; InceptionResNetV2 takes no input smaller than 75 px",
        ),
        (
            {"name": "a", "weights": None, "image_size": "256"},
            "image_size = '256' is not a whole number",
        ),
        (
            {"name": "a", "weights": "missing/rad.h5"},
            "weights = 'missing/rad.h5' is neither imagenet, null, nor an existing",
        ),
    ],
)
def test_a_bad_source_is_refused_with_its_reason(entry, message):
    with pytest.raises(SourceError, match=message):
        candidate_sources({**MODEL, "sources": [entry]}, {})


def test_names_are_unique_and_model_source_must_name_one():
    twice = [{"name": "a", "weights": None}, {"name": "a", "weights": "imagenet"}]
    with pytest.raises(SourceError, match=r"names \['a'\] more than once"):
        candidate_sources({**MODEL, "sources": twice}, {})
    listed = {**MODEL, "sources": [{"name": "a", "weights": None}]}
    candidates = candidate_sources(listed, {})
    assert forced_source(listed, candidates) is None
    assert forced_source({**listed, "source": "a"}, candidates) == candidates[0]
    with pytest.raises(SourceError, match="model.source = 'b' is none of the "):
        forced_source({**listed, "source": "b"}, candidates)


def test_the_plan_carries_the_source_and_an_old_plan_says_to_plan_again():
    source = Source("rad", None, "caffe", None, "luminance")
    assert planned_source({"stages": [], "source": source.as_dict()}) == source
    with pytest.raises(SourceError, match="kedro run --pipeline feature_shift"):
        planned_source({"stages": [], "weights": "imagenet"})


def test_a_wrong_scaling_is_trained_only_on_purpose():
    source = Source("imagenet", "imagenet", "minus_one_to_one", 299)
    assert training_preprocessing(source, {"input_scaling": "zero_to_one"}) == (
        "minus_one_to_one"
    )
    wrong = {"input_scaling": "zero_to_one", "input_scaling_override": True}
    assert training_preprocessing(source, wrong) == "zero_to_one"
