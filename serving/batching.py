"""Batched decoding: the decode steps of concurrent sequences share one onnxruntime call.

A small model on a CPU spends most of a single-row decode step in per-call overhead, so requests that decode
alone leave the cores idle (32 concurrent clients used about one core). Here one loop thread owns a batch:
each new sequence is prefilled alone and joins the batch, and every step feeds the batch's last tokens in one
call. Rows of different lengths share the cache tensors (each row's length is fed to the graph, which ignores the
rest of its row and leaves it out of the rotary positions: serving/engine.py), so every row computes exactly what
it computes alone. On the fused graph each row owns a slot of preallocated caches that the graph updates in place;
on the traced graph the caches pass in and out of every call, left-padded; a graph from before batched decoding
takes one row at a time. Finished and abandoned rows leave the batch at once.

Each sequence's pieces go to its reader as they are decoded: to a thread that iterates them, or, when the reader
submitted with its event loop (the server does), straight into that loop, one wake-up per loop and step, so a
streamed answer reaches its client without a worker thread per chunk (those hops were a third of the server's
Python time at 1 client, py-spy's GIL samples).

The queue is bounded: a sequence submitted while `max_waiting` are already waiting is refused (`QueueFull`),
before anything is decoded, and one that waited `max_wait_seconds` without joining the batch leaves the queue
(`QueueTimeout`); the server answers both with 429. A sequence whose reader went away while it waited leaves
without being prefilled. The loop thread exits when it has nothing to do and
starts again with the next submission, so a model swapped out by a promotion leaves no thread behind; the batch
and its caches are kept for the next run.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serving.decoding import Piece, SequenceDecoder
from serving.engine import CachedSequence, ChatPackage, InPlaceSequence, bind_in_place

log = logging.getLogger("trainonce.serving")


class QueueFull(Exception):
    """More sequences are waiting than the batcher accepts."""


class QueueTimeout(Exception):
    """A sequence waited longer than the batcher lets one wait for a row."""


@dataclass(frozen=True)
class Batching:
    """How the server batches decode steps: up to `max_batch` rows per call (1: one sequence at a time),
    `max_waiting` queued, each for at most `max_wait_seconds`. The queue is deep and the wait long, as vLLM's queue
    is unbounded: load tools (guidellm's sweep) send hundreds of requests at once and expect them queued, not
    refused; beyond either limit a request gets 429."""

    max_batch: int = 32
    max_waiting: int = 2048
    max_wait_seconds: float = 600.0


DEFAULT_BATCHING = Batching()


_DONE = object()


@dataclass
class _Sequence:
    decoder: SequenceDecoder
    loop: asyncio.AbstractEventLoop | None = None  # the reader's event loop; None: a thread reads
    out: queue.SimpleQueue | asyncio.Queue = field(init=False)  # pieces, then _DONE or an exception
    abandoned: bool = False  # its reader went away (a client disconnected): stop decoding it
    queued_at: float = field(init=False, default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.out = queue.SimpleQueue() if self.loop is None else asyncio.Queue()


def _unpacked(item: object) -> Piece:
    if isinstance(item, BaseException):
        raise item
    return item  # type: ignore[return-value]


class PieceStream(Iterator[Piece], AsyncIterator[Piece]):
    """A sequence's pieces as its reader takes them: `for` from a thread, or `async for` on the event loop it was
    submitted with. Dropped unread (a client that went away, even before its choice's turn to stream), it tells the
    loop to stop decoding the sequence."""

    def __init__(self, sequence: _Sequence) -> None:
        self.sequence = sequence

    def __next__(self) -> Piece:
        item = self.sequence.out.get()
        if item is _DONE:
            raise StopIteration
        return _unpacked(item)

    async def __anext__(self) -> Piece:
        item = await self.sequence.out.get()
        if item is _DONE:
            raise StopAsyncIteration
        return _unpacked(item)

    def abandon(self) -> None:
        """Stop decoding this sequence: its reader is gone. Its batch row is free for the next sequence at the
        loop's next turn."""
        self.sequence.abandoned = True

    def __del__(self) -> None:
        self.abandon()


def _deliver(outbox: list[tuple[_Sequence, object]]) -> None:
    """Hand each item to its sequence's reader: a thread's queue at once, an event loop's in one call per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
    for sequence, item in outbox:
        if sequence.loop is None:
            sequence.out.put(item)
        else:
            by_loop.setdefault(sequence.loop, []).append((sequence.out, item))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # that loop has closed (the server stopped): nobody is left to read these
            for sequence, _ in outbox:
                if sequence.loop is loop:
                    sequence.abandoned = True
    outbox.clear()


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for out, item in items:
        out.put_nowait(item)


class _LoneBatch:
    """One row at a time, for a graph from before batched decoding (it cannot take rows of different lengths)."""

    def __init__(self, package: ChatPackage) -> None:
        self.generator = package.generator
        self.rows: list[_Sequence] = []
        self.sequence: CachedSequence | InPlaceSequence | None = None  # the row's, from its join

    def join(self, sequence: _Sequence) -> np.ndarray:
        self.sequence = self.generator.sequence()
        self.rows.append(sequence)
        return self.sequence.feed(sequence.decoder.prompt)

    def step(self) -> np.ndarray:
        return self.sequence.feed([self.rows[0].decoder.next_input])[None]

    def keep(self, keep: list[int]) -> None:
        self.rows = [self.rows[i] for i in keep]


class _PaddedBatch:
    """Rows of the traced graph (models/onnx_forward.py): cache tensors (B, nkv, L, hd) passed into and out of every
    call, each row's tokens at the right end of the L columns and left padding before them."""

    def __init__(self, package: ChatPackage) -> None:
        self.generator = package.generator
        self.rows: list[_Sequence] = []
        self.past: list[np.ndarray] = []
        self.lengths = np.zeros(0, np.int64)  # (B,) the columns that hold each row's tokens

    def join(self, sequence: _Sequence) -> np.ndarray:
        """Prefill `sequence` alone and add it as the last row; the logits (V,) after its prompt."""
        prompt = np.asarray([sequence.decoder.prompt], dtype=np.int64)
        logits, past = self.generator.forward(prompt, self.generator.empty_past(1))
        new = past[0].shape[2]
        if self.rows:
            width = max(new, self.past[0].shape[2])
            past = [
                np.concatenate([_left_pad(b, width), _left_pad(p, width)]) for b, p in zip(self.past, past, strict=True)
            ]
        self.rows.append(sequence)
        self.past, self.lengths = past, np.append(self.lengths, new)
        return logits[0, -1]

    def step(self) -> np.ndarray:
        """Feed every row its next input -> the logits (B, V)."""
        tokens = np.asarray([[s.decoder.next_input] for s in self.rows], dtype=np.int64)
        logits, self.past = self.generator.forward(tokens, self.past, self.lengths)
        self.lengths = self.lengths + 1
        return logits[:, -1]

    def keep(self, keep: list[int]) -> None:
        """Keep only the rows at `keep`; cut the columns that are padding in every remaining row."""
        self.rows = [self.rows[i] for i in keep]
        self.lengths = self.lengths[keep]
        longest = int(self.lengths.max()) if keep else 0
        self.past = [p[keep][:, :, p.shape[2] - longest :] for p in self.past] if keep else []


def _left_pad(cache: np.ndarray, width: int) -> np.ndarray:
    return np.pad(cache, ((0, 0), (0, 0), (width - cache.shape[2], 0), (0, 0)))


class _SlotBatch:
    """Rows of the fused graph in slots of preallocated caches (max_batch, nkv, max_seq_len, hd), updated in place:
    the first B slots are bound as both the past inputs and the present outputs (serving/engine.py's
    InPlaceSequence, batched), so a step copies no cache. A row joins by being prefilled straight into its slot; a row
    that leaves is replaced by the last one (one row's cache copied). Row b's tokens fill its slot's first
    lengths[b] columns; what lies beyond is ignored (GroupQueryAttention reads each row's length)."""

    def __init__(self, package: ChatPackage, max_batch: int) -> None:
        generator, config = package.generator, package.config
        self.session, self.names = generator.session, generator.past_names
        shape = (max_batch, config.n_kv_heads, config.max_seq_len, config.head_dim)
        self.cache = [np.zeros(shape, np.float32) for _ in self.names]
        self.lengths = np.zeros(max_batch, np.int64)
        self.tokens = np.zeros((max_batch, 1), np.int64)
        self.last = np.zeros(max_batch, np.int32)  # seqlens_k: each row's length after the step, minus 1
        self.total = np.zeros((), np.int32)
        self.logits = np.zeros((max_batch, 1, config.vocab_size), np.float32)
        self.rows: list[_Sequence] = []
        self.binding, self.bound = self.session.io_binding(), 0  # the step's binding, for `bound` rows

    def _bind(self, binding: Any, rows: slice, **arrays: np.ndarray) -> None:
        bind_in_place(binding, self.names, [cache[rows] for cache in self.cache], **arrays)

    def join(self, sequence: _Sequence) -> np.ndarray:
        """Prefill `sequence` into the next free slot -> the logits (V,) after its prompt."""
        slot, prompt = len(self.rows), sequence.decoder.prompt
        logits = np.empty((1, len(prompt), self.logits.shape[-1]), np.float32)
        feeds = {  # held until the run: the binding reads them by address
            "input_ids": np.asarray([prompt], dtype=np.int64),
            "seqlens_k": np.array([len(prompt) - 1], np.int32),
            "total_sequence_length": np.array(len(prompt), np.int32),
        }
        binding = self.session.io_binding()
        self._bind(binding, slice(slot, slot + 1), **feeds, logits=logits)
        self.session.run_with_iobinding(binding)
        self.rows.append(sequence)
        self.lengths[slot] = len(prompt)
        return logits[0, -1]

    def step(self) -> np.ndarray:
        """Feed every row its next input -> the logits (B, V)."""
        b = len(self.rows)
        if b != self.bound:
            rows = slice(0, b)
            self._bind(
                self.binding,
                rows,
                input_ids=self.tokens[rows],
                seqlens_k=self.last[rows],
                total_sequence_length=self.total,
                logits=self.logits[rows],
            )
            self.bound = b
        self.tokens[:b, 0] = [s.decoder.next_input for s in self.rows]
        self.last[:b] = self.lengths[:b]
        self.total[...] = self.lengths[:b].max() + 1
        self.session.run_with_iobinding(self.binding)
        self.lengths[:b] += 1
        return self.logits[:b, 0]

    def keep(self, keep: list[int]) -> None:
        """Keep only the rows at `keep`, moved down to the first slots in their order."""
        for slot, row in enumerate(keep):
            if slot != row:
                length = self.lengths[row]
                for cache in self.cache:
                    cache[slot, :, :length] = cache[row, :, :length]
                self.lengths[slot] = length
        self.rows = [self.rows[i] for i in keep]


class DecodeBatcher:
    """Decodes every submitted sequence in a shared batch of at most `max_batch` rows (1 for a graph from before
    batched decoding)."""

    def __init__(self, package: ChatPackage, batching: Batching = DEFAULT_BATCHING) -> None:
        self.package, self.max_batch, self.max_waiting = package, batching.max_batch, batching.max_waiting
        self.max_wait_seconds = batching.max_wait_seconds
        if not package.generator.batches_rows and self.max_batch > 1:
            log.warning("%s predates batched decoding: its sequences decode one at a time", package.directory)
            self.max_batch = 1
        self._waiting: deque[_Sequence] = deque()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._batch: _SlotBatch | _PaddedBatch | _LoneBatch | None = self._new_batch()
        self.running = 0  # rows in the batch, for /metrics

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(
        self, decoders: list[SequenceDecoder], loop: asyncio.AbstractEventLoop | None = None
    ) -> list[PieceStream]:
        """Queue `decoders` (all or none) and return, per decoder, the stream of its pieces: read from a thread,
        or with `loop`, on that event loop (`async for`)."""
        sequences = [_Sequence(d, loop) for d in decoders]
        with self._lock:
            if len(self._waiting) + len(sequences) > self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} sequences are waiting (at most {self.max_waiting})")
            self._waiting.extend(sequences)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="decode-batcher", daemon=True)
                self._thread.start()
        return [PieceStream(s) for s in sequences]

    def _loop(self) -> None:
        try:
            self._decode_until_idle()
        except Exception as error:  # the loop itself failed (no memory for a fresh batch): no reader may wait forever
            log.exception("the decoding loop stopped")
            with self._lock:
                failed = [(sequence, error) for sequence in self._waiting]
                self._waiting.clear()
                self._batch, self._thread = None, None  # the next submission starts over, with a new batch
                self.running = 0
            _deliver(failed)

    def _decode_until_idle(self) -> None:
        batch, outbox = self._batch if self._batch is not None else self._new_batch(), []
        while True:
            with self._lock:  # rows abandoned before a sequence was submitted are free before it can be refused
                if any(sequence.abandoned for sequence in batch.rows):
                    batch.keep([i for i, sequence in enumerate(batch.rows) if not sequence.abandoned])
                if not batch.rows and not self._waiting:
                    self._batch, self._thread = batch, None  # the next submission starts a new loop
                    return
                joining = self._joining(len(batch.rows), outbox)
            _deliver(outbox)
            try:
                for sequence in joining:
                    if not self._emit(sequence, batch.join(sequence), outbox):
                        batch.keep(list(range(len(batch.rows) - 1)))
                    _deliver(outbox)  # its first token at once, not after the others' prefill
                if batch.rows:
                    logits = batch.step()
                    batch.keep([i for i, s in enumerate(batch.rows) if self._emit(s, logits[i], outbox)])
                    _deliver(outbox)
            except Exception as error:  # a failed call fails the rows it was computing, not the server
                log.exception("batched decoding failed")
                outbox.extend((sequence, error) for sequence in [*batch.rows, *joining])
                _deliver(outbox)
                batch = self._new_batch()
            self.running = len(batch.rows)

    def _joining(self, rows: int, outbox: list[tuple[_Sequence, object]]) -> list[_Sequence]:
        """The waiting sequences that join a batch of `rows` now, in order of arrival. Ahead of them, the ones whose
        reader went away leave the queue unprefilled; behind a full batch, the ones that waited too long leave with a
        `QueueTimeout` in `outbox`. Called under the lock."""
        joining: list[_Sequence] = []
        expired = time.monotonic() - self.max_wait_seconds
        while self._waiting:
            head = self._waiting[0]
            if head.abandoned:
                self._waiting.popleft()
            elif rows + len(joining) < self.max_batch:
                joining.append(self._waiting.popleft())
            elif head.queued_at <= expired:
                self._waiting.popleft()
                outbox.append((head, QueueTimeout(f"waited over {self.max_wait_seconds:g} s for a batch row")))
            else:
                break
        return joining

    def _new_batch(self) -> _SlotBatch | _PaddedBatch | _LoneBatch:
        generator = self.package.generator
        if generator.takes_lengths:
            return _SlotBatch(self.package, self.max_batch)
        return _PaddedBatch(self.package) if generator.pads_left else _LoneBatch(self.package)

    @staticmethod
    def _emit(sequence: _Sequence, logits: np.ndarray, outbox: list[tuple[_Sequence, object]]) -> bool:
        """Step one row and put its piece in `outbox`; False when the row leaves the batch."""
        if sequence.abandoned:
            return False
        piece = sequence.decoder.step(logits)
        if piece.text or piece.tokens:
            outbox.append((sequence, piece))
        if sequence.decoder.finished:
            outbox.append((sequence, _DONE))
            return False
        return True
