"""llama.cpp's own converter (`convert_hf_to_gguf.py`, its `conversion/ernie.py` and `gguf-py`) run on a
transformers directory that tasks/deploy/hugging_face.py wrote, in a process of its own:

    python -m tasks.deploy.gguf_convert LLAMA_CPP_SOURCE HF_DIR OUT_FILE {f32,f16,bf16,q8_0} METADATA_JSON

METADATA_JSON holds `general.*` keys (the model's registered name and version) that replace what the converter
would guess from the folder's name, as its `--metadata` option does.

It is llama.cpp's `Ernie4_5MoeModel` that writes the file; two of its assumptions hold for Baidu's released
checkpoints but not for the shapes trainonce trains, and are corrected here, nothing else:
- vocabulary: Baidu's checkpoints ship a SentencePiece `tokenizer.model`; ours is a byte-level BPE
  (`tokenizer.json`, GPT-2's pre-tokenizer), which llama.cpp knows as tokenizer model `gpt2` with
  pre-tokenizer `gpt-2`. The converter names pre-tokenizers by hashing a tokenization of a fixed text, and a
  vocabulary trained on our corpus hashes to nothing it knows, so the pre-tokenizer is named from
  tokenizer.json's own declaration instead (refused unless it is exactly GPT-2's).
- the shared experts' width: the converter writes `intermediate_size // num_key_value_heads`, which equals
  `moe_intermediate_size * moe_num_shared_experts` for ERNIE-4.5-21B-A3B and 300B-A47B only; transformers
  builds the shared expert with the latter, so that is what is written.
The end-of-turn token (our chat format's, listed in generation_config.json beside end-of-text) is written as
llama.cpp's end-of-turn token, so llama.cpp stops a chat reply where our server does.
It runs apart from trainonce's process because it puts llama.cpp's `gguf-py` and `conversion` on sys.path.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ARCHITECTURE = "Ernie4_5_MoeForCausalLM"
OUT_TYPES = ("f32", "f16", "bf16", "q8_0")


def byte_level_bpe_problem(tokenizer_json: dict[str, Any]) -> str | None:
    """Why this tokenizer is not GPT-2's byte-level BPE (llama.cpp's `gpt2` model, `gpt-2` pre-tokenizer), or
    None when it is."""
    model = tokenizer_json.get("model") or {}
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    if model.get("type") != "BPE":
        return f"model.type is {model.get('type')!r}, not 'BPE'"
    if tokenizer_json.get("normalizer") is not None:
        return "it has a normalizer"
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space", False):
        return f"pre_tokenizer is {pre!r}, not ByteLevel with GPT-2's regex and no prefix space"
    return None


def shared_expert_width(hparams: dict[str, Any]) -> int:
    """The shared experts' SwiGLU width as transformers' Ernie4_5_MoeSparseMoeBlock builds it."""
    return int(hparams["moe_intermediate_size"]) * int(hparams.get("moe_num_shared_experts") or 0)


def end_of_turn_id(model_dir: Path, end_of_text: int | None) -> int | None:
    """The stop token generation_config.json lists besides end-of-text (export_hf writes [end_of_turn, eot])."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return None
    stops = json.loads(path.read_text()).get("eos_token_id")
    stops = stops if isinstance(stops, list) else [stops]
    return next((token for token in stops if token is not None and token != end_of_text), None)


def convert(source: Path, model_dir: Path, out_file: Path, out_type: str, metadata: Path) -> Path:
    """Write `out_file` with llama.cpp's ERNIE 4.5 MoE converter (see the module docstring)."""
    sys.path[:0] = [str(source), str(source / "gguf-py")]
    import gguf  # llama.cpp's own gguf-py, the version its converter is written against
    import torch
    from conversion import get_model_class

    stock = get_model_class(ARCHITECTURE)

    class TrainonceErnie(stock):  # type: ignore[misc, valid-type]
        model_arch = stock.model_arch

        def set_vocab(self) -> None:
            if (self.dir_model / "tokenizer.model").is_file():  # Baidu's SentencePiece vocabulary
                super().set_vocab()
                return
            problem = byte_level_bpe_problem(json.loads((self.dir_model / "tokenizer.json").read_text()))
            if problem:
                raise ValueError(f"tokenizer.json: llama.cpp needs GPT-2's byte-level BPE here, but {problem}")
            self._set_vocab_gpt2()
            eot = end_of_turn_id(self.dir_model, self.hparams.get("eos_token_id"))
            if eot is not None:
                self.gguf_writer.add_eot_token_id(eot)

        def get_vocab_base_pre(self, tokenizer: Any) -> str:
            return "gpt-2"  # checked in set_vocab: tokenizer.json declares GPT-2's pre-tokenizer

        def set_gguf_parameters(self) -> None:
            super().set_gguf_parameters()
            key = gguf.Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH.format(arch=self.gguf_writer.arch)
            self.gguf_writer.kv_data[0].pop(key, None)
            if width := shared_expert_width(self.hparams):
                self.gguf_writer.add_expert_shared_feed_forward_length(width)

    out_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    with torch.inference_mode():
        model = TrainonceErnie(model_dir, out_types[out_type], out_file, metadata_override=metadata)
        model.write()
    return out_file


def main(argv: list[str]) -> None:
    if len(argv) != 5 or argv[3] not in OUT_TYPES:
        raise SystemExit(
            "usage: python -m tasks.deploy.gguf_convert LLAMA_CPP_SOURCE HF_DIR OUT_FILE "
            f"{{{','.join(OUT_TYPES)}}} METADATA_JSON"
        )
    convert(Path(argv[0]), Path(argv[1]), Path(argv[2]), argv[3], Path(argv[4]))


if __name__ == "__main__":
    main(sys.argv[1:])
