"""GGUF export: a trainonce checkpoint as the files llama.cpp, Ollama and LM Studio load.

Built only with llama.cpp's own tools (tasks/deploy/llama_cpp.py says where they live): the checkpoint is first written
as a transformers directory (tasks/deploy/hugging_face.py, with our chat template and stop tokens), which llama.cpp's
converter turns into a float GGUF (tasks/deploy/gguf_convert.py); the quantized types are made from the f32 file by
`llama-quantize`, as llama.cpp's documentation does it. The chat template and the end-of-turn and end-of-text
tokens travel in the GGUF metadata, so llama.cpp formats a chat and stops a reply exactly as `trainonce serve`; so
does the metadata's `general.name`, the registered model's name. Ollama takes its chat template from a Modelfile
instead, written beside the files (tasks/deploy/ollama.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from models.chat_format import ChatFormat
from models.image_tokenizer import image_tokenizer_beside
from models.publish import staged_dir
from tasks.deploy.export_folder import GGUF_EXPORT, check_replaceable, mark_export
from tasks.deploy.hugging_face import export_hf
from tasks.deploy.llama_cpp import GGUF_TYPES, LlamaCpp, find_llama_cpp
from tasks.deploy.ollama import MODELFILE, modelfile_text

_CONVERTED = ("f32", "f16", "bf16")  # written by the converter; the rest by llama-quantize from f32


def gguf_name(gguf_type: str) -> str:
    """`model-Q4_K_M.gguf`: llama.cpp's and Ollama's way of naming a file by its type."""
    return f"model-{gguf_type.upper()}.gguf"


def _run(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"{what} failed (exit {done.returncode}):\n{tail}")


def convert_hf_dir(llama_cpp: LlamaCpp, hf_dir: Path, out_file: Path, gguf_type: str, metadata: Path) -> Path:
    """llama.cpp's converter on a transformers directory (in its own process: tasks/deploy/gguf_convert.py), with
    the `general.*` keys of the JSON file `metadata` (llama.cpp's --metadata override)."""
    _run(
        [
            sys.executable,
            "-m",
            "tasks.deploy.gguf_convert",
            str(llama_cpp.source),
            str(hf_dir),
            str(out_file),
            gguf_type,
            str(metadata),
        ],
        f"llama.cpp's convert_hf_to_gguf ({gguf_type})",
    )
    return out_file


def quantize(llama_cpp: LlamaCpp, f32_file: Path, out_file: Path, gguf_type: str) -> Path:
    """llama-quantize from the f32 file (types whose blocks do not fit a tensor fall back as llama.cpp decides)."""
    _run([str(llama_cpp.quantize), str(f32_file), str(out_file), gguf_type.upper()], "llama-quantize")
    return out_file


def export_gguf(
    checkpoint_dir: str | Path,
    tokenizer_path: str | Path,
    chat_format: ChatFormat,
    out_dir: str | Path,
    types: tuple[str, ...] = ("f32", "q8_0", "q4_k_m"),
    hf_dir: str | Path | None = None,
    *,
    name: str,
    version: str | None = None,
) -> dict[str, Path]:
    """Write the checkpoint as one GGUF file per type into `out_dir`, and an Ollama Modelfile whose FROM is the
    first type's file; returns {type: file}.

    `name` and `version`: the registered model the checkpoint is (a version is left out when there is none),
    written as `general.name` (and `general.basename`) and `general.version`, where llama.cpp and the tools that
    list GGUF files show a model's name (the converter would name it after the folder it reads). That folder is a
    transformers directory: `hf_dir` when the checkpoint was already exported as one (export_hf, as the deploy stage
    does for `deploy.hugging_face`), else one written to a scratch folder.

    Unknown types and a missing llama.cpp fail before anything is computed. The folder is assembled beside
    `out_dir` and renamed into place, so a failure never leaves half the files under that name; an earlier GGUF
    export there is replaced, any other non-empty folder is refused (tasks/deploy/export_folder.py)."""
    unknown = [t for t in types if t not in GGUF_TYPES]
    if unknown or not types:
        raise ValueError(f"types: {unknown or 'none'} given; choose one or more of {', '.join(GGUF_TYPES)}")
    out_dir = Path(out_dir)
    check_replaceable(out_dir, GGUF_EXPORT)
    llama_cpp = find_llama_cpp()
    types = tuple(dict.fromkeys(types))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".gguf-hf-") as scratch:
        hf = Path(hf_dir) if hf_dir else export_hf(checkpoint_dir, tokenizer_path, chat_format, Path(scratch) / "hf")
        context_length = json.loads((hf / "config.json").read_text())["max_position_embeddings"]
        modelfile = modelfile_text(gguf_name(types[0]), chat_format, context_length)  # its errors before converting
        metadata = Path(scratch) / "metadata.json"
        named = {"general.name": name, "general.basename": name} | ({"general.version": version} if version else {})
        metadata.write_text(json.dumps(named))
        with staged_dir(out_dir) as staged:
            f32 = convert_hf_dir(llama_cpp, hf, staged / gguf_name("f32"), "f32", metadata)
            for gguf_type in types:
                if gguf_type not in _CONVERTED:
                    quantize(llama_cpp, f32, staged / gguf_name(gguf_type), gguf_type)
                elif gguf_type != "f32":
                    convert_hf_dir(llama_cpp, hf, staged / gguf_name(gguf_type), gguf_type, metadata)
            if "f32" not in types:
                f32.unlink()
            (staged / MODELFILE).write_text(modelfile)
            image_tokenizer = image_tokenizer_beside(hf / "tokenizer.json")
            if image_tokenizer is not None:  # the codes are added tokens to llama.cpp; the codebook draws them
                image_tokenizer.save(staged)
            mark_export(staged, GGUF_EXPORT)
            for written in staged.iterdir():
                written.chmod(0o644)
    return {gguf_type: out_dir / gguf_name(gguf_type) for gguf_type in types}
