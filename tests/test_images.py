"""Tests of ``irv2_pipeline.images``: every odd file is built here, in tmp_path."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from irv2_pipeline.images import (
    ImageRejected,
    OpenPolicy,
    TreeEntry,
    fingerprint,
    load_image,
    load_resized,
    resize,
    walk_image_tree,
)

BLUE_BACKGROUND = OpenPolicy(background=(0, 0, 255))
ORIENTATION = 0x0112


def encode(image: Image.Image, fmt: str, **save_args) -> bytes:
    """The bytes of ``image`` saved as ``fmt``."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def write(path: Path, data: bytes) -> Path:
    """Writes ``data`` to ``path``, making its folder, and returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def texture(seed: int = 0, size: int = 64) -> Image.Image:
    """A random RGB texture."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def rejection(source, policy: OpenPolicy | None = None) -> str:
    """The reason ``load_image`` gives for refusing ``source``."""
    with pytest.raises(ImageRejected) as caught:
        load_image(source, policy or OpenPolicy())
    assert str(caught.value) == caught.value.reason
    return caught.value.reason


# ---------------------------------------------------------------- modes, point 1


def test_rgb_png_is_returned_unchanged(tmp_path):
    image = texture()
    loaded = load_image(write(tmp_path / "a.png", encode(image, "PNG")), OpenPolicy())
    assert (loaded.format, loaded.mode) == ("PNG", "RGB")
    assert loaded.pixels.dtype == np.uint8
    np.testing.assert_array_equal(loaded.pixels, np.asarray(image))


def test_greyscale_l_becomes_three_equal_channels():
    image = Image.new("L", (16, 12), 77)
    image.putpixel((3, 2), 200)
    loaded = load_image(encode(image, "PNG"), OpenPolicy())
    assert loaded.mode == "L"
    assert loaded.pixels.shape == (12, 16, 3)
    assert loaded.pixels[0, 0].tolist() == [77, 77, 77]
    assert loaded.pixels[2, 3].tolist() == [200, 200, 200]


def test_la_alpha_is_composited_on_the_policy_background():
    image = Image.new("LA", (16, 16), (200, 128))
    image.putpixel((0, 0), (100, 0))
    image.putpixel((1, 0), (100, 255))
    loaded = load_image(encode(image, "PNG"), BLUE_BACKGROUND)
    assert loaded.mode == "LA"
    assert loaded.pixels[0, 0].tolist() == [0, 0, 255]  # transparent: background
    assert loaded.pixels[0, 1].tolist() == [100, 100, 100]  # opaque: itself
    # 200 * 128/255 + background * 127/255
    assert loaded.pixels[5, 5].tolist() == [100, 100, 227]


def test_rgba_half_transparent_pixel_is_blended_with_the_background():
    image = Image.new("RGBA", (16, 16), (255, 0, 0, 128))
    image.putpixel((0, 0), (0, 255, 0, 0))
    image.putpixel((1, 0), (10, 20, 30, 255))
    loaded = load_image(encode(image, "PNG"), BLUE_BACKGROUND)
    assert loaded.mode == "RGBA"
    assert loaded.pixels[0, 0].tolist() == [0, 0, 255]
    assert loaded.pixels[0, 1].tolist() == [10, 20, 30]
    # red * 128/255 over blue * 127/255
    assert loaded.pixels[8, 8].tolist() == [128, 0, 127]


def test_rgba_default_background_is_white():
    image = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    loaded = load_image(encode(image, "PNG"), OpenPolicy())
    assert loaded.pixels[8, 8].tolist() == [255, 255, 255]


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_is_composited_on_the_background(fmt):
    image = Image.new("P", (16, 16), 0)
    image.putpalette([255, 0, 0, 0, 255, 0, 10, 20, 30] + [0] * (253 * 3))
    image.putpixel((0, 0), 1)
    image.putpixel((1, 0), 2)
    loaded = load_image(encode(image, fmt, transparency=0), BLUE_BACKGROUND)
    assert (loaded.format, loaded.mode) == (fmt, "P")
    assert loaded.pixels[0, 0].tolist() == [0, 255, 0]
    assert loaded.pixels[0, 1].tolist() == [10, 20, 30]
    # index 0 is transparent: its palette red must not show through
    assert loaded.pixels[8, 8].tolist() == [0, 0, 255]


