"""Tests for qvl_batch.rows.images: Qwen2.5-VL resize parity, orientation, colour modes and row
errors.

Every image is made here with Pillow (HEIC with pillow-heif, where the heif extra is installed).
Parity with transformers' Qwen2-VL processor is checked when transformers is installed (it is not
part of the dev extra) and skipped otherwise.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import math
import pickle
import random
import struct
import threading
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageOps, features

from qvl_batch.config import IMAGE_FORMATS, ConfigError, ImageConfig
from qvl_batch.errors import RowFailure
from qvl_batch.rows.images import TILE, PreparedImage, prepare_image, smart_resize, vision_tokens
from qvl_batch.run.validate import load_job
from qvl_batch.tooling.pictures import stored_as

QWEN_DEFAULT = (56 * 56, 28 * 28 * 1280)  # 3136, 1003520
QWEN_RECOMMENDED = (256 * 28 * 28, 1280 * 28 * 28)
PIXEL_SETTINGS = [
    QWEN_DEFAULT,
    QWEN_RECOMMENDED,
    (28 * 28, 28 * 28 * 4),
    (128 * 28 * 28, 128 * 28 * 28),  # min == max
    (3136, 200_000),
]
RED, GREEN, WHITE = (255, 0, 0), (0, 255, 0), (255, 255, 255)


def encode(img: Image.Image, fmt: str = "PNG", **params) -> bytes:
    if fmt == "PNG":
        params.setdefault("compress_level", 1)  # fast; the tests need many images
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def error_code(data: bytes | None, cfg: ImageConfig | None = None) -> str:
    with pytest.raises(RowFailure) as info:
        prepare_image(data, cfg or ImageConfig())
    return info.value.code


def near(pixel, expected, tol: int = 24) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height (8-bit grey) followed by a bogus tiny IDAT."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ---------------------------------------------------------------- transformers references


@pytest.fixture(scope="module")
def reference_smart_resize():
    """transformers' own smart_resize (5.x PIL module, else the 4.57 module)."""
    pytest.importorskip("transformers", reason="transformers not installed: no reference")
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as ref
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as ref
    return ref


@pytest.fixture(scope="module")
def make_processor():
    """A factory for the transformers Qwen2-VL image processor at given min/max pixels."""
    pytest.importorskip("transformers", reason="transformers not installed: no reference")
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil as processor_class,
        )
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import (
            Qwen2VLImageProcessor as processor_class,
        )
    try:
        processor_class(min_pixels=QWEN_DEFAULT[0], max_pixels=QWEN_DEFAULT[1])
    except Exception as exc:  # e.g. the torchvision-backed class without torch
        pytest.skip(f"cannot construct {processor_class.__name__} here: {exc}")
    cache = {}

    def make(min_pixels: int, max_pixels: int):
        key = (min_pixels, max_pixels)
        if key not in cache:
            cache[key] = processor_class(min_pixels=min_pixels, max_pixels=max_pixels)
        return cache[key]

    return make


def run_processor(processor, img: Image.Image) -> tuple[list[int], np.ndarray]:
    """(grid_thw, raw resized pixel patches) from the processor, without rescale/normalise."""
    out = processor(images=[img], do_rescale=False, do_normalize=False)
    grid = [int(v) for v in np.asarray(out["image_grid_thw"])[0]]
    return grid, np.asarray(out["pixel_values"])


