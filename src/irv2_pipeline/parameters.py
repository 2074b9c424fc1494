"""The rules that parameters must keep, as Pydantic models.

Each model mirrors one block of ``conf/base/parameters*.yml`` and forbids keys it does
not know, so a misspelt key is an error rather than a silently ignored setting.
``parameter_problems`` checks the merged parameters of a run against them and returns
every problem at once; ``hooks.ParameterCheckHook`` names the file that set each key.
A rule between keys (the split fractions' sum, ``min_size`` against ``max_pixels``) is
checked once each of its keys is valid on its own.

The nodes still receive plain dictionaries: Kedro's typed node parameters (1.7)
would replace a block with a model object for every node of a run, including nodes
that index it as a mapping, and their errors cannot name the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

# keras.applications.InceptionResNetV2 refuses inputs smaller than 75 x 75 pixels.
MIN_IMAGE_SIZE = 75
# pHash is 64 bits: two hashes are never further apart than this.
PHASH_BITS = 64
# Beyond (1 - 1/sqrt(2)) / 2 = 0.146 the centre square of the occlusion band's area is
# wider than the inside of the band and would mask part of the band too.
MAX_BORDER_FRACTION = 0.14
# What occluded pixels take (pipelines/evaluation/attribution.py).
OCCLUSION_FILLS = ("mean", "zero")

# Strict: YAML gives real numbers, so "80" or 80.5 is a mistake, not something to
# round; a bool is not a number either.
WholeNumber = Annotated[int, Field(strict=True)]
Fraction = Annotated[float, Field(strict=True, ge=0, le=1)]
Channel = Annotated[int, Field(strict=True, ge=0, le=255)]


def _image_size(size: int) -> int:
    """At least 75 pixels: InceptionResNetV2 accepts no smaller input."""
    if size < MIN_IMAGE_SIZE:
        raise ValueError(
            f"must be at least {MIN_IMAGE_SIZE} (InceptionResNetV2 accepts no "
            "smaller input)"
        )
    return size


def _weights(weights: str | None) -> str | None:
    """`imagenet`, null (random init), or the path of an existing weights file."""
    # A relative path is read from the directory `kedro run` starts in, as
    # backbone.load_irv2 reads it later.
    if weights is None or weights == "imagenet" or Path(weights).is_file():
        return weights
    raise ValueError(
        "must be 'imagenet', null, or the path of an existing weights file"
    )


def _workers(workers: Any) -> Any:
    """`auto` (one process per core) or a positive whole number of processes."""
    if workers == "auto" or (
        isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1
    ):
        return workers
    raise ValueError("use 'auto' or a positive whole number of processes")


def _group_key_pattern(pattern: str | None) -> str | None:
    """null, or a regular expression whose first capturing group is the key."""
    if pattern is None:
        return None
    try:
        groups = re.compile(pattern).groups
    except re.error as error:
        raise ValueError(f"is not a regular expression ({error})") from None
    if groups < 1:
        raise ValueError(
            "needs a capturing group: the first group is the key, e.g. 'patient_(\\d+)'"
        )
    return pattern


class _Block(BaseModel):
    """A parameter block: every key is known, values are not coerced."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelParams(_Block):
    """``model``: the backbone shared by every pipeline."""

    weights: Annotated[str | None, Field(strict=True), AfterValidator(_weights)]
    image_size: Annotated[WholeNumber, AfterValidator(_image_size)]
    seed: WholeNumber
    # Each candidate is checked by sources.candidate_sources (its weights' card
    # included), before the run starts.
    sources: list[dict[str, Any]] | None = None
    source: Annotated[str | None, Field(strict=True)] = None


class ImagesParams(_Block):
    """``images``: how every image is opened (``images.OpenPolicy``)."""

    max_pixels: Annotated[WholeNumber, Field(gt=0)]
    min_size: Annotated[WholeNumber, Field(ge=1)]
    background: tuple[Channel, Channel, Channel]

    @model_validator(mode="after")
    def _some_image_fits(self) -> ImagesParams:
        """`min_size` squared is at most `max_pixels`, so some image can be kept."""
        if self.min_size**2 > self.max_pixels:
            raise ValueError(
                f"min_size {self.min_size} squared is more than max_pixels "
                f"{self.max_pixels}: every image would be rejected"
            )
        return self