def cmyk_bars() -> Image.Image:
    """Four 8-px-wide bars: pure cyan, magenta, yellow and black."""
    image = Image.new("CMYK", (32, 16))
    inks = [(255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 255)]
    for bar, ink in enumerate(inks):
        image.paste(ink, (8 * bar, 0, 8 * bar + 8, 16))
    return image


CMYK_AS_RGB = [[0, 255, 255], [255, 0, 255], [255, 255, 0], [0, 0, 0]]


def test_cmyk_tiff_has_its_true_colours():
    loaded = load_image(encode(cmyk_bars(), "TIFF"), OpenPolicy())
    assert (loaded.format, loaded.mode) == ("TIFF", "CMYK")
    assert loaded.pixels[8, 4::8].tolist() == CMYK_AS_RGB


def test_cmyk_jpeg_is_not_inverted():
    # Pillow writes CMYK JPEGs Adobe-style (inverted, with an APP14 marker), as
    # Photoshop does; reading must undo that. Flat 8x8 blocks at quality 100.
    data = encode(cmyk_bars(), "JPEG", quality=100)
    loaded = load_image(data, OpenPolicy())
    assert (loaded.format, loaded.mode) == ("JPEG", "CMYK")
    centre = loaded.pixels[8, 4::8].astype(int)
    np.testing.assert_allclose(centre, CMYK_AS_RGB, atol=2)


def test_16_bit_greyscale_png_is_scaled_not_clipped():
    values = np.array([65535, 32896, 1000, 257, 0], dtype=np.uint16)
    image = Image.fromarray(np.tile(np.repeat(values, 4), (8, 1)))
    data = encode(image, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    loaded = load_image(data, OpenPolicy())
    assert loaded.mode == "I;16"
    # value * 255 / 65535, rounded: clipping would give 255 for the first four
    assert loaded.pixels[0, ::4, 0].tolist() == [255, 128, 4, 1, 0]
    assert (loaded.pixels[..., 0] == loaded.pixels[..., 2]).all()


def test_one_bit_image_is_black_and_white():
    image = Image.new("1", (16, 16), 0)
    image.putpixel((2, 1), 1)
    loaded = load_image(encode(image, "PNG"), OpenPolicy())
    assert loaded.mode == "1"
    assert loaded.pixels[1, 2].tolist() == [255, 255, 255]
    assert loaded.pixels[0, 0].tolist() == [0, 0, 0]


@pytest.mark.parametrize(
    ("fmt", "save_args"),
    [("GIF", {}), ("PNG", {}), ("WEBP", {"lossless": True}), ("TIFF", {})],
)
def test_animated_image_gives_its_first_frame(fmt, save_args):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [Image.new("RGB", (16, 16), colour) for colour in colours]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], **save_args)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    loaded = load_image(data, OpenPolicy())
    assert loaded.format == fmt
    assert (loaded.pixels == [255, 0, 0]).all()


# ---------------------------------------------------------------- EXIF orientation


def quadrants() -> np.ndarray:
    """A 64x32 (width x height) image with four differently coloured quadrants."""
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:16, :32] = (255, 0, 0)
    pixels[:16, 32:] = (0, 255, 0)
    pixels[16:, :32] = (0, 0, 255)
    pixels[16:, 32:] = (255, 255, 255)
    return pixels


# Orientation -> the displayed image from the stored one (np.rot90 turns
# counter-clockwise; 6 means "turn 90 degrees clockwise to display").
TURNS = {1: 0, 3: 2, 6: -1, 8: 1}


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied(orientation, fmt):
    stored = Image.fromarray(quadrants())
    exif = stored.getexif()
    exif[ORIENTATION] = orientation
    data = encode(stored, fmt, exif=exif.tobytes(), quality=95, subsampling=0)
    loaded = load_image(data, OpenPolicy())

    upright = np.rot90(quadrants(), TURNS[orientation])
    assert loaded.pixels.shape == upright.shape
    swapped = orientation in (6, 8)
    assert (loaded.width, loaded.height) == ((32, 64) if swapped else (64, 32))
    # Exactly the decoder's own pixels, turned; and the quadrant colours where meant.
    raw = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(loaded.pixels, np.rot90(raw, TURNS[orientation]))
    corners = loaded.pixels[[4, 4, -5, -5], [4, -5, 4, -5]].astype(int)
    expected = upright[[4, 4, -5, -5], [4, -5, 4, -5]].astype(int)
    np.testing.assert_allclose(corners, expected, atol=4)


