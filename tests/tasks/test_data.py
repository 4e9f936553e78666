"""Data stage: real corpus, BPE tokenizer with special tokens, memmapped splits, fingerprints, errors."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.chat_format import SPECIAL_TOKENS
from tasks.data.config import DataConfig
from tasks.data.corpus import builtin_shakespeare_files, prepare_data, read_documents, resolve_source
from tasks.data.sampling import sample_batch


def test_builtin_corpus_is_real_shakespeare() -> None:
    files = builtin_shakespeare_files()
    assert len(files) == 42
    assert sum(f.stat().st_size for f in files) > 4_500_000
    assert any("To be, or not to be" in f.read_text() for f in files if "hamlet" in f.name)


def test_prepare_tokenizes_splits_and_round_trips(tmp_path: Path, small_corpus: Path) -> None:
    prepared = prepare_data(DataConfig(source=str(small_corpus), vocab_size=512, data_dir=tmp_path))
    tokenizer = prepared.tokenizer()
    assert tokenizer.get_vocab_size() == 512
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    for text in ["To be, or not to be: that is the question.", "床前明月光，疑是地上霜。", "tabs\tand\nnewlines  "]:
        assert tokenizer.decode(tokenizer.encode(text).ids) == text
    chat = "<|user|>Who wrote Hamlet?<|end|><|assistant|>"
    ids = tokenizer.encode(chat).ids
    assert ids[0] == SPECIAL_TOKENS.index("<|user|>") and ids[-1] == SPECIAL_TOKENS.index("<|assistant|>")
    train, val = prepared.split("train"), prepared.split("val")
    assert train.dtype == np.uint16 and len(train) == prepared.train_tokens
    assert 0.03 < len(val) / (len(train) + len(val)) < 0.08
    assert train.max() < 512
    first_document = sorted(small_corpus.iterdir())[0].read_text().strip()
    head = tokenizer.decode(train[:200].tolist(), skip_special_tokens=False)
    assert len(head) > 200 and first_document.startswith(head)  # the train split starts with document one
    meta = json.loads((prepared.directory / "meta.json").read_text())
    assert meta["fingerprint"] == prepared.fingerprint and meta["documents"] == 3


def test_same_inputs_reuse_and_changed_inputs_re_prepare(tmp_path: Path, small_corpus: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for f in small_corpus.iterdir():
        (source / f.name).write_text(f.read_text())
    config = DataConfig(source=str(source), vocab_size=400, data_dir=tmp_path / "data")
    first = prepare_data(config)
    stamp = (first.directory / "train.bin").stat().st_mtime_ns
    again = prepare_data(config)
    assert again == first and (again.directory / "train.bin").stat().st_mtime_ns == stamp
    (source / "extra.txt").write_text("A new scene, with new words enough to change the corpus. " * 50)
    changed = prepare_data(config)
    assert changed.fingerprint != first.fingerprint and changed.train_tokens > first.train_tokens
    other_vocab = prepare_data(config.model_copy(update={"vocab_size": 450}))
    assert other_vocab.fingerprint != changed.fingerprint


def test_jsonl_source_and_malformed_line(tmp_path: Path, small_corpus: Path) -> None:
    text = next(small_corpus.iterdir()).read_text()
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"text": text[i : i + 2000]}) for i in range(0, 40_000, 2000)))
    assert len(read_documents(resolve_source(str(good), tmp_path))) == 20
    prepared = prepare_data(DataConfig(source=str(good), vocab_size=300, data_dir=tmp_path / "d"))
    assert prepared.train_tokens > 1000
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "broken"\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        read_documents([bad])
    wrong_field = tmp_path / "wrong.jsonl"
    wrong_field.write_text('{"content": "no text key"}\n')
    with pytest.raises(ValueError, match=r"wrong.jsonl:1: expected an object with a string field 'text'"):
        read_documents([wrong_field])


def test_missing_and_empty_sources_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="matched no files"):
        prepare_data(DataConfig(source=str(tmp_path / "nope" / "*.txt"), data_dir=tmp_path))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="contain no text"):
        prepare_data(DataConfig(source=str(tmp_path / "empty.txt"), data_dir=tmp_path))


def test_sample_batch_windows(tmp_path: Path) -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    batch = sample_batch(tokens, 4, 16, np.random.default_rng(0))
    assert batch.shape == (4, 16) and batch.dtype.is_floating_point is False
    assert ((batch[:, 1:] - batch[:, :-1]) == 1).all()  # contiguous windows
    with pytest.raises(ValueError, match="seq_len=1000 must be <"):
        sample_batch(tokens, 1, 1000, np.random.default_rng(0))


def test_a_reused_tokenizer_keeps_the_fingerprint_and_new_data_keeps_the_token_ids(
    tmp_path: Path, small_corpus: Path
) -> None:
    """What a retrain relies on: the same tokenizer reused from a registered model gives the same fingerprint
    as training it (so unchanged data stays cached), and new data is tokenized with the old ids."""
    source = tmp_path / "src"
    shutil.copytree(small_corpus, source)
    config = DataConfig(source=str(source), vocab_size=400, data_dir=tmp_path / "data")
    trained = prepare_data(config)
    copy = tmp_path / "registered_tokenizer.json"
    shutil.copy(trained.tokenizer_path, copy)
    reused = prepare_data(config.model_copy(update={"tokenizer_file": str(copy)}))
    assert reused.fingerprint == trained.fingerprint and reused.directory == trained.directory
    (source / "new.txt").write_text("Enter a messenger with news of the battle. " * 200)
    grown = prepare_data(config.model_copy(update={"tokenizer_file": str(copy)}))
    assert grown.fingerprint != trained.fingerprint
    assert grown.tokenizer_path.read_text() == trained.tokenizer_path.read_text()


def test_a_mismatched_tokenizer_file_is_refused_naming_the_field(tmp_path: Path, small_corpus: Path) -> None:
    config = DataConfig(source=str(small_corpus), vocab_size=400, data_dir=tmp_path / "data")
    other = prepare_data(config.model_copy(update={"vocab_size": 450}))
    with pytest.raises(ValueError, match="tokenizer_file: .* has 450 tokens, vocab_size is 400"):
        prepare_data(config.model_copy(update={"tokenizer_file": str(other.tokenizer_path)}))
    with pytest.raises(FileNotFoundError, match="tokenizer_file"):
        prepare_data(config.model_copy(update={"tokenizer_file": str(tmp_path / "none.json")}))


# A writer process for the race below: each round, it waits for every writer to be ready (a file each), then
# prepares the same dataset into that round's folder and reports what it got, or the error it met.
_RACING_WRITER = """
import json, sys, time, traceback
from pathlib import Path
from tasks.data.corpus import DataConfig, prepare_data
source, base, name, writers, rounds = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
for round in range(rounds):
    (base / f"ready-{round}-{name}").touch()
    deadline = time.monotonic() + 30
    while len(list(base.glob(f"ready-{round}-*"))) < writers and time.monotonic() < deadline:
        time.sleep(0.002)
    try:
        prepared = prepare_data(DataConfig(source=source, vocab_size=400, data_dir=base / f"data-{round}"))
        assert len(prepared.split("train")) == prepared.train_tokens
        print(json.dumps([str(prepared.directory), prepared.fingerprint]), flush=True)
    except Exception:
        print(json.dumps(["error", traceback.format_exc()]), flush=True)
