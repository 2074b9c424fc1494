"""Tests of the configuration: environments override conf/base key by key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT_ROOT, project_parameters

CONF = PROJECT_ROOT / "conf"


def _keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        keys.add(prefix + key)
        if isinstance(value, dict):
            keys |= _keys(value, f"{prefix}{key}.")
    return keys


@pytest.mark.parametrize(
    "path", sorted((CONF / "smoke").glob("parameters*.yml")), ids=Path.name.fget
)
def test_smoke_files_only_override_keys_that_conf_base_has(path):
    base_keys = _keys(project_parameters("base"))
    assert _keys(yaml.safe_load(path.read_text())) <= base_keys


def test_a_partial_override_keeps_the_other_keys_of_its_block():
    base, smoke = project_parameters("base"), project_parameters("smoke")
    assert smoke["model"]["image_size"] == 75 and smoke["model"]["weights"] is None
    assert _keys(smoke) == _keys(base)
    assert smoke["finetune"]["batch_size"] != base["finetune"]["batch_size"]
    assert smoke["finetune"]["head"] == base["finetune"]["head"]
