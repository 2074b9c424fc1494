"""Image sets made from formulas: a pretrained source and targets near and far from it.

Nothing here is downloaded. ``fractal`` images are formula-driven in the way of
FractalDB pre-training (Kataoka et al., ACCV 2020): each class is an iterated function
system (a few random contractive affine maps), each image one rendering of it by the
chaos game, with its maps perturbed, turned, scaled and coloured anew, so the set is
diverse by construction. A pretrained source made on fractals
(:mod:`irv2_pipeline.make_source`) has a *near* target in new fractal classes (the
same generator, other systems) and *far* ones in ``strokes`` (greyscale pen strokes,
another modality) and ``textures`` (colour gratings under noise).

Every image is drawn from a seed: the same call writes the same files.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Fractal classes whose rendering fills less (a dust of points) or more (a blob) of
# the frame than this are drawn again: they carry no shape to learn.
FILL_RANGE = (0.04, 0.45)
CHAOS_CHAINS = 3000
CHAOS_STEPS = 24
CHAOS_BURN_IN = 8


@dataclass(frozen=True)
class Fractal:
    """An iterated function system: affine maps ``x -> A x + b`` and their odds."""

    matrices: np.ndarray  # (maps, 2, 2)
    offsets: np.ndarray  # (maps, 2)
    odds: np.ndarray  # (maps,), sum 1


def fractal_classes(count: int, seed: int, size: int = 64) -> list[Fractal]:
    """``count`` fractal systems whose renderings fill part of the frame.

    Args:
        count: How many classes.
        seed: Seed of the draw; the same seed gives the same systems.
        size: The size at which the filling rate is checked.
    """
    rng = np.random.default_rng(seed)
    systems: list[Fractal] = []
    while len(systems) < count:
        maps = int(rng.integers(2, 5))
        matrices = rng.uniform(-1.0, 1.0, (maps, 2, 2))
        # Contractive maps (largest singular value below 1) keep the orbit bounded.
        largest = np.linalg.svd(matrices, compute_uv=False)[:, 0]
        matrices *= (rng.uniform(0.45, 0.9, maps) / largest)[:, None, None]
        determinants = np.abs(np.linalg.det(matrices)) + 1e-3
        system = Fractal(
            matrices=matrices,
            offsets=rng.uniform(-1.0, 1.0, (maps, 2)),
            odds=determinants / determinants.sum(),
        )
        mask = _rasterize(_orbit(system, rng), size, np.eye(2), 0.9) > 0
        if FILL_RANGE[0] <= mask.mean() <= FILL_RANGE[1]:
            systems.append(system)
    return systems


def fractal_image(system: Fractal, rng: np.random.Generator, size: int) -> np.ndarray:
    """One rendering of ``system``: perturbed maps, a random pose and colours.

    Returns:
        ``(size, size, 3)`` uint8 RGB.
    """
    jitter = 1.0 + rng.uniform(-0.08, 0.08, system.matrices.shape)
    perturbed = Fractal(system.matrices * jitter, system.offsets, system.odds)
    angle = rng.uniform(0, 2 * math.pi)
    pose = np.array(
        [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    )
    if rng.random() < 0.5:
        pose = pose @ np.diag([-1.0, 1.0])
    density = _rasterize(_orbit(perturbed, rng), size, pose, rng.uniform(0.6, 0.95))
    weight = np.clip(density / max(np.percentile(density[density > 0], 90), 1), 0, 1)
    # Strokes two or three pixels wide: a one-pixel orbit vanishes when resized.
    weight = (
        np.asarray(
            Image.fromarray((weight * 255).astype(np.uint8)).filter(
                ImageFilter.MaxFilter(3)
            ),
            np.float64,
        )
        / 255.0
    )
    background = rng.uniform(0, 255, 3)
    colours = rng.uniform(0, 255, (2, 3))
    # Colour varies across the figure (top to bottom), as in FractalDB's colour mode.
    ramp = np.linspace(0.0, 1.0, size)[:, None, None]
    foreground = colours[0] * (1 - ramp) + colours[1] * ramp
    pixels = background * (1 - weight[..., None]) + foreground * weight[..., None]
    noise = rng.normal(0, 6, pixels.shape)
    return np.clip(pixels + noise, 0, 255).astype(np.uint8)


def stroke_image(label: int, classes: int, rng: np.random.Generator, size: int):
    """Greyscale pen strokes whose direction is the class: another modality.

    Class ``label`` of ``classes`` draws 3-6 strokes at ``label * 180 / classes``
    degrees (give or take 12) in light ink on a dark ground or the reverse.

    Returns:
        ``(size, size, 3)`` uint8 with R = G = B.
    """
    dark = rng.random() < 0.5
    ground, ink = (int(rng.integers(0, 60)), int(rng.integers(180, 256)))
    if not dark:
        ground, ink = 255 - ground, 255 - ink
    canvas = Image.new("L", (size, size), ground)
    draw = ImageDraw.Draw(canvas)
    base = math.pi * label / classes
    for _ in range(int(rng.integers(3, 7))):
        angle = base + math.radians(rng.uniform(-12, 12))
        length = rng.uniform(0.3, 0.8) * size
        cx, cy = rng.uniform(0.2, 0.8, 2) * size
        dx, dy = math.cos(angle) * length / 2, math.sin(angle) * length / 2
        draw.line(
            [(cx - dx, cy - dy), (cx + dx, cy + dy)],
            fill=ink,
            width=max(1, int(size * rng.uniform(0.02, 0.06))),
        )
    grey = np.asarray(canvas, np.float64) + rng.normal(0, 4, (size, size))
    grey = np.clip(grey, 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def texture_image(label: int, classes: int, rng: np.random.Generator, size: int):
    """A colour grating under noise whose spatial frequency is the class.

    Returns:
        ``(size, size, 3)`` uint8 RGB.
    """
    cycles = 2.0 + 10.0 * label / max(classes - 1, 1)
    angle = rng.uniform(0, math.pi)
    y, x = np.mgrid[0:size, 0:size] / size
    phase = rng.uniform(0, 2 * math.pi)
    wave = np.sin(2 * math.pi * cycles * (x * math.cos(angle) + y * math.sin(angle)))
    wave = (wave + np.sin(phase + wave * 2)) / 2
    colours = rng.uniform(0, 255, (2, 3))
    weight = (wave[..., None] + 1) / 2
    pixels = colours[0] * (1 - weight) + colours[1] * weight
    return np.clip(pixels + rng.normal(0, 20, pixels.shape), 0, 255).astype(np.uint8)


GENERATORS = ("fractal", "strokes", "textures")


def write_image_folder(
    root: str | Path,
    generator: str,
    *,
    classes: int,
    images_per_class: int,
    seed: int,
    size: int = 96,
) -> Path:
    """Writes ``root/<label>/<label>_NNN.png``, one folder per class.

    Args:
        root: Where the class folders go (made if missing; existing files of the
            same names are overwritten, nothing else is touched).
        generator: One of :data:`GENERATORS`.
        classes: Number of classes.
        images_per_class: Images in each class.
        seed: Seed of the classes (fractal systems) and of every image.
        size: Side of the square images in pixels.

    Returns:
        ``root``.
    """
    draw = image_maker(generator, classes, seed, size)
    root = Path(root)
    for label in range(classes):
        folder = root / f"{generator}_{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(images_per_class):
            pixels = draw(label, index)
            Image.fromarray(pixels).save(folder / f"{folder.name}_{index:03d}.png")
    return root


def image_array(
    generator: str, *, classes: int, images_per_class: int, seed: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """The images :func:`write_image_folder` would write, as arrays in memory.

    Returns:
        ``(images, labels)``: ``(n, size, size, 3)`` uint8 and ``(n,)`` int.
    """
    draw = image_maker(generator, classes, seed, size)
    labels = np.repeat(np.arange(classes), images_per_class)
    images = np.stack(
        [
            draw(label, index)
            for label in range(classes)
            for index in range(images_per_class)
        ]
    )
    return images, labels


def image_maker(
    generator: str, classes: int, seed: int, size: int
) -> Callable[[int, int], np.ndarray]:
    """``draw(label, index)``: the image ``index`` of class ``label``, from its seed."""
    if generator not in GENERATORS:
        raise ValueError(f"generator {generator!r}: use one of {', '.join(GENERATORS)}")
    systems = fractal_classes(classes, seed) if generator == "fractal" else []

    def draw(label: int, index: int) -> np.ndarray:
        rng = np.random.default_rng([seed, label, index])
        if generator == "fractal":
            return fractal_image(systems[label], rng, size)
        if generator == "strokes":
            return stroke_image(label, classes, rng, size)
        return texture_image(label, classes, rng, size)

    return draw


def _orbit(system: Fractal, rng: np.random.Generator) -> np.ndarray:
    """Points of the system's attractor, by the chaos game on many chains at once."""
    points = rng.uniform(-1, 1, (CHAOS_CHAINS, 2))
    kept = []
    for step in range(CHAOS_STEPS):
        chosen = rng.choice(len(system.odds), CHAOS_CHAINS, p=system.odds)
        points = (
            np.einsum("nij,nj->ni", system.matrices[chosen], points)
            + system.offsets[chosen]
        )
        if step >= CHAOS_BURN_IN:
            kept.append(points)
    return np.concatenate(kept)


def _rasterize(
    points: np.ndarray, size: int, pose: np.ndarray, extent: float
) -> np.ndarray:
    """Point counts per pixel, the points posed and fitted to ``extent`` of the frame."""
    posed = points @ pose.T
    low, high = np.percentile(posed, [1, 99], axis=0)
    scale = extent / max(float((high - low).max()), 1e-9)
    centred = (posed - (low + high) / 2) * scale + 0.5
    pixels = np.floor(centred * size).astype(int)
    inside = ((pixels >= 0) & (pixels < size)).all(axis=1)
    density = np.zeros((size, size))
    np.add.at(density, (pixels[inside, 1], pixels[inside, 0]), 1.0)
    return density
