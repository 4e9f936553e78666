"""Images as tokens of the language model's own vocabulary: a fixed codebook of pixel patches (vector quantisation).

ERNIE 5.0 trains text and images as tokens of one autoregressive Transformer. At this project's CPU scale an image
is one of scikit-learn's 8x8 handwritten digits, cut into patches (2 rows x 4 columns by default), and each patch
becomes the id of its nearest codeword: 8 tokens per image, written between `<image>` and `</image>`. The codebook is
fitted once on the training images (tasks/data/images.py, k-means) and saved beside the model, so the model works
outside the pipeline with this module alone (numpy, no scikit-learn).

Codes are named `<img_000>`, `<img_001>`, ... and are ordinary (not special) tokens, so decoded replies keep them as
text and a reply can be parsed back into an image.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import ClassVar

import numpy as np
from pydantic import ConfigDict, Field, model_validator

from models.publish import JsonFile

OPEN, CLOSE = "<image>", "</image>"


class ImageTokenizer(JsonFile):
    """A codebook of `patch`-shaped pixel patches for `image_size` images with values in [0, 1]."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    FILE_NAME: ClassVar[str] = "image_tokenizer.json"

    image_size: tuple[int, int] = Field((8, 8), description="Image height and width in pixels.")
    patch: tuple[int, int] = Field((2, 4), description="Patch height and width; each divides the image's.")
    codebook: tuple[tuple[float, ...], ...] = Field(
        description="One row per code: a patch's pixels in raster order, in [0, 1]."
    )

    @model_validator(mode="after")
    def _check_shapes(self) -> ImageTokenizer:
        (height, width), (patch_height, patch_width) = self.image_size, self.patch
        if height % patch_height or width % patch_width:
            raise ValueError(f"patch {self.patch} must divide image_size {self.image_size}")
        if not 2 <= len(self.codebook) <= 4096:
            raise ValueError(f"codebook: {len(self.codebook)} codes, allowed 2..4096")
        if any(len(row) != patch_height * patch_width for row in self.codebook):
            raise ValueError(f"codebook: every row must hold {patch_height * patch_width} pixels")
        return self

    @property
    def codes_per_image(self) -> int:
        return (self.image_size[0] // self.patch[0]) * (self.image_size[1] // self.patch[1])

    def token_names(self) -> list[str]:
        """The vocabulary this tokenizer adds, in id order: the markers, then one token per code."""
        return [OPEN, CLOSE, *(code_name(i) for i in range(len(self.codebook)))]

    def encode(self, pixels: np.ndarray) -> list[int]:
        """An image with values in [0, 1] -> the index of each patch's nearest codeword (squared distance)."""
        pixels = np.asarray(pixels, dtype=np.float64)
        if pixels.shape != self.image_size:
            raise ValueError(f"image of shape {pixels.shape}, expected {self.image_size}")
        patches = image_patches(pixels, self.patch)
        codebook = np.asarray(self.codebook)
        distances = ((patches[:, None, :] - codebook[None, :, :]) ** 2).sum(axis=-1)  # (patches, codes)
        return [int(code) for code in distances.argmin(axis=1)]

    def decode(self, codes: list[int]) -> np.ndarray:
        """Code indices -> the (H, W) image their codewords make."""
        if len(codes) != self.codes_per_image or not all(0 <= c < len(self.codebook) for c in codes):
            raise ValueError(f"{len(codes)} codes, expected {self.codes_per_image} in 0..{len(self.codebook) - 1}")
        (height, width), (ph, pw) = self.image_size, self.patch
        blocks = np.asarray(self.codebook)[codes].reshape(height // ph, width // pw, ph, pw)
        return blocks.transpose(0, 2, 1, 3).reshape(height, width)

    def text(self, codes: list[int]) -> str:
        """The image as the model reads and writes it: `<image><img_007>...</image>`."""
        return OPEN + "".join(code_name(c) for c in codes) + CLOSE

    def parse(self, text: str) -> list[int] | None:
        """The codes of the first complete image in `text` (exactly codes_per_image codes between the markers, each
        in the codebook), or None when there is none: how a generated reply becomes an image again."""
        pattern = re.escape(OPEN) + r"((?:<img_\d{3,4}>)*)" + re.escape(CLOSE)
        for match in re.finditer(pattern, text):
            codes = [int(n) for n in re.findall(r"<img_(\d{3,4})>", match.group(1))]
            if len(codes) == self.codes_per_image and all(c < len(self.codebook) for c in codes):
                return codes
        return None

    def sha256(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()


def image_tokenizer_beside(tokenizer_path: str | Path) -> ImageTokenizer | None:
    """The image tokenizer that travels beside a tokenizer.json it extends (a prepared dataset, a chat package, an
    exported model directory), or None for a text-only vocabulary."""
    folder = Path(tokenizer_path).parent
    return ImageTokenizer.load(folder) if (folder / ImageTokenizer.FILE_NAME).is_file() else None


def image_patches(pixels: np.ndarray, patch: tuple[int, int]) -> np.ndarray:
    """(H, W) pixels -> (patches, patch pixels), patches in raster order (the order of an image's codes)."""
    (height, width), (ph, pw) = pixels.shape, patch
    if height % ph or width % pw:
        raise ValueError(f"patch {patch} must divide image_size {(height, width)}")
    blocks = pixels.reshape(height // ph, ph, width // pw, pw).transpose(0, 2, 1, 3)  # (rows, cols, ph, pw)
    return blocks.reshape(-1, ph * pw)


def code_name(code: int) -> str:
    return f"<img_{code:03d}>"
