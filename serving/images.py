"""Images in and out of the API: an `image_url` content part (a data URL only: the server never fetches) becomes
the 8x8 image the model reads, and a drawn image becomes a PNG.

Grey levels follow scikit-learn's digits: ink is bright (255 is full ink), the background dark. A larger square
image whose side is a multiple of 8 is averaged down to 8x8, so a client may send the 64x64 PNG it was given back.
Every fault is a 400 naming the part (`param`) and what is wrong, before anything is decoded past the header.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from collections.abc import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from serving.engine import ChatPackage
from serving.errors import ApiError

MAX_IMAGE_BYTES = 64 * 1024  # encoded: an 8x8 PNG is about 140 bytes, a 256x256 one a few KB
MAX_SIDE = 256
MAX_IMAGES = 4  # per request
SIGNATURES = {"image/png": b"\x89PNG\r\n\x1a\n", "image/jpeg": b"\xff\xd8\xff"}
# What Pillow raises for an image it cannot read: a broken chunk is a SyntaxError, a header claiming an enormous
# size a DecompressionBombError (neither an OSError)
UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)(?P<params>(?:;[\w.+-]+=[\w.+-]+)*);base64,(?P<data>.*)", re.S)


def _refuse(message: str, param: str, code: str = "invalid_image") -> ApiError:
    return ApiError(400, message, param, code)


def read_data_url(url: str, param: str, size: tuple[int, int]) -> np.ndarray:
    """The image a data URL holds, as a `size` array in [0, 1]; ApiError 400 naming `param` when it cannot be."""
    if not url.startswith("data:"):
        raise _refuse(
            "only data URLs are accepted (data:image/png;base64,... or data:image/jpeg;base64,...); this server "
            "fetches nothing",
            param,
            "invalid_image_url",
        )
    match = DATA_URL.fullmatch(url)
    if match is None:
        raise _refuse("not a base64 data URL: expected data:<type>;base64,<data>", param, "invalid_image_url")
    kind = match["type"].lower()
    if kind not in SIGNATURES:
        raise _refuse(
            f"image type {kind!r} is not supported; send image/png or image/jpeg", param, "invalid_image_type"
        )
    if len(match["data"]) > (MAX_IMAGE_BYTES * 4) // 3 + 4:
        raise _refuse(f"the image is larger than {MAX_IMAGE_BYTES // 1024} KiB", param, "image_too_large")
    try:
        raw = base64.b64decode(match["data"], validate=True)
    except (binascii.Error, ValueError) as error:
        raise _refuse(f"the image's base64 does not decode ({error})", param) from error
    if not raw.startswith(SIGNATURES[kind]):
        raise _refuse(f"the data is not a {kind} image (its first bytes do not match)", param)
    try:
        image = Image.open(io.BytesIO(raw))
    except UNREADABLE as error:
        raise _refuse(f"the {kind} image cannot be read ({error})", param) from error
    width, height = image.size  # from the header: nothing decoded yet
    rows, columns = size
    if width % columns or height % rows or width // columns != height // rows or max(width, height) > MAX_SIDE:
        raise _refuse(
            f"the image is {width}x{height}; send {columns}x{rows}, or a square multiple of it up to "
            f"{MAX_SIDE}x{MAX_SIDE} (averaged down)",
            param,
            "invalid_image_size",
        )
    try:
        grey = np.asarray(image.convert("L"), dtype=np.float64) / 255.0
    except UNREADABLE as error:  # a truncated or corrupt body behind a valid header
        raise _refuse(f"the {kind} image cannot be decoded ({error})", param) from error
    scale = width // columns
    return grey.reshape(rows, scale, columns, scale).mean(axis=(1, 3))


def reader(package: ChatPackage, count: int) -> Callable[[str, str], str]:
    """How a request's image parts become text for `package`: each data URL read (`read_data_url`) and written as
    its image tokens. Refused before any is read when there are too many, or the model reads no images."""
    if count > MAX_IMAGES:
        raise _refuse(f"{count} images in one request; at most {MAX_IMAGES}", "messages", "too_many_images")
    image_tokenizer = package.image_tokenizer

    def image_text(url: str, param: str) -> str:
        if image_tokenizer is None:
            message = "this model reads no images: its package has no image tokenizer"
            raise _refuse(message, param, "images_unsupported")
        pixels = read_data_url(url, param, image_tokenizer.image_size)
        return image_tokenizer.text(image_tokenizer.encode(pixels))

    return image_text


def png(pixels: np.ndarray, side: int) -> bytes:
    """An image in [0, 1] as a `side` x `side` greyscale PNG (each pixel a square block)."""
    scale = side // pixels.shape[1]
    grey = np.clip(np.round(pixels * 255.0), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.kron(grey, np.ones((scale, scale), dtype=np.uint8))).save(buffer, format="PNG")
    return buffer.getvalue()


def png_base64(pixels: np.ndarray, side: int) -> str:
    """`png(pixels, side)` as base64 text: an images response's `b64_json`."""
    return base64.b64encode(png(pixels, side)).decode()
