"""The parameter reference is made from the models and conf/base, so it cannot drift."""

from __future__ import annotations

import pytest

from irv2_pipeline import parameters
from tools import parameter_reference as ref


@pytest.fixture(scope="module")
def reference() -> str:
    return ref.reference()


def rows(markdown: str) -> dict[str, list[str]]:
    """The reference's table rows, by key: the cells after the key."""
    table = {}
    for line in markdown.splitlines():
        if line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip("|").split(" | ")]
            table[cells[0].strip("`")] = cells[1:]
    return table


def test_every_modelled_key_has_its_rule(reference: str) -> None:
    table = rows(reference)
    for block in parameters.MODELLED_BLOCKS:
        model = ref.model_at(parameters.ProjectParameters, block)
        for key, rule in ref.field_rules(model, block):
            assert table[key][0] == rule


def test_a_block_modelled_in_part_says_which_keys_have_rules(reference: str) -> None:
    # evaluation's rule thresholds have models; its other keys are checked by conf/base.
    assert "evaluation" not in parameters.MODELLED_BLOCKS
    section = reference.split("### `evaluation`")[1].split("### ", maxsplit=1)[0]
    assert "`evaluation.diagnosis.image_property_drift`" in section.split("|")[0]
    assert "the other keys are checked against conf/base's" in section
    assert rows(section)["evaluation.diagnosis.image_property_drift.alpha"][0]


def test_rules_come_from_the_models(reference: str) -> None:
    table = rows(reference)
    # Field constraints, and the validator's own docstring.
    assert "≥ 0, ≤ 255" in table["images.background"][0]
    image_size_rule = parameters._image_size.__doc__.strip().rstrip(".")
    assert image_size_rule in table["model.image_size"][0]
    # A rule between keys of a block, from its model validator.
    assert "`train + val + test` sums to 1" in reference


def test_every_key_of_conf_base_is_listed_with_its_values(reference: str) -> None:
    table = rows(reference)
    base, smoke = ref.load_parameters("base"), ref.load_parameters("smoke")
    for block, values in base.items():
        for key, _value in ref.leaves(values, block):
            assert key in table
    # conf/smoke's value is shown where it differs from conf/base's.
    assert base["model"]["image_size"] != smoke["model"]["image_size"]
    assert table["model.image_size"][1:3] == [
        f"`{base['model']['image_size']}`",
        f"`{smoke['model']['image_size']}`",
    ]
    assert table["model.seed"][2] == ""


def test_comments_are_read_per_key() -> None:
    text = "\n".join(
        [
            "# The block.",
            "outer:",
            "  # Above the key,",
            "  # on two lines.",
            "  first: 1",
            "  second: 2  # after the value",
            "",
            "  # Cut off by the blank line above: not the comment of `third`.",
            "",
            "  third: 3",
            "  presets:",
            "    - op: flip",
            "      # Inside a list item: not a key of the tree.",
            "      probability: 0.5",
            "  last: 4",
        ]
    )
    assert ref._file_comments(text) == {
        "outer": "The block.",
        "outer.first": "Above the key, on two lines.",
        "outer.second": "after the value",
    }


def test_the_hook_fills_the_marked_page_only() -> None:
    page = f"# Configuration\n\n{ref.MARKER}\n"
    filled = ref.on_page_markdown(page)
    assert ref.MARKER not in filled
    assert "| `model.weights` |" in filled
    assert ref.on_page_markdown("# Other page\n") == "# Other page\n"