def test_orientation_6_top_left_is_the_stored_bottom_left():
    stored = Image.fromarray(quadrants())
    exif = stored.getexif()
    exif[ORIENTATION] = 6
    loaded = load_image(encode(stored, "PNG", exif=exif.tobytes()), OpenPolicy())
    assert loaded.pixels[0, 0].tolist() == [0, 0, 255]  # blue was bottom-left
    assert loaded.pixels[0, -1].tolist() == [255, 0, 0]  # red was top-left


# ---------------------------------------------------------------- bad input, point 2


def truncated(data: bytes) -> bytes:
    """The first half of ``data``: a download cut off in the middle."""
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.jpg", b"", "empty file (0 bytes)"),
        (
            "cut.jpg",
            truncated(encode(texture(), "JPEG")),
            "corrupt or truncated JPEG file",
        ),
        (
            "cut.png",
            truncated(encode(texture(), "PNG")),
            "corrupt or truncated PNG file",
        ),
        ("notes.jpg", b"shopping list:\n- eggs\n- milk\n", "a text file, not an image"),
        (
            "page.jpg",
            b"<!DOCTYPE html>\n<html><body>404 Not Found</body></html>",
            "an HTML page, not an image",
        ),
        (
            "picture.jpg",
            encode(texture(), "PPM"),
            "PPM image: format not allowed (allowed: JPEG, PNG, BMP, GIF, WEBP, TIFF)",
        ),
        (
            "favicon.png",
            encode(texture(size=32), "ICO"),
            "ICO image: format not allowed",
        ),
        (
            "drawing.png",
            b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>',
            "an XML/SVG document",
        ),
        ("noise.jpg", bytes(range(256)) * 4, "unrecognised content"),
    ],
)
def test_bad_file_is_rejected_with_a_readable_reason(tmp_path, name, content, reason):
    path = write(tmp_path / name, content)
    assert rejection(path).startswith(reason)
    if content:
        assert rejection(content).startswith(reason)  # bytes or path: the same


def test_image_under_the_minimum_size_is_rejected():
    data = encode(texture(size=64).crop((0, 0, 64, 7)), "PNG")
    assert rejection(data, OpenPolicy(min_size=8)) == (
        "too small: 64x7 px, the minimum side is 8 px (images.min_size)"
    )
    assert load_image(data, OpenPolicy(min_size=7)).height == 7


def test_decompression_bomb_is_rejected_before_decoding():
    # 10,000 x 10,000 one-bit pixels: 100 million pixels in about 12 KB.
    data = encode(Image.new("1", (10_000, 10_000)), "PNG")
    assert len(data) < 50_000
    assert rejection(data).startswith("decompression bomb: more than 50,000,000")


@pytest.mark.parametrize("max_pixels", [1000, 600])
def test_pixel_limit_is_a_parameter_and_an_error_not_a_warning(max_pixels):
    # 1024 pixels: above 1000 (Pillow would only warn) and above 2 x 600.
    data = encode(texture(size=32), "PNG")
    reason = rejection(data, OpenPolicy(max_pixels=max_pixels))
    assert reason.startswith("decompression bomb")
    assert f"{max_pixels:,}" in reason
    assert load_image(data, OpenPolicy(max_pixels=1024)).width == 32


def test_unreadable_path_is_rejected(tmp_path):
    assert rejection(tmp_path / "missing.jpg").startswith("cannot be read")


def test_content_decides_not_the_extension(tmp_path):
    image = texture()
    path = write(tmp_path / "really_a_png.jpg", encode(image, "PNG"))
    loaded = load_image(path, OpenPolicy())
    assert loaded.format == "PNG"
    np.testing.assert_array_equal(loaded.pixels, np.asarray(image))


def test_policy_from_parameters():
    policy = OpenPolicy.from_params(
        {"max_pixels": 1000, "min_size": 3, "background": [1, 2, 3]}
    )
    assert policy == OpenPolicy(max_pixels=1000, min_size=3, background=(1, 2, 3))
    assert OpenPolicy.from_params({}) == OpenPolicy()


# ---------------------------------------------------------------- fingerprint


