"""The Ollama Modelfile written beside GGUF files (`ollama create NAME -f Modelfile`).

Ollama ignores a GGUF's Jinja chat template unless it is close to one of the templates Ollama knows, and ours is
far from all of them: without a Modelfile it would send the model a raw prompt with no role tokens. The Modelfile
gives the chat format as a Go template (`ChatFormat.ollama_template`), the tokens that end a reply as stop
strings, and the sampling defaults of `trainonce serve`: greedy, no repetition penalty, the context the model was
trained for. Ollama reads the file with its own parser: values in double quotes, a multi-line one in triple quotes.
"""

from __future__ import annotations

from models.chat_format import ChatFormat

MODELFILE = "Modelfile"


def modelfile_text(gguf_file: str, chat_format: ChatFormat, context_length: int) -> str:
    """The Modelfile for the GGUF file named `gguf_file` (in the same folder) of a model with this chat format;
    ValueError naming the chat-format field whose token a Modelfile cannot quote."""
    stops = dict.fromkeys([chat_format.end_of_turn, chat_format.end_of_text])
    for field, token in (("end_of_turn", chat_format.end_of_turn), ("end_of_text", chat_format.end_of_text)):
        if '"' in token or "\n" in token:  # Ollama's parser has no escapes inside quotes
            raise ValueError(f"chat_format.{field}: {token!r} cannot be a Modelfile stop string (quote or newline)")
    template = chat_format.ollama_template
    lines = [
        f"# Ollama: `ollama create NAME -f {MODELFILE}` in this folder, then `ollama run NAME`.",
        f"FROM ./{gguf_file}",
        f'TEMPLATE """{template}"""'
        if template
        else "# No TEMPLATE: this model's chat template (Jinja, in the GGUF) has no Go translation here; write one.",
        *(f'PARAMETER stop "{token}"' for token in stops),
        "PARAMETER temperature 0",  # greedy: `trainonce serve`'s default when a request sets no temperature
        "PARAMETER repeat_penalty 1",  # none, as ours (Ollama's default, 1.1, penalises repeats)
        f"PARAMETER num_ctx {context_length}",  # the model's positions; Ollama's default context may be longer
    ]
    return "\n".join(lines) + "\n"
