"""The image data: scikit-learn's handwritten digits (1,797 8x8 images, shipped inside the package: no download),
held out by image; the codebook that turns them into tokens (models/image_tokenizer.py) and the judge that reads a
generated digit (models/digit_judge.py), both fitted on the training images only.

scikit-learn is imported inside the functions: the text-only pipeline never loads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tokenizers import AddedToken, Tokenizer

from models.digit_judge import DigitJudge
from models.image_tokenizer import ImageTokenizer, image_patches

MAX_VALUE = 16.0  # the digits' pixels are the integers 0..16
# An image-text document names its digit before the image (a request to draw it) or after it (a description).
CAPTIONS_BEFORE = ("A handwritten {digit}:", "Draw the digit {digit}:")
CAPTIONS_AFTER = ("This is a {digit}.", "It shows the digit {digit}.")


@dataclass(frozen=True)
class DigitImages:
    pixels: np.ndarray  # (N, 8, 8) float64 in [0, 1]
    labels: np.ndarray  # (N,) int64, the digit each image shows


def load_digit_images() -> DigitImages:
    """All 1,797 digits, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return DigitImages(pixels=digits.images / MAX_VALUE, labels=digits.target.astype(np.int64))


def split_by_image(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) image indices, disjoint and stratified by digit, so every digit is held out in proportion."""
    from sklearn.model_selection import train_test_split

    if not 0 < test_fraction < 1:
        raise ValueError(f"data.images.test_fraction={test_fraction}: allowed 0 < x < 1")
    train, held_out = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels
    )
    return np.sort(train), np.sort(held_out)


def fit_codebook(
    pixels: np.ndarray, codebook_size: int, patch: tuple[int, int] = (2, 4), seed: int = 0
) -> ImageTokenizer:
    """k-means over the patches of `pixels` (N, H, W): the codebook of `codebook_size` codewords, rounded to 1e-4.

    k-means runs on one thread: its centres differ in the last bits with the thread count, and the codebook is part
    of the dataset's identity, which must not depend on the machine."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    image_size = (int(pixels.shape[1]), int(pixels.shape[2]))
    patches = np.concatenate([image_patches(image, patch) for image in pixels])
    distinct = len(np.unique(patches, axis=0))
    if codebook_size > distinct:
        raise ValueError(f"data.images.codebook_size={codebook_size}: the images have only {distinct} distinct patches")
    with threadpool_limits(1):
        kmeans = KMeans(n_clusters=codebook_size, n_init=1, random_state=seed).fit(patches)
    rows = np.round(np.clip(kmeans.cluster_centers_, 0.0, 1.0), 4)
    return ImageTokenizer(image_size=image_size, patch=patch, codebook=tuple(tuple(map(float, r)) for r in rows))


def reconstruction_error(tokenizer: ImageTokenizer, pixels: np.ndarray) -> float:
    """Mean squared pixel error (pixels in [0, 1]) of encoding then decoding `pixels` (N, H, W)."""
    rebuilt = np.stack([tokenizer.decode(tokenizer.encode(image)) for image in pixels])
    return float(((rebuilt - pixels) ** 2).mean())


def fit_judge(train: DigitImages, held_out: DigitImages) -> DigitJudge:
    """Logistic regression (C=1) on the training digits' pixels, its accuracy on the held-out ones recorded."""
    from sklearn.linear_model import LogisticRegression

    classifier = LogisticRegression(C=1.0, max_iter=5000).fit(train.pixels.reshape(len(train.labels), -1), train.labels)
    judge = DigitJudge(
        weights=tuple(tuple(map(float, row)) for row in classifier.coef_),
        bias=tuple(map(float, classifier.intercept_)),
        held_out_accuracy=0.0,
    )
    accuracy = float((judge.predict(held_out.pixels) == held_out.labels).mean())
    return judge.model_copy(update={"held_out_accuracy": accuracy})


def add_image_tokens(tokenizer: Tokenizer, image_tokenizer: ImageTokenizer) -> tuple[int, int]:
    """Add the image markers and codes to `tokenizer`'s vocabulary, after its own tokens (again: no change), and
    return (id of the first code, number of codes). They are ordinary tokens, not special ones: decoding a reply
    keeps them as text, from which `ImageTokenizer.parse` reads the image back."""
    names = image_tokenizer.token_names()
    tokenizer.add_tokens([AddedToken(name, special=False, normalized=False) for name in names])
    ids = [tokenizer.token_to_id(name) for name in names]
    if ids != list(range(ids[0], ids[0] + len(ids))) or ids[-1] != tokenizer.get_vocab_size() - 1:
        raise ValueError(f"the tokenizer holds image tokens at ids {ids[0]}..{ids[-1]} out of order or not at its end")
    return ids[2], len(image_tokenizer.codebook)


def image_documents(
    images: DigitImages,
    image_tokenizer: ImageTokenizer,
    rng: np.random.Generator,
    caption_first: float = 0.5,
    per_image: int = 2,
) -> list[str]:
    """`per_image` documents for each image: its caption then the image with probability `caption_first`, else the
    image then its caption, each caption drawn from the templates of its side."""
    if not 0 <= caption_first <= 1:
        raise ValueError(f"data.images.caption_first={caption_first}: allowed 0..1")
    documents = []
    for pixels, label in zip(images.pixels, images.labels, strict=True):
        image = image_tokenizer.text(image_tokenizer.encode(pixels))
        for _ in range(per_image):
            if rng.random() < caption_first:
                caption = CAPTIONS_BEFORE[rng.integers(len(CAPTIONS_BEFORE))].format(digit=int(label))
                documents.append(f"{caption} {image}")
            else:
                caption = CAPTIONS_AFTER[rng.integers(len(CAPTIONS_AFTER))].format(digit=int(label))
                documents.append(f"{image} {caption}")
    return documents