class SplitParams(_Block):
    """``ingestion.split``: fractions of the duplicate groups per split."""

    train: Fraction
    val: Fraction
    test: Fraction
    seed: WholeNumber
    min_images_per_class: Annotated[WholeNumber, Field(ge=1)]

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> SplitParams:
        """`train + val + test` sums to 1."""
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"train + val + test = {self.train} + {self.val} + {self.test} = "
                f"{total:g}; the fractions must sum to 1"
            )
        return self


class DuplicatesParams(_Block):
    """``ingestion.duplicates``: what counts as one image."""

    max_hamming: Annotated[int, Field(strict=True, ge=0, le=PHASH_BITS)] | None
    group_key_pattern: Annotated[
        str | None, Field(strict=True), AfterValidator(_group_key_pattern)
    ]
    exclude_label_conflicts: Annotated[bool, Field(strict=True)]
    max_colour_distance: Annotated[float, Field(strict=True, ge=0)] | None


class BlankParams(_Block):
    """``ingestion.blank``: which images are blank or near-constant."""

    min_pixel_std: Annotated[float, Field(strict=True, ge=0)]
    reject: Annotated[bool, Field(strict=True)]


class IngestionParams(_Block):
    """``ingestion``: scanning, de-duplicating and splitting the image folder."""

    workers: Annotated[int | Literal["auto"], BeforeValidator(_workers)]
    split: SplitParams
    duplicates: DuplicatesParams
    blank: BlankParams
    apply_label_exclusions: Annotated[bool, Field(strict=True)]
    # Largest over smallest class is never below 1.
    imbalance_warning_ratio: Annotated[float, Field(strict=True, ge=1)]


class InferenceShiftParams(_Block):
    """``inference.shift``: the batch's two-sample test against the training images."""

    max_images: Annotated[WholeNumber, Field(ge=2)] | None
    max_components: Annotated[WholeNumber, Field(ge=1)]
    permutations: Annotated[WholeNumber, Field(ge=1)]
    alpha: Annotated[float, Field(strict=True, gt=0, lt=1)]


class InferenceParams(_Block):
    """``inference``: predicting a folder of new images."""

    batch_size: Annotated[WholeNumber, Field(ge=1)]
    workers: Annotated[int | Literal["auto"], BeforeValidator(_workers)]
    top_k: Annotated[WholeNumber, Field(ge=1)]
    test_time_augmentation: Annotated[bool, Field(strict=True)]
    false_alarm_rate: Annotated[float, Field(strict=True, gt=0, lt=1)]
    max_reference_images: Annotated[WholeNumber, Field(ge=2)] | None
    shift: InferenceShiftParams


class _OpenBlock(BaseModel):
    """A block of which only some keys have rules; conf/base is the schema for the
    rest (``hooks.ParameterCheckHook`` names a key it lacks)."""

    model_config = ConfigDict(extra="allow", frozen=True)


Probability = Annotated[float, Field(strict=True, gt=0, lt=1)]


class ClassImbalanceParams(_OpenBlock):
    """``evaluation.diagnosis.class_imbalance``."""

    # Test images per class.
    min_test_images: Annotated[WholeNumber, Field(ge=1)]


class ImagePropertyDriftParams(_Block):
    """``evaluation.diagnosis.image_property_drift``: train vs test, per property."""

    # Family-wise error rate over the properties.
    alpha: Probability
    # Images per split.
    min_images: Annotated[WholeNumber, Field(ge=2)]
    # Kolmogorov-Smirnov statistic, 0-1.
    high_statistic: Annotated[float, Field(strict=True, gt=0, le=1)]


