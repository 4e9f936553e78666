"""A Hugging Face export loaded as a user would, with transformers alone and nothing of trainonce, so that the tests
can run it under another transformers than the project's (tests/tasks/test_export_hf.py):

    python transformers_probe.py EXPORT_DIR REQUEST_JSON OUT_JSON

The request names token ids to score, a prompt to continue greedily and a conversation; the answer holds what
this transformers computes from them: logits, tokens, the rendered chat and the tokenizer's ids and text.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer


def probe(export_dir: str, request: dict) -> dict:
    model = AutoModelForCausalLM.from_pretrained(export_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    messages = request["messages"]
    prompt_ids = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        logits = model(torch.tensor(request["tokens"])).logits
        # eos_token_id=None: every requested token, so a stop cannot hide a difference
        greedy = model.generate(
            torch.tensor([request["prompt"]]), max_new_tokens=request["new_tokens"], do_sample=False, eos_token_id=None
        )
        reply = model.generate(torch.tensor([prompt_ids]), max_new_tokens=request["new_tokens"], do_sample=False)
    return {
        "transformers": transformers.__version__,
        "model_class": type(model).__name__,
        "tokenizer_class": type(tokenizer).__name__,
        "logits": logits.tolist(),
        "greedy": greedy[0].tolist(),
        "chat_text": tokenizer.apply_chat_template(messages, tokenize=False),
        "chat_ids": tokenizer.apply_chat_template(messages, return_dict=False),
        "prompt_ids": prompt_ids,
        "reply_ids": reply[0, len(prompt_ids) :].tolist(),
        "reply_text": tokenizer.decode(reply[0, len(prompt_ids) :], skip_special_tokens=True),
        "encoded": tokenizer.encode(request["text"], add_special_tokens=False),
    }


if __name__ == "__main__":
    export, request_file, out_file = sys.argv[1:]
    Path(out_file).write_text(json.dumps(probe(export, json.loads(Path(request_file).read_text()))))