def test_fingerprint_describes_the_upright_image(tmp_path):
    stored = Image.fromarray(quadrants())
    exif = stored.getexif()
    exif[ORIENTATION] = 6
    data = encode(stored, "PNG", exif=exif.tobytes())
    record = fingerprint(write(tmp_path / "turned.png", data), OpenPolicy())

    upright = encode(Image.fromarray(np.rot90(quadrants(), -1)), "BMP")
    same_pixels = fingerprint(write(tmp_path / "upright.bmp", upright), OpenPolicy())
    assert record == {
        "sha256": hashlib.sha256(data).hexdigest(),
        "phash": same_pixels["phash"],
        "width": 32,
        "height": 64,
        "format": "PNG",
        "mode": "RGB",
        # Half of every channel's pixels at 255, half at 0.
        "mean_colour": "#808080",
        "pixel_std": 127.5,
        # Grey levels (ITU-R 601 luma) of red, green, blue and white: 76, 150, 29,
        # 255 over a quarter of the image each.
        "brightness": 127.5,
        "contrast": 85.319,
    }
    assert len(record["phash"]) == 16
    assert same_pixels["sha256"] != record["sha256"]


def test_fingerprint_returns_the_reason_instead_of_raising(tmp_path):
    policy = OpenPolicy()
    assert fingerprint(write(tmp_path / "a.jpg", b""), policy) == "empty file (0 bytes)"
    assert fingerprint(tmp_path / "missing.jpg", policy).startswith("cannot be read")


# ---------------------------------------------------------------- walking the tree


@pytest.fixture
def odd_tree(tmp_path) -> Path:
    """An image root with hidden files and every kind of dangerous symbolic link."""
    root = tmp_path / "images"
    outside = tmp_path / "outside"
    write(outside / "secret.jpg", encode(texture(), "JPEG"))
    cat = root / "cat"
    write(cat / "a.jpg", encode(texture(1), "JPEG"))
    write(cat / "nested" / "b.png", encode(texture(2), "PNG"))
    for hidden in (".DS_Store", "._a.jpg", "Thumbs.db", "desktop.ini"):
        write(cat / hidden, b"\x00\x05\x16\x07")
    write(root / ".hidden_folder" / "c.jpg", encode(texture(3), "JPEG"))
    os.symlink(outside / "secret.jpg", cat / "outside_file.jpg")
    os.symlink(outside, cat / "outside_folder")
    os.symlink("..", cat / "parent_loop")
    os.symlink("self_loop", cat / "self_loop")
    os.symlink("nowhere.jpg", cat / "broken.jpg")
    os.symlink("a.jpg", cat / "inside_alias.jpg")
    os.symlink("nested", cat / "inside_folder")
    return root


def test_walk_reports_hidden_files_and_bad_links_and_never_follows_them(odd_tree):
    entries = list(walk_image_tree(odd_tree))
    by_path = {entry.path: entry.reason for entry in entries}
    assert len(by_path) == len(entries)
    usable = sorted(path for path, reason in by_path.items() if reason is None)
    assert usable == [
        "cat/a.jpg",
        "cat/inside_alias.jpg",
        "cat/inside_folder/b.png",
        "cat/nested/b.png",
    ]
    hidden = "hidden or system file, not an image"
    for path in ("cat/.DS_Store", "cat/._a.jpg", "cat/Thumbs.db", "cat/desktop.ini"):
        assert by_path[path] == hidden
    assert by_path[".hidden_folder"] == hidden
    outside = odd_tree.parent / "outside"
    assert by_path["cat/outside_file.jpg"] == (
        f"symbolic link to {outside / 'secret.jpg'}, outside the image root, "
        "not followed"
    )
    assert by_path["cat/outside_folder"].startswith(
        f"symbolic link to {outside}, outside the image root"
    )
    assert by_path["cat/parent_loop"] == (
        "symbolic link loop (points back to a parent folder), not followed"
    )
    assert by_path["cat/self_loop"] == "symbolic link loop, not followed"
    assert by_path["cat/broken.jpg"] == "broken symbolic link, not followed"
    # Nothing below a refused link or a hidden folder was walked.
    assert not [p for p in by_path if "/outside_folder/" in p or "_loop/" in p]
    assert not [p for p in by_path if p.startswith(".hidden_folder/")]


def test_walk_is_sorted_and_stable(odd_tree):
    first = list(walk_image_tree(odd_tree))
    assert first == list(walk_image_tree(odd_tree))
    assert all(isinstance(entry, TreeEntry) for entry in first)
    cat = [entry.path for entry in first if entry.path.count("/") == 1]
    assert cat == sorted(cat)


def test_walk_reports_special_files(tmp_path):
    root = tmp_path / "images"
    (root / "cat").mkdir(parents=True)
    os.mkfifo(root / "cat" / "pipe.jpg")
    assert list(walk_image_tree(root)) == [
        TreeEntry("cat/pipe.jpg", "not a regular file")
    ]


# ---------------------------------------------------------------- large photos


