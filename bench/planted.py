"""Planted-cause benchmark: each diagnosis rule's false alarms and power, measured.

A matrix of image sets x causes. Each cell is a project copy
(``tests/conftest.py``'s ``copy_project``) whose ``data/01_raw/images`` holds the set
with the cause planted, and one ``kedro run --env smoke`` on it, with ``model.weights``
a pretrained source made here (``--source``: ``trained``, IRv2 trained from scratch on
20 classes of fractal images, the default, or ``adabn``, random convolutions with the
BatchNorm statistics of fractal images; ``irv2_pipeline.make_source``, cached by
content) and training cut as the planted tests
cut it (one head stage fitted to convergence on the pooled features, no augmented
copies: ``tests/pipelines/evaluation/conftest.py``'s ``CUT_TO_THE_FINDING``). The
rules that fired are read from ``diagnosis.json``, the rules that could not judge from
``diagnosis_not_judged.json``, the images ingestion flagged blank from the manifest.

Image sets (``--sets``, each with every ``--seeds``): ``fractal``, ``strokes``,
``textures`` (``irv2_pipeline.synthetic_images``: ``--classes`` classes of
``--images`` images, 96 px) and ``demo`` (the bundled Fashion-MNIST images, ``--images``
drawn per class with the seed). Causes (``--causes``):

- ``control``: nothing planted;
- ``label_noise_10``, ``label_noise_30``: that share of one class's images moved into
  the other classes' folders, in turn (``label_noise``);
- ``rare_classes``: half the classes cut to ``--rare-images`` images each
  (``class_imbalance``);
- ``shortcut-<side>-<colour>-<corner>``: the first two classes regrouped into two
  brands, every other image of each in ``brand_a`` with a square mark of ``side`` (a
  share of the image's side), ``red``, ``white`` or ``black``, in the ``top_left``,
  ``top_right``, ``bottom_left`` or ``bottom_right`` corner, the rest in ``brand_b``:
  the mark is what tells them apart (``shortcut``); ``shortcut`` alone is
  ``shortcut-0.1-red-top_left``;
- ``near_duplicates``: a fifth of every class copied with a little noise, ingestion
  told to group exact copies only (``ingestion.duplicates.max_hamming=0``), so the
  copies fall into other splits (``leakage``);
- ``blank``: a tenth of one class replaced by flat grey frames (ingestion's ``blank``
  flag).

Per rule it reports the false-positive rate (the share of control runs where it fired)
and, for the rule a cause names, the power (the share of that cause's runs where it
fired), each with a 95% Wilson interval, and how often the rule could not judge.
``random_weights`` cannot fire (every run has a source); ``small_test_set`` is a true
caveat of sets this small, not an alarm; ``domain_gap`` is a property of the set, not
a planted cause (the sources are made on fractals: near for ``fractal``, far for
``strokes``), so its rate is given per set. With ``adabn`` the features are those of
random convolutions and the model is poor on every set: rules that a poor model
rightly raises (``dummy_baseline``, ``overfitting``) then fire on the controls too.

Usage::

    python bench/planted.py                                   # the whole matrix
    python bench/planted.py --sets fractal --seeds 0 --causes control shortcut

It prints one line per run, the table in Markdown (``--table FILE`` also writes it),
and, as its last line, one JSON object with every run and rate. ``--keep DIR`` keeps
each run's JSON and CSV reports (``DIR/<set>-<seed>-<cause>/``).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from irv2_pipeline.make_source import cached_source  # noqa: E402
from irv2_pipeline.pipelines.evaluation.verdict import RULES  # noqa: E402
from irv2_pipeline.synthetic_images import GENERATORS, write_image_folder  # noqa: E402
from tests.conftest import copy_project, kedro  # noqa: E402
from tests.pipelines.evaluation.conftest import (  # noqa: E402
    CUT_TO_THE_FINDING,
    HEAD_ONLY,
)

SETS = (*GENERATORS, "demo")
DEMO = ROOT / "data" / "01_raw" / "images"
CAUSES = (
    "control",
    "label_noise_10",
    "label_noise_30",
    "rare_classes",
    "shortcut",
    "shortcut-0.06-white-bottom_right",
    "near_duplicates",
    "blank",
)
# The rule each cause must raise; "blank" is ingestion's flag, not a diagnosis rule.
NAMED_RULE = {
    "label_noise": "label_noise",
    "rare_classes": "class_imbalance",
    "shortcut": "shortcut",
    "near_duplicates": "leakage",
    "blank": "blank",
}
COLOURS = {"red": (255, 0, 0), "white": (255, 255, 255), "black": (0, 0, 0)}
CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")
BLANK_GREY = 128
Z95 = 1.959964


def wilson(hits: int, runs: int) -> tuple[float, float]:
    """The 95% Wilson score interval of a rate of ``hits`` in ``runs``."""
    if runs == 0:
        return (math.nan, math.nan)
    rate = hits / runs
    centre = rate + Z95**2 / (2 * runs)
    spread = Z95 * math.sqrt(rate * (1 - rate) / runs + Z95**2 / (4 * runs**2))
    scale = 1 + Z95**2 / runs
    return ((centre - spread) / scale, (centre + spread) / scale)


def write_set(images: Path, name: str, classes: int, per_class: int, seed: int) -> None:
    """Fills the empty ``images`` folder with the set ``name`` drawn with ``seed``."""
    if name in GENERATORS:
        write_image_folder(
            images, name, classes=classes, images_per_class=per_class, seed=seed
        )
        return
    rng = np.random.default_rng(seed)
    for folder in sorted(DEMO.iterdir()):
        files = sorted(folder.glob("*.png"))
        chosen = rng.choice(len(files), min(per_class, len(files)), replace=False)
        (images / folder.name).mkdir(parents=True)
        for index in sorted(chosen):
            shutil.copy2(files[index], images / folder.name / files[index].name)


def class_folders(images: Path) -> list[Path]:
    """The class folders of ``images``, sorted."""
    return sorted(path for path in images.iterdir() if path.is_dir())


def move_labels(images: Path, share: float, rng: np.random.Generator) -> None:
    """Moves ``share`` of the first class's images into the other classes, in turn."""
    source, *others = class_folders(images)
    files = sorted(source.glob("*.png"))
    chosen = sorted(rng.choice(len(files), round(share * len(files)), replace=False))
    for turn, index in enumerate(chosen):
        files[index].rename(others[turn % len(others)] / files[index].name)


