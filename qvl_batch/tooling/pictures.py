"""Photo-like pictures for synthetic datasets: gradients, blobs, edges and grain (so JPEG decoding
costs about what real photos cost), their encodings, and how a camera stores an EXIF-rotated one."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageChops, ImageDraw

EXIF_ORIENTATION_TAG = 0x0112
_NOISE_TILE = 256

# The transpose that, applied to an upright picture, gives what a camera stores with EXIF
# orientation k (the inverse of what exif_transpose applies when reading it back).
_STORE_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def stored_as(upright: Image.Image, orientation: int) -> Image.Image:
    """The pixels a camera writes for ``upright`` with EXIF orientation tag ``orientation``."""
    fix = _STORE_TRANSPOSE.get(orientation)
    return upright if fix is None else upright.transpose(fix)


# ----------------------------------------------------------------------------- images


def _rand_color(rng: np.random.Generator) -> tuple[int, int, int]:
    """A random RGB colour as PIL wants it (plain ints)."""
    r, g, b = (int(v) for v in rng.integers(0, 256, 3))
    return r, g, b


def _gradient(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A float32 HxWx3 linear gradient between two random colours along a random direction."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    t = math.cos(angle) * xx / w + math.sin(angle) * yy / h
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    return (c0 + (c1 - c0) * t[..., None]).astype(np.float32)


def _draw_blobs(rng: np.random.Generator, img: Image.Image) -> None:
    """Draw a few random filled ellipses/rectangles (soft blobs once the image is upscaled)."""
    w, h = img.size
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.uniform(-0.2, 1.0) * w, rng.uniform(-0.2, 1.0) * h
        x1, y1 = x0 + rng.uniform(0.1, 0.6) * w, y0 + rng.uniform(0.1, 0.6) * h
        shape = draw.ellipse if rng.random() < 0.6 else draw.rectangle
        shape([x0, y0, x1, y1], fill=_rand_color(rng))


def _draw_edges(rng: np.random.Generator, img: Image.Image) -> None:
    """Draw a few sharp full-resolution lines: the high-frequency edges real photos have."""
    w, h = img.size
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        xy = [float(v) for v in rng.uniform(0, 1, 4) * (w, h, w, h)]
        width = int(rng.integers(1, max(2, w // 100) + 1))
        draw.line(xy, fill=_rand_color(rng), width=width)


def _add_grain(rng: np.random.Generator, img: Image.Image, sigma: float) -> Image.Image:
    """Add sensor-like grain cheaply: one uniform noise tile of std ~sigma repeated, added in C."""
    w, h = img.size
    span = max(2, round(sigma * math.sqrt(12)))
    tile = rng.integers(0, span + 1, (min(h, _NOISE_TILE), min(w, _NOISE_TILE), 3), dtype=np.uint8)
    reps = (-(-h // tile.shape[0]), -(-w // tile.shape[1]), 1)
    noise = np.ascontiguousarray(np.tile(tile, reps)[:h, :w])
    return ImageChops.add(img, Image.fromarray(noise, "RGB"), scale=1.0, offset=-(span // 2))


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """An RGB image with photo-like statistics so JPEG decode costs what real photos cost.

    Gradients, blobs and coarse texture are built at 1/8 resolution and upscaled bilinearly, then
    sharp edges and tiled grain are added at full resolution: about 35 ms for 2000x1500.
    """
    if width < 1 or height < 1:
        raise ValueError(f"photo_like: size must be positive, got {width}x{height}")
    sw, sh = max(2, -(-width // 8)), max(2, -(-height // 8))
    small = Image.fromarray(np.clip(_gradient(rng, sw, sh), 0, 255).astype(np.uint8), "RGB")
    _draw_blobs(rng, small)
    coarse = np.asarray(small, dtype=np.float32) + rng.normal(0, 14, (sh, sw, 3))
    small = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8), "RGB")
    img = small.resize((width, height), Image.Resampling.BILINEAR)
    _draw_edges(rng, img)
    return _add_grain(rng, img, sigma=float(rng.uniform(5, 10)))


def encode_jpeg(
    img: Image.Image,
    quality: int = 90,
    exif_orientation: int | None = None,
    progressive: bool = False,
) -> bytes:
    """Encode img as JPEG bytes, with an EXIF Orientation tag (0x0112) when one is given."""
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    params: dict = {"quality": quality, "progressive": progressive}
    if exif_orientation is not None:
        if not 1 <= exif_orientation <= 8:
            raise ValueError(f"EXIF orientation must be 1..8, got {exif_orientation}")
        exif = Image.Exif()
        exif[EXIF_ORIENTATION_TAG] = exif_orientation
        params["exif"] = exif.tobytes()
    buf = io.BytesIO()
    img.save(buf, "JPEG", **params)
    return buf.getvalue()


def encode_png(img: Image.Image) -> bytes:
    """Encode img as PNG bytes with fast compression (decode cost barely depends on the level)."""
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def with_alpha(rng: np.random.Generator, img: Image.Image) -> Image.Image:
    """Return img as RGBA whose alpha is a soft blob: opaque inside, fully transparent outside."""
    w, h = img.size
    sw, sh = max(2, -(-w // 8)), max(2, -(-h // 8))
    alpha = Image.new("L", (sw, sh), 0)
    corners = rng.uniform((0.0, 0.0, 0.5, 0.5), (0.4, 0.4, 1.0, 1.0)) * (sw, sh, sw, sh)
    box = [float(v) for v in corners]
    ImageDraw.Draw(alpha).ellipse(box, fill=int(rng.integers(160, 256)))
    rgba = img.convert("RGBA")
    rgba.putalpha(alpha.resize((w, h), Image.Resampling.BILINEAR))
    return rgba
