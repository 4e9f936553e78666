"""GGUF export: llama.cpp (its Python bindings and its own server) loads what `export_gguf` writes and computes
what we compute: logits on validation windows, greedy tokens, tokenization, and the chat reply `trainonce serve`
gives, formatted by the chat template that travelled in the GGUF metadata and stopped at our end-of-turn token.

The tests that run llama.cpp need it built: `make test-llama-cpp` builds it and runs them, as `.ci/run` does; the
others are in the default suite."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
from pydantic import ValidationError

from models.chat_format import Message
from models.checkpoint import save_model
from models.generate import greedy_generate
from models.moe import ElasticMoE
from registry.names import CHAT_MODEL
from registry.promotion import promote
from tasks.data.corpus import PreparedData
from tasks.deploy.gguf import export_gguf
from tasks.deploy.gguf_convert import byte_level_bpe_problem, end_of_turn_id, shared_expert_width
from tasks.deploy.hugging_face import export_hf
from tasks.deploy.llama_cpp import LlamaCpp, LlamaCppMissing, check_gguf_request, default_home
from tasks.pipeline_config import load_pipeline_config
from tests.conftest import image_model
from tests.serving.test_server import API_KEY, free_port, running_server, serving

MESSAGES = [
    Message(role="system", content="Answer briefly."),
    Message(role="user", content="Copy: king queen crown"),
]
_built = pytest.mark.skipif(
    bool(LlamaCpp(default_home()).missing()), reason="llama.cpp is not built: run `make llama-cpp`"
)


def needs_llama_cpp(test):
    """Runs with `make test-llama-cpp` (which builds llama.cpp first), not with `make test` or `make test-slow`."""
    return pytest.mark.llama_cpp(pytest.mark.slow(_built(test)))


# ---------------------------------------------------------------------------------------------------------
# Without llama.cpp: what the converter is told, and what is refused before any compute.


def test_our_tokenizer_is_gpt2_byte_level_bpe_and_other_tokenizers_are_named(small_data: PreparedData) -> None:
    ours = json.loads(Path(small_data.tokenizer_path).read_text())
    assert byte_level_bpe_problem(ours) is None
    assert "Metaspace" in byte_level_bpe_problem({**ours, "pre_tokenizer": {"type": "Metaspace"}})
    assert "normalizer" in byte_level_bpe_problem({**ours, "normalizer": {"type": "NFC"}})
    assert "'Unigram'" in byte_level_bpe_problem({**ours, "model": {"type": "Unigram"}})
    prefixed = {**ours, "pre_tokenizer": {**ours["pre_tokenizer"], "add_prefix_space": True}}
    assert "prefix space" in byte_level_bpe_problem(prefixed)


def test_the_converter_gets_transformers_shared_expert_width_and_our_end_of_turn(
    tmp_path: Path, chat_model: ElasticMoE, small_data: PreparedData
) -> None:
    exported = export_hf(
        save_model(chat_model, tmp_path / "ckpt"), small_data.tokenizer_path, small_data.chat_format, tmp_path / "hf"
    )
    hparams = json.loads((exported / "config.json").read_text())
    config = chat_model.config
    assert shared_expert_width(hparams) == config.expert_ffn_dim * config.n_shared_experts
    ids = small_data.chat_format.token_ids(small_data.tokenizer())
    assert end_of_turn_id(exported, hparams["eos_token_id"]) == ids["end_of_turn"] != ids["end_of_text"]


def test_gguf_asked_without_llama_cpp_is_refused_naming_the_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chat_model: ElasticMoE, small_data: PreparedData
) -> None:
    monkeypatch.setenv("TRAINONCE_LLAMA_CPP", str(tmp_path / "nothing-here"))
    with pytest.raises(LlamaCppMissing, match=r"deploy\.gguf: q4_k_m asked for.*make llama-cpp"):
        check_gguf_request("deploy.gguf", ("q4_k_m",))
    check_gguf_request("deploy.gguf", ())  # nothing asked: nothing needed
    checkpoint = save_model(chat_model, tmp_path / "ckpt")
    out = tmp_path / "gguf"
    with pytest.raises(LlamaCppMissing, match="make llama-cpp"):
        export_gguf(checkpoint, small_data.tokenizer_path, small_data.chat_format, out, ("f32",), name="m")
    with pytest.raises(ValueError, match=r"types: \['q3'\].*q4_k_m, q4_0, q2_k"):
        export_gguf(checkpoint, small_data.tokenizer_path, small_data.chat_format, out, ("q3",), name="m")
    assert not out.exists()
    with pytest.raises(ValidationError, match=r"deploy\.gguf\.0"):
        load_pipeline_config("tiny", {"deploy": {"gguf": ["q3"]}})


def test_cli_refuses_unknown_types_and_missing_llama_cpp(tmp_path: Path) -> None:
    env = {**os.environ, "TRAINONCE_LLAMA_CPP": str(tmp_path / "nothing-here")}
    command = [
        sys.executable,
        "-m",
        "flows.cli",
        "export-gguf",
        "--workdir",
        str(tmp_path),
        "--out",
        str(tmp_path / "out"),
    ]
    bad_type = subprocess.run([*command, "--types", "f32,q3"], capture_output=True, text=True, env=env)
    assert bad_type.returncode == 2 and "['q3']: choose from f32,f16,bf16,q8_0" in bad_type.stderr
    missing = subprocess.run(command, capture_output=True, text=True, env=env)
    assert missing.returncode == 1 and "export-gguf: --types: f32, q8_0, q4_k_m asked for" in missing.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------
# With llama.cpp.

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_k_m", "q2_k")


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory: pytest.TempPathFactory, chat_model: ElasticMoE, small_data: PreparedData):
    """The chat model registered as `trainonce-chat-torch/1`, then `trainonce export-gguf` on that reference (the
    Modelfile's FROM: f32, the first type)."""
    from flows.cli import main
    from registry.models import register_checkpoint
    from registry.tracking import RunLogger

    folder = tmp_path_factory.mktemp("gguf")
    logger = RunLogger(folder / "registry", run_name="align")
    checkpoint = save_model(chat_model, folder / "dpo")
    register_checkpoint(
        folder / "registry", logger.run_id, "trainonce-chat-torch", checkpoint, small_data.tokenizer_path, {},
        {"stage": "dpo"},
    )  # fmt: skip
    logger.finish()
    main(["export-gguf", "--workdir", str(folder / "registry"), "--model", "trainonce-chat-torch/1",
          "--out", str(folder / "out"), "--types", ",".join(GGUF_TYPES)])  # fmt: skip
    return {gguf_type: folder / "out" / f"model-{gguf_type.upper()}.gguf" for gguf_type in GGUF_TYPES}


@contextmanager
def loaded(path: Path, kv_cache: str = "f32") -> Iterator:
    """llama.cpp on one GGUF file, logits for every position, an f32 KV cache unless told (its default f16 cache
    rounds the keys and values our model keeps in f32)."""
    from llama_cpp import GGML_TYPE_F16, GGML_TYPE_F32, Llama

    cache_type = {"f32": GGML_TYPE_F32, "f16": GGML_TYPE_F16}[kv_cache]
    llm = Llama(
        model_path=str(path), n_ctx=256, n_batch=256, logits_all=True, n_threads=2, verbose=False,
        type_k=cache_type, type_v=cache_type, seed=0,
    )  # fmt: skip
    try:
        yield llm
    finally:
        llm.close()


def llama_logits(llm, tokens: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def validation_windows(data: PreparedData, count: int = 4, length: int = 96) -> list[list[int]]:
    val = data.split("val")
    starts = np.linspace(0, len(val) - length - 1, count).astype(int)
    return [val[s : s + length].tolist() for s in starts]


@needs_llama_cpp
def test_llama_cpp_computes_our_logits_greedy_tokens_and_tokenization(
    gguf_files: dict[str, Path], chat_model: ElasticMoE, small_data: PreparedData
) -> None:
    assert all(path.stat().st_mode & 0o044 == 0o044 for path in gguf_files.values())
    windows = validation_windows(small_data)
    with torch.no_grad():
        ours = [chat_model(torch.tensor([window])).logits[0].numpy() for window in windows]
    assert all(logits.std() > 0.1 for logits in ours)
    with loaded(gguf_files["f32"], kv_cache="f16") as llm:  # llama.cpp's default cache type, for the README's figure
        f16_cache = max(np.abs(o - llama_logits(llm, w)).max() for o, w in zip(ours, windows, strict=True))
    with loaded(gguf_files["f32"]) as llm:
        f32_cache = max(np.abs(o - llama_logits(llm, w)).max() for o, w in zip(ours, windows, strict=True))
        print(f"max |logit difference| vs ours, f32 GGUF: f32 KV cache {f32_cache:.1e}, f16 KV cache {f16_cache:.1e}")
        assert f32_cache <= 1e-3 and 10 * f32_cache < f16_cache <= 5e-2
        prompt = windows[0][:16]
        expected = greedy_generate(chat_model, torch.tensor([prompt]), 24)[0, len(prompt) :].tolist()
        llm.reset()
        generated = []
        for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            generated.append(token)
            if len(generated) == len(expected):
                break
        assert generated == expected

        tokenizer = small_data.tokenizer()
        text = small_data.documents()[0][:4000]
        chat, _ = small_data.chat_tokenizer().render([*MESSAGES, Message(role="assistant", content="king queen")])
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text).ids
        rendered = tokenizer.decode(chat, skip_special_tokens=False)
        assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == chat


@needs_llama_cpp
def test_the_chat_template_stop_tokens_and_registered_name_travel_in_the_metadata(
    gguf_files: dict[str, Path], small_data: PreparedData
) -> None:
    import llama_cpp

    ids = small_data.chat_format.token_ids(small_data.tokenizer())
    with loaded(gguf_files["q8_0"]) as llm:
        assert llm.metadata["tokenizer.chat_template"] == small_data.chat_format.template
        assert llm.metadata["general.architecture"] == "ernie4_5-moe"
        assert llm.metadata["general.name"] == llm.metadata["general.basename"] == "trainonce-chat-torch"
        assert llm.metadata["general.version"] == "1"
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        assert llama_cpp.llama_vocab_eot(vocab) == ids["end_of_turn"]
        assert llama_cpp.llama_vocab_eos(vocab) == ids["end_of_text"]
        assert llama_cpp.llama_vocab_is_eog(vocab, ids["end_of_turn"])
        assert not llama_cpp.llama_vocab_get_add_bos(vocab)
    modelfile = (gguf_files["f32"].parent / "Modelfile").read_text().splitlines()
    assert "FROM ./model-F32.gguf" in modelfile and 'PARAMETER stop "<|end|>"' in modelfile


@needs_llama_cpp
def test_quantized_files_are_smaller_and_keep_perplexity_close(
    gguf_files: dict[str, Path], small_data: PreparedData
) -> None:
    windows = validation_windows(small_data)

    def perplexity(path: Path) -> float:
        with loaded(path) as llm:
            losses = []
            for window in windows:
                logits = torch.from_numpy(llama_logits(llm, window))
                losses.append(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(window[1:])).item())
        return math.exp(float(np.mean(losses)))

    reference = perplexity(gguf_files["f32"])
    sizes = {t: gguf_files[t].stat().st_size for t in GGUF_TYPES}
    # q2_k: K-quant rows are 256 wide; tensors this model's 32-wide rows cannot hold fall back to q4_0's blocks
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"] > sizes["q4_0"] >= sizes["q2_k"]
    for gguf_type in GGUF_TYPES[1:]:
        ratio = perplexity(gguf_files[gguf_type]) / reference
        assert 0.9 < ratio < 1.25, (gguf_type, ratio)


