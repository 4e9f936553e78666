"""The chat format: how a conversation becomes token ids, which of them SFT trains on, and which token ends a
reply, for our own tokenizer and for an imported model's (ERNIE 4.5's `User: ...\\nAssistant: ...` turns, or any
other Hugging Face chat template).

A format is a Jinja chat template with Hugging Face's conventions (`messages`, `add_generation_prompt`,
rendered by transformers' own `render_jinja_template`) plus the names of its end-of-turn, end-of-text and pad
tokens. It travels with the data (`data.chat_format`, recorded in the prepared dataset) and with every
registered checkpoint (`extra["chat_format"]`), so SFT, DPO, the ONNX package, the HF export and the server
all render prompts exactly as the model was trained on them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Tokenizer

END_OF_TEXT = "<|endoftext|>"
PAD = "<|pad|>"
SYSTEM, USER, ASSISTANT, END_OF_TURN = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = (END_OF_TEXT, PAD, SYSTEM, USER, ASSISTANT, END_OF_TURN)  # ids 0..5 of tokenizers we train
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

# `<|role|>content<|end|>` per message, then `<|assistant|>` when a reply is asked for.
TRAINONCE_TEMPLATE = (
    "{% set roles = " + json.dumps(ROLE_TOKENS) + " %}"
    "{% for message in messages %}"
    "{% if message['role'] not in roles %}"
    "{{ raise_exception('role must be one of system, user, assistant; got ' + message['role']) }}"
    "{% endif %}"
    "{{ roles[message['role']] + message['content'] + '" + END_OF_TURN + "' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ASSISTANT + "' }}{% endif %}"
)

# The same format in Go's text/template, for Ollama, which runs a Modelfile's TEMPLATE and not a GGUF's Jinja
# template (tasks/deploy/ollama.py). Ollama passes `.Messages` and has no generation-prompt flag: the template adds
# the assistant's role token after a last message that is not the assistant's, and leaves a last assistant message
# open, for Ollama to continue it (what transformers' `continue_final_message` renders).
TRAINONCE_OLLAMA_TEMPLATE = "\n".join(
    [
        "{{- range $i, $_ := .Messages }}",
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}",
        '{{- if eq .Role "system" }}' + SYSTEM,
        '{{- else if eq .Role "user" }}' + USER,
        '{{- else if eq .Role "assistant" }}' + ASSISTANT,
        # Jinja's raise_exception: executing a template that was never defined fails, naming it in the error
        '{{- else }}{{ template "role must be one of system, user, assistant" . }}',
        "{{- end }}{{ .Content }}",
        '{{- if not (and $last (eq .Role "assistant")) }}' + END_OF_TURN + "{{ end }}",
        '{{- if and $last (ne .Role "assistant") }}' + ASSISTANT + "{{ end }}",
        "{{- end }}",
    ]
)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str


# A conversation every template must render consistently before a format is accepted.
_PROBE = (
    Message(role="system", content="Be brief."),
    Message(role="user", content="Name a king."),
    Message(role="assistant", content="Lear"),
    Message(role="user", content="And a queen?"),
    Message(role="assistant", content="Gertrude"),
)


class ChatFormat(BaseModel):
    """A chat template and the tokens the pipeline needs from it (defaults: trainonce's own format)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    template: str = Field(
        TRAINONCE_TEMPLATE,
        min_length=1,
        description="Jinja chat template with Hugging Face's conventions (`messages`, `add_generation_prompt`); "
        "an imported model's own template (tokenizer_config.json / chat_template.jinja).",
    )
    end_of_turn: str = Field(
        END_OF_TURN,
        min_length=1,
        description="The single token the template puts after an assistant reply: SFT trains on it, generation "
        "and serving stop at it.",
    )
    end_of_text: str = Field(END_OF_TEXT, min_length=1, description="Token appended to every pre-training document.")
    pad: str = Field(PAD, min_length=1, description="Token that right-pads batches (never trained on).")
    variables: dict[str, str] = Field(
        default_factory=dict,
        description="Extra names the template reads, e.g. `bos_token` (Hugging Face passes the special tokens).",
    )

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The conversation as text, exactly as transformers' `apply_chat_template(tokenize=False)` renders it."""
        from transformers.utils.chat_template_utils import render_jinja_template

        # Any: transformers annotates it narrower than it works (template variables pass as keyword arguments)
        render_template: Any = render_jinja_template
        rendered, _ = render_template(
            conversations=[[m.model_dump() for m in messages]],
            chat_template=self.template,
            add_generation_prompt=add_generation_prompt,
            **self.variables,
        )
        return rendered[0]

    @property
    def ollama_template(self) -> str | None:
        """This format as a Go template for an Ollama Modelfile; None for a template that has no Go translation
        here (an imported model's own)."""
        return TRAINONCE_OLLAMA_TEMPLATE if self.template == TRAINONCE_TEMPLATE else None

    def token_ids(self, tokenizer: Tokenizer) -> dict[str, int]:
        """Ids of the end-of-turn, end-of-text and pad tokens; ValueError naming the field that is not one token."""
        ids: dict[str, int] = {}
        for field in ("end_of_turn", "end_of_text", "pad"):
            token = getattr(self, field)
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                raise ValueError(f"chat_format.{field}: {token!r} is not a token of the tokenizer")
            ids[field] = token_id
        return ids

    def check(self, tokenizer: Tokenizer) -> None:
        """Usable with `tokenizer`: its tokens exist, and rendering a probe conversation grows turn by turn with
        the end-of-turn token closing every reply (what masking the assistant's tokens relies on)."""
        chat = ChatTokenizer(tokenizer, self)  # raises naming the token field
        try:
            chat.render(_PROBE)
        except Exception as error:  # a template error from Jinja has many types; name the field either way
            raise ValueError(f"chat_format.template: {error}") from error


