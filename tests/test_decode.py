"""Every kind of bad or unusual input is converted or rejected with a reason."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from raymmc.features.decode import DecodeConfig, clean_caption, decode_image

CFG = DecodeConfig(image_size=32, resize=36)


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_rgb_png_is_resized_and_cropped():
    arr, reason = decode_image(encode(Image.new("RGB", (80, 40), (10, 20, 30))), CFG)
    assert reason is None
    assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8
    assert tuple(arr[16, 16]) == (10, 20, 30)


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("CMYK", "JPEG"), ("P", "PNG"), ("I;16", "PNG"),
                                      ("RGB", "WEBP"), ("1", "PNG")])
def test_other_modes_become_rgb(mode, fmt):
    arr, reason = decode_image(encode(Image.new(mode, (40, 40)), fmt), CFG)
    assert reason is None and arr.shape == (32, 32, 3)


def test_alpha_is_composited_on_the_background():
    img = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent red
    arr, _ = decode_image(encode(img), CFG)
    assert tuple(arr[5, 5]) == CFG.background
    arr, _ = decode_image(encode(Image.new("RGBA", (40, 40), (255, 0, 0, 255))), CFG)
    assert tuple(arr[5, 5]) == (255, 0, 0)


def test_missing_image_is_not_an_error():
    assert decode_image(None, CFG) == (None, None)


@pytest.mark.parametrize("data,expected", [
    (b"", "zero bytes"),
    (b"definitely not an image", "undecodable"),
])
def test_garbage_is_rejected(data, expected):
    arr, reason = decode_image(data, CFG)
    assert arr is None and expected in reason


def test_only_the_allowed_formats_are_parsed():
    """An EPS item is refused unparsed (Pillow would hand it to Ghostscript); a format left out of
    ``extract.decode.formats`` is refused, named; the config refuses unknown names and EPS."""
    from raymmc.config import ConfigError, load_config

    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\nshowpage\n"
    arr, reason = decode_image(eps, CFG)
    assert arr is None and reason.startswith("image: undecodable (not one of the formats JPEG, PNG")
    png = encode(Image.new("RGB", (40, 40), (0, 0, 255)))
    assert decode_image(png, CFG)[0] is not None
    arr, reason = decode_image(png, DecodeConfig(image_size=32, resize=36, formats=("JPEG",)))
    assert arr is None and reason == "image: undecodable (not one of the formats JPEG)"
    for bad, match in ((["JPEG", "NOPE"], "Pillow format names"), (["PNG", "EPS"], "Ghostscript")):
        with pytest.raises(ConfigError, match=match):
            load_config(overrides=[f"extract.decode.formats={bad}"])


def test_truncated_png_is_rejected():
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    arr, reason = decode_image(data[: len(data) // 2], CFG)
    assert arr is None and reason.startswith("image: corrupt")


def test_truncated_jpeg_is_rejected():
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    arr, reason = decode_image(data[: len(data) // 3], CFG)
    assert arr is None and "corrupt" in reason


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims huge dimensions: the decompression-bomb shape."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 10)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_rejected_before_decoding():
    arr, reason = decode_image(_png_header_only(20000, 20000), CFG)
    assert arr is None and reason.startswith("image: decompression bomb guard")


def test_max_pixels_is_configurable():
    small = DecodeConfig(image_size=32, resize=36, max_pixels=50 * 50)
    data = encode(Image.new("RGB", (60, 60)))
    arr, reason = decode_image(data, small)
    assert arr is None and "3600 pixels exceeds max_pixels=2500" in reason
    assert decode_image(data, CFG)[1] is None


@pytest.mark.parametrize("raw,expected", [
    ("  A red   fox\n", ("A red fox", None)),
    (None, (None, None)),
    ("", (None, "caption: empty")),
    ("   \t\n", (None, "caption: empty")),
    ("caf\xe9".encode("latin-1"), ("caf\ufffd", None)),  # not UTF-8: replacement char, kept
    ("naïve".encode("utf-8"), ("naïve", None)),
    ("nul\x00byte", ("nul byte", None)),
])
def test_captions(raw, expected):
    assert clean_caption(raw, CFG) == expected
