"""Counterfactuals benchmark: what the variants cost against one training of ours.

In one project copy (this checkout's ``conf/``, the demo images), after
``kedro run --env smoke`` has made the inputs (or in ``--project``, a finished smoke
run, copied first), it runs side by side, one after the other:

1. ``kedro run --env smoke --pipeline finetune`` (one training of ours, as the DAG
   trains it; the default checkpoints are deleted first so it trains afresh);
2. ``kedro run --env smoke --pipeline counterfactuals`` with the variants of
   ``--variants`` (written to the copy's ``conf/local``; ``all``: every variant).

One training of ours is the ``finetune`` pipeline alone (its test predictions are
``evaluation``'s); each variant's cost includes its test predictions, which the
counterfactuals pipeline makes. Cost is counted in backbone passes: images through
IRv2, from each run's own records (``finetune_stages.csv``, the log): a training step is one pass per image
(forward and backward), feature extraction, BatchNorm adaptation and test prediction
one pass per image. Range tests count ``steps x seeds x batch`` training passes.
Cached pooled features count once per feature set actually computed: the log says
"Cached ..." when a run computed them and "read from" when a variant read the ones
another variant computed (``finetune.feature_cache_dir``), so the figure "without
sharing" is the same records with every read counted as a computation.

Usage::

    python bench/counterfactuals.py                       # every variant
    python bench/counterfactuals.py --variants ours,all_frozen --project /tmp/smoke

It prints a table, one row per variant, and as its last line one JSON object: the
passes and wall time of each, the totals and their ratios to one training of ours
(measured in the same run), and the core count.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml
from scale import run_kedro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import copy_project  # noqa: E402

STAGES = "data/07_model_output/finetune_stages.csv"
MANIFEST = "data/02_intermediate/image_manifest.csv"
COMPUTED = re.compile(r"Cached (\d+) pooled features")
READ = re.compile(r"Pooled features of (\d+) images read from")


def stage_passes(stages: pd.DataFrame, n_val: int, lr_find: dict) -> dict[str, int]:
    """Backbone passes of one training run from its stage records (features apart)."""
    train = forward = 0
    backbone_trained_since_adapt = True
    for stage in stages.to_dict("records"):
        if stage["bn_policy"] == "adapt" and backbone_trained_since_adapt:
            # AdaBN runs the backbone over the original training images once.
            forward += int(stage["train_images"]) - int(stage["augmented_images"])
            backbone_trained_since_adapt = False
        if not stage["cached_features"]:
            epochs = int(stage["epochs_trained"])
            train += epochs * int(stage["train_images"])
            forward += epochs * n_val
            backbone_trained_since_adapt = True
        if pd.notna(stage.get("planned_learning_rate")):
            # The stage's range test ran: steps x seeds batches of training.
            sweeps = len(lr_find["seeds"]) * int(lr_find["steps"])
            if not stage["cached_features"]:
                train += sweeps * int(stage["global_batch_size"])
    return {"training": train, "forward": forward}


def feature_passes(log: str) -> tuple[int, int]:
    """Images whose pooled features were computed, and read from another variant's."""
    computed = sum(int(n) for n in COMPUTED.findall(log))
    read = sum(int(n) for n in READ.findall(log))
    return computed, read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="all")
    parser.add_argument("--project", type=Path, help="a finished smoke run to copy")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench_counterfactuals_"))
    try:
        project = workdir / "project"
        if args.project:
            shutil.copytree(args.project, project, symlinks=True)
            shutil.rmtree(project / "conf")
            shutil.copytree(ROOT / "conf", project / "conf")
            shutil.rmtree(project / "data" / "06_models" / "counterfactuals", True)
        else:
            copy_project(project)
            run_kedro(["run", "--env", "smoke"], project, workdir / "smoke.log")
        only = None if args.variants == "all" else args.variants.split(",")
        for env in ("local", "smoke"):
            (project / "conf" / env / "parameters_counterfactuals.yml").write_text(
                yaml.safe_dump({"counterfactuals": {"only": only}})
            )
        params = load_smoke_parameters(project)
        manifest = pd.read_csv(project / MANIFEST)
        n_val = int((manifest["split"] == "val").sum())
        n_test = int((manifest["split"] == "test").sum())
        lr_find = params["finetune"]["lr_find"]

        shutil.rmtree(project / "data" / "06_models" / "checkpoints", True)
        ours_log = workdir / "finetune.log"
        ours_run = run_kedro(
            ["run", "--env", "smoke", "--pipeline", "finetune"], project, ours_log
        )
        text = ours_log.read_text()
        computed, _ = feature_passes(text)
        ours = stage_passes(pd.read_csv(project / STAGES), n_val, lr_find)
        ours_total = ours["training"] + ours["forward"] + computed
        print(
            f"one training of ours: {ours_total} backbone passes, {ours_run['seconds']} s"
        )

        cf_log = workdir / "counterfactuals.log"
        cf_run = run_kedro(
            ["run", "--env", "smoke", "--pipeline", "counterfactuals"], project, cf_log
        )
        rows = variant_rows(project, cf_log.read_text(), n_val, n_test, lr_find)
        table = pd.DataFrame(rows)
        print(table.to_string(index=False))
        shared = int(table["passes"].sum())
        unshared = shared + int(table["features_read"].sum())
        result = {
            "variants": table["variant"].to_list(),
            "per_variant": rows,
            "ours_one_training": {
                "passes": ours_total,
                "seconds": ours_run["seconds"],
                **ours,
                "features": computed,
            },
            "counterfactuals": {
                "passes_shared_features": shared,
                "passes_without_sharing": unshared,
                "seconds": cf_run["seconds"],
            },
            "ratio_passes_to_ours": round(shared / ours_total, 2),
            "ratio_passes_without_sharing_to_ours": round(unshared / ours_total, 2),
            "ratio_seconds_to_ours": round(cf_run["seconds"] / ours_run["seconds"], 2),
            "n_train_val_test": [
                int((manifest["split"] == "train").sum()),
                n_val,
                n_test,
            ],
            "cores": os.cpu_count(),
            "command": " ".join(["python", "bench/counterfactuals.py", *sys.argv[1:]]),
        }
        print(
            f"counterfactuals: {shared} passes ({result['ratio_passes_to_ours']}x "
            f"ours; {result['ratio_passes_without_sharing_to_ours']}x without shared "
            f"features), {cf_run['seconds']} s ({result['ratio_seconds_to_ours']}x)"
        )
        print(json.dumps(result))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def variant_rows(
    project: Path, log: str, n_val: int, n_test: int, lr_find: dict
) -> list[dict]:
    """One row per variant: its passes, counted from its records and its log part."""
    parts = re.split(r"(?=Running node: )", log)
    rows = []
    summary = pd.read_csv(project / "data/08_reporting/counterfactual_summary.csv")
    for name in summary["variant"]:
        stages = pd.read_csv(
            project
            / "data/07_model_output/counterfactuals"
            / name
            / "finetune_stages.csv"
        )
        # The training node's log: its header lists `<name>.variant_plan`.
        own = "".join(part for part in parts if f";{name}.variant_plan;" in part)
        computed, read = feature_passes(own)
        passes = stage_passes(stages, n_val, lr_find)
        total = passes["training"] + passes["forward"] + computed + n_test
        rows.append(
            {
                "variant": name,
                "training_passes": passes["training"],
                "forward_passes": passes["forward"] + n_test,
                "features_computed": computed,
                "features_read": read,
                "passes": total,
                "training_seconds": float(stages["seconds"].sum()),
            }
        )
    return rows


def load_smoke_parameters(project: Path) -> dict:
    """The smoke env's parameters as a run gets them."""
    from kedro.config import OmegaConfigLoader  # noqa: PLC0415

    from irv2_pipeline.settings import CONFIG_LOADER_ARGS  # noqa: PLC0415

    loader = OmegaConfigLoader(
        str(project / "conf"), **{**CONFIG_LOADER_ARGS, "default_run_env": "smoke"}
    )
    return dict(loader["parameters"])


if __name__ == "__main__":
    main()