class ChatTokenizer:
    """A tokenizer with its chat format: what SFT, DPO, evaluation and serving encode conversations with."""

    def __init__(self, tokenizer: Tokenizer, chat_format: ChatFormat) -> None:
        self.tokenizer = tokenizer
        self.format = chat_format
        ids = chat_format.token_ids(tokenizer)
        self.end_of_turn_id, self.pad_id = ids["end_of_turn"], ids["pad"]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Token ids of the rendered conversation, and a loss mask that is 1 exactly on every assistant reply
        and the end-of-turn token closing it (what SFT trains on).

        A reply's characters are found by rendering the conversation up to it (with the generation prompt) and
        through it; tokens overlapping that span are masked in, so a token that merges the prompt's last space
        with the reply's first word is trained too."""
        text = self.format.render(messages, add_generation_prompt)
        spans = []
        for index, message in enumerate(messages):
            if message.role != "assistant":
                continue
            before = self.format.render(messages[:index], add_generation_prompt=True)
            through = self.format.render(messages[: index + 1])
            if not (text.startswith(through) and through.startswith(before)):
                raise ValueError("the template does not render a conversation as the concatenation of its turns")
            if not through.rstrip().endswith(self.format.end_of_turn):
                raise ValueError(f"an assistant turn does not end with end_of_turn {self.format.end_of_turn!r}")
            spans.append((len(before), len(through)))
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        mask = [int(any(end > lo and start < hi for lo, hi in spans)) for start, end in encoding.offsets]
        return encoding.ids, mask


def chat_format_of(extra: Mapping[str, Any]) -> ChatFormat:
    """The chat format registered with a checkpoint (`extra["chat_format"]`); trainonce's own for versions
    registered before formats were recorded."""
    return ChatFormat.model_validate(extra.get("chat_format", {}))


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string, or an AddedToken dict with `content`."""
    return value.get("content") if isinstance(value, dict) else value


def chat_format_from_hf(directory: Path, tokenizer: Tokenizer, template_file: Path | None = None) -> ChatFormat:
    """The chat format of a Hugging Face checkpoint: its chat template (`template_file`, else
    `chat_template.jinja`, else tokenizer_config.json's `chat_template`), its eos token as end of text, and
    as end of turn the generation config's eos token that the template puts after an assistant reply."""
    config_file = directory / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template_file is None and (directory / "chat_template.jinja").is_file():
        template_file = directory / "chat_template.jinja"
    if template_file is not None:
        template = template_file.read_text()
    if not template:
        raise ValueError(
            f"chat_template: {directory} has no chat template (chat_template.jinja or tokenizer_config.json); "
            "a base model needs one: give --chat-template FILE"
        )
    variables = {
        name: text
        for name in ("bos_token", "eos_token", "pad_token", "unk_token")
        if (text := _token_text(tokenizer_config.get(name)))
    }
    end_of_text = variables.get("eos_token")
    candidates = [end_of_text] if end_of_text else []
    generation_file = directory / "generation_config.json"
    if generation_file.is_file():
        eos = json.loads(generation_file.read_text()).get("eos_token_id")
        tokens = (tokenizer.id_to_token(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None)
        candidates += [token for token in tokens if token is not None]
    candidates = list(dict.fromkeys(candidates))
    probe = ChatFormat(template=template, variables=variables)
    reply = probe.render(_PROBE[1:3])
    closing = reply[reply.rindex(_PROBE[2].content) + len(_PROBE[2].content) :]
    end_of_turn = next((token for token in candidates if token and token in closing), None)
    if end_of_turn is None:
        raise ValueError(
            f"chat_template: none of the eos tokens {candidates} follows an assistant reply in {directory}'s "
            f"template (it closes a reply with {closing!r})"
        )
    end_of_text = end_of_text or end_of_turn
    pad = variables.get("pad_token") or end_of_text
    chat_format = ChatFormat(
        template=template, end_of_turn=end_of_turn, end_of_text=end_of_text, pad=pad, variables=variables
    )
    chat_format.check(tokenizer)
    return chat_format
