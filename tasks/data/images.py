"""The image data: scikit-learn's handwritten digits (1,797 8x8 images, shipped inside the package: no download),
held out by image; the codebook that turns them into tokens (models/image_tokenizer.py) and the judge that reads a
generated digit (models/digit_judge.py), both fitted on the training images only.

scikit-learn is imported inside the functions: the text-only pipeline never loads it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer

from models.digit_judge import DigitJudge
from models.image_tokenizer import ImageTokenizer, image_patches
from models.publish import staged_dir
from tasks.data.config import ImagesConfig

MAX_VALUE = 16.0  # the digits' pixels are the integers 0..16
# An image-text document names its digit before the image (a request to draw it) or after it (a description).
CAPTIONS_BEFORE = ("A handwritten {digit}:", "Draw the digit {digit}:")
CAPTIONS_AFTER = ("This is a {digit}.", "It shows the digit {digit}.")


@dataclass(frozen=True)
class DigitImages:
    pixels: np.ndarray  # (N, 8, 8) float64 in [0, 1]
    labels: np.ndarray  # (N,) int64, the digit each image shows


@dataclass(frozen=True)
class PreparedImages:
    """The image side of a prepared dataset: the digits, which of them are held out, and what was fitted on the
    others (the codebook that makes them tokens, the judge that reads a drawn digit)."""

    digits: DigitImages
    train: np.ndarray  # indices of the training images
    held_out: np.ndarray  # indices of the held-out images, never trained on
    image_tokenizer: ImageTokenizer
    judge: DigitJudge

    def split(self, name: str) -> DigitImages:
        """The `train` or `held_out` images."""
        indices = {"train": self.train, "held_out": self.held_out}[name]
        return DigitImages(self.digits.pixels[indices], self.digits.labels[indices])

    def save(self, directory: Path) -> None:
        """Into `directory`: the pixels (as the source's 0..16 integers), labels and split, the codebook, the judge."""
        np.savez(
            directory / "images.npz",
            pixels=np.round(self.digits.pixels * MAX_VALUE).astype(np.uint8),
            labels=self.digits.labels,
            train=self.train,
            held_out=self.held_out,
        )
        self.image_tokenizer.save(directory)
        self.judge.save(directory)

    @classmethod
    def load(cls, directory: Path) -> PreparedImages:
        with np.load(directory / "images.npz") as arrays:
            digits = DigitImages(arrays["pixels"] / MAX_VALUE, arrays["labels"].astype(np.int64))
            train, held_out = arrays["train"], arrays["held_out"]
        return cls(digits, train, held_out, ImageTokenizer.load(directory), DigitJudge.load(directory))


def digits_digest() -> str:
    """sha256 of the digits file scikit-learn ships: the image source's identity, as source_digest is the text's."""
    return hashlib.sha256((files("sklearn.datasets") / "data" / "digits.csv.gz").read_bytes()).hexdigest()


def prepare_images(config: ImagesConfig, data_dir: Path) -> PreparedImages:
    """Split the digits, fit (or load `codebook_file`) the codebook and fit the judge on the training images: done
    once per settings and kept under `<data_dir>/images/`, as the text tokenizer is under `<data_dir>/tokenizers/`."""
    reused = _reused_codebook(config)
    fitted_from = {
        "digits": digits_digest(),
        "test_fraction": config.test_fraction,
        "seed": config.seed,
        "codebook": reused.sha256() if reused else {"patch": config.patch, "size": config.codebook_size},
    }
    key = hashlib.sha256(json.dumps(fitted_from, sort_keys=True).encode()).hexdigest()
    directory = data_dir / "images" / key[:16]
    if not (directory / "images.npz").is_file():
        digits = load_digit_images()
        train, held_out = split_by_image(digits.labels, config.test_fraction, config.seed)
        image_tokenizer = reused or fit_codebook(digits.pixels[train], config.codebook_size, config.patch, config.seed)
        judge = fit_judge(
            DigitImages(digits.pixels[train], digits.labels[train]),
            DigitImages(digits.pixels[held_out], digits.labels[held_out]),
        )
        with staged_dir(directory, keep_existing=lambda found: (found / "images.npz").is_file()) as staged:
            PreparedImages(digits, train, held_out, image_tokenizer, judge).save(staged)
    return PreparedImages.load(directory)


def _reused_codebook(config: ImagesConfig) -> ImageTokenizer | None:
    """The codebook `codebook_file` names, checked against the settings; None when there is none to reuse."""
    if config.codebook_file is None:
        return None
    path = Path(config.codebook_file)
    if not path.is_file():
        raise FileNotFoundError(f"data.images.codebook_file: {path} does not exist")
    codebook = ImageTokenizer.model_validate_json(path.read_text())
    if len(codebook.codebook) != config.codebook_size or codebook.patch != config.patch:
        raise ValueError(
            f"data.images.codebook_file: {path} has {len(codebook.codebook)} codes of {codebook.patch} patches; "
            f"the settings ask for codebook_size={config.codebook_size}, patch={config.patch}"
        )
    return codebook


def image_streams(
    images: PreparedImages, tokenizer: Tokenizer, config: ImagesConfig, end_of_text: int
) -> dict[str, list[int]]:
    """The token streams of the image-text documents: `train` from the training images, `val` from the held-out
    ones, each document followed by the end-of-text token as the corpus's are."""
    streams = {}
    for index, (name, split) in enumerate((("train", "train"), ("val", "held_out"))):
        rng = np.random.default_rng([config.seed, index])
        documents = image_documents(
            images.split(split), images.image_tokenizer, rng, config.caption_first, config.documents_per_image
        )
        streams[name] = [token for e in tokenizer.encode_batch(documents) for token in (*e.ids, end_of_text)]
    return streams


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


def add_image_tokens(tokenizer: Tokenizer, image_tokenizer: ImageTokenizer, vocab_size: int) -> tuple[int, int]:
    """Give `tokenizer` the image markers and codes as its last ids, ending at `vocab_size` (a text vocabulary shorter
    than the ids before them is padded with unused `<|reserved_N|>` tokens, so where the image tokens sit follows from
    the config alone); adding them again changes nothing. Returns (id of the first code, number of codes).

    They are ordinary tokens, not special ones: decoding a reply keeps them as text, from which
    `ImageTokenizer.parse` reads the image back."""
    names = image_tokenizer.token_names()
    text_size = vocab_size - len(names)
    if tokenizer.token_to_id(names[0]) is None:
        if tokenizer.get_vocab_size() > text_size:
            raise ValueError(
                f"data.vocab_size={vocab_size}: the text tokenizer has {tokenizer.get_vocab_size()} tokens and the "
                f"images need {len(names)} more; allowed: vocab_size >= {tokenizer.get_vocab_size() + len(names)}"
            )
        reserved = range(tokenizer.get_vocab_size(), text_size)
        tokenizer.add_special_tokens([AddedToken(f"<|reserved_{i}|>", special=True) for i in reserved])
        tokenizer.add_tokens([AddedToken(name, special=False, normalized=False) for name in names])
    ids = [tokenizer.token_to_id(name) for name in names]
    if ids != list(range(text_size, vocab_size)) or tokenizer.get_vocab_size() != vocab_size:
        raise ValueError(
            f"the tokenizer holds the image tokens at ids {ids[0]}..{ids[-1]} of {tokenizer.get_vocab_size()}; "
            f"data.vocab_size={vocab_size} and data.images.codebook_size={len(image_tokenizer.codebook)} put them at "
            f"{text_size}..{vocab_size - 1}"
        )
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
