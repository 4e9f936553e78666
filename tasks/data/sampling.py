"""How training draws its batches from a prepared dataset: random windows of a token stream (`sample_batch`), and the
mix of text and image-text windows every training stage draws from (`TrainingMix`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def sample_batch(tokens: np.ndarray, batch_size: int, seq_len: int, rng: np.random.Generator) -> torch.Tensor:
    """`batch_size` random windows of `seq_len` tokens as a (B, T) int64 tensor."""
    if len(tokens) <= seq_len:
        raise ValueError(f"seq_len={seq_len} must be < the {len(tokens)} tokens of this split")
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
    return torch.from_numpy(np.stack([tokens[s : s + seq_len].astype(np.int64) for s in starts]))


@dataclass(frozen=True)
class TrainingMix:
    """The streams a training stage samples: the text, and, when the data has images, the image-text documents for
    `image_share` of each batch's rows (text rows first, image rows last).

    Text only, `sample` is `sample_batch` on the text with the same generator calls, so a text-only run draws exactly
    the windows it drew before the mix existed (its resumes and cached results stay valid). With images, a batch
    whose share is not a whole number of rows (the small batches of replay, distillation and calibration) rounds
    down and adds one more image row with the remaining probability, so the share holds on average. Several processes
    each take a contiguous slice of a batch's rows, so the image rows fall to the last ones: the gradient averaged
    over processes is the one of the whole batch, but each process's balancing losses see its own mix."""

    text: np.ndarray
    images: np.ndarray | None = None
    image_share: float = 0.0

    def __post_init__(self) -> None:
        if self.images is not None and not 0 < self.image_share < 1:
            raise ValueError(f"image_share={self.image_share}: allowed 0 < x < 1 with an image stream")

    def image_rows(self, batch_size: int, rng: np.random.Generator) -> int:
        """How many of `batch_size` rows come from the image stream."""
        if self.images is None:
            return 0
        expected = self.image_share * batch_size
        rows = math.floor(expected + 1e-9)
        remainder = expected - rows
        return rows + int(remainder > 1e-9 and rng.random() < remainder)

    def sample(self, batch_size: int, seq_len: int, rng: np.random.Generator) -> torch.Tensor:
        """A (B, T) batch of windows: text rows, then image-text rows."""
        if self.images is None:
            return sample_batch(self.text, batch_size, seq_len, rng)
        image_rows = self.image_rows(batch_size, rng)
        parts = [
            sample_batch(stream, rows, seq_len, rng)
            for stream, rows in ((self.text, batch_size - image_rows), (self.images, image_rows))
            if rows
        ]
        return torch.cat(parts)
