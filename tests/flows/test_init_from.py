"""The pipeline from a pretrained transformers checkpoint (`init_from: hf:<dir>`, 3 steps of continued
pre-training): the import and its continuation become supernets, and the model's own chat format (ERNIE-style
turns, not our role tokens) carries through SFT, DPO, the ONNX package the server loads and the Hugging Face
export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from flows.cli import EPHEMERAL_STARTUP_SECONDS, main
from models.chat_format import Message, chat_format_of
from registry.models import download_chat_package, download_checkpoint
from registry.tracking import store_client
from serving.engine import ChatPackage


@pytest.mark.slow
def test_pipeline_from_an_imported_checkpoint_keeps_its_chat_format_to_serving(
    hf_checkpoint: Path,
    small_corpus: Path,
    short_pipeline: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    workdir = tmp_path / "pipeline"
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    overrides = [
        *short_pipeline,
        f"data.source={small_corpus}",
        f"data.data_dir={tmp_path / 'data'}",
        f"init_from=hf:{hf_checkpoint}",
        "init_steps=3",
        "search.max_evaluations=4",
        "sft.steps=8",
        "sft.task_mix.train_per_task=8",
        "sft.task_mix.test_per_task=2",
        "sft.max_new_tokens=8",
        "dpo.steps=2",
        "dpo.max_pairs=8",
        "dpo.max_new_tokens=8",
        "deploy.variants=[fp32]",
        "deploy.hugging_face=true",
    ]
    # Prefect's own test server, stopped (and its logs flushed) when the run ends
    with prefect_test_harness(server_startup_timeout=EPHEMERAL_STARTUP_SECONDS):
        main(["pipeline", "--config", "tiny", "--workdir", str(workdir), *(f"--set={o}" for o in overrides)])
    out = capsys.readouterr().out
    assert "supernet registered as models:/trainonce-supernet/2" in out

    client = store_client(workdir)
    imported = download_checkpoint(workdir, "trainonce-supernet/1")
    ernie = chat_format_of(imported.extra)
    assert (ernie.end_of_turn, ernie.end_of_text) == ("<|end_of_sentence|>", "</s>")
    continued = download_checkpoint(workdir, "trainonce-supernet/2")  # trained on the source's tokenizer and format
    assert client.get_model_version("trainonce-supernet", "2").tags["warm_started_from"] == imported.version.uri
    assert chat_format_of(continued.extra) == ernie and continued.extra["pretrain_tokens"] > 0
    subnet = client.get_model_version("trainonce-subnet", "1").tags
    assert subnet["parent_model"] == "trainonce-supernet/2"
    dpo = download_checkpoint(workdir, "trainonce-chat-torch/2")
    assert chat_format_of(dpo.extra) == ernie  # SFT and DPO trained on the model's own turns

    champion = download_chat_package(workdir, "trainonce-chat@champion")
    config = json.loads((champion / "generation_config.json").read_text())
    tokenizer = Tokenizer.from_file(str(champion / "tokenizer.json"))
    assert config["eos_token_id"] == tokenizer.token_to_id("<|end_of_sentence|>") == 404
    package = ChatPackage(champion)
    messages = [Message(role="user", content="Repeat: king queen")]
    prompt = package.chat_prompt(messages)
    text = tokenizer.decode(prompt, skip_special_tokens=False)
    assert text == "<s><|begin_of_sentence|>User: Repeat: king queen\nAssistant: "
    completion = package.complete(prompt, 4)  # the server's engine generates from it
    assert completion.prompt_tokens == len(prompt) and completion.completion_tokens >= 1

    assert client.get_model_version("trainonce-chat-hf", "1").tags["stage"] == "export-hf"
    (hf_dir,) = (workdir / "export-hf").iterdir()
    hf_tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    rendered = hf_tokenizer.apply_chat_template(
        [m.model_dump() for m in messages], add_generation_prompt=True, return_dict=False
    )
    assert rendered == prompt
