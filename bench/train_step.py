"""Images per second and model FLOP utilisation of finetune's exact training step.

The model is what ``finetune`` trains: ``[0, 255]`` RGB -> IRv2's preprocessing ->
InceptionResNetV2 (random weights) -> pooling -> head, trained as one stage of the
pipeline trains it (``classifier.training_model`` with the stage's BatchNorm policy,
``LayerwiseAdamW`` with the warm-up + cosine schedule, label-smoothed cross-entropy,
``fit`` with ``steps_per_execution``). The data are synthetic uint8 arrays in memory,
so the figure is the model's and the step's, not the input pipeline's
(``bench/input_pipeline.py`` measures that).

Model FLOPs per image are counted from the layer shapes: 2 x multiply-adds of every
convolution and dense layer forward, plus twice that (input and weight gradients)
for every such layer from the first trainable one on; BatchNorm, activations and
the optimizer are left out (the usual MFU convention). Utilisation is that times
images per second over the device's peak: a table of known devices' dense bf16/fp16
peaks, or ``--peak-tflops``.

Only Keras and the package's backend-agnostic modules (``backbone``, ``classifier``,
``pipelines/finetune/optimizer.py``) are imported, never TensorFlow, so it runs on a
machine with JAX and no TensorFlow::

    python bench/train_step.py                                   # TensorFlow, CPU
    KERAS_BACKEND=jax python bench/train_step.py --image-size 299 --batch-size 128 \\
        --precision mixed_bfloat16 --jit                         # a GPU box

It prints a short table and, as the last line, one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import keras
import numpy as np

from irv2_pipeline.backbone import load_irv2, set_trainable_from
from irv2_pipeline.classifier import (
    HeadSpec,
    InferenceMode,
    build_classifier,
    training_model,
)


def _finetune_optimizer():
    """``pipelines/finetune/optimizer.py``, loaded from its file: importing it as
    part of its package runs the package's ``__init__``, which imports the Kedro
    pipeline and with it TensorFlow (absent from a JAX-only machine)."""
    import irv2_pipeline  # noqa: PLC0415

    path = Path(irv2_pipeline.__file__).parent / "pipelines/finetune/optimizer.py"
    spec = importlib.util.spec_from_file_location("finetune_optimizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


optimizer_module = _finetune_optimizer()
layerwise_multipliers = optimizer_module.layerwise_multipliers
make_optimizer = optimizer_module.make_optimizer
warmup_cosine = optimizer_module.warmup_cosine

CLASSES = 10
# Dense (no sparsity) bf16/fp16 tensor-core peaks in TFLOPS, from the vendors' data
# sheets, by a part of the device's name.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "V100": 125.0,
    "T4": 65.0,
}


def build_trainee(
    backbone: keras.Model,
    unfreeze_from: str | None,
    bn_policy: str,
    jit: bool,
    steps_per_execution: int = 1,
) -> keras.Model:
    """The model one stage trains, compiled as ``finetune`` compiles it."""
    classifier = build_classifier(
        backbone, [f"class_{i}" for i in range(CLASSES)], HeadSpec(), seed=0
    )
    set_trainable_from(backbone, unfreeze_from)
    trainee = training_model(classifier, bn_policy)
    optimizer = make_optimizer(
        "adamw",
        warmup_cosine(1e-4, 10, 1, 100, 0.0),
        1e-5,
        layerwise_multipliers(backbone, 0.8),
    )
    trainee.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=0.1),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        jit_compile=jit,
        steps_per_execution=steps_per_execution,
    )
    optimizer.build(trainee.trainable_variables)
    return trainee


def _leaf_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Layers in topological order, nested models opened."""
    leaves = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            leaves.extend(_leaf_layers(layer))
        elif isinstance(layer, InferenceMode):
            leaves.extend(_leaf_layers(layer.model))
        else:
            leaves.append(layer)
    return leaves


def model_flops_per_image(model: keras.Model) -> tuple[float, float]:
    """Training and forward FLOPs per image (see the module docstring)."""
    forward = backward = 0.0
    trained = False
    for layer in _leaf_layers(model):
        if isinstance(layer, keras.layers.Conv2D):
            kernel = layer.kernel.shape
            out = layer.output.shape
            macs = out[1] * out[2] * kernel[0] * kernel[1] * kernel[2] * kernel[3]
        elif isinstance(layer, keras.layers.Dense):
            macs = layer.kernel.shape[0] * layer.kernel.shape[1]
        else:
            continue
        trained = trained or bool(layer.trainable_weights)
        forward += 2.0 * macs
        if trained:
            backward += 4.0 * macs
    return forward + backward, forward


def device_name() -> str:
    """The first accelerator's name, or the CPU."""
    if keras.backend.backend() == "jax":
        import jax  # noqa: PLC0415

        device = jax.devices()[0]
        return device.device_kind if device.platform != "cpu" else "cpu"
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf  # noqa: PLC0415

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            return tf.config.experimental.get_device_details(gpus[0]).get(
                "device_name", "gpu"
            )
    return "cpu"