class DummyBaselineParams(_Block):
    """``evaluation.diagnosis.dummy_baseline``: the model vs the most frequent class."""

    # Test images per class.
    min_test_images: Annotated[WholeNumber, Field(ge=1)]


class WeakSegmentParams(_Block):
    """``evaluation.diagnosis.weak_segment``: slices of the test images by property."""

    # Bins of equal count per property.
    quantile_bins: Annotated[WholeNumber, Field(ge=2)]
    # Share of the test images in a bin.
    min_share: Fraction
    # Test images in a bin.
    min_images: Annotated[WholeNumber, Field(ge=1)]
    # Multiple of the accuracy on all test images.
    max_relative_accuracy: Annotated[float, Field(strict=True, gt=0, lt=1)]
    # Family-wise error rate over the bins.
    alpha: Probability


class ShortcutParams(_Block):
    """``evaluation.diagnosis.shortcut``: the border's occlusion test, per class."""

    # Share of a class's test predictions.
    min_border_flip_rate: Fraction
    # Border flips over centre flips.
    min_ratio: Annotated[float, Field(strict=True, ge=0)]
    # Standard errors of the sign test.
    noise_z: Annotated[float, Field(strict=True, ge=0)]
    # Recall from chance (0) to perfect (1).
    min_skill: Fraction
    # Empirical p-value against the random squares; 1 never stops a class.
    max_p_value: Annotated[float, Field(strict=True, gt=0, le=1)]


class MiscalibrationParams(_OpenBlock):
    """``evaluation.diagnosis.miscalibration``."""

    # Of the calibration test (metrics.calibration_p_value).
    alpha: Probability


class DiagnosisParams(_OpenBlock):
    """``evaluation.diagnosis``: the thresholds of the rules that have a model."""

    miscalibration: MiscalibrationParams
    class_imbalance: ClassImbalanceParams
    image_property_drift: ImagePropertyDriftParams
    dummy_baseline: DummyBaselineParams
    weak_segment: WeakSegmentParams
    shortcut: ShortcutParams


class OcclusionParams(_Block):
    """``evaluation.attribution.occlusion``: the masks of the occlusion test."""

    border_fraction: Annotated[float, Field(strict=True, gt=0, le=MAX_BORDER_FRACTION)]
    fill: Literal[OCCLUSION_FILLS]
    random_patches: Annotated[WholeNumber, Field(ge=1)]
    seed: WholeNumber


class AttributionParams(_OpenBlock):
    """``evaluation.attribution``: where the model looks."""

    occlusion: OcclusionParams


class BootstrapParams(_Block):
    """``evaluation.bootstrap``: the intervals' resamples and the calibration test's."""

    resamples: Annotated[WholeNumber, Field(ge=1)]
    seed: WholeNumber


class EvaluationParams(_OpenBlock):
    """``evaluation``: the keys with rules (the verdict and the data checks)."""

    # The least severity that fails the run; none never does.
    fail_on: Literal["none", "low", "medium", "high"]
    bootstrap: BootstrapParams
    attribution: AttributionParams
    diagnosis: DiagnosisParams

    @model_validator(mode="after")
    def _miscalibration_can_fire(self) -> EvaluationParams:
        """`diagnosis.miscalibration.alpha` is above 1 / (1 + `bootstrap.resamples`),
        the smallest p-value the calibration test can give."""
        resamples = self.bootstrap.resamples
        alpha = self.diagnosis.miscalibration.alpha
        if alpha <= 1 / (1 + resamples):
            raise ValueError(
                f"diagnosis.miscalibration.alpha {alpha:g} is at most 1 / (1 + "
                f"bootstrap.resamples) = {1 / (1 + resamples):.3g}, the smallest "
                f"p-value {resamples} draws of the calibration test can give: the "
                "miscalibration rule could never fire (raise bootstrap.resamples or "
                "alpha)"
            )
        return self

    @model_validator(mode="after")
    def _shortcut_can_fire(self) -> EvaluationParams:
        """`diagnosis.shortcut.max_p_value` is at least 1 / (1 +
        `attribution.occlusion.random_patches`), the smallest p-value that many
        random squares give."""
        patches = self.attribution.occlusion.random_patches
        max_p_value = self.diagnosis.shortcut.max_p_value
        if max_p_value < 1 / (1 + patches):
            raise ValueError(
                f"diagnosis.shortcut.max_p_value {max_p_value:g} is below "
                f"1 / (1 + attribution.occlusion.random_patches) = "
                f"{1 / (1 + patches):.3f}, the smallest p-value {patches} random "
                "squares can give: the shortcut rule could never fire (raise "
                "random_patches or max_p_value)"
            )
        return self


