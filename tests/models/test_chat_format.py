"""Chat formats: our role-token format renders what SFT always trained on, a foreign (ERNIE-style) template
masks exactly the assistant's turns, a Hugging Face folder's own format is found, and a format the pipeline
cannot use is refused with the field named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from models.chat_format import ROLE_TOKENS, ChatFormat, ChatTokenizer, Message, chat_format_from_hf
from models.losses import IGNORE_INDEX
from tasks.align.sft import encode
from tasks.data.config import DataConfig
from tasks.data.corpus import PreparedData, prepare_data
from tasks.data.task_mix import Conversation

CONVERSATION = (
    Message(role="system", content="Be brief."),
    Message(role="user", content="What is 2 + 2?"),
    Message(role="assistant", content="4"),
    Message(role="user", content="And 3 + 3?"),
    Message(role="assistant", content="6"),
)


def trained_text(chat: ChatTokenizer, messages: tuple[Message, ...]) -> str:
    ids, mask = chat.render(messages)
    return chat.decode([i for i, m in zip(ids, mask, strict=True) if m])


def test_our_format_is_role_tokens_around_each_message_and_trains_on_the_replies(small_data: PreparedData) -> None:
    chat = small_data.chat_tokenizer()
    tokenizer = small_data.tokenizer()
    ids, mask = chat.render(CONVERSATION)
    # what render_chat always produced: <|role|> content <|end|>, content encoded on its own
    expected: list[int] = []
    for message in CONVERSATION:
        expected += [tokenizer.token_to_id(ROLE_TOKENS[message.role]), *tokenizer.encode(message.content).ids]
        expected.append(chat.end_of_turn_id)
    assert ids == expected
    assert tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m], skip_special_tokens=False) == (
        "4<|end|>6<|end|>"
    )
    prompt, prompt_mask = chat.render(CONVERSATION[:2], add_generation_prompt=True)
    assert prompt[-1] == tokenizer.token_to_id("<|assistant|>") and sum(prompt_mask) == 0
    assert ids[: len(prompt)] == prompt  # generation continues exactly where training data does


def test_a_foreign_template_masks_the_assistant_turns_and_its_own_end_token(foreign_tokenizer_dir: Path) -> None:
    tokenizer = Tokenizer.from_file(str(foreign_tokenizer_dir / "tokenizer.json"))
    chat_format = chat_format_from_hf(foreign_tokenizer_dir, tokenizer)
    tokens = (chat_format.end_of_turn, chat_format.end_of_text, chat_format.pad)
    assert tokens == ("<|end_of_sentence|>", "</s>", "<unk>")
    assert chat_format.variables["bos_token"] == "<s>"
    chat = ChatTokenizer(tokenizer, chat_format)
    text = chat_format.render(CONVERSATION)
    assert text == (
        "<s><|begin_of_sentence|>Be brief.\nUser: What is 2 + 2?\nAssistant: 4<|end_of_sentence|>"
        "User: And 3 + 3?\nAssistant: 6<|end_of_sentence|>"
    )
    ids, mask = chat.render(CONVERSATION)
    assert chat.decode(ids) == text.replace("<s>", "").replace("<|begin_of_sentence|>", "").replace(
        "<|end_of_sentence|>", ""
    )  # special tokens are single ids, skipped when decoding
    trained = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m], skip_special_tokens=False)
    assert trained.replace(" ", "") == "4<|end_of_sentence|>6<|end_of_sentence|>"  # a merged leading space may ride
    assert ids[:2] == [401, 403] and ids.count(chat.end_of_turn_id) == 2  # <s><|begin_of_sentence|>
    assert not set(ids) & {2, 3, 4, 5}  # none of our role tokens

    example = encode(Conversation(messages=CONVERSATION[1:3]), chat, max_len=64)
    targets = [t for t in example.targets if t != IGNORE_INDEX]
    assert targets[-1] == chat.end_of_turn_id and tokenizer.decode(targets[:-1]).strip() == "4"
    assert example.targets[-1] == IGNORE_INDEX


def test_data_prepared_with_a_foreign_format_separates_documents_with_its_end_of_text(
    foreign_tokenizer_dir: Path, small_corpus: Path, tmp_path: Path
) -> None:
    tokenizer = Tokenizer.from_file(str(foreign_tokenizer_dir / "tokenizer.json"))
    chat_format = chat_format_from_hf(foreign_tokenizer_dir, tokenizer)
    config = DataConfig(
        source=str(small_corpus),
        vocab_size=408,
        data_dir=tmp_path,
        chat_format=chat_format,
        tokenizer_file=str(foreign_tokenizer_dir / "tokenizer.json"),
    )
    prepared = prepare_data(config)
    end_of_text = tokenizer.token_to_id("</s>")
    assert int(np.sum(prepared.split("train") == end_of_text)) == len(list(small_corpus.iterdir()))
    assert prepared.chat_format == chat_format and prepared.chat_tokenizer().end_of_turn_id == 404
    ours = prepare_data(
        config.model_copy(update={"chat_format": ChatFormat(), "tokenizer_file": None, "vocab_size": 400})
    )
    assert ours.fingerprint != prepared.fingerprint

    with pytest.raises(ValueError, match="tokenizer_file: .* has 405 tokens, vocab_size is 404"):
        prepare_data(config.model_copy(update={"vocab_size": 404}))
    with pytest.raises(ValueError, match=r"chat_format.end_of_turn: '<\|end\|>x' is not a token"):
        wrong = chat_format.model_copy(update={"end_of_turn": "<|end|>x"})
        prepare_data(config.model_copy(update={"chat_format": wrong}))


def test_formats_the_pipeline_cannot_use_are_refused_naming_the_field(
    foreign_tokenizer_dir: Path, small_data: PreparedData, tmp_path: Path
) -> None:
    tokenizer = Tokenizer.from_file(str(foreign_tokenizer_dir / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"chat_format.pad: '<\|nothing\|>' is not a token"):
        ChatFormat(pad="<|nothing|>").check(small_data.tokenizer())
    reversed_turns = "{% for message in messages | reverse %}{{ message['content'] + '<|end|>' }}{% endfor %}"
    with pytest.raises(ValueError, match="chat_format.template: the template does not render a conversation as"):
        ChatFormat(template=reversed_turns).check(small_data.tokenizer())
    with pytest.raises(ValueError, match="chat_format.template: .*does not end with end_of_turn"):
        ChatFormat(template="{% for m in messages %}{{ m['content'] }}{% endfor %}").check(small_data.tokenizer())

    base = tmp_path / "base-model"
    shutil.copytree(foreign_tokenizer_dir, base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "chat_template"}))
    with pytest.raises(ValueError, match="has no chat template .* give --chat-template FILE"):
        chat_format_from_hf(base, tokenizer)
    template_file = tmp_path / "template.jinja"
    template_file.write_text(config["chat_template"].replace("<|end_of_sentence|>", "\\n\\n"))
    with pytest.raises(ValueError, match=r"none of the eos tokens \['</s>', '<\|end_of_sentence\|>'\]"):
        chat_format_from_hf(base, tokenizer, template_file)
    template_file.write_text(config["chat_template"])
    assert chat_format_from_hf(base, tokenizer, template_file).end_of_turn == "<|end_of_sentence|>"
