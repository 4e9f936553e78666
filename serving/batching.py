"""Batched decoding: the decode steps of concurrent sequences share one onnxruntime call.

A small model on a CPU spends most of a single-row decode step in per-call overhead, so requests that decode
alone leave the cores idle (32 concurrent clients used about one core). Here one loop thread owns a batch:
each new sequence is prefilled alone and joins the batch, and every step feeds the batch's last tokens in one
call. Rows of different lengths share the cache tensors, padded (each row's length is fed to the graph, which masks
the padding and leaves it out of the rotary positions: serving/engine.py), so every row computes exactly what it
computes alone. Finished and abandoned rows leave the batch at once; columns that became padding for
every row are cut off.

The queue is bounded: a sequence submitted while `max_waiting` are already waiting is refused (`QueueFull`),
before anything is decoded, and the server answers 429. The loop thread exits when it has nothing to do and
starts again with the next submission, so a model swapped out by a promotion leaves no thread behind.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from serving.decoding import Piece, SequenceDecoder
from serving.engine import ChatPackage

log = logging.getLogger("trainonce.serving")


class QueueFull(Exception):
    """More sequences are waiting than the batcher accepts."""


_DONE = object()


@dataclass
class _Sequence:
    decoder: SequenceDecoder
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # pieces, then _DONE or an exception
    abandoned: bool = False  # its reader went away (a client disconnected): stop decoding it


class _PieceStream(Iterator[Piece]):
    """A sequence's pieces as its reader sees them. Dropped unread (a client that went away, even before its
    choice's turn to stream), it tells the loop to stop decoding the sequence."""

    def __init__(self, sequence: _Sequence) -> None:
        self.sequence = sequence

    def __next__(self) -> Piece:
        item = self.sequence.out.get()
        if item is _DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def __del__(self) -> None:
        self.sequence.abandoned = True


@dataclass
class _Batch:
    """The running rows: their sequences, cache tensors (B, nkv, L, hd) and how many of the L columns hold each
    row's tokens (B,). The rest is padding: on the right for the fused graph, on the left for the traced one
    (OnnxGenerator.forward)."""

    left_padded: bool
    rows: list[_Sequence] = field(default_factory=list)
    past: list[np.ndarray] = field(default_factory=list)
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def add(self, sequence: _Sequence, past: list[np.ndarray]) -> None:
        """Join a freshly prefilled row (its cache (1, nkv, L', hd)), padding whichever cache is narrower."""
        new = past[0].shape[2]
        if not self.rows:
            self.rows, self.past, self.lengths = [sequence], past, np.array([new], np.int64)
            return
        width = max(new, self.past[0].shape[2])
        self.rows.append(sequence)
        self.past = [
            np.concatenate([self._widen(b, width), self._widen(p, width)]) for b, p in zip(self.past, past, strict=True)
        ]
        self.lengths = np.append(self.lengths, new)

    def _widen(self, cache: np.ndarray, width: int) -> np.ndarray:
        missing = width - cache.shape[2]
        if not missing:
            return cache
        side = (missing, 0) if self.left_padded else (0, missing)
        return np.pad(cache, ((0, 0), (0, 0), side, (0, 0)))

    def stepped(self, present: list[np.ndarray]) -> None:
        """Every row took one more token."""
        self.past, self.lengths = present, self.lengths + 1

    def keep(self, keep: list[int]) -> None:
        """Keep only the rows at `keep`; cut the columns that are padding in every remaining row."""
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.past, self.lengths = [], np.zeros(0, np.int64)
            return
        self.lengths = self.lengths[keep]
        width, longest = self.past[0].shape[2], int(self.lengths.max())
        columns = slice(width - longest, width) if self.left_padded else slice(0, longest)
        self.past = [p[keep][:, :, columns] for p in self.past]


class DecodeBatcher:
    """Decodes every submitted sequence in a shared batch of at most `max_batch` rows."""

    def __init__(self, package: ChatPackage, max_batch: int, max_waiting: int) -> None:
        if not package.generator.batches_rows:
            raise ValueError(
                f"{package.directory} predates batched decoding (neither seqlens_k nor pad_lengths input): re-export it"
            )
        self.package, self.max_batch, self.max_waiting = package, max_batch, max_waiting
        self._waiting: deque[_Sequence] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self.running = 0  # rows in the batch, for /metrics

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, decoders: list[SequenceDecoder]) -> list[Iterator[Piece]]:
        """Queue `decoders` (all or none) and return, per decoder, the iterator of its pieces."""
        sequences = [_Sequence(d) for d in decoders]
        with self._lock:
            if len(self._waiting) + len(sequences) > self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} sequences are waiting (at most {self.max_waiting})")
            self._waiting.extend(sequences)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="decode-batcher", daemon=True)
                self._thread.start()
            self._wake.notify()
        return [_PieceStream(s) for s in sequences]

    def _loop(self) -> None:
        batch = self._new_batch()
        while True:
            with self._lock:
                if not batch.rows and not self._waiting:
                    self._thread = None  # the next submission starts a new loop
                    return
                joining = [
                    self._waiting.popleft() for _ in range(min(len(self._waiting), self.max_batch - len(batch.rows)))
                ]
            try:
                for sequence in joining:
                    self._prefill(sequence, batch)
                if batch.rows:
                    self._step(batch)
            except Exception as error:  # a failed call fails the rows it was computing, not the server
                log.exception("batched decoding failed")
                for sequence in [*batch.rows, *joining]:
                    sequence.out.put(error)
                batch = self._new_batch()
            self.running = len(batch.rows)

    def _new_batch(self) -> _Batch:
        return _Batch(left_padded=self.package.generator.pads_left)

    def _prefill(self, sequence: _Sequence, batch: _Batch) -> None:
        generator = self.package.generator
        prompt = np.asarray([sequence.decoder.prompt], dtype=np.int64)
        logits, past = generator.forward(prompt, generator.empty_past(1))
        if self._emit(sequence, logits[0, -1]):
            batch.add(sequence, past)

    def _step(self, batch: _Batch) -> None:
        tokens = np.asarray([[s.decoder.next_input] for s in batch.rows], dtype=np.int64)
        logits, present = self.package.generator.forward(tokens, batch.past, batch.lengths)
        batch.stepped(present)
        batch.keep([i for i, s in enumerate(batch.rows) if self._emit(s, logits[i, -1])])

    @staticmethod
    def _emit(sequence: _Sequence, logits: np.ndarray) -> bool:
        """Step one row and hand its piece to its reader; False when the row leaves the batch."""
        if sequence.abandoned:
            return False
        piece = sequence.decoder.step(logits)
        if piece.text or piece.tokens:
            sequence.out.put(piece)
        if sequence.decoder.finished:
            sequence.out.put(_DONE)
            return False
        return True
