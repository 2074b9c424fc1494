"""Benchmark of the diagnosis passes, against one plain ``predict``.

Every demo image (``data/01_raw/images``, 240) stands for a test image; the model is
the classifier ``finetune`` builds (``classifier.build_classifier``, IRv2 with random
weights, ``--size`` px). Side by side in one process, alternating for ``--rounds``
rounds (medians), each over images already in memory but the label-issue pass:

- ``predict``: one plain forward pass over the images (``predict.predict_padded``),
  the unit: one backbone pass;
- ``occlusion``: what ``occlude_test_split`` runs: the images with the border band
  masked, then the centre square, then that square at each of ``random_patches``
  random places of conf/base (2 + 16 = 18 forward passes);
- ``grad_cam_plot``: what ``plot_grad_cam`` runs: Grad-CAM (a forward and a backward
  pass) on the images one plot shows, ``max_wrong`` + ``correct_per_class`` x classes
  of conf/base (8 + 2 x 3 = 14 here);
- ``grad_cam_all``: Grad-CAM on every image, the cost per image of a forward and
  backward pass (the pipeline does not run it; it prices a heatmap per test image);
- ``label_issues``: what ``embed_reference_images`` and ``find_label_issues`` run,
  every image standing for a training original (its own duplicate group): one
  streamed forward pass over the files for the pooled features
  (``predict.probabilities_and_features``), the k-fold cross-validated probe
  (``label_issues.out_of_sample_probabilities``) and confident learning by cleanlab
  (``label_issues.confident_learning``), with ``evaluation.label_issues`` of
  conf/base; its three parts are timed within the same calls (``label_issues_embed``,
  ``label_issues_probe``, ``label_issues_cleanlab``). The embedding reads and decodes
  the files, as the node does; the other passes run on pixels in memory.
  ``probabilities_and_features`` builds and traces its two-output model
  (probabilities and pooled features) once per model, so the first round pays it;
- ``predict_with_features``: that two-output model built once, in memory, traced
  before timing: what the embedding costs without the files and the tracing.

Backbone passes are counted as image-passes over the images divided by their number
(a backward pass counted apart). The last line printed is one JSON object.

Usage::

    python bench/diagnosis.py
    python bench/diagnosis.py --size 139 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402 - after the log level
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from irv2_pipeline.backbone import load_irv2, preprocessed_zero  # noqa: E402
from irv2_pipeline.classifier import (  # noqa: E402
    HeadSpec,
    build_classifier,
    pooled_features_layer,
)
from irv2_pipeline.images import OpenPolicy, load_image, resize  # noqa: E402
from irv2_pipeline.pipelines.evaluation.attribution import (  # noqa: E402
    grad_cam,
    occlude,
    occlusion_masks,
    random_squares,
)
from irv2_pipeline.pipelines.evaluation.label_issues import (  # noqa: E402
    confident_learning,
    out_of_sample_probabilities,
)
from irv2_pipeline.predict import (  # noqa: E402
    predict_padded,
    probabilities_and_features,
)

PROJECT = Path(__file__).resolve().parents[1]
ROOT = PROJECT / "data" / "01_raw" / "images"
EVALUATION = PROJECT / "conf" / "base" / "parameters_evaluation.yml"


def label_issue_pass(
    model: keras.Model,
    paths: list[Path],
    labels: np.ndarray,
    names: list[str],
    *,
    settings: dict,
    args: argparse.Namespace,
) -> dict[str, float]:
    """The label-issue pass of the evaluation pipeline, timed by part (seconds)."""
    started = time.perf_counter()
    features = probabilities_and_features(
        model,
        names,
        paths,
        image_size=args.size,
        policy=OpenPolicy(),
        batch_size=args.batch_size,
    ).features
    embedded = time.perf_counter()
    probabilities = out_of_sample_probabilities(
        features,
        labels,
        [path.name for path in paths],
        len(names),
        folds=args.folds,
        c=float(settings["c"]),
        max_iter=int(settings["max_iter"]),
        seed=int(settings["seed"]),
    )
    probed = time.perf_counter()
    confident_learning([str(path) for path in paths], labels, probabilities, names)
    finished = time.perf_counter()
    return {
        "label_issues_embed": embedded - started,
        "label_issues_probe": probed - embedded,
        "label_issues_cleanlab": finished - probed,
    }


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def batches(pixels: np.ndarray, size: int) -> list[np.ndarray]:
    return [pixels[start : start + size] for start in range(0, len(pixels), size)]


def occlusion_pass_masks(size: int, occlusion: dict) -> list[np.ndarray]:
    """The masks ``occlude_test_split`` predicts under: border, centre, random squares."""
    border, centre = occlusion_masks(size, float(occlusion["border_fraction"]))
    squares = random_squares(
        size,
        int(border.sum()),
        int(occlusion["random_patches"]),
        int(occlusion["seed"]),
    )
    return [border, centre, *squares]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=75)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--folds", type=int, help="default: evaluation.label_issues.folds of conf/base"
    )
    args = parser.parse_args()

    evaluation = yaml.safe_load(EVALUATION.read_text())["evaluation"]
    settings = evaluation["attribution"]
    if args.folds is None:
        args.folds = int(evaluation["label_issues"]["folds"])
    paths = sorted(ROOT.rglob("*.png"))
    names = sorted({path.parent.name for path in paths})
    labels = np.array([names.index(path.parent.name) for path in paths])
    policy = OpenPolicy()
    pixels = np.stack(
        [resize(load_image(path, policy).pixels, args.size) for path in paths]
    ).astype(np.float32)
    classifier = build_classifier(load_irv2(None, args.size), names, HeadSpec(), seed=0)
    model = classifier.model
    shown = int(settings["grad_cam"]["max_wrong"]) + len(names) * int(
        settings["grad_cam"]["correct_per_class"]
    )
    layer = "conv_7b_ac" if args.size >= 140 else "block35_10_ac"
    masks = occlusion_pass_masks(args.size, settings["occlusion"])
    fill = str(settings["occlusion"]["fill"])
    targets = labels.tolist()

    def plain() -> None:
        for batch in batches(pixels, args.batch_size):
            predict_padded(model, batch, args.batch_size)

    def occlusion() -> None:
        for batch in batches(pixels, args.batch_size):
            for mask in masks:
                hidden = occlude(
                    batch, mask, fill, preprocessed_zero(classifier.input_scaling)
                )
                predict_padded(model, hidden, args.batch_size)

    pooled = pooled_features_layer(model)
    with_features = keras.Model(
        model.input, [model.output, model.get_layer(pooled).output]
    )

    def plain_with_features() -> None:
        for batch in batches(pixels, args.batch_size):
            predict_padded(with_features, batch, args.batch_size)

    passes = {
        "predict": plain,
        "predict_with_features": plain_with_features,
        "occlusion": occlusion,
        "grad_cam_plot": lambda: grad_cam(
            model, layer, pixels[:shown], targets[:shown], args.batch_size
        ),
        "grad_cam_all": lambda: grad_cam(
            model, layer, pixels, targets, args.batch_size
        ),
    }
    parts: dict[str, list[float]] = {}

    def label_issues() -> None:
        timed_parts = label_issue_pass(
            model, paths, labels, names, settings=evaluation["label_issues"], args=args
        )
        for name, value in timed_parts.items():
            parts.setdefault(name, []).append(value)

    passes["label_issues"] = label_issues
    # Tracing, TensorFlow's and cleanlab's start-up go to a first untimed call of
    # each pass.
    for run in passes.values():
        run()
    parts.clear()
    times: dict[str, list[float]] = {name: [] for name in passes}
    for _ in range(args.rounds):
        for name, run in passes.items():
            times[name].append(timed(run))
    seconds = {
        name: float(np.median(values)) for name, values in (times | parts).items()
    }
    images = len(pixels)
    # Image-passes through the backbone per image: forward, backward.
    backbone_passes = {
        "predict": (1.0, 0.0),
        "predict_with_features": (1.0, 0.0),
        "occlusion": (float(len(masks)), 0.0),
        "grad_cam_plot": (shown / images, shown / images),
        "grad_cam_all": (1.0, 1.0),
        "label_issues": (1.0, 0.0),
        "label_issues_embed": (1.0, 0.0),
        "label_issues_probe": (0.0, 0.0),
        "label_issues_cleanlab": (0.0, 0.0),
    }

    print(
        f"python bench/diagnosis.py --size {args.size} --batch-size "
        f"{args.batch_size} --rounds {args.rounds} --folds {args.folds}"
    )
    print(
        f"{images} images, {len(names)} classes, {args.size} px, Grad-CAM at {layer}, "
        f"{shown} images in the plot, {args.folds}-fold probe, keras "
        f"{keras.__version__}"
    )
    print(f"{'pass':<23}{'forward':>9}{'backward':>9}{'seconds':>9}{'x predict':>10}")
    for name, (forward, backward) in backbone_passes.items():
        print(
            f"{name:<23}{forward:>9.3f}{backward:>9.3f}{seconds[name]:>9.2f}"
            f"{seconds[name] / seconds['predict']:>10.2f}"
        )
    figures = {
        "images": images,
        "image_size": args.size,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "grad_cam_layer": layer,
        "grad_cam_plot_images": shown,
        "backbone_passes": {
            name: {"forward": round(f, 3), "backward": round(b, 3)}
            for name, (f, b) in backbone_passes.items()
        },
        "seconds": {name: round(value, 3) for name, value in seconds.items()},
        "over_predict": {
            name: round(value / seconds["predict"], 2)
            for name, value in seconds.items()
        },
        "label_issue_folds": args.folds,
        "cores": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