@contextmanager
def llama_server(path: Path) -> Iterator[str]:
    """llama.cpp's own OpenAI-compatible server on one GGUF file, with the GGUF's Jinja chat template."""
    port = free_port()
    server = LlamaCpp(default_home()).server
    process = subprocess.Popen(
        [str(server), "-m", str(path), "--port", str(port), "--host", "127.0.0.1", "--jinja", "-t", "1",
         "-c", "512", "-np", "1", "-ctk", "f32", "-ctv", "f32", "--api-key", API_KEY],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    with serving(process, f"http://127.0.0.1:{port}") as url:
        yield url


@needs_llama_cpp
def test_llama_server_chat_gives_trainonce_serve_reply(gguf_files: dict[str, Path], make_chat_registry) -> None:
    """The same greedy reply, ended at the end-of-turn token, from llama.cpp's chat endpoint on the f32 GGUF and
    ours on the fp32 ONNX package of the same model, both through the `openai` client. llama-server runs with an
    f32 KV cache (`-ctk f32 -ctv f32`): its default f16 cache moves logits by ~1e-2 (measured below), enough to
    flip a near-tie. A served INT4 champion's replies differ from these by quantization."""
    workdir = make_chat_registry()
    promote(workdir, CHAT_MODEL, "1")  # version 1: the fp32 package
    messages = [{"role": m.role, "content": m.content} for m in MESSAGES]
    replies = []
    for server in (running_server(workdir), llama_server(gguf_files["f32"])):
        with server as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY)
            response = client.chat.completions.create(model=CHAT_MODEL, messages=messages, temperature=0, max_tokens=40)
            choice = response.choices[0]
            replies.append((choice.message.content, choice.finish_reason, response.usage.completion_tokens))
    assert replies[0] == replies[1]
    assert replies[0][0]


