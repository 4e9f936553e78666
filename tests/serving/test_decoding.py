"""One sequence's decoding with the real byte-level tokenizer, fed logits that force a known text: stop strings
split across tokens are found and never partly released, unfinished characters wait, and the sequence ends
for the right reason."""

import numpy as np
import pytest
from tokenizers import Tokenizer

from models.sampling import SamplingParams
from serving.decoding import SequenceDecoder
from serving.token_text import TokenTexts
from tasks.data.corpus import PreparedData

EOS = 5  # <|end|> in tokenizers we train


@pytest.fixture(scope="module")
def tokenizer(small_data: PreparedData) -> Tokenizer:
    return small_data.tokenizer()


def forced(tokenizer: Tokenizer, targets: list[int], params: SamplingParams, budget: int = 64):
    """Decode with logits that put (nearly) all mass on `targets`, one per step; the pieces and the decoder."""
    vocab = tokenizer.get_vocab_size()
    decoder = SequenceDecoder(tokenizer, [1, 2], budget, params, EOS, vocab)
    pieces = []
    for target in targets:
        if decoder.finished:
            break
        logits = np.full(vocab, -10.0, dtype=np.float32)
        logits[target] = 10.0
        pieces.append(decoder.step(logits))
    return pieces, decoder


def test_a_stop_string_across_tokens_ends_the_text_before_it_and_is_never_streamed(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("to be, or not to be: that is the question").ids
    assert len(tokenizer.encode("or not").ids) > 1  # the stop string spans tokens
    pieces, decoder = forced(tokenizer, ids, SamplingParams(stop=("or not", "zzz")))
    streamed = [p.text for p in pieces]
    assert "".join(streamed) == "to be, "
    assert decoder.finish_reason == "stop"
    assert decoder.completion_tokens < len(ids)  # it stopped there, not at the end of the forced text
    kept, _ = forced(tokenizer, ids, SamplingParams(stop=("or not",), include_stop_str_in_output=True))
    assert "".join(p.text for p in kept) == "to be, or not"


def test_held_back_text_is_released_when_no_stop_string_follows(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("to be, or").ids
    pieces, decoder = forced(tokenizer, [*ids, EOS], SamplingParams(stop=("or not",)))
    assert "".join(p.text for p in pieces) == "to be, or"
    assert pieces[-1].text.endswith("or")  # held back until the end of turn showed it was no stop string
    assert decoder.finish_reason == "stop"
    budget_pieces, budget_decoder = forced(tokenizer, ids, SamplingParams(stop=("or not",)), budget=len(ids))
    assert "".join(p.text for p in budget_pieces) == "to be, or" and budget_decoder.finish_reason == "length"


def test_unfinished_characters_wait_for_their_bytes(tokenizer: Tokenizer) -> None:
    text = "naïve café 🙂 done"
    ids = tokenizer.encode(text).ids
    pieces, _ = forced(tokenizer, ids, SamplingParams())
    assert "".join(p.text for p in pieces) == text
    assert not any("\ufffd" in p.text for p in pieces)
    emoji_bytes = b"".join(TokenTexts(tokenizer)(i)[1] for i in ids)
    assert emoji_bytes.decode() == text  # logprob entries' bytes join losslessly


def test_min_tokens_ignore_eos_and_stop_token_ids(tokenizer: Tokenizer) -> None:
    word = tokenizer.encode(" be").ids[0]
    _, early = forced(tokenizer, [EOS, EOS, word, EOS], SamplingParams(min_tokens=2))
    assert early.ids[:2] != [EOS, EOS] and early.finish_reason == "stop" and early.completion_tokens == 3
    _, ignoring = forced(tokenizer, [EOS, word, EOS], SamplingParams(ignore_eos=True), budget=3)
    assert ignoring.finish_reason == "length" and ignoring.completion_tokens == 3
    _, stopped = forced(tokenizer, [word, word, word], SamplingParams(stop_token_ids=(word,)))
    assert stopped.finish_reason == "stop" and stopped.completion_tokens == 0
