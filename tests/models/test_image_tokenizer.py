"""The image tokenizer: a digit becomes 8 codes and comes back as the image those codewords make; the codebook fitted
on the training digits reconstructs held-out ones closely, the same on any thread count; text round trips. The judge
of generated digits reads real and reconstructed ones."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from models.digit_judge import DigitJudge
from models.image_tokenizer import ImageTokenizer, code_name
from tasks.data.corpus import PreparedData
from tasks.data.images import (
    DigitImages,
    add_image_tokens,
    fit_codebook,
    fit_judge,
    image_documents,
    load_digit_images,
    reconstruction_error,
    split_by_image,
)


@pytest.fixture(scope="module")
def digits_and_codebook():
    digits = load_digit_images()
    train, held_out = split_by_image(digits.labels, test_fraction=0.2, seed=0)
    return digits, train, held_out, fit_codebook(digits.pixels[train], codebook_size=128)


def test_the_split_is_by_image_disjoint_stratified_and_fixed(digits_and_codebook) -> None:
    digits, train, held_out, _ = digits_and_codebook
    assert len(digits.labels) == 1797 and digits.pixels.shape == (1797, 8, 8)
    assert digits.pixels.min() >= 0.0 and digits.pixels.max() == 1.0
    assert (len(train), len(held_out)) == (1437, 360) and not set(train) & set(held_out)
    per_digit = np.bincount(digits.labels[held_out], minlength=10)
    assert per_digit.min() >= 35 and per_digit.max() <= 37  # each digit about 20% of its 174-183 images
    assert all((a == b).all() for a, b in zip(split_by_image(digits.labels, 0.2, 0), (train, held_out), strict=True))


def test_codes_round_trip_and_held_out_digits_reconstruct_closely(digits_and_codebook) -> None:
    digits, _, held_out, tokenizer = digits_and_codebook
    assert tokenizer.codes_per_image == 8 and len(tokenizer.codebook) == 128
    for code in range(128):  # every codeword's own patch encodes to that code
        image = tokenizer.decode([code] * 8)
        assert tokenizer.encode(image) == [code] * 8
    error = reconstruction_error(tokenizer, digits.pixels[held_out])
    assert error < 0.01  # about 6% of the pixels' variance (0.0080 measured)
    assert error < 0.2 * digits.pixels[held_out].var()


def test_patches_are_in_raster_order() -> None:
    tokenizer = ImageTokenizer(image_size=(4, 4), patch=(2, 2), codebook=((0.0,) * 4, (1.0,) * 4))
    image = np.zeros((4, 4))
    image[0:2, 2:4] = 1.0  # the top-right patch
    image[2:4, 0:2] = 1.0  # the bottom-left patch
    assert tokenizer.encode(image) == [0, 1, 1, 0]
    assert (tokenizer.decode([0, 1, 1, 0]) == image).all()


def test_the_codebook_is_the_same_on_any_thread_count(digits_and_codebook) -> None:
    """k-means' centres differ in their last bits with OpenMP's thread count unless it runs on one thread: fitted in
    processes started with 1 and 2 threads, the codebook is the same as here."""
    _, _, _, tokenizer = digits_and_codebook
    fit = (
        "from tasks.data.images import fit_codebook, load_digit_images, split_by_image;"
        "d = load_digit_images(); train, _ = split_by_image(d.labels, 0.2, 0);"
        "print(fit_codebook(d.pixels[train], codebook_size=128).sha256())"
    )
    for threads in ("1", "2"):
        env = {**os.environ, "OMP_NUM_THREADS": threads}
        done = subprocess.run([sys.executable, "-c", fit], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip() == tokenizer.sha256(), threads


def test_text_round_trip_and_parsing_refuses_incomplete_images(digits_and_codebook, tmp_path: Path) -> None:
    _, _, _, tokenizer = digits_and_codebook
    codes = [0, 5, 17, 127, 3, 3, 64, 99]
    text = tokenizer.text(codes)
    assert text.startswith("<image><img_000><img_005>") and text.endswith("<img_099></image>")
    assert tokenizer.parse(f"Here it is: {text} done") == codes
    assert tokenizer.parse(tokenizer.text(codes[:7])) is None  # 7 codes
    assert tokenizer.parse(tokenizer.text([*codes, 1])) is None  # 9 codes
    assert tokenizer.parse(text.replace("</image>", "")) is None  # not closed
    assert tokenizer.parse("<image>" + "".join(code_name(128) for _ in range(8)) + "</image>") is None  # not a code
    assert tokenizer.token_names()[:3] == ["<image>", "</image>", "<img_000>"] and len(tokenizer.token_names()) == 130
    assert ImageTokenizer.load(tokenizer.save(tmp_path).parent) == tokenizer


def test_the_judge_reads_real_and_tokenized_digits_as_scikit_learn_does(digits_and_codebook, tmp_path: Path) -> None:
    """The judge of generated digits: its numpy logits give scikit-learn's predictions; it reads held-out real digits
    (about 97%) and their reconstructions from 8 codes (about 95%: the ceiling of any generated digit's score)."""
    from sklearn.linear_model import LogisticRegression

    digits, train, held_out, tokenizer = digits_and_codebook
    split = [DigitImages(digits.pixels[i], digits.labels[i]) for i in (train, held_out)]
    judge = fit_judge(*split)
    assert judge.held_out_accuracy > 0.95
    flat = digits.pixels.reshape(len(digits.labels), -1)
    reference = LogisticRegression(C=1.0, max_iter=5000).fit(flat[train], digits.labels[train])
    assert (judge.predict(digits.pixels) == reference.predict(flat)).all()
    rebuilt = np.stack([tokenizer.decode(tokenizer.encode(image)) for image in split[1].pixels])
    assert (judge.predict(rebuilt) == split[1].labels).mean() > 0.93
    assert DigitJudge.load(judge.save(tmp_path).parent) == judge


def test_images_join_the_text_vocabulary_and_documents_tokenize_code_by_code(
    digits_and_codebook, small_data: PreparedData
) -> None:
    """The markers and codes come after the BPE's 400 tokens (again: unchanged); text tokenizes as before; an
    image-text document's codes are single tokens in order, and decoding keeps them as text that parses back."""
    digits, train, _, image_tokenizer = digits_and_codebook
    tokenizer = small_data.tokenizer()
    text = "Thou art a handwritten four."
    before = tokenizer.encode(text).ids
    assert add_image_tokens(tokenizer, image_tokenizer, 530) == (402, 128)
    assert tokenizer.get_vocab_size() == 530 and tokenizer.token_to_id("<image>") == 400
    assert add_image_tokens(tokenizer, image_tokenizer, 530) == (402, 128) and tokenizer.get_vocab_size() == 530
    assert tokenizer.encode(text).ids == before

    images = DigitImages(digits.pixels[train[:50]], digits.labels[train[:50]])
    documents = image_documents(images, image_tokenizer, np.random.default_rng(0), caption_first=0.5, per_image=2)
    assert len(documents) == 100
    caption_first = sum(not d.startswith("<image>") for d in documents)
    assert 35 <= caption_first <= 65  # about half, either way round
    first = documents[0]
    codes = image_tokenizer.encode(images.pixels[0])
    ids = tokenizer.encode(first).ids
    start = ids.index(400)
    assert ids[start : start + 10] == [400, *(402 + c for c in codes), 401]
    assert str(images.labels[0]) in first
    assert image_tokenizer.parse(tokenizer.decode(ids, skip_special_tokens=True)) == codes
    with pytest.raises(ValueError, match="caption_first=1.5: allowed 0..1"):
        image_documents(images, image_tokenizer, np.random.default_rng(0), caption_first=1.5)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"patch": (3, 4)}, "patch (3, 4) must divide image_size (8, 8)"),
        ({"codebook": ((0.0,) * 8,)}, "1 codes, allowed 2..4096"),
        ({"codebook": ((0.0,) * 4,) * 2}, "every row must hold 8 pixels"),
    ],
)
def test_a_bad_tokenizer_is_refused(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ImageTokenizer(**{"codebook": ((0.0,) * 8,) * 2, **fields})


def test_a_codebook_larger_than_the_distinct_patches_is_refused() -> None:
    with pytest.raises(ValueError, match="codebook_size=64: the images have only 2 distinct patches"):
        fit_codebook(np.stack([np.zeros((8, 8)), np.ones((8, 8))]), codebook_size=64)