@needs_llama_cpp
def test_the_deploy_task_logs_the_files_as_artifacts_with_the_lineage(
    tmp_path: Path, chat_model: ElasticMoE, small_data: PreparedData
) -> None:
    from registry.tracking import store_client
    from tasks.deploy.task import export_gguf_task

    checkpoint = save_model(chat_model, tmp_path / "checkpoint")
    lineage = {"parent_model": "models:/trainonce-chat-torch/3", "parent_supernet": "models:/trainonce-supernet/1"}
    result = export_gguf_task.fn(str(checkpoint), str(small_data.directory), str(tmp_path), lineage, ("q8_0",))
    client = store_client(tmp_path)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and result.artifact_uri == f"runs:/{result.run_id}/gguf"
    assert {k: run.data.tags[k] for k in lineage} == lineage and run.data.tags["stage"] == "export-gguf"
    artifacts = [a.path for a in client.list_artifacts(result.run_id, "gguf")]
    assert artifacts == ["gguf/Modelfile", "gguf/model-Q8_0.gguf", "gguf/trainonce-export.json"]
    modelfile = (Path(result.files["q8_0"]).parent / "Modelfile").read_text()
    assert "FROM ./model-Q8_0.gguf" in modelfile.splitlines()
    assert run.data.metrics["size_mb/q8_0"] == pytest.approx(Path(result.files["q8_0"]).stat().st_size / 1e6)

    # With the model's transformers directory already exported (deploy.hugging_face), the same bytes come out of it;
    # and it is that directory which is converted: a comment added to its chat template reaches the GGUF.
    hf_dir = export_hf(checkpoint, small_data.tokenizer_path, small_data.chat_format, tmp_path / "hf")
    reused = export_gguf_task.fn(
        str(checkpoint), str(small_data.directory), str(tmp_path), lineage, ("q8_0",), str(hf_dir)
    )
    assert Path(reused.files["q8_0"]).read_bytes() == Path(result.files["q8_0"]).read_bytes()
    with (hf_dir / "chat_template.jinja").open("a") as template:
        template.write("{# read from the given directory #}")
    marked = export_gguf_task.fn(
        str(checkpoint), str(small_data.directory), str(tmp_path), lineage, ("q8_0",), str(hf_dir)
    )
    assert b"{# read from the given directory #}" in Path(marked.files["q8_0"]).read_bytes()

    (tmp_path / "models").mkdir()  # a folder of the user's own GGUF files: refused, not replaced
    (tmp_path / "models" / "theirs.gguf").write_bytes(b"GGUF")
    with pytest.raises(FileExistsError, match="not an earlier trainonce gguf export"):
        export_gguf(
            checkpoint, small_data.tokenizer_path, small_data.chat_format, tmp_path / "models", ("f32",), name="m"
        )
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["theirs.gguf"]


@needs_llama_cpp
def test_a_model_with_images_leaves_as_gguf_with_its_codebook(tmp_path: Path, image_data: PreparedData) -> None:
    """The image codes are added tokens to llama.cpp: it tokenizes a drawing into our ids and computes our logits on
    a prompt holding one; the codebook goes beside the GGUF files, so a drawing can be made and read outside."""
    from models.image_tokenizer import ImageTokenizer

    model = image_model()
    checkpoint = save_model(model, tmp_path / "checkpoint")
    files = export_gguf(checkpoint, image_data.tokenizer_path, image_data.chat_format, tmp_path / "gguf", ("f32",),
                        name="digits")  # fmt: skip
    images = image_data.images
    assert images is not None and ImageTokenizer.load(tmp_path / "gguf") == images.image_tokenizer
    codes = images.image_tokenizer.encode(images.split("held_out").pixels[2])
    text = f"{images.image_tokenizer.text(codes)} Which digit is this?"
    ids = image_data.tokenizer().encode(text).ids
    assert ids[1:9] == [402 + code for code in codes]
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    with loaded(files["f32"]) as llm:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
        assert np.abs(llama_logits(llm, ids) - ours).max() <= 1e-3
