"""Choosing the next token from a model's logits, as vLLM and OpenAI define the controls: logit bias,
presence/frequency/repetition penalties, allowed tokens and bad words, temperature, top-k, top-p and min-p, a seed,
and the log-probabilities of the chosen token and its best alternatives.

One sampler for every consumer: the server and the MLflow pyfunc (serving/engine.py) and evaluation, which
stays greedy by its parameters (`SamplingParams()`: temperature 0), not by a second code path. It works on
one sequence's logits row in NumPy, so an onnxruntime decoder and a PyTorch one can both feed it.

Order of operations (vLLM's): bias and penalties change the logits, and tokens outside `allowed_token_ids` or
completing a bad word get -inf; temperature 0 takes the argmax of those;
otherwise temperature scales them, top-k, min-p and top-p cut the tail, and the seeded generator draws.
Log-probabilities are the model's own (log-softmax of the raw logits), so they score the text the model
produced whatever the controls, as vLLM's default `raw_logprobs` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

MAX_TOP_LOGPROBS = 20  # vLLM's default `max_logprobs`; OpenAI allows 20 on chat
MAX_STOP_SEQUENCES = 16
LOGIT_BIAS_RANGE = 100.0  # OpenAI: each bias in [-100, 100]

# The controls' ranges, declared once: SamplingParams and the HTTP requests (serving/protocol.py) share them,
# so a request's 400 and a pyfunc caller's error name the same bounds.
Temperature = Annotated[float, Field(ge=0.0, le=2.0, description="0: greedy; higher: more random.")]
TopP = Annotated[float, Field(gt=0.0, le=1.0, description="Nucleus: the smallest set of tokens with this mass.")]
TopK = Annotated[int, Field(ge=-1, description="Keep the k most likely tokens; 0 or -1: all.")]
MinP = Annotated[float, Field(ge=0.0, le=1.0, description="Drop tokens below min_p x the top probability.")]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, description="Subtracted per generated occurrence (OpenAI).")]
RepetitionPenalty = Annotated[
    float, Field(gt=0.0, le=2.0, description="> 1 discourages tokens already in the prompt or output (vLLM).")
]
LogitBias = Annotated[
    dict[int, Annotated[float, Field(ge=-LOGIT_BIAS_RANGE, le=LOGIT_BIAS_RANGE)]],
    Field(description="Token id -> added to its logit, in [-100, 100]; -100 bans a token."),
]
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS, description="Alternatives reported per token.")]
StopSequence = Annotated[str, Field(min_length=1, max_length=256)]


class SamplingParams(BaseModel):
    """How one sequence is decoded. The defaults are greedy decoding that stops at the end of turn."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    top_k: TopK = 0
    min_p: MinP = 0.0
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: RepetitionPenalty = 1.0
    logit_bias: LogitBias = Field(default_factory=dict)
    seed: int | None = Field(None, description="Same seed, same request: same tokens. None: fresh randomness.")
    min_tokens: int = Field(0, ge=0, description="The end of turn and stop tokens are banned before this many.")
    ignore_eos: bool = Field(False, description="Keep generating past the end of turn (benchmarks).")
    stop: tuple[StopSequence, ...] = Field((), max_length=MAX_STOP_SEQUENCES, description="Texts that end it.")
    stop_token_ids: tuple[int, ...] = Field((), description="Token ids that end it, besides the end of turn.")
    allowed_token_ids: tuple[int, ...] | None = Field(
        None, min_length=1, description="Only these tokens can be chosen (vLLM's); None: any token."
    )
    bad_words_ids: tuple[tuple[int, ...], ...] = Field(
        (),
        description="Token sequences never generated: a sequence's last token is banned wherever the tokens "
        "generated so far end in the rest of it (vLLM's `bad_words`, tokenized).",
    )
    skip_special_tokens: bool = Field(True, description="False: special tokens stay in the text (vLLM's).")
    include_stop_str_in_output: bool = False
    logprobs: TopLogprobs | None = Field(None, description="None: no log-probabilities; k: the token's and k more.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def token_ids(self) -> dict[str, list[int]]:
        """Every token id the parameters name, by parameter: each must be in the model's vocabulary."""
        return {
            "logit_bias": list(self.logit_bias),
            "stop_token_ids": list(self.stop_token_ids),
            "allowed_token_ids": list(self.allowed_token_ids or ()),
            "bad_words": [t for word in self.bad_words_ids for t in word],
        }


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float | None  # the model's log-probability of it; None when not asked for
    top_logprobs: tuple[tuple[int, float], ...]  # the best `params.logprobs` alternatives, most likely first


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """In float64, so a completion's summed log-probabilities match a scorer's to ~1e-6."""
    shifted = logits.astype(np.float64) - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def scored(token: int, logits: np.ndarray, top: int) -> SampledToken:
    """`token` with the model's log-probability of it under `logits` (V,) and the `top` most likely alternatives:
    a generated token's, or a prompt token's (scored by the logits before it)."""
    log_probs = log_softmax(logits)
    best = np.argsort(-log_probs, kind="stable")[:top]
    return SampledToken(token, float(log_probs[token]), tuple((int(t), float(log_probs[t])) for t in best))


class Sampler:
    """One sequence's sampler: its random generator and the counts its penalties need."""

    def __init__(
        self,
        params: SamplingParams,
        vocab_size: int,
        prompt: np.ndarray | list[int],
        rng: np.random.Generator | None = None,
    ) -> None:
        out_of_vocab = [t for ids in params.token_ids().values() for t in ids if not 0 <= t < vocab_size]
        if out_of_vocab:
            raise ValueError(f"token ids must be in [0, {vocab_size - 1}]; got {out_of_vocab[:5]}")
        self.params = params
        self.rng = rng if rng is not None else np.random.default_rng(seed_entropy(params.seed))
        self.generated: list[int] = []  # what bad words are matched against
        self.generated_counts = np.zeros(vocab_size, dtype=np.int64)
        self.seen = np.zeros(vocab_size, dtype=bool)  # prompt or output: what repetition_penalty discourages
        self.seen[np.asarray(prompt, dtype=np.int64)] = True
        self.bias = np.zeros(vocab_size, dtype=np.float32)
        for token, value in params.logit_bias.items():
            self.bias[token] = value
        # Nothing moves a logit: greedy decoding then reads the logits as they are (decoding's hot path, where a
        # float64 copy of every row was a measurable share of a small model's step).
        self.unadjusted = not (
            params.logit_bias
            or params.allowed_token_ids is not None
            or params.bad_words_ids
            or params.repetition_penalty != 1.0
            or params.frequency_penalty
            or params.presence_penalty
        )
        if params.allowed_token_ids is not None:
            allowed = np.zeros(vocab_size, dtype=bool)
            allowed[list(params.allowed_token_ids)] = True
            self.bias[~allowed] = -np.inf

    def _bad_word_ends(self) -> list[int]:
        """The last token of every bad word whose other tokens the generated tokens end in (all of a one-token
        word's), as vLLM bans them: only generated tokens count, not the prompt's."""
        return [
            word[-1]
            for word in self.params.bad_words_ids
            if len(word) - 1 <= len(self.generated)
            and self.generated[len(self.generated) - len(word) + 1 :] == list(word[:-1])
        ]

    def adjusted(self, logits: np.ndarray, banned: tuple[int, ...] = ()) -> np.ndarray:
        """The logits after bias and penalties, in float64; `banned` tokens (min_tokens), tokens not allowed and
        those that would complete a bad word get -inf. When those bans leave no allowed token (`allowed_token_ids`
        all ending tokens under min_tokens, or all bad-word ends) they give way for this step: only allowed tokens
        are ever generated, and an all -inf row has nothing to sample."""
        params = self.params
        out = logits.astype(np.float64) + self.bias
        if params.repetition_penalty != 1.0:
            seen = out[self.seen]
            out[self.seen] = np.where(seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty)
        if params.frequency_penalty or params.presence_penalty:
            out -= params.frequency_penalty * self.generated_counts + params.presence_penalty * (
                self.generated_counts > 0
            )
        banned = (*banned, *self._bad_word_ends())
        if banned:
            index = list(banned)
            before = out[index]  # a copy (fancy indexing): the bans are undone in place, without a second row
            out[index] = -np.inf
            if not np.isfinite(out).any():
                out[index] = before
        return out

    def choose(self, logits: np.ndarray, banned: tuple[int, ...] = ()) -> SampledToken:
        """The next token for this sequence from its logits row (V,), and its log-probabilities."""
        params = self.params
        if params.greedy and self.unadjusted and not banned:
            token = int(logits.argmax())
        else:
            adjusted = self.adjusted(logits, banned)
            token = int(adjusted.argmax()) if params.greedy else self._draw(adjusted)
        self.generated.append(token)
        self.generated_counts[token] += 1
        self.seen[token] = True
        return SampledToken(token, None, ()) if params.logprobs is None else scored(token, logits, params.logprobs)

    def _draw(self, adjusted: np.ndarray) -> int:
        params = self.params
        # shifted before scaling: a tiny temperature then sends the others to -inf (probability 0), never to inf - inf
        with np.errstate(over="ignore"):
            probs = np.exp((adjusted - adjusted.max()) / params.temperature)
        if 0 < params.top_k < probs.size:
            probs[probs < np.partition(probs, -params.top_k)[-params.top_k]] = 0.0
        if params.min_p > 0:
            probs[probs < params.min_p * probs.max()] = 0.0
        if params.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            mass = np.cumsum(probs[order]) / probs.sum()
            keep = int(np.searchsorted(mass, params.top_p)) + 1  # the smallest prefix with at least top_p
            probs[order[keep:]] = 0.0
        cumulative = np.cumsum(probs)  # a token with probability 0 owns an empty interval: never drawn
        drawn = int(np.searchsorted(cumulative, self.rng.random() * cumulative[-1], side="right"))
        return min(drawn, probs.size - 1)


def seed_entropy(seed: int | None) -> int | None:
    """A request's seed as numpy takes it: any integer a client sends is a seed, as vLLM takes it (some clients send
    -1 for "random"); numpy refuses negative entropy, so a negative seed wraps modulo 2**64, and a seed that is
    already non-negative is used as it is (the same seed gives the same tokens as before)."""
    return seed if seed is None or seed >= 0 else seed % 2**64


def choice_generators(seed: int | None, n: int) -> list[np.random.Generator]:
    """One generator per choice of a request: with a seed, the same request draws the same n choices, and
    the choices differ from each other."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed_entropy(seed)).spawn(n)]