def peak_tflops(name: str, given: float | None) -> float | None:
    """``--peak-tflops``, else the table's entry for the device, else ``None``."""
    if given is not None:
        return given
    for part, peak in PEAK_TFLOPS.items():
        if part in name:
            return peak
    return None


def measure(
    trainee: keras.Model, batch_size: int, warmup_steps: int, steps: int
) -> dict[str, float]:
    """Trains ``warmup_steps`` (tracing, compiling), then times ``steps`` more."""
    size = trainee.input_shape[1]
    rng = np.random.default_rng(0)
    count = batch_size * max(steps, warmup_steps)
    # uint8, as decoded images are: a quarter of float32's bytes to the device.
    pixels = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    labels = np.eye(CLASSES, dtype="float32")[rng.integers(0, CLASSES, count)]
    started = time.perf_counter()
    trainee.fit(
        pixels[: batch_size * warmup_steps],
        labels[: batch_size * warmup_steps],
        batch_size=batch_size,
        epochs=1,
        verbose=0,
    )
    warmup = time.perf_counter() - started
    started = time.perf_counter()
    trainee.fit(
        pixels[: batch_size * steps],
        labels[: batch_size * steps],
        batch_size=batch_size,
        epochs=1,
        verbose=0,
        shuffle=False,
    )
    seconds = time.perf_counter() - started
    return {
        "images_per_second": batch_size * steps / seconds,
        "seconds_per_step": seconds / steps,
        "warmup_seconds": warmup,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=75)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--unfreeze-from", default="block8_1")
    parser.add_argument("--bn-policy", default="frozen")
    parser.add_argument("--precision", default="float32")
    parser.add_argument("--jit", action="store_true")
    parser.add_argument(
        "--steps-per-execution",
        type=int,
        default=1,
        help="training steps per call (finetune.steps_per_execution); divides --steps",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's peak in TFLOPS (default: the table for known GPUs)",
    )
    args = parser.parse_args()
    unfreeze_from = None if args.unfreeze_from == "none" else args.unfreeze_from

    keras.config.set_dtype_policy(args.precision)
    trainee = build_trainee(
        load_irv2(None, args.image_size),
        unfreeze_from,
        args.bn_policy,
        args.jit,
        args.steps_per_execution,
    )
    figures = measure(trainee, args.batch_size, args.warmup_steps, args.steps)
    trainable = sum(int(np.prod(w.shape)) for w in trainee.trainable_weights)
    devices = [str(d) for d in keras.distribution.list_devices()]
    flops, forward_flops = model_flops_per_image(trainee)
    name = device_name()
    peak = peak_tflops(name, args.peak_tflops)
    achieved = flops * figures["images_per_second"] / 1e12
    mfu = achieved / peak if peak else None
    print(f"command        {' '.join(['python', *sys.argv])}")
    print(f"backend        {keras.backend.backend()}")
    print(f"devices        {', '.join(devices)} ({name})")
    print(
        f"model          IRv2 {args.image_size} px from {unfreeze_from}, BN {args.bn_policy}"
    )
    print(f"trainable      {trainable:,} parameters")
    print(f"precision      {args.precision}, XLA {args.jit}")
    print(
        f"batch x steps  {args.batch_size} x {args.steps} "
        f"({args.steps_per_execution} per execution)"
    )
    print(f"images/s       {figures['images_per_second']:.1f}")
    print(f"s/step         {figures['seconds_per_step']:.3f}")
    print(f"warm-up        {figures['warmup_seconds']:.1f} s (tracing, compiling)")
    print(
        f"model FLOPs    {flops / 1e9:.1f} G per image trained "
        f"({forward_flops / 1e9:.1f} G forward)"
    )
    print(
        f"achieved       {achieved:.3f} TFLOPS; MFU "
        + (
            f"{mfu:.1%} of {peak:g} TFLOPS"
            if mfu is not None
            else "n/a (unknown peak: --peak-tflops)"
        )
    )
    print(
        json.dumps(
            {
                "bench": "train_step",
                "backend": keras.backend.backend(),
                "devices": devices,
                "image_size": args.image_size,
                "batch_size": args.batch_size,
                "steps": args.steps,
                "unfreeze_from": unfreeze_from,
                "bn_policy": args.bn_policy,
                "precision": args.precision,
                "jit": args.jit,
                "steps_per_execution": args.steps_per_execution,
                "trainable_params": trainable,
                "device_name": name,
                "model_gflops_per_image": round(flops / 1e9, 3),
                "forward_gflops_per_image": round(forward_flops / 1e9, 3),
                "achieved_tflops": round(achieved, 4),
                "peak_tflops": peak,
                "mfu": None if mfu is None else round(mfu, 4),
                **{k: round(v, 4) for k, v in figures.items()},
                "cpu_count": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
