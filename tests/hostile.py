"""A hostile image corpus: byte strings a real dataset can hold, each with the outcome it must get.

Every generator below yields :class:`Case` tuples ``(name, data, expected)``; :func:`corpus` chains
them. ``expected.outcome`` is an :data:`qvl_batch.errors.IMAGE_CODES` code, or ``"OK"`` with the
upright source size, the notes (as :func:`same_notes` compares them) and a few pixels of the
prepared image that must hold a colour (so orientation and frame choice are checked, not just
sizes). Outcomes assume the default
:class:`~qvl_batch.config.ImageConfig`. Everything is made here from seeds: no files, no network.
HEIC is written by pillow-heif where it is installed (the heif extra), and only sniffed otherwise.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import random
import struct
import zlib
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
from PIL import Image, features

from qvl_batch.tooling.pictures import encode_jpeg, photo_like, stored_as

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
GREY, WHITE = (128, 128, 128), (255, 255, 255)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BOMB_SIDE = 10_500  # 110M pixels: over ImageConfig.max_image_pixels, under Pillow's hard limit

Mark = tuple[tuple[float, float], tuple[int, int, int]]  # (x, y) as fractions of the size -> RGB


class Expected(NamedTuple):
    """What prepare_image must do with a case under the default ImageConfig."""

    outcome: str  # an RowFailure code, or "OK"
    size: tuple[int, int] | None = None  # OK: upright (width, height) of the source
    notes: frozenset[str] = frozenset()  # OK: PreparedImage.notes, as same_notes compares them
    marks: tuple[Mark, ...] = ()  # OK: colours at points of the prepared image
    detail: str = ""  # errors: a piece of the message (e.g. the format Pillow identified)


class Case(NamedTuple):
    name: str
    data: bytes | None
    expected: Expected


def ok(size: tuple[int, int], *notes: str, marks: tuple[Mark, ...] = ()) -> Expected:
    return Expected("OK", size, frozenset(notes), marks)


def refused(code: str, detail: str = "") -> Expected:
    return Expected(code, detail=detail)


def same_notes(actual, expected: frozenset[str]) -> bool:
    """The notes are exactly the expected ones, except that a ``warning:`` note is matched by its
    start (category and the first words of Pillow's message, which may change between versions)."""

    def matched(note: str) -> str:
        if note.startswith("warning:"):
            return next((e for e in expected if note.startswith(e)), note)
        return note

    return sorted(matched(note) for note in actual) == sorted(expected)


# ----------------------------------------------------------------------------- helpers


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def png_raw(width: int, height: int, depth: int, colour_type: int, rows: list[bytes]) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB/RGBA): filter 0 on every row."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    idat = zlib.compress(b"".join(b"\x00" + row for row in rows), 1)
    return (
        PNG_SIGNATURE
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def png_with_chunk(png: bytes, chunk: bytes) -> bytes:
    """Insert a chunk right after IHDR (signature 8 bytes + IHDR 25 bytes), before any IDAT."""
    return png[:33] + chunk + png[33:]


def jpeg_with_segment(jpeg: bytes, marker: int, body: bytes) -> bytes:
    """Insert a marker segment right after SOI."""
    segment = struct.pack(">BBH", 0xFF, marker, len(body) + 2) + body
    return jpeg[:2] + segment + jpeg[2:]


def halves(width: int, height: int, left, right, mode: str = "RGB") -> Image.Image:
    """An image whose left half is ``left`` and right half ``right``."""
    img = Image.new(mode, (width, height), left)
    img.paste(right, (width // 2, 0, width, height))
    return img


def two_tone(left_colour, right_colour) -> tuple[Mark, ...]:
    return (((0.2, 0.5), left_colour), ((0.8, 0.5), right_colour))


def photo_jpeg(seed: int, width: int, height: int, **params) -> bytes:
    return encode_jpeg(photo_like(np.random.default_rng(seed), width, height), **params)


# ----------------------------------------------------------------------------- generators


def truncated() -> Iterator[Case]:
    """Files cut short: Pillow identifies them from the header, the decoder runs out of data."""
    jpeg = photo_jpeg(1, 400, 300, quality=90)
    yield Case("jpeg_truncated_60pct", jpeg[: len(jpeg) * 6 // 10], refused("DECODE_ERROR"))
    yield Case("jpeg_without_eoi", jpeg[:-2], refused("DECODE_ERROR", "truncated"))
    scan = jpeg.index(b"\xff\xda")
    yield Case("jpeg_cut_at_scan", jpeg[: scan + 14], refused("DECODE_ERROR", "truncated"))
    progressive = photo_jpeg(2, 400, 300, progressive=True)
    half = progressive[: len(progressive) // 2]
    yield Case("jpeg_progressive_truncated", half, refused("DECODE_ERROR"))
    png = encode(photo_like(np.random.default_rng(3), 300, 200), "PNG")
    yield Case("png_truncated_half", png[: len(png) // 2], refused("DECODE_ERROR"))
    yield Case("png_ihdr_only", png[:33], refused("DECODE_ERROR"))


def not_images() -> Iterator[Case]:
    """Nothing, zeros, noise, and a valid magic number followed by noise."""
    noise = random.Random(11).randbytes(4096)
    yield Case("null_image", None, refused("MISSING_IMAGE"))
    yield Case("zero_bytes", b"", refused("MISSING_IMAGE"))
    yield Case("nul_bytes_4k", bytes(4096), refused("DECODE_ERROR", "cannot identify"))
    yield Case("random_bytes_4k", noise, refused("DECODE_ERROR", "cannot identify"))
    yield Case("png_magic_then_noise", PNG_SIGNATURE + noise, refused("DECODE_ERROR"))
    yield Case("jpeg_magic_then_noise", b"\xff\xd8\xff" + noise, refused("DECODE_ERROR"))
    gif_frame = (  # a 64x48 screen and frame, no palette, then 8 sub-blocks of noise as LZW data
        b"GIF89a"
        + struct.pack("<HHBBB", 64, 48, 0, 0, 0)
        + b","
        + struct.pack("<HHHHB", 0, 0, 64, 48, 0)
        + b"\x08"
        + b"".join(b"\xff" + noise[i : i + 255] for i in range(0, 8 * 255, 255))
    )
    yield Case("gif_frame_of_noise", gif_frame, refused("DECODE_ERROR", "broken data"))


def bombs() -> Iterator[Case]:
    """Headers that claim a huge canvas. Refused from the header: no pixel is ever decoded."""
    fake_idat = zlib.compress(bytes(64))
    ihdr = struct.pack(">IIBBBBB", 50_000, 50_000, 8, 0, 0, 0, 0)
    header_only = (
        PNG_SIGNATURE
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", fake_idat)
        + png_chunk(b"IEND", b"")
    )
    yield Case("png_header_50000x50000", header_only, refused("IMAGE_TOO_LARGE", "Pillow"))

    jpeg = bytearray(encode(Image.new("RGB", (64, 48), GREY), "JPEG"))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", 50_000, 50_000)  # height, width
    yield Case("jpeg_sof_50000x50000", bytes(jpeg), refused("IMAGE_TOO_LARGE", "Pillow"))

    gif = bytearray(encode(Image.new("RGB", (64, 48), GREY), "GIF"))
    gif[6:10] = struct.pack("<HH", 50_000, 50_000)  # logical screen
    yield Case("gif_screen_50000x50000", bytes(gif), refused("IMAGE_TOO_LARGE", "Pillow"))

    yield Case("tiff_ifd_50000x50000", tiff_header_only(50_000, 50_000), refused("IMAGE_TOO_LARGE"))
    yield Case(
        f"png_zeros_{BOMB_SIDE}x{BOMB_SIDE}",
        png_bomb(BOMB_SIDE),
        refused("IMAGE_TOO_LARGE", "max_image_pixels"),
    )


def tiff_header_only(width: int, height: int) -> bytes:
    """A little-endian TIFF whose one IFD declares width x height 8-bit grey and no real strip."""
    entries = [  # (tag, type, count, value); type 3 SHORT, 4 LONG
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 1, 8),
        (259, 3, 1, 1),
        (262, 3, 1, 1),
        (273, 4, 1, 8 + 2 + 12 * 10 + 4),
        (277, 3, 1, 1),
        (278, 4, 1, height),
        (279, 4, 1, min(width * height, 0xFFFFFFFF)),
        (284, 3, 1, 1),
    ]
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        packed = struct.pack("<HI", value, 0)[:4] if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, count) + packed
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + bytes(64)


@functools.lru_cache(maxsize=2)
def png_bomb(side: int) -> bytes:
    """A valid side x side grey PNG of zeros: ~0.5 MB that decodes to side^2 bytes."""
    packer = zlib.compressobj(1)
    rows = bytes(side + 1) * 64  # 64 rows of (filter byte + side zero pixels)
    idat = [packer.compress(rows) for _ in range(side // 64)]
    idat += [packer.compress(bytes(side + 1) * (side % 64)), packer.flush()]
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", b"".join(idat))
        + png_chunk(b"IEND", b"")
    )


def sizes() -> Iterator[Case]:
    """1x1 and aspect ratios past (and exactly at) Qwen's limit of 200."""
    yield Case("png_1x1", encode(Image.new("RGB", (1, 1), RED), "PNG"), refused("IMAGE_TOO_SMALL"))
    yield Case("gif_1x1", encode(Image.new("L", (1, 1)), "GIF"), refused("IMAGE_TOO_SMALL"))
    yield Case("jpeg_1x1", encode(Image.new("RGB", (1, 1)), "JPEG"), refused("IMAGE_TOO_SMALL"))
    yield Case(
        "png_20000x10",
        encode(Image.new("L", (20_000, 10), 90), "PNG"),
        refused("ASPECT_RATIO"),
    )
    yield Case(
        "png_10x20000",
        encode(Image.new("L", (10, 20_000), 90), "PNG"),
        refused("ASPECT_RATIO"),
    )
    thin = halves(2000, 10, RED, BLUE)
    yield Case("jpeg_2000x10_aspect_200", encode(thin, "JPEG", quality=95), ok((2000, 10)))


def colour_modes() -> Iterator[Case]:
    """CMYK, 16-bit and palette/alpha sources, all flattened to RGB with the right colours."""
    cmyk = halves(150, 100, (0, 255, 255, 0), (255, 255, 0, 0), mode="CMYK")  # red | blue
    yield Case(
        "jpeg_cmyk",
        encode(cmyk, "JPEG", quality=95),
        ok((150, 100), marks=two_tone(RED, BLUE)),
    )

    grey16 = np.full((100, 150), 10_000, dtype=np.uint16)
    grey16[:, 75:] = 50_000
    yield Case(
        "png_16bit_grey",
        encode(Image.fromarray(grey16), "PNG"),
        ok((150, 100), marks=two_tone((39, 39, 39), (195, 195, 195))),
    )

    rgb16 = np.zeros((100, 150, 3), dtype=">u2")
    rgb16[:, :75] = (65_535, 0, 0)
    rgb16[:, 75:] = (0, 0, 40_000)  # 8-bit: 40000 >> 8 = 156
    rows = [rgb16[y].tobytes() for y in range(100)]
    yield Case(
        "png_16bit_rgb",
        png_raw(150, 100, 16, 2, rows),
        ok((150, 100), marks=two_tone(RED, (0, 0, 156))),
    )

    rgba16 = np.zeros((100, 150, 4), dtype=">u2")
    rgba16[:, :75] = (65_535, 0, 0, 65_535)  # opaque red | fully transparent
    rows = [rgba16[y].tobytes() for y in range(100)]
    yield Case(
        "png_16bit_rgba_transparent",
        png_raw(150, 100, 16, 6, rows),
        ok((150, 100), "alpha_flattened", marks=two_tone(RED, WHITE)),
    )

    palette = halves(150, 100, 0, 1, mode="P")
    palette.putpalette([0, 0, 0, *BLUE] + [0] * 762)
    yield Case(
        "png_palette_transparency",
        encode(palette, "PNG", transparency=0),
        ok((150, 100), "alpha_flattened", marks=two_tone(WHITE, BLUE)),
    )
    gif = halves(150, 100, 0, 1, mode="P")
    gif.putpalette([0, 0, 0, *RED] + [0] * 762)
    yield Case(
        "gif_transparency",
        encode(gif, "GIF", transparency=0),
        ok((150, 100), "alpha_flattened", marks=two_tone(WHITE, RED)),
    )


def animations() -> Iterator[Case]:
    """Multi-frame files: the first frame is used and the note says so."""

    def frames() -> list[Image.Image]:  # fresh images: a save can leave encoder state on them
        return [Image.new("RGB", (150, 100), colour) for colour in (RED, BLUE, GREEN)]

    first_red = (((0.5, 0.5), RED),)
    for name, fmt, params in [
        ("gif_animated", "GIF", {"duration": 40, "loop": 0}),
        ("webp_animated", "WEBP", {"duration": 40, "lossless": True}),
        ("png_animated_apng", "PNG", {"duration": 40}),
        ("mpo_two_pictures", "MPO", {}),
        ("tiff_three_pages", "TIFF", {"compression": "tiff_deflate"}),
    ]:
        first, *rest = frames()
        data = encode(first, fmt, save_all=True, append_images=rest, **params)
        yield Case(name, data, ok((150, 100), "first_frame", marks=first_red))


UPRIGHT_MARKS = (
    ((0.06, 0.08), RED),  # top-left
    ((0.94, 0.08), GREEN),  # top-right
    ((0.06, 0.92), GREY),
    ((0.94, 0.92), GREY),
)


def upright_picture(width: int = 250, height: int = 170) -> Image.Image:
    """Grey with a red block at the top-left and a green one at the top-right corner."""
    img = Image.new("RGB", (width, height), GREY)
    block = min(width, height) // 4
    img.paste(RED, (0, 0, block, block))
    img.paste(GREEN, (width - block, 0, width, block))
    return img


def stored(orientation: int, upright: Image.Image | None = None) -> Image.Image:
    return stored_as(upright or upright_picture(), orientation)


def exif(orientation: int) -> Image.Exif:
    tags = Image.Exif()
    tags[0x0112] = orientation
    return tags


def orientations() -> Iterator[Case]:
    """All eight EXIF orientations (and a bad one): the prepared pixels must be upright."""
    for k in range(1, 9):
        data = encode(stored(k), "JPEG", quality=95, exif=exif(k))
        notes = ("exif_transposed",) if k != 1 else ()
        yield Case(f"jpeg_exif_orientation_{k}", data, ok((250, 170), *notes, marks=UPRIGHT_MARKS))
    bad = encode(upright_picture(), "JPEG", quality=95, exif=exif(9))
    yield Case("jpeg_exif_orientation_9_ignored", bad, ok((250, 170), marks=UPRIGHT_MARKS))
    png = encode(stored(6), "PNG", exif=exif(6))
    yield Case(
        "png_exif_orientation_6", png, ok((250, 170), "exif_transposed", marks=UPRIGHT_MARKS)
    )
    webp = encode(stored(3), "WEBP", lossless=True, exif=exif(3))
    yield Case(
        "webp_exif_orientation_3", webp, ok((250, 170), "exif_transposed", marks=UPRIGHT_MARKS)
    )
    broken = b"Exif\x00\x00II*\x00" + struct.pack("<I", 0xFFFFFF00) + bytes(20)  # IFD past end
    jpeg = jpeg_with_segment(encode(upright_picture(), "JPEG", quality=95), 0xE1, broken)
    warned = "warning:UserWarning:Corrupt EXIF data"  # what Pillow warns, as the row's note
    yield Case("jpeg_exif_corrupt_ifd", jpeg, ok((250, 170), warned, marks=UPRIGHT_MARKS))


def encodings() -> Iterator[Case]:
    """Progressive JPEG (small, and large enough for a DCT-domain draft) and a damaged scan."""
    yield Case("jpeg_progressive", photo_jpeg(4, 640, 480, progressive=True), ok((640, 480)))
    large = photo_jpeg(5, 2800, 2000, progressive=True)
    yield Case("jpeg_progressive_2800x2000_draft", large, ok((2800, 2000), "draft"))
    damaged = bytearray(photo_jpeg(6, 400, 300))
    for k in range(40):  # flipped bits mid-scan: libjpeg gives up and Pillow reports it
        damaged[len(damaged) // 3 + 97 * k] ^= 0x55
    yield Case("jpeg_scan_bit_flips", bytes(damaged), refused("DECODE_ERROR", "broken data"))


def big_metadata() -> Iterator[Case]:
    """Metadata far larger than the pixels: decoded fine, or refused by Pillow's own text cap."""
    picture = upright_picture()

    def jpeg(**params) -> bytes:
        return encode(picture, "JPEG", quality=95, **params)

    yield Case("jpeg_com_65000", jpeg(comment=b"c" * 65_000), ok((250, 170), marks=UPRIGHT_MARKS))
    tags = exif(6)
    tags[0x010E] = "d" * 60_000  # ImageDescription: a 60 KB EXIF block
    data = encode(stored(6), "JPEG", quality=95, exif=tags)
    yield Case("jpeg_exif_60kb", data, ok((250, 170), "exif_transposed", marks=UPRIGHT_MARKS))
    icc = bytes(range(256)) * 16_000  # a 4 MB "profile" (garbage) over ~63 APP2 segments
    yield Case("jpeg_icc_4mb", jpeg(icc_profile=icc), ok((250, 170), marks=UPRIGHT_MARKS))
    data = jpeg()
    for _ in range(80):  # 80 maximal APP15 segments: 5.2 MB before the first frame header
        data = jpeg_with_segment(data, 0xEF, bytes(65_533))
    yield Case("jpeg_app15_5mb", data, ok((250, 170), marks=UPRIGHT_MARKS))

    png = encode(picture, "PNG")
    text = png_chunk(b"tEXt", b"Comment\x00" + b"t" * 2_000_000)
    yield Case("png_text_2mb", png_with_chunk(png, text), ok((250, 170), marks=UPRIGHT_MARKS))
    ztxt = png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(bytes(16_000_000), 9))
    yield Case(
        "png_ztxt_16mb_inflated",
        png_with_chunk(png, ztxt),
        refused("DECODE_ERROR", "MAX_TEXT_CHUNK"),
    )
    iccp = png_chunk(b"iCCP", b"icc\x00\x00" + zlib.compress(bytes(16_000_000), 9))
    yield Case(
        "png_iccp_16mb_inflated",
        png_with_chunk(png, iccp),
        refused("DECODE_ERROR", "MAX_TEXT_CHUNK"),
    )


def allowed_formats() -> Iterator[Case]:
    """The rest of the allow-list decodes: BMP, TIFF, WebP, and AVIF where this Pillow has it."""
    picture = halves(150, 100, RED, BLUE)
    written = [
        ("bmp_rgb", "BMP", {}),
        ("tiff_lzw", "TIFF", {"compression": "tiff_lzw"}),
        ("webp_lossy", "WEBP", {"quality": 90}),
    ]
    if features.check("avif"):  # Pillow >= 11.3 writes and reads AVIF itself
        written.append(("avif_lossy", "AVIF", {"quality": 90}))
    for name, fmt, params in written:
        data = encode(picture, fmt, **params)
        yield Case(name, data, ok((150, 100), marks=two_tone(RED, BLUE)))


def unsupported_formats() -> Iterator[Case]:
    """Formats Pillow reads but the runner refuses, identified without decoding a pixel."""
    rgb = Image.new("RGB", (150, 100), RED)
    written = [
        ("ppm_p6", "PPM", rgb, "PPM"),
        ("pgm_p5", "PPM", rgb.convert("L"), "PPM"),
        ("pbm_p4", "PPM", rgb.convert("1"), "PPM"),
        ("tga", "TGA", rgb, "TGA"),
        ("pcx", "PCX", rgb, "PCX"),
        ("ico", "ICO", rgb, "ICO"),
        ("sgi", "SGI", rgb, "SGI"),
        ("xbm", "XBM", rgb.convert("1"), "XBM"),
        ("im", "IM", rgb, "IM"),
        ("eps", "EPS", rgb, "EPS"),
        ("dds", "DDS", rgb, "DDS"),
        ("blp", "BLP", rgb.convert("P"), "BLP"),
        ("msp", "MSP", rgb.convert("1"), "MSP"),
        ("spider", "SPIDER", rgb.convert("F"), "SPIDER"),
        ("icns", "ICNS", Image.new("RGB", (128, 128), RED), "ICNS"),
        ("dib", "DIB", rgb, "DIB"),
        ("qoi", "QOI", rgb, "QOI"),
    ]
    if features.check("jpg_2000"):
        written.append(("jpeg2000", "JPEG2000", rgb, "JPEG2000"))
    for name, fmt, img, identified in written:
        try:
            data = encode(img, fmt)
        except (KeyError, OSError, ValueError):  # this Pillow cannot write it: nothing to test
            continue
        yield Case(name, data, refused("UNSUPPORTED_FORMAT", identified))

    # PostScript would go to Ghostscript on load(); the header alone identifies it.
    postscript = b"%!PS-Adobe-3.0\n%%BoundingBox: 0 0 150 100\n%%EndComments\nshowpage\n%%EOF\n"
    yield Case("postscript", postscript, refused("UNSUPPORTED_FORMAT", "EPS"))
    yield Case("psd_rgb", psd(150, 100), refused("UNSUPPORTED_FORMAT", "PSD"))
    # Not allowed *and* over Pillow's hard pixel limit: still the format decides the code.
    eps_bomb = postscript.replace(b"0 0 150 100", b"0 0 50000 50000")
    yield Case("eps_bbox_50000x50000", eps_bomb, refused("UNSUPPORTED_FORMAT", "size limit"))
    tga = struct.pack("<BBBHHBHHHHBB", 0, 0, 2, 0, 0, 0, 0, 0, 50_000, 50_000, 24, 0x20)
    yield Case(
        "tga_header_50000x50000", tga + bytes(256), refused("UNSUPPORTED_FORMAT", "size limit")
    )
    # Phones' HEIC is outside the default allow-list: named from its ftyp brand, with or without
    # pillow-heif, and never handed to libheif.
    ftyp = struct.pack(">I", 24) + b"ftypheic" + bytes(4) + b"mif1heic"
    noise = random.Random(12).randbytes(512)
    yield Case("heic_ftyp_then_noise", ftyp + noise, refused("UNSUPPORTED_FORMAT", "HEIF"))
    if importlib.util.find_spec("pillow_heif") is not None:
        yield Case("heic", heic(rgb), refused("UNSUPPORTED_FORMAT", "HEIF"))


def heic(img: Image.Image) -> bytes:
    """HEIC as phones write it, by pillow-heif (libheif with x265); the heif extra."""
    import pillow_heif

    buf = io.BytesIO()
    pillow_heif.from_pillow(img).save(buf, quality=90)
    return buf.getvalue()


def psd(width: int, height: int) -> bytes:
    """A minimal uncompressed 8-bit RGB Photoshop file (Pillow reads PSD but cannot write it)."""
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    sections = struct.pack(">III", 0, 0, 0)  # colour mode data, resources, layers: all empty
    planes = b"\xff" * (width * height) + bytes(2 * width * height)  # red
    return header + sections + struct.pack(">H", 0) + planes


GENERATORS = (
    truncated,
    not_images,
    bombs,
    sizes,
    colour_modes,
    animations,
    orientations,
    encodings,
    big_metadata,
    allowed_formats,
    unsupported_formats,
)


@functools.lru_cache(maxsize=1)
def corpus() -> tuple[Case, ...]:
    """Every case of every generator, in a fixed order (about 1 s to build, then cached)."""
    return tuple(case for generate in GENERATORS for case in generate())