def implied_grid(prepared: PreparedImage) -> list[int]:
    width, height = prepared.resized_size
    return [1, height // 14, width // 14]


# ---------------------------------------------------------------- smart_resize


def size_pairs() -> list[tuple[int, int]]:
    """~2300 (h, w): edge cases, the max_pixels boundary, aspect near 200, and random sizes."""
    edges = [1, 2, 13, 14, 15, 27, 28, 29, 41, 42, 43, 55, 56, 57, 70, 84, 98, 111, 112, 113]
    pairs = [(h, w) for h in edges for w in edges]
    pairs += [(h, w) for h in range(990, 1012, 3) for w in range(990, 1012, 3)]  # sqrt(1003520)
    pairs += [(1120, 896), (896, 1120), (1092, 924), (1003520, 1), (1, 1003520)]
    pairs += [(20000, 100), (100, 20000), (20001, 100), (200, 1), (201, 1), (5600, 28)]
    pairs += [(5628, 28), (28, 5628), (19999, 100), (30000, 150), (30001, 150), (4000, 20)]
    pairs += [(28 * k + 14, 28 * j + 14) for k in range(8) for j in range(8)]  # .5 ties
    rng = random.Random(1234)
    while len(pairs) < 2300:
        h = max(1, int(math.exp(rng.uniform(0, math.log(30000)))))
        w = max(1, int(h * math.exp(rng.uniform(-math.log(300), math.log(300)))))
        pairs.append((h, w))
    return pairs


@pytest.mark.parametrize(("min_pixels", "max_pixels"), PIXEL_SETTINGS)
def test_smart_resize_matches_transformers(reference_smart_resize, min_pixels, max_pixels):
    refused = 0
    for h, w in size_pairs():
        try:
            expected = reference_smart_resize(
                h, w, factor=28, min_pixels=min_pixels, max_pixels=max_pixels
            )
        except ValueError:
            refused += 1
            with pytest.raises(ValueError):
                smart_resize(h, w, min_pixels, max_pixels)
            continue
        got = smart_resize(h, w, min_pixels, max_pixels)
        assert got == tuple(expected), (h, w, min_pixels, max_pixels)
    assert refused > 50  # the sample really covers aspect ratios past 200


def test_smart_resize_known_values():
    assert smart_resize(1080, 1920, *QWEN_DEFAULT) == (728, 1316)  # shrunk under max_pixels
    assert smart_resize(70, 126, *QWEN_DEFAULT) == (56, 112)  # 2.5 and 4.5 round to even
    assert smart_resize(1, 1, *QWEN_DEFAULT) == (56, 56)  # grown to min_pixels
    assert smart_resize(28, 28, 784, 784) == (28, 28)
    assert smart_resize(20000, 100, *QWEN_DEFAULT) == (14140, 56)  # aspect exactly 200 is allowed
    with pytest.raises(ValueError, match="aspect"):
        smart_resize(20001, 100, *QWEN_DEFAULT)


def test_smart_resize_is_symmetric_and_on_the_grid():
    for h, w in size_pairs()[::7]:
        if max(h, w) / min(h, w) > 200:
            continue
        for min_pixels, max_pixels in PIXEL_SETTINGS:
            rh, rw = smart_resize(h, w, min_pixels, max_pixels)
            assert rh % TILE == 0 and rw % TILE == 0 and rh >= TILE and rw >= TILE
            assert smart_resize(w, h, min_pixels, max_pixels) == (rw, rh)


def test_vision_tokens():
    assert vision_tokens(28, 28) == 1
    assert vision_tokens(728, 1316) == 26 * 47
    assert vision_tokens(56, 112) == 8


# ---------------------------------------------------------------- processor parity


def random_image(rng: np.random.Generator, width: int, height: int, mode: str) -> Image.Image:
    """Random colours blown up 16x with bilinear: gradients everywhere, so resampling shows."""
    coarse = rng.integers(0, 256, (height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8)
    rgb = Image.fromarray(coarse, "RGB").resize((width, height), Image.Resampling.BILINEAR)
    return rgb if mode == "RGB" else rgb.convert(mode)  # "P": web palette, dithered


def parity_cases() -> list[tuple[int, int, str, str, tuple[int, int]]]:
    rng = random.Random(7)
    cases = []
    for i in range(40):
        width = rng.choice([rng.randint(10, 120), rng.randint(120, 900), rng.randint(900, 1600)])
        height = max(10, min(1600, int(width * rng.uniform(0.2, 5))))
        fmt, mode = [("JPEG", "RGB"), ("PNG", "RGB"), ("PNG", "L"), ("PNG", "P")][i % 4]
        settings = [QWEN_DEFAULT, (3136, 200_000), (784, 50_000), QWEN_RECOMMENDED][(i // 4) % 4]
        cases.append((width, height, fmt, mode, settings))
    return cases


def test_prepared_image_matches_processor(make_processor):
    rng = np.random.default_rng(0)
    for width, height, fmt, mode, (min_pixels, max_pixels) in parity_cases():
        data = encode(random_image(rng, width, height, mode), fmt)
        cfg = ImageConfig(min_pixels=min_pixels, max_pixels=max_pixels, draft=False)
        prepared = prepare_image(data, cfg)
        processor = make_processor(min_pixels, max_pixels)
        with Image.open(io.BytesIO(data)) as original:
            grid, pixels = run_processor(processor, original)
        case = (width, height, fmt, mode, min_pixels, max_pixels)
        assert grid == implied_grid(prepared), case
        again_grid, again_pixels = run_processor(processor, prepared.image)
        assert again_grid == grid, case  # the processor must not resize our image again
        assert np.array_equal(again_pixels, pixels), case  # same pixels as its own resize


def test_alpha_matches_processor_white_background(make_processor):
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4.x convert_to_rgb drops alpha instead of compositing on white")
    rng = np.random.default_rng(1)
    for width, height in [(300, 200), (57, 913), (1500, 700)]:
        rgba = np.concatenate(
            [rng.integers(0, 256, (height, width, 3)), rng.integers(0, 256, (height, width, 1))],
            axis=-1,
        ).astype(np.uint8)
        data = encode(Image.fromarray(rgba, "RGBA"))
        processor = make_processor(*QWEN_DEFAULT)
        prepared = prepare_image(data, ImageConfig(draft=False))
        with Image.open(io.BytesIO(data)) as original:
            grid, pixels = run_processor(processor, original)
        assert grid == implied_grid(prepared)
        assert np.array_equal(run_processor(processor, prepared.image)[1], pixels)


def test_draft_keeps_processor_grid(make_processor):
    rng = np.random.default_rng(2)
    min_pixels, max_pixels = 3136, 100_000
    for width, height in [(2400, 1600), (1000, 3100), (1800, 1800)]:
        data = encode(random_image(rng, width, height, "RGB"), "JPEG", quality=90)
        prepared = prepare_image(data, ImageConfig(min_pixels=min_pixels, max_pixels=max_pixels))
        assert "draft" in prepared.notes
        with Image.open(io.BytesIO(data)) as original:
            grid, pixels = run_processor(make_processor(min_pixels, max_pixels), original)
        assert grid == implied_grid(prepared)
        ours = run_processor(make_processor(min_pixels, max_pixels), prepared.image)[1]
        # DCT-domain downscale differs a little from a full decode + bicubic, not a lot.
        assert np.abs(ours.astype(np.float64) - pixels.astype(np.float64)).mean() < 6


# ---------------------------------------------------------------- EXIF orientation


def upright_picture(width: int, height: int) -> Image.Image:
    """Grey, with a red block at the top-left and a green block at the top-right."""
    img = Image.new("RGB", (width, height), (128, 128, 128))
    block = max(8, min(width, height) // 4)
    img.paste(RED, (0, 0, block, block))
    img.paste(GREEN, (width - block, 0, width, block))
    return img


def exif_jpeg(upright: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored_as(upright, orientation), "JPEG", quality=95, exif=exif)


def assert_upright(img: Image.Image) -> None:
    width, height = img.size
    corner = max(2, min(width, height) // 16)
    assert near(img.getpixel((corner, corner)), RED), img.getpixel((corner, corner))
    assert near(img.getpixel((width - 1 - corner, corner)), GREEN)
    assert near(img.getpixel((corner, height - 1 - corner)), (128, 128, 128))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation(orientation):
    data = exif_jpeg(upright_picture(168, 112), orientation)
    prepared = prepare_image(data, ImageConfig())
    assert prepared.original_size == (168, 112)
    assert prepared.resized_size == (168, 112)
    assert prepared.image.size == (168, 112)
    assert_upright(prepared.image)
    assert ("exif_transposed" in prepared.notes) == (orientation != 1)
    with Image.open(io.BytesIO(data)) as reference:  # Pillow's own reading agrees
        assert_upright(ImageOps.exif_transpose(reference))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_draft_on_exif_rotated_jpeg(orientation):
    data = exif_jpeg(upright_picture(1000, 3000), orientation)
    cfg = ImageConfig(max_pixels=100_000)
    prepared = prepare_image(data, cfg)
    target_h, target_w = smart_resize(3000, 1000, cfg.min_pixels, cfg.max_pixels)
    assert prepared.original_size == (1000, 3000)
    assert prepared.resized_size == (target_w, target_h)
    assert prepared.image.size == (target_w, target_h)
    assert "draft" in prepared.notes and "exif_transposed" in prepared.notes
    assert_upright(prepared.image)


def test_draft_off_and_not_worth_it():
    data = exif_jpeg(upright_picture(1000, 3000), 6)
    assert "draft" not in prepare_image(data, ImageConfig(max_pixels=100_000, draft=False)).notes
    # the default max_pixels target (546x1652 or so) is more than half the source height
    assert "draft" not in prepare_image(data, ImageConfig()).notes
    png = encode(upright_picture(1000, 3000))
    assert "draft" not in prepare_image(png, ImageConfig(max_pixels=100_000)).notes


# ---------------------------------------------------------------- alpha and colour modes


def test_rgba_transparent_becomes_white():
    img = Image.new("RGBA", (112, 112), (0, 0, 0, 0))
    img.paste((255, 0, 0, 255), (56, 0, 112, 112))
    img.paste((0, 0, 0, 128), (0, 56, 56, 112))
    prepared = prepare_image(encode(img), ImageConfig())
    assert prepared.image.mode == "RGB"
    assert prepared.image.getpixel((10, 10)) == WHITE
    assert prepared.image.getpixel((100, 10)) == RED
    assert near(prepared.image.getpixel((10, 100)), (127, 127, 127), tol=2)
    assert "alpha_flattened" in prepared.notes


def test_opaque_rgba_is_not_flattened():
    img = Image.new("RGBA", (112, 112), (10, 20, 30, 255))
    prepared = prepare_image(encode(img), ImageConfig())
    assert prepared.image.getpixel((50, 50)) == (10, 20, 30)
    assert "alpha_flattened" not in prepared.notes


def test_la_transparent_becomes_white():
    img = Image.new("LA", (112, 112), (0, 0))
    img.paste((0, 255), (56, 0, 112, 112))
    prepared = prepare_image(encode(img), ImageConfig())
    assert prepared.image.getpixel((10, 10)) == WHITE
    assert prepared.image.getpixel((100, 10)) == (0, 0, 0)


def test_palette_with_transparency_becomes_white():
    img = Image.new("P", (112, 112), 0)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (56, 0, 112, 112))
    prepared = prepare_image(encode(img, transparency=0), ImageConfig())
    assert prepared.image.getpixel((10, 10)) == WHITE
    assert prepared.image.getpixel((100, 10)) == (0, 0, 255)
    assert "alpha_flattened" in prepared.notes


def test_palette_without_transparency():
    img = Image.new("P", (112, 112), 0)
    img.putpalette([200, 10, 10, 10, 200, 10] + [0] * 762)
    img.paste(1, (56, 0, 112, 112))
    prepared = prepare_image(encode(img), ImageConfig())
    assert prepared.image.getpixel((10, 10)) == (200, 10, 10)
    assert prepared.image.getpixel((100, 10)) == (10, 200, 10)


def test_cmyk_jpeg():
    img = Image.new("CMYK", (112, 112), (0, 255, 255, 0))  # red
    data = encode(img, "JPEG", quality=95)
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "CMYK"
    prepared = prepare_image(data, ImageConfig())
    assert prepared.image.mode == "RGB"
    assert near(prepared.image.getpixel((50, 50)), RED)


def test_16bit_grey_png_is_scaled_not_clipped():
    arr = np.full((112, 112), 10_000, dtype=np.uint16)
    arr[:, 56:] = 50_000
    data = encode(Image.fromarray(arr))
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode in ("I;16", "I")  # Pillow's choice differs across versions
    prepared = prepare_image(data, ImageConfig())
    dark, light = prepared.image.getpixel((10, 50)), prepared.image.getpixel((100, 50))
    assert near(dark, (10_000 >> 8,) * 3, tol=1)
    assert near(light, (50_000 >> 8,) * 3, tol=1)


def test_32bit_int_and_float_tiff():
    ints = np.full((112, 112), 1_000, dtype=np.int32)
    ints[:, 56:] = 60_000
    prepared = prepare_image(encode(Image.fromarray(ints, "I"), "TIFF"), ImageConfig())
    assert near(prepared.image.getpixel((10, 50)), (3, 3, 3), tol=1)
    assert near(prepared.image.getpixel((100, 50)), (234, 234, 234), tol=1)
    floats = np.full((112, 112), 0.25, dtype=np.float32)
    floats[:, 56:] = 0.75
    prepared = prepare_image(encode(Image.fromarray(floats, "F"), "TIFF"), ImageConfig())
    assert near(prepared.image.getpixel((10, 50)), (64, 64, 64), tol=1)
    assert near(prepared.image.getpixel((100, 50)), (191, 191, 191), tol=1)


def test_one_bit_image():
    img = Image.new("1", (112, 112), 0)
    img.paste(1, (56, 0, 112, 112))
    prepared = prepare_image(encode(img), ImageConfig())
    assert prepared.image.getpixel((10, 10)) == (0, 0, 0)
    assert prepared.image.getpixel((100, 10)) == WHITE


def test_grey_jpeg():
    prepared = prepare_image(encode(Image.new("L", (300, 200), 90), "JPEG"), ImageConfig())
    assert prepared.image.mode == "RGB"
    assert near(prepared.image.getpixel((100, 100)), (90, 90, 90), tol=2)


# ---------------------------------------------------------------- animation


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (112, 84), colour) for colour in (RED, (0, 0, 255), GREEN)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    prepared = prepare_image(data, ImageConfig())
    assert prepared.image.getpixel((50, 40)) == RED
    assert "first_frame" in prepared.notes


def test_still_gif_has_no_frame_note():
    prepared = prepare_image(encode(Image.new("RGB", (112, 84), RED), "GIF"), ImageConfig())
    assert "first_frame" not in prepared.notes


# ---------------------------------------------------------------- errors


def test_missing_image():
    assert error_code(None) == "MISSING_IMAGE"
    assert error_code(b"") == "MISSING_IMAGE"


def test_undecodable_bytes():
    assert error_code(random.Random(3).randbytes(5000)) == "DECODE_ERROR"
    assert error_code(b"\x89PNG\r\n\x1a\n garbage") == "DECODE_ERROR"


def test_truncated_files():
    rng = np.random.default_rng(4)
    jpeg = encode(random_image(rng, 400, 300, "RGB"), "JPEG")
    png = encode(random_image(rng, 400, 300, "RGB"), "PNG")
    for data in (jpeg[: len(jpeg) // 2], png[: len(png) // 2]):
        with pytest.raises(RowFailure) as info:
            prepare_image(data, ImageConfig())
        assert info.value.code == "DECODE_ERROR"
        assert "\n" not in info.value.message and len(info.value.message) <= 200


def test_too_small():
    assert error_code(encode(Image.new("RGB", (1, 1)))) == "IMAGE_TOO_SMALL"
    assert (
        error_code(encode(Image.new("RGB", (4, 4))), ImageConfig(min_side=8)) == "IMAGE_TOO_SMALL"
    )
    assert error_code(encode(Image.new("RGB", (400, 7))), ImageConfig(min_side=8)) == (
        "IMAGE_TOO_SMALL"
    )
    assert prepare_image(encode(Image.new("RGB", (8, 8))), ImageConfig(min_side=8)).vision_tokens


def test_too_large_by_config():
    data = encode(Image.new("RGB", (100, 100)))
    with pytest.raises(RowFailure) as info:
        prepare_image(data, ImageConfig(max_image_pixels=9_999))
    assert info.value.code == "IMAGE_TOO_LARGE" and "max_image_pixels" in info.value.message
    assert prepare_image(data, ImageConfig(max_image_pixels=10_000)).resized_size == (112, 112)


def test_too_large_is_decided_from_the_header():
    # The pixel data is bogus: reaching the decoder would give DECODE_ERROR instead.
    assert error_code(png_header_only(12_000, 12_000)) == "IMAGE_TOO_LARGE"
    # Pillow's own limit (2x its MAX_IMAGE_PIXELS) is refused whatever the config says.
    big = ImageConfig(max_image_pixels=10**12)
    assert error_code(png_header_only(20_000, 20_000), big) == "IMAGE_TOO_LARGE"
    # Between Pillow's warning threshold (~89.5M) and ours (100M) the config decides, even in a
    # process that makes warnings errors: Pillow's warning is only a note on the row.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert error_code(png_header_only(9_500, 9_500)) == "DECODE_ERROR"


def test_aspect_ratio():
    assert error_code(encode(Image.new("L", (20_000, 10)))) == "ASPECT_RATIO"
    assert error_code(encode(Image.new("L", (10, 2_010)))) == "ASPECT_RATIO"
    assert prepare_image(encode(Image.new("L", (2_000, 10))), ImageConfig()).resized_size


def test_identification_failure_of_another_plugin_is_a_decode_error(monkeypatch):
    # Bytes only the TGA plugin (no magic number) would claim, and that plugin misbehaving.
    tga = encode(Image.new("RGB", (64, 48), RED), "TGA")
    assert error_code(tga) == "UNSUPPORTED_FORMAT"

    def broken(fp, filename):
        raise RuntimeError("plugin bug")

    Image.init()
    monkeypatch.setitem(Image.OPEN, "TGA", (broken, None))
    with pytest.raises(RowFailure) as info:
        prepare_image(tga, ImageConfig())
    assert info.value.code == "DECODE_ERROR"
    assert info.value.message == "UnidentifiedImageError: cannot identify an image format"


def test_allowed_plugin_returning_another_format_is_refused(monkeypatch):
    Image.init()
    factory, accept = Image.OPEN["PNG"]

    def relabelled(fp, filename):
        img = factory(fp, filename)
        img.format = "PCX"  # as if the PNG plugin had handed back some other format's image
        return img

    monkeypatch.setitem(Image.OPEN, "PNG", (relabelled, accept))
    with pytest.raises(RowFailure) as info:
        prepare_image(encode(Image.new("RGB", (64, 48), RED)), ImageConfig())
    assert info.value.code == "UNSUPPORTED_FORMAT" and "PCX" in info.value.message


# ---------------------------------------------------------------- source formats


def red_green(width: int = 168, height: int = 112) -> Image.Image:
    img = Image.new("RGB", (width, height), RED)
    img.paste(GREEN, (width // 2, 0, width, height))
    return img


def assert_red_green(prepared: PreparedImage) -> None:
    width, height = prepared.image.size
    assert near(prepared.image.getpixel((width // 4, height // 2)), RED)
    assert near(prepared.image.getpixel((3 * width // 4, height // 2)), GREEN)


needs_avif = pytest.mark.skipif(not features.check("avif"), reason="Pillow < 11.3: no AVIF")


@needs_avif
def test_avif_decodes_by_default():
    """An AVIF made by Pillow itself (img.save(buf, "AVIF")): Pillow's own test images are not
    installed with the wheel."""
    prepared = prepare_image(encode(red_green(), "AVIF", quality=90), ImageConfig())
    assert (prepared.original_size, prepared.resized_size) == ((168, 112), (168, 112))
    assert_red_green(prepared)
    assert "AVIF" in ImageConfig().formats


@needs_avif
def test_avif_outside_image_formats_is_unsupported():
    no_avif = ImageConfig(formats=[name for name in IMAGE_FORMATS if name != "AVIF"])
    with pytest.raises(RowFailure) as info:
        prepare_image(encode(red_green(), "AVIF", quality=90), no_avif)
    assert info.value.code == "UNSUPPORTED_FORMAT"
    assert info.value.message.startswith("AVIF is not an allowed source format (image.formats:")


def test_heic_decodes_only_where_heif_is_allowed():
    """A HEIC written by pillow-heif (the heif extra; skipped without it)."""
    pillow_heif = pytest.importorskip("pillow_heif")
    buf = io.BytesIO()
    pillow_heif.from_pillow(red_green()).save(buf, quality=90)
    data = buf.getvalue()
    with pytest.raises(RowFailure) as info:
        prepare_image(data, ImageConfig())
    assert info.value.code == "UNSUPPORTED_FORMAT" and "HEIF" in info.value.message
    prepared = prepare_image(data, ImageConfig(formats=["JPEG", "heif"]))
    assert (prepared.original_size, prepared.resized_size) == ((168, 112), (168, 112))
    assert_red_green(prepared)
    jpeg_only = ImageConfig(formats=["JPEG"])  # after the HEIF plugin is registered, still refused
    with pytest.raises(RowFailure) as info:
        prepare_image(data, jpeg_only)
    assert info.value.code == "UNSUPPORTED_FORMAT" and "HEIF" in info.value.message


def test_bad_image_formats_is_a_config_error(monkeypatch):
    assert ImageConfig(formats=["jpeg", "Png", "JPEG"]).formats == ["JPEG", "PNG"]
    with pytest.raises(ConfigError, match=r"^image\.formats: must name"):
        ImageConfig(formats=[])
    job = ["input.paths=[x.parquet]", "output.path=o"]
    for bad in ("[JPEG,NOPE]", "[EPS]"):  # EPS: Pillow reads it, by running Ghostscript
        ImageConfig(formats=bad[1:-1].split(","))  # alone a setting is only a list of names
        with pytest.raises(ConfigError, match=r"^image\.formats: .*not source formats"):
            load_job(None, [*job, f"image.formats={bad}"])  # checked against Pillow here

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "pillow_heif" else find_spec(name, *args),
    )
    with pytest.raises(ConfigError, match=r"^image\.formats: HEIF needs pillow-heif") as info:
        ImageConfig(formats=["JPEG", "HEIF"])
    assert "pip install 'qvl-batch[heif]'" in str(info.value)


# ---------------------------------------------------------------- Pillow's warnings


def corrupt_exif_jpeg(colour=RED) -> bytes:
    """A JPEG whose EXIF block (APP1) points its first IFD past its own end."""
    exif = b"Exif\x00\x00II*\x00" + struct.pack("<I", 0xFFFFFF00) + bytes(20)
    jpeg = encode(Image.new("RGB", (112, 84), colour), "JPEG")
    return jpeg[:2] + struct.pack(">BBH", 0xFF, 0xE1, len(exif) + 2) + exif + jpeg[2:]


def warning_notes(prepared: PreparedImage) -> list[str]:
    return [note for note in prepared.notes if note.startswith("warning:")]


def test_corrupt_exif_warning_is_a_row_note(recwarn, capfd):
    data = corrupt_exif_jpeg()
    with pytest.warns(UserWarning, match="Corrupt EXIF"), Image.open(io.BytesIO(data)) as img:
        img.getexif()  # Pillow itself warns on this file
    recwarn.clear()
    (note,) = prepare_image(data, ImageConfig()).notes
    # Pillow's "Corrupt EXIF data.  Expecting to read ...": category, then the message on one line.
    assert note.startswith("warning:UserWarning:Corrupt EXIF data. Expecting to read"), note
    assert prepare_image(data, ImageConfig()).notes == (note,), "a repeat gets its note too"
    assert not recwarn.list, [str(w.message) for w in recwarn]
    assert capfd.readouterr().err == ""


def test_warning_notes_stay_with_their_row_across_threads(recwarn, capfd):
    corrupt, clean = corrupt_exif_jpeg(), encode(Image.new("RGB", (112, 84), RED), "JPEG")
    start = threading.Barrier(8)

    def prepare_many(worker: int) -> list[tuple[bool, list[str]]]:
        start.wait()
        out = []
        for i in range(12):
            bad = (i + worker) % 2 == 0
            out.append(
                (bad, warning_notes(prepare_image(corrupt if bad else clean, ImageConfig())))
            )
        return out

    with ThreadPoolExecutor(8) as pool:
        results = [item for done in pool.map(prepare_many, range(8)) for item in done]
    assert len(results) == 96
    for bad, notes in results:
        assert len(notes) == (1 if bad else 0), notes
        assert all(note.startswith("warning:UserWarning:Corrupt EXIF data") for note in notes)
    assert not recwarn.list, [str(w.message) for w in recwarn]
    assert capfd.readouterr().err == ""


def test_pillow_bomb_warning_is_a_note_not_an_error(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000)  # 90x90 = 8100: warns, under 2x
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a process that makes warnings errors does not see it
        prepared = prepare_image(encode(Image.new("RGB", (90, 90), RED)), ImageConfig())
    (note,) = warning_notes(prepared)
    category, text = note.split(":", 2)[1:]
    assert category == "DecompressionBombWarning"
    assert text.startswith("Image size (8100 pixels) exceeds limit of 5000 pixels; could be")
    assert len(text) == 80 and "," not in note  # capped; notes are comma-joined in image_notes


def test_other_warnings_pass_through(recwarn):
    def library_call():
        warnings.warn("caller's fault", UserWarning, stacklevel=2)

    warnings.warn("plain", RuntimeWarning, stacklevel=1)
    library_call()
    assert [(w.category, str(w.message), w.filename) for w in recwarn] == [
        (RuntimeWarning, "plain", __file__),
        (UserWarning, "caller's fault", __file__),
    ]


def test_image_error_pickles_and_reads_well():
    err = RowFailure("DECODE_ERROR", "cannot identify image file")
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.code, copy.message) == ("DECODE_ERROR", "cannot identify image file")
    assert str(copy) == "DECODE_ERROR: cannot identify image file"


# ---------------------------------------------------------------- hash, tokens, sizes


@pytest.mark.parametrize(
    ("width", "height", "fmt"),
    [
        (640, 480, "JPEG"),
        (1920, 1080, "JPEG"),
        (33, 77, "PNG"),
        (2000, 20, "PNG"),
        (112, 84, "PNG"),
    ],
)
def test_hash_tokens_and_size(width, height, fmt):
    data = encode(random_image(np.random.default_rng(5), width, height, "RGB"), fmt)
    prepared = prepare_image(data, ImageConfig())
    w, h = prepared.resized_size
    assert prepared.sha256 == hashlib.sha256(data).hexdigest()
    assert prepared.original_size == (width, height)
    assert (h, w) == smart_resize(height, width, *QWEN_DEFAULT)
    assert w % TILE == 0 and h % TILE == 0
    assert prepared.vision_tokens == (h // 28) * (w // 28)
    assert prepared.image.mode == "RGB" and prepared.image.size == (w, h)
    assert np.asarray(prepared.image).shape == (h, w, 3)  # usable, not a closed source image
