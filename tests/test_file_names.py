"""Odd file names from users' folders: spaces, Unicode, very long names, one base name
in two classes. Each image is keyed by its path relative to the image root, through
ingestion and augmentation, end to end.
"""

from __future__ import annotations

import pandas as pd

from tests.conftest import kedro

RAW = "data/01_raw/images"
# Demo images renamed (old name -> new name, relative to the image root).
RENAMED = {
    "bag/bag_000.png": "bag/holiday photo 01.png",
    "bag/bag_001.png": "bag/Tasche_größe_äöü_日本語.png",
    "bag/bag_002.png": "bag/sub folder é/" + "long_" * 48 + "name.png",
    "bag/bag_003.png": "bag/same name.png",
    "sneaker/sneaker_000.png": "sneaker/same name.png",
    "trouser/trouser_000.png": "trouser/ leading and trailing spaces .png",
}


def test_odd_names_are_ingested_and_augmented_under_their_relative_paths(
    project_copy,
):
    root = project_copy / RAW
    for old, new in RENAMED.items():
        (root / new).parent.mkdir(parents=True, exist_ok=True)
        (root / old).rename(root / new)
    assert len((root / RENAMED["bag/bag_002.png"]).name.encode()) > 240

    result = kedro(
        ["run", "--env", "smoke", "--pipelines", "ingestion,augmentation"],
        cwd=project_copy,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]

    manifest = pd.read_csv(project_copy / "data/02_intermediate/image_manifest.csv")
    rejected = pd.read_csv(project_copy / "data/02_intermediate/rejected_images.csv")
    assert rejected.empty, rejected.to_string()
    rows = manifest.set_index("path")
    for new in RENAMED.values():
        assert new in rows.index, new
        assert rows.loc[new, "label"] == new.split("/", 1)[0]
    assert manifest["path"].is_unique

    augmented = pd.read_csv(project_copy / "data/05_model_input/augmented_manifest.csv")
    train = set(manifest.loc[manifest["split"] == "train", "path"])
    odd_in_train = train & set(RENAMED.values())
    assert odd_in_train, "the split put none of the odd names in train"
    assert odd_in_train <= set(augmented["source_path"])
    folder = project_copy / "data/05_model_input/augmented"
    assert all((folder / path).is_file() for path in augmented["path"])
