"""Reading one image into the array the vision tower takes: float32 [size, size, 3] in [-1, 1].

The training pipeline (image_pipeline.py) and the generate CLI both call `load_image`, so an image
is decoded, converted and resized the same way at training time and at inference time.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, UnidentifiedImageError


def load_image(path_or_bytes, size: int | None, resize: bool = True) -> np.ndarray:
    """The image at `path_or_bytes` (a path, the encoded bytes, or decoded uint8 pixels
    [H, W, C] as a TFDS image feature gives them) as float32 [size, size, 3].

    Any mode Pillow reads (palette, grey, RGBA, CMYK...) is converted to RGB; pixel values are
    mapped from [0, 255] to [-1, 1]. With `resize`, the image is resized to `size` x `size` with
    antialiased bilinear filtering (the aspect ratio is not kept, as in ViT / PaliGemma
    preprocessing); without it, an image of another size is an error. `size=None` keeps the
    image's own size.
    """
    name = _name(path_or_bytes)
    try:
        if isinstance(path_or_bytes, np.ndarray):
            pixels = path_or_bytes[..., 0] if path_or_bytes.shape[-1:] == (1,) else path_or_bytes
            image = Image.fromarray(pixels.astype(np.uint8)).convert("RGB")
        else:
            source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, (bytes, bytearray)) else (
                os.fspath(path_or_bytes))
            with Image.open(source) as image:
                image = image.convert("RGB")
    except FileNotFoundError:
        raise ValueError(f"Cannot read the image {name}: there is no such file; check the path "
                         "(JSONL image paths are relative to data.image_dir).") from None
    except (OSError, UnidentifiedImageError, ValueError, TypeError) as e:
        raise ValueError(f"Cannot read the image {name}: it is not an image Pillow can decode "
                         f"({type(e).__name__}); use PNG, JPEG or another format Pillow reads.") from None
    if size is not None and image.size != (size, size):
        if not resize:
            raise ValueError(f"The image {name} is {image.size[0]}x{image.size[1]}, not the "
                             f"expected {size}x{size}; resize it or set data.resize_images=True.")
        image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    return normalize(np.asarray(image))


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] in [0, 255] -> float32 in [-1, 1]."""
    return pixels.astype(np.float32) * np.float32(2 / 255) - np.float32(1)


def _name(path_or_bytes) -> str:
    if isinstance(path_or_bytes, (bytes, bytearray)):
        return f"<{len(path_or_bytes)} encoded bytes>"
    if isinstance(path_or_bytes, np.ndarray):
        return f"<pixels {path_or_bytes.shape}>"
    return repr(os.fspath(path_or_bytes)) if isinstance(path_or_bytes, (str, os.PathLike)) else (
        repr(path_or_bytes))
