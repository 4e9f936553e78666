"""Hugging Face export: a trainonce checkpoint as a directory that `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load offline, and so transformers, vLLM, SGLang and FastDeploy serve.

The weights are written by transformers' own `Ernie4_5_MoeForCausalLM.save_pretrained` (config.json,
generation_config.json, safetensors, weight tying as transformers expects it) and the tokenizer by
`PreTrainedTokenizerFast.save_pretrained`, with the chat template SFT rendered its data with
(`models.chat_format`), so `apply_chat_template` yields exactly the token ids the model was trained on.

transformers 5 writes both files in its own vocabulary, and the 4.x releases that know ERNIE 4.5 MoE (4.54 to
4.57), which vLLM, SGLang and TGI releases still read configs with, misread them; the two files are then rewritten
so that both majors load the same model (`config_for_both_majors`, `tokenizer_config_for_both_majors`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM, GenerationConfig, PreTrainedTokenizerFast

from models.chat_format import ChatFormat
from models.checkpoint import load_model
from models.hf import hf_config_dict, to_hf_state_dict
from models.image_tokenizer import image_tokenizer_beside
from models.publish import staged_dir
from tasks.deploy.export_folder import HF_EXPORT, check_replaceable, mark_export


def export_hf(
    checkpoint_dir: str | Path, tokenizer_path: str | Path, chat_format: ChatFormat, out_dir: str | Path
) -> Path:
    """Write the checkpoint (supernet, sub-model or aligned model) as a transformers model directory.

    A sub-model transformers cannot express (different expert counts per layer) fails before anything is
    written, naming the layer. The directory is assembled beside `out_dir` and renamed into place, so a
    failure never leaves a half-written model under that name; an earlier export there is replaced, any other
    non-empty folder is refused (tasks/deploy/export_folder.py)."""
    model = load_model(checkpoint_dir).eval()
    config = hf_config_dict(model.config)  # raises, naming the layer, before any file is written
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    ids = chat_format.token_ids(tokenizer)
    end_of_turn, end_of_text, pad = ids["end_of_turn"], ids["end_of_text"], ids["pad"]
    config.update(eos_token_id=end_of_text, pad_token_id=pad, bos_token_id=None)

    out_dir = Path(out_dir)
    check_replaceable(out_dir, HF_EXPORT)
    with torch.device("meta"):  # no second copy of the weights: load_state_dict(assign=True) adopts ours
        hf = Ernie4_5_MoeForCausalLM(Ernie4_5_MoeConfig(**config))
    result = hf.load_state_dict(to_hf_state_dict(model), strict=False, assign=True)
    if result.unexpected_keys or set(result.missing_keys) - {"lm_head.weight"}:
        raise ValueError(f"weights do not match Ernie4_5_MoeForCausalLM: {result}")
    if config["tie_word_embeddings"]:
        hf.tie_weights()
    # A chat reply ends with the end-of-turn token, plain text with end-of-text: generation stops at either.
    stops = list(dict.fromkeys([end_of_turn, end_of_text]))
    hf.generation_config = GenerationConfig(eos_token_id=stops, pad_token_id=pad, do_sample=False)
    with staged_dir(out_dir) as staged:
        hf.save_pretrained(staged, safe_serialization=True)
        _rewrite_json(staged / "config.json", config_for_both_majors)
        PreTrainedTokenizerFast(
            tokenizer_object=tokenizer,
            eos_token=chat_format.end_of_text,
            pad_token=chat_format.pad,
            # every special token the tokenizer itself declares (our role tokens, an imported model's markers)
            additional_special_tokens=[
                v.content
                for v in tokenizer.get_added_tokens_decoder().values()
                if v.special and v.content not in (chat_format.end_of_text, chat_format.pad)
            ],
            chat_template=chat_format.template,
            model_max_length=model.config.max_seq_len,
            **{k: v for k, v in chat_format.variables.items() if k in ("bos_token", "unk_token")},
        ).save_pretrained(staged)
        _rewrite_json(staged / "tokenizer_config.json", tokenizer_config_for_both_majors)
        image_tokenizer = image_tokenizer_beside(tokenizer_path)
        if image_tokenizer is not None:  # the codebook: the model reads and draws images outside trainonce too
            image_tokenizer.save(staged)
        mark_export(staged, HF_EXPORT)
        for written in staged.iterdir():  # save_pretrained leaves the weights owner-only (0600); serving
            written.chmod(0o644)  # containers often run as another user
    return out_dir


def config_for_both_majors(config: dict[str, Any]) -> dict[str, Any]:
    """config.json as transformers 5 wrote it, plus the names 4.x reads for the same fields.

    transformers 5 keeps the rotary base only in `rope_parameters`; 4.x reads `rope_theta`, and without it uses
    ERNIE's default 500000 instead of ours: a different model, loaded without an error (greedy output differs
    from the third token on). 5.x ignores the extra `rope_theta`. The dtype's name moved too (`dtype` from 4.56,
    `torch_dtype` before) but needs no copy: the export is float32, what every 4.x loads by default, and 4.56 and
    later warn about `torch_dtype`."""
    return {**config, "rope_theta": config["rope_parameters"]["rope_theta"]}  # our models' RoPE is plain (default)


def tokenizer_config_for_both_majors(config: dict[str, Any]) -> dict[str, Any]:
    """tokenizer_config.json as transformers 5 wrote it, in the form both majors load.

    5.x names the class `TokenizersBackend`, which 4.x does not have (`AutoTokenizer` fails); both know
    `PreTrainedTokenizerFast` (in 5.x an alias of the same class). 5.x lists the special tokens beyond eos and pad
    as `extra_special_tokens`, which 4.x takes for a dict of named tokens and fails on as a list; both read the
    list as `additional_special_tokens` (5.x renames it on load)."""
    out = {key: value for key, value in config.items() if key != "extra_special_tokens"}
    out["tokenizer_class"] = "PreTrainedTokenizerFast"
    if config.get("extra_special_tokens"):
        out["additional_special_tokens"] = list(config["extra_special_tokens"])
    return out


def _rewrite_json(path: Path, change: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text())), indent=2, sort_keys=True) + "\n")
