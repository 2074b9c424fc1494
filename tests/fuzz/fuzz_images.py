"""Coverage-guided fuzzing of ``images.load_image`` with atheris (libFuzzer).

The only exception allowed out of ``load_image`` is ``ImageRejected``; libFuzzer's own
``-timeout`` (seconds per input) and ``-rss_limit_mb`` flags bound time and memory.

    python tests/fuzz/fuzz_images.py -max_total_time=3600 -timeout=10 \
        -rss_limit_mb=512 CORPUS_DIR

``make_seed_corpus(folder)`` writes the small valid seed files (JPEG, PNG, GIF, WebP,
BMP, TIFF) that the test and the command above start from.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from irv2_pipeline.images import ImageRejected, OpenPolicy, load_image

# Small limits so that a mutated header cannot make a single input take seconds.
POLICY = OpenPolicy(max_pixels=4_000_000, min_size=1)


def fuzz_one(data: bytes) -> None:
    """Feeds one input; anything but ``ImageRejected`` propagates as a crash."""
    try:
        load_image(data, POLICY)
    except ImageRejected:
        pass


def make_seed_corpus(folder: Path) -> None:
    """Writes one small valid file of each allowed format into ``folder``."""
    from PIL import Image  # noqa: PLC0415 - only needed to make seeds

    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.new("RGB", (12, 9))
    rgb.putdata(
        [
            (x * 20 % 256, y * 28 % 256, (x + y) * 9 % 256)
            for y in range(9)
            for x in range(12)
        ]
    )
    frames = [rgb, rgb.rotate(90, expand=False)]
    seeds = {
        "seed.jpg": lambda f: rgb.save(f, "JPEG", quality=80),
        "seed.png": lambda f: rgb.convert("RGBA").save(f, "PNG"),
        "seed.gif": lambda f: frames[0].save(
            f, "GIF", save_all=True, append_images=frames[1:]
        ),
        "seed.webp": lambda f: rgb.save(f, "WEBP", quality=70),
        "seed.bmp": lambda f: rgb.convert("P").save(f, "BMP"),
        "seed.tif": lambda f: rgb.convert("CMYK").save(
            f, "TIFF", compression="tiff_lzw"
        ),
    }
    for name, write in seeds.items():
        buffer = io.BytesIO()
        write(buffer)
        (folder / name).write_bytes(buffer.getvalue())


def main() -> None:
    """Runs libFuzzer with the command-line flags given."""
    atheris.Setup(sys.argv, fuzz_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