class ProjectParameters(BaseModel):
    """The blocks with rules; other blocks are checked against conf/base's keys."""

    model_config = ConfigDict(extra="allow", frozen=True)

    model: ModelParams
    images: ImagesParams
    ingestion: IngestionParams
    inference: InferenceParams
    evaluation: EvaluationParams


def _closed_paths(model: type[BaseModel], prefix: str = "") -> tuple[str, ...]:
    """Dotted paths of the blocks under ``model`` whose models forbid unknown keys."""
    paths: list[str] = []
    for name, field in model.model_fields.items():
        block = field.annotation
        if isinstance(block, type) and issubclass(block, BaseModel):
            if block.model_config.get("extra") == "forbid":
                paths.append(prefix + name)
            else:
                paths += _closed_paths(block, f"{prefix}{name}.")
    return tuple(paths)


# The blocks whose models forbid unknown keys (and name them); conf/base is the
# schema of every other key.
MODELLED_BLOCKS = _closed_paths(ProjectParameters)


def is_modelled(key: str) -> bool:
    """Whether a dotted key lies in a block of :data:`MODELLED_BLOCKS`."""
    return any(key == block or key.startswith(f"{block}.") for block in MODELLED_BLOCKS)


@dataclass(frozen=True)
class Problem:
    """One broken rule.

    Attributes:
        key: Dotted path of the parameter, e.g. ``ingestion.split.train``.
        text: What is wrong, naming the key, e.g. ``model.image_size = 64: must be
            at least 75 ...``.
    """

    key: str
    text: str


def parameter_problems(params: dict[str, Any]) -> list[Problem]:
    """Checks a run's merged parameters against the models.

    Args:
        params: The ``parameters`` of a run (every block, merged over conf/base).

    Returns:
        Every problem found, in the models' field order; empty when all is well.
    """
    try:
        ProjectParameters.model_validate(params)
    except ValidationError as error:
        return [_problem(params, e) for e in error.errors(include_url=False)]
    return []


def _problem(params: dict[str, Any], error: dict[str, Any]) -> Problem:
    names = [part for part in error["loc"] if isinstance(part, str)]
    key = ".".join(names)
    if error["type"] == "extra_forbidden":
        return Problem(key, f"unknown key `{key}`{_suggestion(names)}")
    items = [part for part in error["loc"] if isinstance(part, int)]
    if error["type"] == "missing":
        missing = f"item {items[0]} of `{key}`" if items else f"`{key}`"
        return Problem(key, f"{missing} is missing")
    message = _message(error)
    if items:
        message = f"item {items[0]}: {message}"
    return Problem(key, f"{key}{_shown(_value_at(params, names))}: {message}")


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return ""
    # As written in YAML: repr would double every backslash of a regular expression.
    return f" = '{value}'" if isinstance(value, str) else f" = {value!r}"


def _message(error: dict[str, Any]) -> str:
    if error["type"] == "value_error":
        return str(error["ctx"]["error"])
    return error["msg"].replace("Input should be", "must be")


def _suggestion(names: list[str]) -> str:
    block = ProjectParameters
    for name in names[:-1]:
        block = block.model_fields[name].annotation
    close = get_close_matches(names[-1], list(block.model_fields), n=1)
    return f" (did you mean `{close[0]}`?)" if close else ""


def _value_at(params: dict[str, Any], names: list[str]) -> Any:
    value: Any = params
    for name in names:
        value = value[name]
    return value
