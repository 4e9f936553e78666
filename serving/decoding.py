"""One sequence's decoding, independent of how its logits are computed: sample the next token, turn the
tokens into text incrementally, and decide when it ends (end of turn, a stop token, a stop string, the
token budget).

Text is released only when it is final: an unfinished UTF-8 character waits for its next byte, and text that
could be the start of a stop string waits until it is known not to be one, so a stop string split across
tokens is still found and never partly streamed. The decoding loop (serving/engine.py) only feeds logits rows
and reads `next_input`; a batched loop can step many decoders with one model call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from tokenizers import Tokenizer

from models.sampling import SampledToken, Sampler, SamplingParams


@dataclass(frozen=True)
class Piece:
    """What one decoding step releases: final text (possibly empty), and the tokens it completes."""

    text: str
    tokens: tuple[SampledToken, ...] = ()


@dataclass
class SequenceDecoder:
    """The state of one sequence being generated; `step(logits)` once per model call until `finished`."""

    tokenizer: Tokenizer
    prompt: Sequence[int]
    budget: int  # tokens that may be generated
    params: SamplingParams
    eos_token_id: int
    vocab_size: int
    rng: np.random.Generator | None = None
    sampler: Sampler = field(init=False)
    ids: list[int] = field(init=False, default_factory=list)  # generated, end-of-turn and stop tokens excluded
    finish_reason: str | None = field(init=False, default=None)  # "stop" or "length" once finished
    next_input: int = field(init=False, default=-1)  # the token the model reads next
    _released: int = field(init=False, default=0)  # characters of the decoded text already released
    _pending: list[SampledToken] = field(init=False, default_factory=list)  # tokens not yet in a piece

    def __post_init__(self) -> None:
        self.sampler = Sampler(self.params, self.vocab_size, list(self.prompt), self.rng)
        ends = set(self.params.stop_token_ids) | (set() if self.params.ignore_eos else {self.eos_token_id})
        self._ending_tokens = tuple(sorted(ends))
        if self.budget < 1:  # nothing to generate: an echoed prompt that is only scored (`max_tokens: 0`)
            self.finish_reason = "length"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def completion_tokens(self) -> int:
        return len(self.ids)

    def step(self, logits: np.ndarray) -> Piece:
        """Choose the next token from its logits row (V,) and release what is now final."""
        if self.finished:
            raise RuntimeError("this sequence has finished")
        banned = self._ending_tokens if len(self.ids) < self.params.min_tokens else ()
        sampled = self.sampler.choose(logits, banned)
        self.next_input = sampled.token_id
        if sampled.token_id in self._ending_tokens:
            self.finish_reason = "stop"
            text = self._text()
            return self._release(len(text), text)
        self.ids.append(sampled.token_id)
        self._pending.append(sampled)
        text = self._text()
        stop_at = self._stop_string_at(text)
        if stop_at is not None:
            self.finish_reason = "stop"
            return self._release(stop_at, text)
        if len(self.ids) >= self.budget:
            self.finish_reason = "length"
            return self._release(len(text), text)
        if text.endswith("\ufffd"):  # an unfinished UTF-8 sequence: wait for its next byte
            return Piece("")
        return self._release(len(text) - self._held_back(text), text)

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=self.params.skip_special_tokens)

    def _stop_string_at(self, text: str) -> int | None:
        """Where the released text ends if a stop string appeared: before it, or after it when it is kept.
        Released text never holds the start of a stop string, so the search starts at the unreleased text."""
        found = [(at, stop) for stop in self.params.stop if (at := text.find(stop, self._released)) >= 0]
        if not found:
            return None
        at, stop = min(found)
        return at + len(stop) if self.params.include_stop_str_in_output else at

    def _held_back(self, text: str) -> int:
        """Characters at the end of `text` that may be the start of a stop string."""
        unreleased = text[self._released :]
        return max(
            (
                k
                for stop in self.params.stop
                for k in range(min(len(stop) - 1, len(unreleased)), 0, -1)
                if unreleased.endswith(stop[:k])
            ),
            default=0,
        )

    def _release(self, end: int, text: str) -> Piece:
        if end <= self._released and not self.finished:
            return Piece("")
        piece = Piece(text[self._released : max(end, self._released)], tuple(self._pending))
        self._released = max(end, self._released)
        self._pending = []
        return piece