def cut_classes(images: Path, keep: int, rng: np.random.Generator) -> None:
    """Keeps ``keep`` images in each of the last half of the classes."""
    folders = class_folders(images)
    for folder in folders[len(folders) - len(folders) // 2 :]:
        files = sorted(folder.glob("*.png"))
        dropped = rng.choice(len(files), max(0, len(files) - keep), replace=False)
        for index in dropped:
            files[index].unlink()


def watermark_brands(images: Path, side: float, colour: str, corner: str) -> None:
    """Regroups the first two classes into two brands, the first one watermarked.

    Every other image of each of the two classes goes to ``brand_a``, with a square
    mark in one corner, the rest to ``brand_b``: the mark is then what tells the two
    brands apart, as ``tests/pipelines/evaluation/test_shortcut_planted.py`` plants
    it. A mark on a class the model can tell by its content is not a shortcut it
    needs, and masking it changes nothing.
    """
    if colour not in COLOURS or corner not in CORNERS:
        raise ValueError(f"shortcut colour {colour!r} or corner {corner!r} unknown")
    products = class_folders(images)[:2]
    brands = [images / "brand_a", images / "brand_b"]
    for brand in brands:
        brand.mkdir()
    for folder in products:
        for index, path in enumerate(sorted(folder.glob("*.png"))):
            pixels = np.array(Image.open(path).convert("RGB"))
            if index % 2 == 0:
                height, width = pixels.shape[:2]
                size = max(1, round(side * min(height, width)))
                top = corner.startswith("top")
                rows = slice(0, size) if top else slice(height - size, None)
                left = corner.endswith("left")
                cols = slice(0, size) if left else slice(width - size, None)
                pixels[rows, cols] = COLOURS[colour]
            Image.fromarray(pixels).save(
                brands[index % 2] / f"{folder.name}_{path.name}"
            )
            path.unlink()
        folder.rmdir()


def copy_near(images: Path, share: float, rng: np.random.Generator) -> None:
    """Adds a noisy copy of ``share`` of every class's images beside them."""
    for folder in class_folders(images):
        files = sorted(folder.glob("*.png"))
        for index in rng.choice(len(files), round(share * len(files)), replace=False):
            pixels = np.array(Image.open(files[index]).convert("RGB")).astype(float)
            noisy = np.clip(pixels + rng.normal(0, 3, pixels.shape), 0, 255)
            copy = folder / f"{files[index].stem}_copy.png"
            Image.fromarray(noisy.astype(np.uint8)).save(copy)


def blank_out(images: Path, share: float, rng: np.random.Generator) -> None:
    """Replaces ``share`` of the first class's images with flat grey frames."""
    files = sorted(class_folders(images)[0].glob("*.png"))
    for index in rng.choice(len(files), max(1, round(share * len(files))), False):
        size = Image.open(files[index]).size
        Image.new("RGB", size, (BLANK_GREY,) * 3).save(files[index])


def plant(images: Path, cause: str, rare_images: int, seed: int) -> dict:
    """Plants ``cause`` into ``images``; returns the parameters it needs, if any."""
    rng = np.random.default_rng([seed, 7])
    if cause.startswith("label_noise_"):
        move_labels(images, int(cause.rsplit("_", 1)[1]) / 100, rng)
    elif cause == "rare_classes":
        cut_classes(images, rare_images, rng)
    elif cause.startswith("shortcut"):
        side, colour, corner = cause.split("-")[1:] or ["0.1", "red", "top_left"]
        watermark_brands(images, float(side), colour, corner)
    elif cause == "near_duplicates":
        copy_near(images, 0.2, rng)
        # Exact copies only: the near copies escape ingestion's grouping.
        return {"ingestion": {"duplicates": {"max_hamming": None}}}
    elif cause == "blank":
        blank_out(images, 0.1, rng)
    elif cause != "control":
        raise ValueError(f"cause {cause!r}: use one of {', '.join(CAUSES)}")
    return {}


def rule_of(cause: str) -> str | None:
    """The rule ``cause`` must raise (None for the control)."""
    return next(
        (rule for prefix, rule in NAMED_RULE.items() if cause.startswith(prefix)), None
    )


def run_cell(
    workspace: Path,
    cell: dict,
    source: Path,
    *,
    classes: int,
    per_class: int,
    rare: int,
    keep: Path | None = None,
) -> dict:
    """One planted run: what fired, what could not judge, the blank flags, seconds.

    With ``keep``, the run's reports (JSON and CSV) are copied into a folder of it
    named after the cell: every rule's figures, to set thresholds from afterwards.
    """
    project = copy_project(workspace / f"{cell['set']}-{cell['seed']}-{cell['cause']}")
    images = project / "data" / "01_raw" / "images"
    shutil.rmtree(images)
    images.mkdir()
    write_set(images, cell["set"], classes, per_class, cell["seed"])
    overrides = plant(images, cell["cause"], rare, cell["seed"])
    stages = project / "conf" / "smoke" / "parameters_finetune.yml"
    conf = yaml.safe_load(stages.read_text())
    conf["finetune"]["stages"] = HEAD_ONLY
    stages.write_text(yaml.safe_dump(conf))
    # conf/smoke merges key by key over conf/base (settings.py: soft merge).
    for block, values in overrides.items():
        (project / "conf" / "smoke" / f"parameters_{block}.yml").write_text(
            yaml.safe_dump({block: values})
        )
    params = ",".join([CUT_TO_THE_FINDING, f"model.weights={source}"])
    started = time.monotonic()
    result = kedro(["run", "--env", "smoke", "--params", params], project, 3600)
    seconds = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(
            f"{cell}: kedro run failed:\n{(result.stdout + result.stderr)[-4000:]}"
        )
    reports = project / "data" / "08_reporting"
    manifest = pd.read_csv(project / "data" / "02_intermediate" / "image_manifest.csv")
    fired = [f["rule"] for f in json.loads((reports / "diagnosis.json").read_text())]
    if manifest["blank"].astype(bool).any():
        fired.append("blank")
    skipped = json.loads((reports / "diagnosis_not_judged.json").read_text())
    noise = json.loads((reports / "label_noise_estimate.json").read_text())
    if keep is not None:
        kept = keep / project.name
        kept.mkdir(parents=True, exist_ok=True)
        data = project / "data"
        for folder in (reports, data / "02_intermediate", data / "07_model_output"):
            for path in folder.iterdir():
                if path.suffix in {".json", ".csv"}:
                    shutil.copy2(path, kept / path.name)
    shutil.rmtree(project)
    return {
        **cell,
        "fired": fired,
        "not_judged": [rule["rule"] for rule in skipped],
        # What label_noise's thresholds are held against, to set them from controls.
        "label_noise": {
            "worst_class_rate": round(
                max(
                    (
                        max(c["noise_rate"], c["mislabelled_share"])
                        for c in noise["classes"]
                    ),
                    default=math.nan,
                ),
                4,
            )
            if noise.get("estimated")
            else None,
            "n_flagged": noise.get("n_flagged"),
            "out_of_sample_accuracy": noise.get("out_of_sample_accuracy"),
        },
        "seconds": round(seconds, 1),
    }


def rates(runs: list[dict]) -> pd.DataFrame:
    """Per rule: false positives on the controls, power on its causes, not judged."""
    controls = [run for run in runs if run["cause"] == "control"]
    rows = []
    for rule in (*RULES, "blank"):
        causes = [run for run in runs if rule_of(run["cause"]) == rule]
        false_hits = sum(rule in run["fired"] for run in controls)
        hits = sum(rule in run["fired"] for run in causes)
        rows.append(
            {
                "rule": rule,
                "false_positive": f"{false_hits}/{len(controls)}",
                "fp_rate": false_hits / len(controls) if controls else math.nan,
                "fp_ci95": wilson(false_hits, len(controls)),
                "power": f"{hits}/{len(causes)}" if causes else "",
                "power_rate": hits / len(causes) if causes else math.nan,
                "power_ci95": wilson(hits, len(causes)),
                "not_judged": sum(rule in run["not_judged"] for run in runs),
            }
        )
    return pd.DataFrame(rows)


def markdown(table: pd.DataFrame, runs: list[dict]) -> str:
    """The rates as a Markdown table, and domain_gap per set."""

    def rate(rate: float, interval: tuple[float, float], count: str) -> str:
        if not count or math.isnan(rate):
            return "-"
        return f"{count} = {rate:.2f} [{interval[0]:.2f}, {interval[1]:.2f}]"

    lines = [
        "| rule | false positives on controls [95% CI] | power on its cause [95% CI]"
        f" | not judged (of {len(runs)} runs) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {row.rule} | {rate(row.fp_rate, row.fp_ci95, row.false_positive)} | "
        f"{rate(row.power_rate, row.power_ci95, row.power)} | {row.not_judged} |"
        for row in table.itertuples()
    ]
    gap = {}
    for run in runs:
        fired, total = gap.get(run["set"], (0, 0))
        gap[run["set"]] = (fired + ("domain_gap" in run["fired"]), total + 1)
    lines += [
        "",
        "domain_gap per set (the sources are made on fractals): "
        + ", ".join(f"{name} {hits}/{total}" for name, (hits, total) in gap.items()),
    ]
    return "\n".join(lines)


def matrix(sets: Iterable[str], seeds: Iterable[int], causes: Iterable[str]):
    """Every cell, the set and seed outermost so that a cut run covers each cause."""
    return [
        {"set": name, "seed": seed, "cause": cause}
        for seed in seeds
        for name in sets
        for cause in causes
    ]


def main(argv: list[str] | None = None, log: Callable[[str], None] = print) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--causes", nargs="+", default=list(CAUSES))
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--images", type=int, default=60, help="images per class")
    parser.add_argument("--rare-images", type=int, default=12)
    parser.add_argument("--source", choices=("trained", "adabn"), default="trained")
    parser.add_argument("--table", type=Path, help="also write the table here")
    parser.add_argument(
        "--keep", type=Path, help="copy each run's JSON and CSV reports under here"
    )
    args = parser.parse_args(argv)
    source = cached_source(args.source, seed=0)
    runs = []
    with tempfile.TemporaryDirectory(prefix="planted-") as workspace:
        for cell in matrix(args.sets, args.seeds, args.causes):
            run = run_cell(
                Path(workspace),
                cell,
                source,
                classes=args.classes,
                per_class=args.images,
                rare=args.rare_images,
                keep=args.keep,
            )
            log(
                f"{run['set']} seed {run['seed']} {run['cause']}: fired "
                f"{', '.join(run['fired']) or 'nothing'}; not judged "
                f"{', '.join(run['not_judged']) or 'none'} ({run['seconds']} s)"
            )
            runs.append(run)
    table = rates(runs)
    text = markdown(table, runs)
    log(text)
    if args.table:
        args.table.write_text(text + "\n")
    figures = {
        "runs": runs,
        "rates": json.loads(table.to_json(orient="records")),
        "command": "python bench/planted.py " + " ".join(argv or sys.argv[1:]),
    }
    log(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
