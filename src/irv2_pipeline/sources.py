"""The pretrained sources a run chooses from, and the one its plan chose.

A source is a backbone to fine-tune from: its weights (``imagenet``, ``null`` or a
local file of IRv2 without top), the preprocessing they were trained with
(``backbone.INPUT_SCALINGS``), the image size they were trained at, and how grey
images become RGB (``backbone.GRAYSCALE_RULES``). ``model.sources`` lists candidates;
without it, ``model.weights`` (with ``finetune.input_scaling``) is the one candidate.

feature_shift measures every candidate on the training images and ranks them
(``rank_sources``); the plan records the chosen one, and every pipeline after it
builds the backbone from the plan (:func:`planned_source`), not from the parameters,
so the model that is trained, evaluated and exported is the one that was measured.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from irv2_pipeline.backbone import (
    INPUT_SCALINGS,
    MIN_IMAGE_SIZE,
    WeightsError,
    check_grayscale,
    model_input_scaling,
    weights_card,
)

DEFAULT_GRAYSCALE = "replicate"
RERUN_FEATURE_SHIFT = "Run `kedro run --pipeline feature_shift` to plan again."


class SourceError(ValueError):
    """``model.sources`` or ``model.source`` cannot be used; the message says why."""


@dataclass(frozen=True)
class Source:
    """One candidate backbone.

    Attributes:
        name: How the ranking, the plan and ``model.source`` name it.
        weights: ``"imagenet"``, ``None`` (random init) or a weights file's path.
        preprocessing: A key of ``backbone.INPUT_SCALINGS``.
        image_size: The size the weights were trained at (``None``: not known).
        grayscale: A key of ``backbone.GRAYSCALE_RULES``.
    """

    name: str
    weights: str | None
    preprocessing: str
    image_size: int | None
    grayscale: str = DEFAULT_GRAYSCALE

    @property
    def pretrained(self) -> bool:
        """Whether the weights describe some source (not random init)."""
        return self.weights is not None

    def as_dict(self) -> dict[str, Any]:
        """The fields, as the plan's JSON keeps them."""
        return asdict(self)

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> Source:
        """The source a plan recorded (:meth:`as_dict`)."""
        size = fields.get("image_size")
        return cls(
            name=str(fields["name"]),
            weights=fields.get("weights"),
            preprocessing=str(fields["preprocessing"]),
            image_size=None if size is None else int(size),
            grayscale=str(fields.get("grayscale", DEFAULT_GRAYSCALE)),
        )


def candidate_sources(
    model: Mapping[str, Any], finetune: Mapping[str, Any]
) -> list[Source]:
    """The sources feature_shift measures, checked.

    Args:
        model: The ``model`` parameters: ``sources`` (a list of ``{name, weights,
            preprocessing, image_size, grayscale}``; only ``name`` and ``weights``
            are required) or, without it, ``weights``.
        finetune: The ``finetune`` parameters (``input_scaling``: the preprocessing
            of the one source ``model.weights`` names).

    Returns:
        The candidates, in the order given.

    Raises:
        SourceError: A candidate without a name or weights, two of the same name,
            an unknown preprocessing or grayscale rule, one its weights' card
            contradicts, or an image size IRv2 cannot take.
    """
    listed = model.get("sources")
    if not listed:
        weights = model.get("weights")
        try:
            preprocessing = model_input_scaling(finetune, weights)
        except (ValueError, WeightsError) as error:
            raise SourceError(str(error)) from error
        return [
            Source(
                name=default_name(weights),
                weights=weights,
                preprocessing=preprocessing,
                image_size=_card_size(weights),
            )
        ]
    if not isinstance(listed, list):
        raise SourceError(
            "model.sources must be a list of sources, each a mapping with at least "
            f"`name` and `weights`; got {type(listed).__name__}"
        )
    sources = [_listed_source(entry, index) for index, entry in enumerate(listed)]
    names = [source.name for source in sources]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise SourceError(f"model.sources names {repeated} more than once")
    return sources


def forced_source(model: Mapping[str, Any], sources: list[Source]) -> Source | None:
    """The candidate ``model.source`` names (``None``: the ranking chooses).

    Raises:
        SourceError: ``model.source`` names no candidate.
    """
    name = model.get("source")
    if name is None:
        return None
    for source in sources:
        if source.name == str(name):
            return source
    raise SourceError(
        f"model.source = {name!r} is none of the candidates "
        f"({', '.join(source.name for source in sources)}); name one of them, or "
        "null to let feature_shift choose"
    )


