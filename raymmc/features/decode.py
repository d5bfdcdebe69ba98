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


@dataclass
class DecodeConfig:
    image_size: int = 224  # side of the centre crop fed to the CNN
    resize: int = 256  # shorter side before the crop (torchvision's ImageNet eval recipe)
    # Decompression-bomb guard: images with more pixels are rejected before decoding.
    max_pixels: int = 64_000_000
    background: tuple[int, int, int] = (255, 255, 255)  # transparent pixels are composited on this
    min_caption_chars: int = 1


def decode_image(data: bytes | None, cfg: DecodeConfig) -> tuple[np.ndarray | None, str | None]:
    """Return ``(HxWx3 uint8 array, None)`` or ``(None, reason)``; ``(None, None)`` when there is no image."""
    if data is None:
        return None, None
    if len(data) == 0:
        return None, "image: zero bytes"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
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
        return None, "image: undecodable (not a PNG/JPEG/WebP/... file)"
    except (OSError, SyntaxError, ValueError) as exc:  # truncated / corrupt data
        return None, f"image: corrupt ({exc})"
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
    """Return ``(text, None)``, or ``(None, reason)`` for an unusable caption; ``(None, None)`` if absent."""
    if caption is None:
        return None, None
    if isinstance(caption, bytes):  # a binary column, or text in an unknown encoding
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError:
            caption = caption.decode("utf-8", errors="replace")
    if not isinstance(caption, str):
        return None, f"caption: not text ({type(caption).__name__})"
    text = " ".join(caption.replace("\x00", " ").split())
    if len(text) < cfg.min_caption_chars:
        return None, "caption: empty"
    return text, None