"""


def test_processes_preparing_the_same_dataset_at_once_all_get_it(tmp_path: Path, small_corpus: Path) -> None:
    """Pipeline runs started together on the same data: each writer stages privately, and the losers of the
    publishing race use the winner's dataset (same fingerprint, same bytes) instead of failing."""
    writers, rounds = 3, 4  # each round, about a third of the writers failed before the fix
    command = [sys.executable, "-c", _RACING_WRITER, str(small_corpus), str(tmp_path)]
    pipe = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    processes = [subprocess.Popen([*command, f"w{i}", str(writers), str(rounds)], **pipe) for i in range(writers)]
    outputs = [process.communicate(timeout=300) for process in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
    reports = [[json.loads(line) for line in stdout.splitlines()] for stdout, _ in outputs]
    errors = [error for report in reports for kind, error in report if kind == "error"]
    assert not errors, f"{len(errors)} of {writers * rounds} preparations failed; the first:\n{errors[0]}"
    alone = prepare_data(DataConfig(source=str(small_corpus), vocab_size=400, data_dir=tmp_path / "alone"))
    for round in range(rounds):
        data_dir = tmp_path / f"data-{round}"
        assert all(report[round] == [str(data_dir / alone.directory.name), alone.fingerprint] for report in reports)
        for name in ("tokenizer.json", "train.bin", "val.bin", "meta.json"):
            assert (data_dir / alone.directory.name / name).read_bytes() == (alone.directory / name).read_bytes()
        assert not [p.name for p in [*data_dir.iterdir(), *(data_dir / "tokenizers").iterdir()] if p.name[0] == "."]
