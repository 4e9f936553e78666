"""Run an exported chat package with onnxruntime: greedy decoding with the KV cache, and scoring.

A package is the folder `tasks/export.py` writes and the registry versions as `trainonce-chat`:
`model.onnx` (fp32, INT8 or INT4), `tokenizer.json` and `generation_config.json`. The same engine serves
HTTP requests (serving/app.py), answers the MLflow pyfunc's `predict` (serving/chat_pyfunc.py) and measures
every variant for the export stage and the gate, so what is evaluated is exactly what is served.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from models.chat_format import ChatFormat, ChatTokenizer, Message

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
GENERATION_CONFIG_FILE = "generation_config.json"


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


def finish_reason(generated: int, budget: int) -> str:
    """OpenAI's finish_reason: `length` when the token budget ran out, else `stop` (the model ended its turn)."""
    return "length" if generated >= budget else "stop"


@dataclass(frozen=True)
class GeneratedToken:
    token_id: int
    text: str  # the text this token adds to the decoded completion (may be empty mid-character)


class OnnxGenerator:
    """An onnxruntime session over the exported decoder, `(input_ids, *past) -> (logits, *present)`."""

    def __init__(self, model_path: str | Path, config: GenerationConfig, threads: int = 0) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's default (all physical cores)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # CPU only on purpose: the package must behave the same on every machine that serves it.
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        self.config = config
        self.past_names = [f"past_{kind}_{i}" for i in range(config.n_layers) for kind in ("key", "value")]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.config.n_kv_heads, 0, self.config.head_dim)
        return [np.zeros(shape, dtype=np.float32) for _ in self.past_names]

    def forward(self, input_ids: np.ndarray, past: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """input_ids (B, T) int64 after `past` -> logits (B, T, V) and the extended cache."""
        feeds = {"input_ids": input_ids.astype(np.int64), **dict(zip(self.past_names, past, strict=True))}
        logits, *present = self.session.run(None, feeds)
        return logits, present

    def mean_nll(self, tokens: np.ndarray) -> float:
        """Mean next-token negative log-likelihood of `tokens` (B, T), all in one prefill."""
        logits, _ = self.forward(tokens[:, :-1], self.empty_past(tokens.shape[0]))
        logits = logits.astype(np.float64)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        targets = tokens[:, 1:]
        return float(-np.take_along_axis(log_probs, targets[..., None], axis=-1).mean())

    def greedy(self, prompt: Sequence[int], max_new_tokens: int, eos_token_id: int | None) -> Iterator[int]:
        """Greedy continuation of one prompt, one forward step per token; stops after `eos_token_id`."""
        past = self.empty_past(1)
        step = np.asarray([prompt], dtype=np.int64)
        for _ in range(max_new_tokens):
            logits, past = self.forward(step, past)
            token = int(logits[0, -1].argmax())
            yield token
            if token == eos_token_id:
                return
            step = np.asarray([[token]], dtype=np.int64)


class ChatPackage:
    """A loaded package: tokenizer, chat template and generator; thread-safe (onnxruntime sessions are)."""

    def __init__(self, directory: str | Path, threads: int = 0) -> None:
        directory = Path(directory)
        for name in (MODEL_FILE, TOKENIZER_FILE, GENERATION_CONFIG_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory} is not a trainonce chat package: no {name}")
        self.directory = directory
        self.config = GenerationConfig.load(directory)
        self.tokenizer = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
        self.chat_tokenizer = ChatTokenizer(self.tokenizer, ChatFormat.model_validate(self.config.chat_format))
        self.generator = OnnxGenerator(directory / MODEL_FILE, self.config, threads)

    def chat_prompt(self, messages: Sequence[Message]) -> list[int]:
        """The token ids SFT trained on, ending in the generation prompt that asks for a reply."""
        return self.chat_tokenizer.render(messages, add_generation_prompt=True)[0]

    def text_prompt(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def room_for(self, prompt: Sequence[int]) -> int:
        """How many tokens may still be generated after `prompt` within the context."""
        return self.config.max_seq_len - len(prompt)

    def stream(self, prompt: Sequence[int], max_new_tokens: int, stop_at_eos: bool = True) -> Iterator[GeneratedToken]:
        """Generated tokens with the text each adds (decoded incrementally, so multi-byte characters that
        span tokens come out whole). The end-of-turn token itself is not yielded."""
        eos = self.config.eos_token_id if stop_at_eos else None
        ids: list[int] = []
        emitted = ""
        for token in self.generator.greedy(prompt, max_new_tokens, eos):
            if token == eos:
                return
            ids.append(token)
            text = self.tokenizer.decode(ids)
            if text.endswith("\ufffd"):  # an unfinished UTF-8 sequence: wait for its next byte
                yield GeneratedToken(token, "")
                continue
            yield GeneratedToken(token, text[len(emitted) :])
            emitted = text

    def complete(self, prompt: Sequence[int], max_new_tokens: int, stop_at_eos: bool = True) -> Completion:
        tokens = list(self.stream(prompt, max_new_tokens, stop_at_eos))
        text = "".join(t.text for t in tokens)
        return Completion(text, finish_reason(len(tokens), max_new_tokens), len(prompt), len(tokens))


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" (end of turn) or "length" (max_new_tokens reached)
    prompt_tokens: int
    completion_tokens: int
