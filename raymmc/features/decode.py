"""Image bytes -> fixed-size RGB arrays, and captions -> clean text, with a reason for every
rejection. Plain functions: the Ray Data job maps them over batches."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

# A truncated file must be an error, not a half-grey picture.
ImageFile.LOAD_TRUNCATED_IMAGES = False
Image.init()  # every plugin registered: Image.open(formats=...) only looks up those already loaded


@dataclass
class DecodeConfig:
    image_size: int = 224  # side of the centre crop fed to the CNN
    resize: int = 256  # shorter side before the crop (torchvision's ImageNet eval recipe)
    # Decompression-bomb guard: images with more pixels are rejected before decoding.
    max_pixels: int = 64_000_000
    background: tuple[int, int, int] = (255, 255, 255)  # transparent pixels are composited on this
    min_caption_chars: int = 1
    # Longer captions are cut (with a note) before anything else touches them: a hostile 1 GB caption must not
    # become a 1 GB token list. 20k characters is far past what any encoder reads (MiniLM: 256 tokens).
    max_caption_chars: int = 20_000
    # Longer ids are rejected: an id is a key users join on, not a payload (and it is written into every output).
    max_id_chars: int = 1024
    # The image formats Pillow may try on an item's bytes (all it knows otherwise): an EPS item would run
    # Ghostscript where it is installed, and every extra format is parser code exposed to the archive's bytes.
    # (JPEG covers multi-picture MPO files too.)
    formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "ICO")


def decode_image(data: bytes | None, cfg: DecodeConfig) -> tuple[np.ndarray | None, str | None]:
    """Return ``(HxWx3 uint8 array, None)`` or ``(None, reason)``; ``(None, None)`` when there is no image."""
    if data is None:
        return None, None
    if len(data) == 0:
        return None, "image: zero bytes"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(cfg.formats))
            w, h = img.size
            if w * h > cfg.max_pixels:
                return None, f"image: decompression bomb guard: {w}x{h} = {w * h} pixels exceeds max_pixels={cfg.max_pixels}"
            if w == 0 or h == 0:
                return None, "image: zero width or height"
            # JPEG can decode at a reduced scale directly: much faster for large photos.
            img.draft("RGB", (cfg.resize, cfg.resize))
            img.load()
            img = _to_rgb(img, cfg.background)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return None, f"image: decompression bomb guard: {exc}"
    except UnidentifiedImageError:
        return None, f"image: undecodable (not one of the formats {', '.join(cfg.formats)})"
    except Exception as exc:  # truncated / corrupt data: whatever a format's parser raises, a note on this row
        return None, f"image: corrupt ({type(exc).__name__}: {exc})"
    return _resize_crop(img, cfg), None


def _to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    if img.mode == "I;16" or img.mode == "I":
        # 16/32-bit grayscale: scale to 8 bits rather than clipping to white.
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() or 1.0
        return Image.fromarray((arr / hi * 255).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, F ...


def _resize_crop(img: Image.Image, cfg: DecodeConfig) -> np.ndarray:
    w, h = img.size
    scale = cfg.resize / min(w, h)
    nw, nh = max(cfg.image_size, round(w * scale)), max(cfg.image_size, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - cfg.image_size) // 2, (nh - cfg.image_size) // 2
    img = img.crop((left, top, left + cfg.image_size, top + cfg.image_size))
    return np.asarray(img, dtype=np.uint8)


def clean_caption(caption: object, cfg: DecodeConfig) -> tuple[str | None, str | None]:
    """Return ``(text, None)``, ``(text, note)`` for a caption that was cut to ``max_caption_chars``, or
    ``(None, reason)`` for an unusable caption; ``(None, None)`` if absent."""
    if caption is None:
        return None, None
    note = None
    limit = cfg.max_caption_chars
    if isinstance(caption, (bytes, memoryview)):  # a binary column, or text in an unknown encoding
        raw = bytes(caption)
        if len(raw) > 4 * limit:  # no UTF-8 character is longer than 4 bytes: decode only what can be kept
            note = f"caption: truncated from {len(raw)} bytes to {limit} characters"
            raw = raw[: 4 * limit]
        caption = raw.decode("utf-8", errors="replace")  # invalid bytes become U+FFFD, the rest is kept
    if not isinstance(caption, str):
        return None, f"caption: not text ({type(caption).__name__})"
    if len(caption) > limit:
        note = note or f"caption: truncated from {len(caption)} to {limit} characters"
        caption = caption[:limit]
    text = " ".join(caption.replace("\x00", " ").split())
    if len(text) < cfg.min_caption_chars:
        return None, "caption: empty"
    return text, note


def id_problem(id_: str | None, cfg: DecodeConfig) -> str | None:
    """Why an id cannot be used (``None`` when it can). Ids are data, never paths: ``/`` and ``..`` are kept
    as they are; control characters (NUL among them) break the CSV files, databases and terminals that
    assignments end up in, and an id longer than ``max_id_chars`` is a payload, not a key."""
    if id_ is None or id_ == "":
        return "missing id"
    if len(id_) > cfg.max_id_chars:
        return f"id longer than max_id_chars={cfg.max_id_chars} ({len(id_)} characters)"
    if "\ufffd" in id_:
        return "id is not valid UTF-8"
    bad = next((c for c in id_ if ord(c) < 32 or 127 <= ord(c) < 160), None)
    if bad is not None:
        return f"id contains a control character (U+{ord(bad):04X})"
    return None
