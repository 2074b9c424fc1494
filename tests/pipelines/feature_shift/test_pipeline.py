"""What `feature_shift` writes in `kedro run --env smoke` on the demo images.

The shared smoke run (``smoke_run``) is read: feature_shift reads ingestion's manifest
from its CSV there too (the catalog saves it, then loads it for the next pipeline).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from irv2_pipeline.pipelines.feature_shift.shift import PROFILE_COLUMNS

from .conftest import DEPTHS, GROUPS, UNITS, feature_shift_params


@pytest.mark.slow
def test_the_smoke_run_writes_every_output(smoke_run):
    project, log, _ = smoke_run
    assert "shift figures are meaningless" in log

    data = project / "data"
    manifest = pd.read_csv(data / "02_intermediate" / "image_manifest.csv")
    profile = pd.read_csv(data / "02_intermediate" / "bn_shift_profile.csv")
    assert list(profile.columns) == PROFILE_COLUMNS
    assert len(profile) == 204
    assert list(profile["depth"]) == list(range(204))
    assert list(dict.fromkeys(profile["unit"])) == UNITS
    assert not profile["weights_pretrained"].any()
    np.testing.assert_allclose(
        profile["shift"], profile["mean_part"] + profile["variance_part"]
    )

    split_shift = pd.read_csv(data / "02_intermediate" / "split_shift.csv")
    assert list(split_shift["pair"]) == ["train-vs-val", "train-vs-test"]
    counts = manifest["split"].value_counts()
    assert list(split_shift["n_compared"]) == [counts["val"], counts["test"]]
    assert split_shift["p_value"].between(0, 1, inclusive="right").all()
    assert split_shift["verdict"].str.contains("differs from train, p = ").all()

    transferability = pd.read_csv(data / "02_intermediate" / "transferability.csv")
    assert list(transferability["layer"]) == list(DEPTHS)
    assert np.isfinite(transferability["logme"]).all()
    assert transferability["probe_val_accuracy"].between(0, 1).all()

    plan = json.loads((data / "05_model_input" / "finetune_plan.json").read_text())
    assert plan["basis"] == "default_stages"
    assert plan["shift_meaningful"] is False
    assert plan["stages"] == feature_shift_params("smoke")["default_stages"]
    assert any("meaningless" in line for line in plan["rationale"])
    assert any("initializer's statistics" in line for line in plan["rationale"])

    summary = json.loads(
        (data / "08_reporting" / "feature_shift_summary.json").read_text()
    )
    assert summary["shift_meaningful"] is False
    assert "meaningless" in summary["warning"]
    assert [block["block"] for block in summary["blocks"]] == list(GROUPS)
    plot = data / "08_reporting" / "bn_shift_by_depth.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
