"""The data stage with images: the digits join the text's vocabulary as its last ids, their documents are streams of
their own (held-out images only in validation), the text is prepared exactly as without images, and training
stages draw the declared share of rows from the images. Text-only data and runs keep their identities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from tokenizers import Tokenizer, models

from tasks.data.config import DataConfig, ImagesConfig
from tasks.data.corpus import PreparedData, data_fingerprint, prepare_data
from tasks.data.sampling import TrainingMix, sample_batch
from tasks.pipeline_config import load_pipeline_config
from tasks.pretrain.config import PretrainConfig
from tests.conftest import with_images


def stream_images(data: PreparedData, split: str) -> list[list[int]]:
    """Every image (its codes) written in the `split` image stream, read back from the decoded text."""
    images = data.images
    assert images is not None
    text = data.tokenizer().decode(data.image_split(split).tolist(), skip_special_tokens=False)
    return [codes for document in text.split("<|endoftext|>") if (codes := images.image_tokenizer.parse(document))]


def test_images_take_the_last_ids_and_the_text_is_prepared_as_without_them(
    small_data: PreparedData, image_data: PreparedData
) -> None:
    settings = image_data.image_settings
    assert settings is not None and small_data.image_settings is None and small_data.images is None
    assert image_data.vocab_size == 530 and (settings["first_code_id"], settings["codes"]) == (402, 128)
    tokenizer = image_data.tokenizer()
    assert tokenizer.token_to_id("<image>") == 400 and tokenizer.token_to_id("<img_127>") == 529
    assert image_data.fingerprint != small_data.fingerprint
    assert (image_data.directory / "train.bin").read_bytes() == (small_data.directory / "train.bin").read_bytes()
    assert (image_data.directory / "val.bin").read_bytes() == (small_data.directory / "val.bin").read_bytes()
    assert (settings["train_images"], settings["held_out_images"]) == (1437, 360)
    assert settings["reconstruction_mse"] < 0.01 and settings["judge_held_out_accuracy"] > 0.95
    assert prepare_data(with_images(small_data)).directory == image_data.directory  # prepared once


def test_the_image_streams_hold_each_split_s_images_only(image_data: PreparedData) -> None:
    images = image_data.images
    assert images is not None
    encode = images.image_tokenizer.encode
    for stream, split in (("train", "train"), ("val", "held_out")):
        written = stream_images(image_data, stream)
        own = images.split(split)
        assert len(written) == 2 * len(own.labels)  # documents_per_image
        assert {tuple(c) for c in written} == {tuple(encode(p)) for p in own.pixels}


def test_the_dataset_s_identity_moves_with_the_images_and_a_reused_codebook_keeps_it(
    small_data: PreparedData, image_data: PreparedData, tmp_path
) -> None:
    smaller = prepare_data(with_images(small_data, vocab_size=466, codebook_size=64))
    assert smaller.fingerprint != image_data.fingerprint and smaller.image_settings["first_code_id"] == 402
    images = image_data.images
    assert images is not None
    codebook = images.image_tokenizer.save(tmp_path)
    assert prepare_data(with_images(small_data, codebook_file=str(codebook))).fingerprint == image_data.fingerprint
    with pytest.raises(ValueError, match=r"has 128 codes of \(2, 4\) patches; the settings ask for codebook_size=64"):
        prepare_data(with_images(small_data, vocab_size=466, codebook_size=64, codebook_file=str(codebook)))


def test_a_short_text_vocabulary_is_padded_so_the_images_end_the_vocabulary(small_data: PreparedData) -> None:
    padded = prepare_data(with_images(small_data, vocab_size=540))
    tokenizer = padded.tokenizer()
    assert padded.image_settings["first_code_id"] == 412 and tokenizer.get_vocab_size() == 540
    assert tokenizer.id_to_token(400) == "<|reserved_400|>" and tokenizer.token_to_id("<image>") == 410


def test_a_text_tokenizer_too_large_for_the_images_is_refused(small_data: PreparedData) -> None:
    with pytest.raises(ValueError, match="data.vocab_size=520: the text tokenizer has 400 tokens.*vocab_size >= 530"):
        prepare_data(with_images(small_data, vocab_size=520))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: DataConfig(vocab_size=400, images=ImagesConfig()), "leaves 270 text tokens beside the 130 image"),
        (lambda: ImagesConfig(patch=(3, 4)), r"patch=\(3, 4\): each side must divide 8"),
        (lambda: ImagesConfig(token_share=1.0), "token_share"),
        (lambda: load_pipeline_config("tiny-images", {"init_from": "hf:/tmp/model"}), "data.images with init_from"),
        (
            lambda: load_pipeline_config("tiny-images", {"data.images.token_share": 0.3}),
            r"token_share=0.3 x pretrain.batch_size=16 is not a whole number of rows; allowed: a multiple of "
            r"1/16, e.g. 0.3125",
        ),
    ],
)
def test_bad_image_settings_are_refused_naming_the_field(build, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        build()


def test_text_only_mixing_draws_exactly_the_windows_sample_batch_draws() -> None:
    text = np.arange(5000, dtype=np.uint16)
    mix = TrainingMix(text)
    expected = sample_batch(text, 16, 32, np.random.default_rng([3, 7, 0, 0]))
    assert torch.equal(mix.sample(16, 32, np.random.default_rng([3, 7, 0, 0])), expected)


def test_a_mixed_batch_draws_its_share_of_rows_from_the_images() -> None:
    text, images = np.arange(5000, dtype=np.int64), np.arange(10_000, 12_000, dtype=np.int64)
    mix = TrainingMix(text, images, image_share=0.25)
    batch = mix.sample(16, 32, np.random.default_rng(0))
    from_images = (batch >= 10_000).all(dim=1)
    assert from_images.tolist() == [False] * 12 + [True] * 4
    assert ((batch < 5000).all(dim=1) == ~from_images).all()
    # 2 rows at a quarter: half an image row per batch on average (0 or 1)
    rng = np.random.default_rng(1)
    rows = [mix.image_rows(2, rng) for _ in range(4000)]
    assert set(rows) == {0, 1} and abs(np.mean(rows) - 0.5) < 0.03
    with pytest.raises(ValueError, match="image_share=0.0: allowed 0 < x < 1"):
        TrainingMix(text, images, image_share=0.0)


def test_text_only_identities_are_unchanged_by_the_images_settings() -> None:
    """Tiny's run identity and the text-only data fingerprint formula, as they were before images existed: every
    checkpoint, registry tag and cached benchmark arm keeps its key."""
    assert PretrainConfig().config_hash("") == "8545952f5949055c04ad1ef74727adba79505052969af1ac2d5ffd3aa90a23e6"
    tokenizer = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    assert (
        data_fingerprint(DataConfig(), "source", tokenizer)
        == "356db5f3f1670f22736e119d9defa1f6d9df373207c9af8498d209fe4b0ec101"
    )


def test_a_warm_start_retrain_keeps_the_supernet_s_tokenizer_and_codebook(
    tmp_path, small_data: PreparedData, image_data: PreparedData
) -> None:
    """The registered supernet carries its codebook, so a retrain reads image codes that mean the same patches: its
    data preparation reuses both the tokenizer and the codebook, and unchanged data keeps its fingerprint."""
    import dataclasses

    from registry.tracking import RunLogger
    from tasks.pretrain.loop import run_pretrain
    from tasks.pretrain.task import register_pretrained, retrain_data_config

    base = load_pipeline_config("tiny").pretrain.model_dump()
    base["model"].update(vocab_size=530, n_layers=2, n_experts=4, image_token_range=(402, 128))
    base["elastic"].update(depths=[1, 2], expert_counts=[2, 4], top_ks=[1, 2])
    steps = {"max_steps": 2, "eval_interval": 2, "batch_size": 4, "seq_len": 32, "optim": {"warmup_steps": 1}}
    config = PretrainConfig.model_validate({**base, **steps})
    result = run_pretrain(config, image_data, tmp_path / "run")
    logger = RunLogger(tmp_path / "workdir", run_name="pretrain")
    register_pretrained(
        dataclasses.replace(result, mlflow_run_id=logger.run_id), config, image_data, tmp_path / "workdir"
    )
    logger.finish()
    fresh = with_images(small_data).model_copy(update={"tokenizer_file": None})
    retrain = retrain_data_config(fresh, config, tmp_path / "workdir")
    assert retrain.tokenizer_file is not None and retrain.images is not None and retrain.images.codebook_file
    assert prepare_data(retrain).fingerprint == image_data.fingerprint
