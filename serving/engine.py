"""Run an exported chat package with onnxruntime: decoding with the KV cache (greedy or sampled), and scoring.

A package is the folder `tasks/deploy/onnx_export.py` writes and the registry versions as `trainonce-chat`:
`model.onnx` (fp32, INT8 or INT4), `tokenizer.json` and `generation_config.json`. The same engine serves
HTTP requests (serving/app.py), answers the MLflow pyfunc's `predict` (serving/chat_pyfunc.py) and measures
every variant for the export stage and the gate, so what is evaluated is exactly what is served.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from models.chat_format import ChatFormat, ChatTokenizer, Message
from models.image_tokenizer import OPEN, ImageTokenizer, code_name
from models.sampling import SampledToken, SamplingParams, scored
from serving.decoding import Piece, SequenceDecoder
from serving.token_text import TokenTexts

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
GENERATION_CONFIG_FILE = "generation_config.json"
GREEDY = SamplingParams()  # what evaluation decodes with, and the server when a request sets no temperature
EVERY_TOKEN = SamplingParams(ignore_eos=True)  # greedy past the end of turn: fixed lengths for speed and parity


@dataclass(frozen=True)
class GenerationConfig:
    """What a runtime needs besides the graph: cache shapes, context length, the stop token and the chat format."""

    n_layers: int
    n_kv_heads: int
    head_dim: int
    max_seq_len: int
    vocab_size: int
    eos_token_id: int
    default_max_new_tokens: int
    quantization: str
    chat_format: dict = field(default_factory=dict)  # models.chat_format.ChatFormat; {}: trainonce's own

    def save(self, directory: Path) -> None:
        (directory / GENERATION_CONFIG_FILE).write_text(json.dumps(self.__dict__, indent=2))

    @classmethod
    def load(cls, directory: Path) -> GenerationConfig:
        return cls(**json.loads((directory / GENERATION_CONFIG_FILE).read_text()))


class OnnxGenerator:
    """An onnxruntime session over the exported decoder, `(input_ids, *past) -> (logits, *present)`."""

    def __init__(self, model_path: str | Path, config: GenerationConfig, threads: int = 0, spin: bool = True) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's default (all physical cores)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if not spin:  # see ChatPackage
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # CPU only on purpose: the package must behave the same on every machine that serves it.
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.config = config
        self.past_names = [f"past_{kind}_{i}" for i in range(config.n_layers) for kind in ("key", "value")]
        # How rows of different lengths share a call is the graph's, read from its inputs, so a package keeps
        # serving whatever exporter wrote it: `seqlens_k`, the fused graph (tasks/deploy/fused_graph.py), rows
        # right-padded; `pad_lengths`, the traced graph (models/onnx_forward.py), rows left-padded; neither, a
        # graph from before batched decoding, one row at a time.
        inputs = {i.name for i in self.session.get_inputs()}
        self.takes_lengths = "seqlens_k" in inputs
        self.pads_left = "pad_lengths" in inputs
        self.batches_rows = self.takes_lengths or self.pads_left

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.config.n_kv_heads, 0, self.config.head_dim)
        return [np.zeros(shape, dtype=np.float32) for _ in self.past_names]

    def forward(
        self, input_ids: np.ndarray, past: Sequence[np.ndarray], lengths: np.ndarray | None = None
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """input_ids (B, T) int64 after `past` -> logits (B, T, V) and the extended cache. `lengths` (B,): how many
        of the cache's columns hold each row's tokens, when rows of different lengths share the call (on the left
        of the cache for the fused graph, on the right for the traced one); None: every row fills the cache."""
        width = past[0].shape[2]
        if lengths is None:
            lengths = np.full(len(input_ids), width, np.int64)
        elif not self.batches_rows and (lengths != width).any():
            raise ValueError("this package's graph predates batched decoding: it cannot take rows of different lengths")
        feeds = {"input_ids": input_ids.astype(np.int64), **dict(zip(self.past_names, past, strict=True))}
        if self.takes_lengths:
            new = input_ids.shape[1]
            feeds["seqlens_k"] = (lengths + new - 1).astype(np.int32)
            feeds["total_sequence_length"] = np.asarray(lengths.max() + new, np.int32)
        elif self.pads_left:
            feeds["pad_lengths"] = (width - lengths).astype(np.int64)
        logits, *present = self.session.run(None, feeds)
        return logits, present

    def sequence(self) -> CachedSequence | InPlaceSequence:
        """One sequence decoded on its own, its cache kept between calls: in place in the fused graph's shared
        buffers, else passed in and out of every call."""
        return InPlaceSequence(self) if self.takes_lengths else CachedSequence(self)

    def mean_nll(self, tokens: np.ndarray) -> float:
        """Mean next-token negative log-likelihood of `tokens` (B, T), all in one prefill."""
        logits, _ = self.forward(tokens[:, :-1], self.empty_past(tokens.shape[0]))
        logits = logits.astype(np.float64)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        targets = tokens[:, 1:]
        return float(-np.take_along_axis(log_probs, targets[..., None], axis=-1).mean())


class CachedSequence:
    """One sequence whose cache goes into and comes out of every call (any graph)."""

    def __init__(self, generator: OnnxGenerator) -> None:
        self.generator, self.past = generator, generator.empty_past(1)

    def feed(self, tokens: Sequence[int]) -> np.ndarray:
        """Run `tokens` after the cached ones -> the logits (V,) after the last of them."""
        logits, self.past = self.generator.forward(np.asarray([tokens], dtype=np.int64), self.past)
        return logits[0, -1]


def bind_in_place(binding: Any, past_names: Sequence[str], caches: Sequence[np.ndarray], **arrays: np.ndarray) -> None:
    """Bind each of `caches` as both its layer's past input and present output, so GroupQueryAttention updates it in
    place; and each of `arrays` by name, `logits` as the output the call writes, the others as inputs read through
    their memory. Everything is bound by address: the caller keeps the arrays alive until the run."""
    for past, cache in zip(past_names, caches, strict=True):
        buffer = ort.OrtValue.ortvalue_from_numpy(cache)
        binding.bind_ortvalue_input(past, buffer)
        binding.bind_ortvalue_output(past.replace("past_", "present_"), buffer)
    for name, array in arrays.items():
        bind = binding.bind_ortvalue_output if name == "logits" else binding.bind_ortvalue_input
        bind(name, ort.OrtValue.ortvalue_from_numpy(array))


class InPlaceSequence:
    """One sequence on the fused graph with its cache updated in place (onnxruntime-genai's past-present shared
    buffer): each cache tensor is one (1, n_kv, max_seq_len, hd) buffer bound as both the layer's past input and
    its present output, so GroupQueryAttention writes the new keys and values into it and nothing is copied or
    allocated per step; the step's inputs and logits are bound once too. At batch 1 a small model's step is mostly
    such per-call work (binding 2 * n_layers + 3 inputs, converting as many outputs), not kernels."""

    def __init__(self, generator: OnnxGenerator) -> None:
        config = generator.config
        self.session, self.length, self.limit = generator.session, 0, config.max_seq_len
        self.binding = self.session.io_binding()
        shape = (1, config.n_kv_heads, config.max_seq_len, config.head_dim)
        self.cache = [np.zeros(shape, np.float32) for _ in generator.past_names]
        # one-token steps read and write these arrays through values bound to their memory
        self.token, self.last = np.zeros((1, 1), np.int64), np.zeros(1, np.int32)
        self.total, self.logits = np.zeros((), np.int32), np.zeros((1, 1, config.vocab_size), np.float32)
        bind_in_place(
            self.binding, generator.past_names, self.cache, seqlens_k=self.last, total_sequence_length=self.total
        )
        self._stepping = False

    def feed(self, tokens: Sequence[int]) -> np.ndarray:
        """Run `tokens` after the cached ones -> the logits (V,) after the last of them."""
        total = self.length + len(tokens)
        if total > self.limit:
            raise ValueError(f"sequence length {total} exceeds max_seq_len={self.limit}")
        self.last[0], self.total[...] = total - 1, total
        if len(tokens) == 1:
            if not self._stepping:
                bind_in_place(self.binding, (), (), input_ids=self.token, logits=self.logits)
                self._stepping = True
            self.token[0, 0] = tokens[0]
            self.session.run_with_iobinding(self.binding)
            self.length = total
            return self.logits[0, -1]
        ids = np.asarray([tokens], dtype=np.int64)  # held until the run: the binding reads it by address
        logits = np.empty((1, len(tokens), self.logits.shape[-1]), np.float32)
        bind_in_place(self.binding, (), (), input_ids=ids, logits=logits)
        self._stepping = False
        self.session.run_with_iobinding(self.binding)
        self.length = total
        return logits[0, -1]


class ChatPackage:
    """A loaded package: tokenizer, chat template and generator; thread-safe (onnxruntime sessions are).

    With `spin` (onnxruntime's default) the session's worker threads spin for a while after each call, waiting for
    the next: the fastest for a process that only decodes. A server should not: its event loop and batch thread need
    those cores between calls, and without spinning `trainonce serve` answered 1.3-1.4x the tokens/s at 1 client and
    1.1-1.2x at 32 (docs/benchmarks.md)."""

    def __init__(self, directory: str | Path, threads: int = 0, spin: bool = True) -> None:
        directory = Path(directory)
        for name in (MODEL_FILE, TOKENIZER_FILE, GENERATION_CONFIG_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory} is not a trainonce chat package: no {name}")
        self.directory = directory
        self.config = GenerationConfig.load(directory)
        self.tokenizer = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
        self.chat_tokenizer = ChatTokenizer(self.tokenizer, ChatFormat.model_validate(self.config.chat_format))
        self.generator = OnnxGenerator(directory / MODEL_FILE, self.config, threads, spin)
        self.token_texts = TokenTexts(self.tokenizer)
        image_file = directory / ImageTokenizer.FILE_NAME
        self.image_tokenizer = ImageTokenizer.load(directory) if image_file.is_file() else None
        codes = len(self.image_tokenizer.codebook) if self.image_tokenizer is not None else 0
        # the token id of each image code, in code order (empty for a text-only model), and back
        self.code_ids: tuple[int, ...] = tuple(self.tokenizer.token_to_id(code_name(i)) for i in range(codes))
        self._code_of = {token: code for code, token in enumerate(self.code_ids)}

    def drawing_prompt(self, messages: Sequence[Message]) -> list[int]:
        """The conversation (its last turn asking for a drawing), then the assistant's reply opened with `<image>`:
        the model's next tokens are the drawing's codes."""
        return self.chat_prompt(messages) + self.tokenizer.encode(OPEN).ids

    def drawing_params(self, temperature: float, seed: int | None) -> SamplingParams:
        """Sampling of exactly one image's codes: every other token masked out, the end of turn ignored."""
        return SamplingParams(temperature=temperature, seed=seed, allowed_token_ids=self.code_ids, ignore_eos=True)

    def codes_of(self, token_ids: Sequence[int]) -> list[int]:
        """The codebook indices that generated image tokens stand for."""
        return [self._code_of[t] for t in token_ids]

    def drawn_image(self, token_ids: Sequence[int]) -> np.ndarray:
        """The (H, W) image, in [0, 1], that generated code tokens make."""
        if self.image_tokenizer is None:
            raise ValueError("this model draws no images: its package has no image tokenizer")
        return self.image_tokenizer.decode(self.codes_of(token_ids))

    def chat_prompt(self, messages: Sequence[Message]) -> list[int]:
        """The token ids SFT trained on, ending in the generation prompt that asks for a reply."""
        return self.chat_tokenizer.render(messages, add_generation_prompt=True)[0]

    def text_prompt(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def room_for(self, prompt: Sequence[int]) -> int:
        """How many tokens may still be generated after `prompt` within the context."""
        return self.config.max_seq_len - len(prompt)

    def prompt_logprobs(self, prompt: Sequence[int], top: int) -> list[SampledToken]:
        """Each prompt token with the model's log-probability of it given the tokens before it (teacher-forced, in
        one forward pass over the prompt) and its `top` alternatives, as an echoed completion reports them: the
        first token has nothing before it, so its log-probability is None."""
        logits, _ = self.generator.forward(np.asarray([prompt], dtype=np.int64), self.generator.empty_past(1))
        return [
            SampledToken(prompt[0], None, ()),
            *(scored(token, logits[0, i], top) for i, token in enumerate(prompt[1:])),
        ]

    def decoder(
        self,
        prompt: Sequence[int],
        budget: int,
        params: SamplingParams = GREEDY,
        rng: np.random.Generator | None = None,
    ) -> SequenceDecoder:
        """A fresh decoding of `prompt`: up to `budget` tokens, chosen as `params` says."""
        config = self.config
        return SequenceDecoder(self.tokenizer, prompt, budget, params, config.eos_token_id, config.vocab_size, rng)

    def decode(self, decoder: SequenceDecoder) -> Iterator[Piece]:
        """Run `decoder` to its end, one cached forward step per token, yielding each piece of final text
        (and the tokens it completes) as soon as it is known."""
        sequence = self.generator.sequence()
        step: Sequence[int] = decoder.prompt
        while not decoder.finished:
            piece = decoder.step(sequence.feed(step))
            if piece.text or piece.tokens:
                yield piece
            step = (decoder.next_input,)

    def complete(
        self,
        prompt: Sequence[int],
        budget: int,
        params: SamplingParams = GREEDY,
        rng: np.random.Generator | None = None,
    ) -> Completion:
        """The whole completion at once (greedy unless `params` say otherwise)."""
        decoder = self.decoder(prompt, budget, params, rng)
        pieces = list(self.decode(decoder))
        return Completion(
            text="".join(p.text for p in pieces),
            finish_reason=str(decoder.finish_reason),
            prompt_tokens=len(prompt),
            completion_tokens=decoder.completion_tokens,
            token_ids=tuple(decoder.ids),
            tokens=tuple(t for p in pieces for t in p.tokens),
        )


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" (end of turn, a stop token or string) or "length" (the budget ran out)
    prompt_tokens: int
    completion_tokens: int
    token_ids: tuple[int, ...]  # the generated tokens, the end of turn or stop token excluded
    tokens: tuple[SampledToken, ...]  # the same with their log-probabilities, when asked for
