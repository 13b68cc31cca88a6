"""Decode, validate and resize one encoded image to the Qwen2.5-VL vision grid.

Every failure that is the row's fault (missing, undecodable, a format outside ``image.formats``, too
large, too small, too thin) raises :class:`RowFailure` with a stable code, so the caller can record
it on the row and carry on. Only the allowed formats' plugins ever decode pixels; other formats
are named from their headers and refused. Pillow's warnings about an image become notes on its row.
The resize rule is Qwen2.5-VL's own (``smart_resize``), so the engine's processor never resizes
again and the vision-token count is known before the image reaches the model.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import math
import struct
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import RowError, RowFailure

TILE = 28  # Qwen2.5-VL: 14px patches merged 2x2 -> one vision token per 28x28 tile
MAX_ASPECT = 200  # Qwen's processor refuses images thinner than this

# Never allowed, whatever image.formats says: EPS/PS runs Ghostscript, a PostScript interpreter, on
# load(). (The default allow-list is config.IMAGE_FORMATS.)
_NEVER_ALLOWED = frozenset({"EPS"})
# Outside the allow-list, named from their magic number alone and never handed to their plugin:
# ICO's _open already decodes pixels (its largest icon, possibly an embedded PNG up to Pillow's bomb
# limit); HEIF's plugin (pillow-heif, the heif extra) is registered only where HEIF is allowed.
_DECODES_ON_OPEN = ("ICO",)
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs")

# What Pillow raises on corrupt or unsupported input; anything else is a bug and propagates.
_DECODE_ERRORS = (
    OSError,  # includes UnidentifiedImageError and "image file is truncated"
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    TypeError,
)

# EXIF Orientation -> the transpose that makes the pixels upright (as ImageOps.exif_transpose).
_ORIENTATION_FIX = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION = 0x0112
_WHITE = (255, 255, 255, 255)


@dataclass
class PreparedImage:
    """One image ready for the model, with what the batcher and the output row need to know."""

    image: Image.Image  # RGB, exactly resized_size
    sha256: str  # hex sha256 of the original encoded bytes (content hash)
    original_size: tuple[int, int]  # (width, height) after EXIF orientation
    resized_size: tuple[int, int]  # (width, height), multiples of 28
    vision_tokens: int
    # e.g. "exif_transposed", "alpha_flattened", "first_frame", "draft", "warning:<category>:<text>"
    notes: tuple[str, ...] = ()


def smart_resize(
    height: int, width: int, min_pixels: int, max_pixels: int, factor: int = TILE
) -> tuple[int, int]:
    """Qwen2.5-VL's resize rule -> (h, w), both multiples of 28, pixels within [min, max].

    A copy of transformers' Qwen2-VL ``smart_resize`` (round() is banker's rounding there too),
    kept here so the package does not import transformers. Raises ValueError past aspect 200.
    """
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_ASPECT}, "
            f"got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def vision_tokens(height: int, width: int) -> int:
    """Vision tokens the model spends on an image of this (resized) size: one per 28x28 tile."""
    return (height // TILE) * (width // TILE)


def known_formats() -> frozenset[str]:
    """Names ``image.formats`` may hold: the formats this Pillow reads, less EPS, plus MPO (read by
    the JPEG plugin), AVIF (read by Pillow >= 11.3 itself) and HEIF (pillow-heif's plugin)."""
    Image.init()  # registers every plugin once; later calls return at once
    return (frozenset(Image.OPEN) | {"MPO", "AVIF", "HEIF"}) - _NEVER_ALLOWED


@dataclass(frozen=True)
class _Formats:
    """What one allow-list means for Image.open, worked out once per list."""

    allowed: tuple[str, ...]  # image.formats
    open_with: tuple[str, ...]  # the plugins Image.open may try
    others: tuple[str, ...]  # the header parsers that name a refused format


@functools.lru_cache(maxsize=8)  # a process prepares images for one job: one list, seldom more
def _formats(allowed: tuple[str, ...]) -> _Formats:
    """The plugins for one allow-list; registers pillow-heif's the first time HEIF is allowed."""
    if "HEIF" in allowed:  # config load checked that pillow-heif is installed
        import pillow_heif

        pillow_heif.register_heif_opener()
    Image.init()
    # MPO has no opener of its own: the JPEG one returns MPO files. A plugin this Pillow lacks
    # (AVIF before 11.3) is left out: Image.open raises KeyError on those.
    plugins = dict.fromkeys("JPEG" if name == "MPO" else name for name in allowed)
    open_with = tuple(name for name in plugins if name in Image.OPEN)
    named_by_magic = (*_DECODES_ON_OPEN, "HEIF")
    others = tuple(f for f in Image.ID if f in Image.OPEN and f not in open_with + named_by_magic)
    return _Formats(allowed, open_with, others)


def prepare_image(data: bytes | None, cfg, digest: str | None = None) -> PreparedImage:
    """Decode, validate, orient, flatten to RGB and resize one encoded image to the Qwen grid.

    ``cfg`` is an :class:`~qvl_batch.config.ImageConfig` (or anything with its attributes).
    Raises :class:`RowFailure` for problems with the image itself. ``digest``: the bytes'
    sha256 when the caller has it already. Pillow's warnings about the image are added to its
    notes as ``warning:<category>:<message>``; none reach the process's warning machinery.
    """
    if not data:
        raise RowFailure(RowError.MISSING_IMAGE, "no image bytes")
    digest = digest or hashlib.sha256(data).hexdigest()
    formats = _formats(tuple(cfg.formats))
    with _warnings_as_notes() as warned:
        try:
            with _open_allowed(data, formats) as src:
                prepared = _prepare_open(src, digest, cfg)
        except Image.DecompressionBombError as exc:
            raise RowFailure(
                RowError.IMAGE_TOO_LARGE, f"refused by Pillow: {_short(exc)}"
            ) from None
        except _DECODE_ERRORS as exc:
            raise RowFailure(RowError.DECODE_ERROR, _short(exc)) from None
    prepared.notes += tuple(warned)
    return prepared


def _open_allowed(data: bytes, formats: _Formats) -> Image.Image:
    """Open (header only) with the allowed plugins alone; other formats never reach a decoder.

    Raises UNSUPPORTED_FORMAT when Pillow would know the format, else Pillow's own error.
    """
    try:
        src = Image.open(io.BytesIO(data), formats=formats.open_with)
    except UnidentifiedImageError:
        other = _identify_any(data, formats)
        if other is not None:
            raise RowFailure(RowError.UNSUPPORTED_FORMAT, _unsupported(other, formats)) from None
        # Pillow's own message names a BytesIO address: different on every run.
        raise UnidentifiedImageError("cannot identify an image format") from None
    if src.format not in formats.allowed:  # a plugin's factory may return another format
        src.close()
        raise RowFailure(
            RowError.UNSUPPORTED_FORMAT, _unsupported(src.format or "unknown", formats)
        )
    return src


def _identify_any(data: bytes, formats: _Formats) -> str | None:
    """The other Pillow format these bytes are in, or None; header parsers only, no pixels.

    Runs only on bytes the allowed plugins did not recognise, so the common path pays nothing.
    """
    for fmt in _DECODES_ON_OPEN:
        accept = Image.OPEN.get(fmt, (None, None))[1]
        verdict = accept(data[:16]) if accept and fmt not in formats.allowed else False
        if verdict and not isinstance(verdict, str):  # a str is Pillow's "cannot read" note
            return fmt
    if "HEIF" not in formats.allowed and _is_heif(data):
        return "HEIF"
    try:
        with Image.open(io.BytesIO(data), formats=formats.others) as other:
            return other.format or "unknown"
    except Image.DecompressionBombError:
        return "a format whose header is past Pillow's size limit"  # identified, then refused
    except Exception:  # ~40 rarely used header parsers on hostile bytes: only a label is at stake
        return None


def _is_heif(data: bytes) -> bool:
    """An ISO media file whose ftyp box names a HEVC-coded HEIF brand, major or compatible."""
    end = min(int.from_bytes(data[:4], "big"), 64)  # the box's size, capped
    brands = (data[i : i + 4] for i in (8, *range(16, end, 4)))  # major, then compatible ones
    return data[4:8] == b"ftyp" and any(brand in _HEIF_BRANDS for brand in brands)


def _unsupported(fmt: str, formats: _Formats) -> str:
    return f"{fmt} is not an allowed source format (image.formats: {', '.join(formats.allowed)})"


def _prepare_open(src: Image.Image, digest: str, cfg) -> PreparedImage:
    """The work on an opened (header-only) image; Pillow's errors escape to prepare_image."""
    _check_size(src.size, cfg)
    width, height = src.size  # the stored (pre-orientation) frame until the transpose below
    # smart_resize is symmetric in (h, w), so the stored-frame target is the upright one transposed;
    # that is also the frame JPEG draft wants its size in.
    target_h, target_w = smart_resize(height, width, cfg.min_pixels, cfg.max_pixels)
    notes: list[str] = []
    if getattr(src, "is_animated", False):
        notes.append("first_frame")
    if _use_draft(src, cfg, (target_w, target_h)):
        src.draft("RGB", (target_w, target_h))  # picks a DCT scale that keeps >= this size
        if src.size != (width, height):
            notes.append("draft")
    src.load()  # the full decode, so truncated or corrupt data fails here

    upright = src
    orientation = _orientation(src)
    if orientation in _ORIENTATION_FIX:
        upright = src.transpose(_ORIENTATION_FIX[orientation])
        notes.append("exif_transposed")
    if orientation in _SWAPS_AXES:
        width, height, target_w, target_h = height, width, target_h, target_w
    rgb, flattened = _to_rgb(upright)
    if flattened:
        notes.append("alpha_flattened")
    if rgb.size != (target_w, target_h):
        rgb = rgb.resize((target_w, target_h), Image.Resampling.BICUBIC)
    return PreparedImage(
        image=rgb,
        sha256=digest,
        original_size=(width, height),
        resized_size=(target_w, target_h),
        vision_tokens=vision_tokens(target_h, target_w),
        notes=tuple(notes),
    )


def _check_size(size: tuple[int, int], cfg) -> None:
    """Refuse from the header alone, before any pixels are decoded."""
    width, height = size
    if width * height > cfg.max_image_pixels:
        raise RowFailure(
            RowError.IMAGE_TOO_LARGE,
            f"{width}x{height} = {width * height} pixels > max_image_pixels {cfg.max_image_pixels}",
        )
    if min(width, height) < cfg.min_side:
        raise RowFailure(
            RowError.IMAGE_TOO_SMALL, f"{width}x{height}: a side is < min_side {cfg.min_side}"
        )
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise RowFailure(
            RowError.ASPECT_RATIO,
            f"{width}x{height}: aspect ratio > {MAX_ASPECT} (Qwen refuses it)",
        )


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8); 1 when absent, unreadable or out of range."""
    try:
        value = img.getexif().get(_EXIF_ORIENTATION, 1)
    except _DECODE_ERRORS:  # the pixels are loaded; a broken EXIF block should not cost the row
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _use_draft(img: Image.Image, cfg, target: tuple[int, int]) -> bool:
    """JPEG DCT-domain downscale pays off when the target is at most half the source each way."""
    width, height = img.size
    return (
        bool(cfg.draft)
        and img.format == "JPEG"
        and target[0] * 2 <= width
        and target[1] * 2 <= height
    )


def _to_rgb(img: Image.Image) -> tuple[Image.Image, bool]:
    """RGB version of ``img`` and whether transparency was composited over white."""
    if img.mode == "RGB":
        return img, False
    if img.mode.startswith("I") or img.mode == "F":  # wide grey; a tRNS value here is ignored
        return Image.fromarray(_to_uint8(img), "L").convert("RGB"), False
    if _has_alpha(img):
        return _flatten_alpha(img)
    return img.convert("RGB"), False


def _has_alpha(img: Image.Image) -> bool:
    return "A" in img.getbands() or "a" in img.mode or img.info.get("transparency") is not None


def _flatten_alpha(img: Image.Image) -> tuple[Image.Image, bool]:
    """Composite over white (as transformers' convert_to_rgb does); opaque images just convert."""
    if img.mode == "La":  # Pillow has no direct La -> RGBA conversion
        img = img.convert("LA")
    rgba = img if img.mode == "RGBA" else img.convert("RGBA")
    if rgba.getextrema()[3][0] == 255:
        return rgba.convert("RGB"), False
    background = Image.new("RGBA", rgba.size, _WHITE)
    return Image.alpha_composite(background, rgba).convert("RGB"), True


def _to_uint8(img: Image.Image) -> np.ndarray:
    """8-bit grey from Pillow's wide modes, scaled rather than clipped (clipping gives white).

    I;16*: 16-bit samples, >> 8. I: Pillow's 32-bit container, which 16-bit PNG/TIFF decode into
    on some versions, so it is read as 16-bit too. F: [0, 1] data is scaled by 255, else clipped.
    """
    arr = np.asarray(img)
    if img.mode == "F":
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = arr * 255.0
        return np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    wide = np.clip(arr.astype(np.int64), 0, 65535)
    return (wide >> 8).astype(np.uint8)


# Pillow's warnings about one image (corrupt EXIF, invalid APNG, DecompressionBombWarning, ...)
# belong in its row's notes, not in the job's log. warnings.catch_warnings cannot collect them: it
# swaps process-wide state (filters, showwarning) under the other prepare threads. A showwarning
# hook fails too: any catch_warnings (pytest wraps every test in one) swaps it out, and the default
# filter drops a repeated message before any hook sees it (the next image with that fault would get
# no note). So warnings.warn itself is wrapped, once, at import: a call from Pillow or pillow-heif
# on a thread inside prepare_image becomes a note on that thread's list; any other call passes
# through unchanged (one frame deeper, hence stacklevel + 1). Pillow's C code never warns.
_WARNING_SOURCES = ("PIL.", "pillow_heif.")
_collecting = threading.local()  # .notes: the list of the image this thread is preparing
_passthrough_warn = warnings.warn


def _route_warning(message, category=None, stacklevel=1, source=None, **kwargs):
    notes = getattr(_collecting, "notes", None)
    caller = sys._getframe(1).f_globals.get("__name__", "")  # the module that called warn()
    if notes is not None and caller.startswith(_WARNING_SOURCES):
        note = _warning_note(message, category)
        if note not in notes:
            notes.append(note)
        return
    _passthrough_warn(message, category, stacklevel + 1, source, **kwargs)


warnings.warn = _route_warning


@contextlib.contextmanager
def _warnings_as_notes() -> Iterator[list[str]]:
    """Collect Pillow's warnings on this thread, as notes, for the duration of the block."""
    _collecting.notes = notes = []
    try:
        yield notes
    finally:
        _collecting.notes = None


def _warning_note(message, category) -> str:
    """``warning:<category>:<first 80 characters>``, one line, no commas (image_notes uses them)."""
    if isinstance(message, Warning):
        category = type(message)
    text = " ".join(str(message).split())[:80].replace(",", ";")
    return f"warning:{(category or UserWarning).__name__}:{text}"


def _short(exc: BaseException) -> str:
    """One-line message for a decode failure: the exception type and its first line, capped."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    message = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return message[:200]