def planned_source(finetune_plan: Mapping[str, Any]) -> Source:
    """The source the plan chose, which finetune, evaluation and counterfactuals use.

    Raises:
        SourceError: A plan that records no source (written by an older version),
            or one whose preprocessing its weights' card now contradicts.
    """
    fields = finetune_plan.get("source")
    if not isinstance(fields, Mapping):
        raise SourceError(
            f"finetune_plan records no source (it predates model.sources). "
            f"{RERUN_FEATURE_SHIFT}"
        )
    source = Source.from_dict(fields)
    # The weights' card may have changed since the plan was made.
    try:
        card = weights_card(source.weights)
    except WeightsError as error:
        raise SourceError(f"{error}. {RERUN_FEATURE_SHIFT}") from error
    try:
        _preprocessing(fields, card, f"finetune_plan's source `{source.name}`")
    except SourceError as error:
        raise SourceError(
            f"{error} (in model.sources, or finetune.input_scaling for "
            f"model.weights). {RERUN_FEATURE_SHIFT}"
        ) from error
    return source


def training_preprocessing(source: Source, finetune: Mapping[str, Any]) -> str:
    """The preprocessing a model on ``source`` is trained with: the source's own,
    unless ``finetune.input_scaling_override`` trains with ``finetune.input_scaling``
    on purpose (the counterfactual that measures a wrong scaling)."""
    if finetune.get("input_scaling_override", False):
        return model_input_scaling(finetune, source.weights)
    return source.preprocessing


def default_name(weights: str | None) -> str:
    """The name of the one source ``model.weights`` gives: ``imagenet``, ``random``
    or the file's name without its suffixes."""
    if weights is None:
        return "random"
    if weights == "imagenet":
        return "imagenet"
    name = Path(weights).name
    return name.split(".", 1)[0] or name


def _listed_source(entry: Any, index: int) -> Source:
    """One entry of ``model.sources``, checked."""
    where = f"model.sources[{index}]"
    if not isinstance(entry, Mapping) or "name" not in entry or "weights" not in entry:
        raise SourceError(
            f"{where} must be a mapping with at least `name` and `weights` "
            "(imagenet, null or a weights file's path)"
        )
    unknown = sorted(set(entry) - {*Source.__dataclass_fields__})
    if unknown:
        raise SourceError(
            f"{where} has unknown keys {unknown}; a source takes "
            f"{', '.join(Source.__dataclass_fields__)}"
        )
    name, weights = str(entry["name"]), entry["weights"]
    where = f"model.sources `{name}`"
    if weights is not None and not isinstance(weights, str):
        raise SourceError(f"{where}: weights = {weights!r} is not a string or null")
    # Whether the file holds IRv2 without top is known when it loads (feature_shift's
    # first node, before anything is written); a missing one is known now.
    if weights not in (None, "imagenet") and not Path(weights).is_file():
        raise SourceError(
            f"{where}: weights = {weights!r} is neither imagenet, null, nor an "
            "existing file (a relative path is read from where `kedro run` starts)"
        )
    try:
        card = weights_card(weights)
    except WeightsError as error:
        raise SourceError(f"{where}: {error}") from error
    preprocessing = _preprocessing(entry, card, where)
    grayscale = str(
        entry.get("grayscale") or card.get("grayscale") or DEFAULT_GRAYSCALE
    )
    try:
        check_grayscale(grayscale)
    except ValueError as error:
        raise SourceError(f"{where}: {error}") from error
    if card.get("grayscale") not in (None, grayscale):
        raise SourceError(
            f"{where}: grayscale = {grayscale!r} but the weights' card says they "
            f"were trained with {card['grayscale']!r}; use {card['grayscale']!r}"
        )
    return Source(
        name=name,
        weights=weights,
        preprocessing=preprocessing,
        image_size=_image_size(entry.get("image_size", card.get("image_size")), where),
        grayscale=grayscale,
    )


def _preprocessing(
    entry: Mapping[str, Any], card: Mapping[str, Any], where: str
) -> str:
    """A source's preprocessing: given, or its card's, or IRv2's own; a given one
    must be known and agree with the card (features fed other pixels than the
    weights were trained on are off from the first layer)."""
    carded = card.get("preprocessing")
    preprocessing = str(entry.get("preprocessing") or carded or "minus_one_to_one")
    if preprocessing not in INPUT_SCALINGS:
        raise SourceError(
            f"{where}: preprocessing = {preprocessing!r}; use one of "
            f"{', '.join(INPUT_SCALINGS)}"
        )
    if carded is not None and carded != preprocessing:
        raise SourceError(
            f"{where}: preprocessing = {preprocessing!r} but the weights' card says "
            f"they were trained with {carded!r}; use {carded!r}"
        )
    return preprocessing


def _image_size(size: Any, where: str) -> int | None:
    """A source's training size: null (not known) or a whole number IRv2 takes."""
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int):
        raise SourceError(f"{where}: image_size = {size!r} is not a whole number")
    if size < MIN_IMAGE_SIZE:
        raise SourceError(
            f"{where}: image_size = {size}; InceptionResNetV2 takes no input smaller "
            f"than {MIN_IMAGE_SIZE} px"
        )
    return size


def _card_size(weights: str | None) -> int | None:
    size = weights_card(weights).get("image_size")
    return None if size is None else int(size)
