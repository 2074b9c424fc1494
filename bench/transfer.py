"""Transfer benchmark: a pretrained source made here, a near and a far target.

Sources (``irv2_pipeline.make_source``, cached by content): ``adabn`` (random IRv2 with
the BatchNorm statistics of fractal images) and ``trained`` (IRv2 trained from scratch
on fractal classes at 75 px, then its statistics refreshed). Targets, written into
project copies (this checkout's ``conf/``): ``near`` (new fractal classes, the source's
own generator), ``far`` (greyscale pen strokes), ``textures`` (colour gratings) and
``demo`` (the bundled photos).

``--shift`` runs ``kedro run --env smoke --to-outputs feature_shift_summary`` for every
source and target and prints the block shift of each (the figures beside the
thresholds in ``conf/base/parameters_feature_shift.yml``).

``--outcome`` runs, with the ``trained`` source, on ``near`` and ``far``, side by side
in one invocation: the whole DAG (``kedro run --env smoke``), then the counterfactuals
pipeline with ``ours`` and ``all_frozen`` only. It reports per target the test accuracy
against the run's own linear probe at ``conv_7b`` (the ratio should be at least 1) and
``all_frozen`` minus ``ours`` with its 95 % paired-bootstrap interval (the measured plan
should win: an interval below 0).

``--choice`` lists two sources of one kind (``--source-kind``, default ``trained``) as
``model.sources``: one made on fractals, one on pen strokes. On ``near`` and ``far`` it
runs the whole DAG twice, each source forced (``model.source``), and reports which
source feature_shift ranked first, the test accuracy fine-tuned from each, and the
chosen minus the other with its 95 % paired-bootstrap interval over the same test
images (the choice should never lose: an interval not below 0).

Usage::

    python bench/transfer.py --shift
    python bench/transfer.py --outcome --images-per-class 60
    python bench/transfer.py --choice

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml
from scale import run_kedro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from irv2_pipeline.make_source import cached_source  # noqa: E402
from irv2_pipeline.pipelines.evaluation.metrics import (  # noqa: E402
    paired_bootstrap_difference,
)
from irv2_pipeline.synthetic_images import write_image_folder  # noqa: E402
from tests.conftest import copy_project  # noqa: E402

TARGETS = {"near": "fractal", "far": "strokes", "textures": "textures", "demo": None}
BLOCKS = ["stem", "block35", "mixed_6a", "block17", "mixed_7a", "block8", "conv_7b"]
SUMMARY = "data/08_reporting/feature_shift_summary.json"


def target_project(root: Path, target: str, args: argparse.Namespace) -> Path:
    """A project copy whose raw images are the target's (the demo's for ``demo``)."""
    project = copy_project(root / target)
    generator = TARGETS[target]
    if generator is not None:
        images = project / "data" / "01_raw" / "images"
        shutil.rmtree(images)
        (project / "data" / "01_raw" / "label_exclusions.csv").write_text("path\n")
        write_image_folder(
            images,
            generator,
            classes=args.classes,
            images_per_class=args.images_per_class,
            seed=args.seed + 7,
            size=96,
        )
    return project


def shift_rows(root: Path, args: argparse.Namespace) -> list[dict]:
    rows = []
    for kind in ("adabn", "trained"):
        weights = cached_source(kind, args.seed)
        for target in TARGETS:
            project = target_project(root / kind, target, args)
            run_kedro(
                [
                    "run",
                    "--env",
                    "smoke",
                    "--to-outputs",
                    "feature_shift_summary",
                    "--params",
                    f"model.weights={weights}",
                ],
                project,
                project / "kedro.log",
            )
            summary = json.loads((project / SUMMARY).read_text())
            shift = {block["block"]: block["shift"] for block in summary["blocks"]}
            rows.append(
                {
                    "source": kind,
                    "target": target,
                    "grayscale_share": summary["grayscale_share"],
                    "shift_starts_at": summary["shift_starts_at"],
                    **{block: round(shift[block], 4) for block in BLOCKS},
                }
            )
    return rows


def outcome_rows(root: Path, args: argparse.Namespace) -> list[dict]:
    weights = cached_source("trained", args.seed)
    rows = []
    for target in ("near", "far"):
        project = target_project(root, target, args)
        params = ["--params", f"model.weights={weights}"]
        dag = run_kedro(
            ["run", "--env", "smoke", *params], project, project / "dag.log"
        )
        (project / "conf" / "local" / "parameters_counterfactuals.yml").write_text(
            "counterfactuals:\n  only: [ours, all_frozen]\n"
        )
        run_kedro(
            ["run", "--env", "smoke", "--pipeline", "counterfactuals", *params],
            project,
            project / "counterfactuals.log",
        )
        metrics = json.loads(
            (project / "data/08_reporting/evaluation_metrics.json").read_text()
        )
        probe = pd.read_csv(project / "data/02_intermediate/transferability.csv")
        top = float(
            probe.loc[probe["layer"] == "conv_7b", "probe_val_accuracy"].iloc[0]
        )
        summary = pd.read_csv(
            project / "data/08_reporting/counterfactual_summary.csv"
        ).set_index("variant")
        frozen = summary.loc["all_frozen"]
        plan = json.loads(
            (project / "data/05_model_input/finetune_plan.json").read_text()
        )
        rows.append(
            {
                "target": target,
                "n_test": int(metrics["n_test"]),
                "test_accuracy": round(float(metrics["accuracy"]), 4),
                "probe_val_accuracy": round(top, 4),
                "ratio_to_probe": round(float(metrics["accuracy"]) / top, 3),
                "plan": [stage["name"] for stage in plan["stages"]],
                "all_frozen_minus_ours": round(float(frozen["accuracy_difference"]), 4),
                "interval": [
                    round(float(frozen["accuracy_difference_low"]), 4),
                    round(float(frozen["accuracy_difference_high"]), 4),
                ],
                "dag_seconds": dag["seconds"],
            }
        )
    return rows


def choice_rows(root: Path, args: argparse.Namespace) -> list[dict]:
    sources = {
        generator: cached_source(args.source_kind, args.seed, generator=generator)
        for generator in ("fractal", "strokes")
    }
    rows = []
    for target in ("near", "far"):
        accuracy, predictions, ranking = {}, {}, None
        for name in sources:
            project = target_project(root / name, target, args)
            file = project / "conf" / "smoke" / "parameters.yml"
            params = yaml.safe_load(file.read_text())
            params["model"]["sources"] = [
                {"name": source, "weights": str(weights)}
                for source, weights in sources.items()
            ]
            file.write_text(yaml.safe_dump(params, sort_keys=False))
            run_kedro(
                ["run", "--env", "smoke", "--params", f"model.source={name}"],
                project,
                project / "dag.log",
            )
            ranking = pd.read_csv(project / "data/08_reporting/source_ranking.csv")
            table = pd.read_csv(project / "data/07_model_output/test_predictions.csv")
            predictions[name] = table.sort_values("path", ignore_index=True)
            accuracy[name] = float(
                (predictions[name]["label"] == predictions[name]["predicted"]).mean()
            )
        chosen = str(ranking["source"].iloc[0])
        (other,) = [name for name in sources if name != chosen]
        labels = predictions[chosen]["label"].to_numpy()
        if not (labels == predictions[other]["label"].to_numpy()).all():
            raise RuntimeError("the two runs scored different test images")
        difference, low, high = paired_bootstrap_difference(
            labels,
            predictions[chosen]["predicted"].to_numpy(),
            predictions[other]["predicted"].to_numpy(),
            lambda y_true, y_pred: float((y_true == y_pred).mean()),
            resamples=2000,
            seed=args.seed,
        )
        rows.append(
            {
                "target": target,
                "ranked_first": chosen,
                "logme": dict(
                    zip(ranking["source"], ranking["logme"].round(4), strict=True)
                ),
                "n_test": len(labels),
                "accuracy_chosen": round(accuracy[chosen], 4),
                "accuracy_other": round(accuracy[other], 4),
                "chosen_minus_other": round(difference, 4),
                "interval": [round(low, 4), round(high, 4)],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shift", action="store_true")
    parser.add_argument("--outcome", action="store_true")
    parser.add_argument("--choice", action="store_true")
    parser.add_argument(
        "--source-kind", choices=("adabn", "trained"), default="trained"
    )
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--images-per-class", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not (args.shift or args.outcome or args.choice):
        parser.error("choose --shift, --outcome, --choice or several")
    result: dict = {"classes": args.classes, "images_per_class": args.images_per_class}
    with tempfile.TemporaryDirectory(prefix="transfer-") as scratch:
        root = Path(scratch)
        if args.shift:
            result["shift"] = shift_rows(root / "shift", args)
            print(pd.DataFrame(result["shift"]).to_string(index=False))
        if args.outcome:
            result["outcome"] = outcome_rows(root / "outcome", args)
            print(pd.DataFrame(result["outcome"]).to_string(index=False))
        if args.choice:
            result["source_kind"] = args.source_kind
            result["choice"] = choice_rows(root / "choice", args)
            print(pd.DataFrame(result["choice"]).to_string(index=False))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