def photo(seed: int, size: tuple[int, int]) -> Image.Image:
    """A photo-like image: a smooth colour field with finer detail and grain."""
    rng = np.random.default_rng(seed)
    width, height = size

    def field(cells: int) -> np.ndarray:
        small = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
        big = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
        return np.asarray(big, dtype=np.int16)

    grain = rng.integers(-8, 9, (height, width, 1), dtype=np.int16)
    pixels = field(6) // 2 + field(48) // 2 + grain
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def test_a_large_jpeg_decodes_at_reduced_scale_but_keeps_its_size():
    data = encode(photo(0, (1600, 1200)), "JPEG", quality=90)
    full = load_image(data, OpenPolicy())
    reduced = load_image(data, OpenPolicy(), min_side=150)
    assert full.pixels.shape == (1200, 1600, 3)
    # 1/8 scale still leaves the shorter side at least min_side.
    assert reduced.pixels.shape == (150, 200, 3)
    assert (reduced.width, reduced.height) == (full.width, full.height) == (1600, 1200)
    # Not twice min_side: decoded at full size.
    assert load_image(data, OpenPolicy(), min_side=601).pixels.shape == (1200, 1600, 3)


def test_a_turned_large_jpeg_keeps_its_upright_size():
    stored = photo(1, (1600, 1200))
    exif = stored.getexif()
    exif[ORIENTATION] = 6
    data = encode(stored, "JPEG", exif=exif.tobytes(), quality=90)
    reduced = load_image(data, OpenPolicy(), min_side=150)
    assert reduced.pixels.shape == (200, 150, 3)
    assert (reduced.width, reduced.height) == (1200, 1600)
    scanned = fingerprint_of(data)
    assert (scanned["width"], scanned["height"]) == (1200, 1600)


def fingerprint_of(data: bytes) -> dict | str:
    """``fingerprint`` of a file holding ``data``."""
    with tempfile.TemporaryDirectory() as folder:
        return fingerprint(write(Path(folder) / "image.jpg", data), OpenPolicy())


@pytest.mark.parametrize("min_side", [0, 150])
def test_a_truncated_large_jpeg_is_rejected_at_any_scale(min_side):
    data = truncated(encode(photo(2, (1600, 1200)), "JPEG", quality=90))
    with pytest.raises(ImageRejected, match="corrupt or truncated JPEG file"):
        load_image(data, OpenPolicy(), min_side=min_side)
    assert fingerprint_of(data).startswith("corrupt or truncated JPEG file")


def test_a_corrupt_large_jpeg_gets_the_same_verdict_at_any_scale():
    data = bytearray(encode(photo(3, (1600, 1200)), "JPEG", quality=90))
    # A bad Huffman table: every scale has to decode the same entropy-coded data.
    table = data.index(b"\xff\xc4")
    data[table + 5 : table + 21] = b"\xff" * 16
    reasons = []
    for min_side in (0, 150):
        with pytest.raises(ImageRejected) as caught:
            load_image(bytes(data), OpenPolicy(), min_side=min_side)
        reasons.append(caught.value.reason)
    assert reasons[0] == reasons[1]
    assert reasons[0].startswith("corrupt or truncated JPEG file")


def test_reduced_scale_pixels_stay_close_to_a_full_decode():
    data = encode(photo(4, (2400, 1800)), "JPEG", quality=90)
    full = resize(load_image(data, OpenPolicy()).pixels, 299).astype(int)
    reduced = load_resized(data, OpenPolicy(), 299).astype(int)
    assert load_image(data, OpenPolicy(), min_side=598).pixels.shape[0] == 900
    difference = np.abs(full - reduced)
    assert difference.mean() < 1.0 and difference.max() <= 8
    # Small images are never reduced: the pixels are exactly a full decode's.
    small = encode(photo(5, (500, 400)), "JPEG", quality=90)
    np.testing.assert_array_equal(
        load_resized(small, OpenPolicy(), 299),
        resize(load_image(small, OpenPolicy()).pixels, 299),
    )


def test_a_large_photo_and_its_small_copy_still_hash_as_near_duplicates():
    large = photo(6, (2400, 1800))
    small = large.resize((600, 450), Image.Resampling.BICUBIC)
    hashes = [
        int(fingerprint_of(encode(image, "JPEG", quality=q))["phash"], 16)
        for image, q in ((large, 92), (small, 70))
    ]
    assert (hashes[0] ^ hashes[1]).bit_count() <= 4  # ingestion's max_hamming
