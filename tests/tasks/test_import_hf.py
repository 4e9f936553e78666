"""Hugging Face import: a tiny randomly initialised transformers ERNIE 4.5 MoE saved to a folder (nothing is
downloaded) becomes a registered supernet that computes what transformers computes; a sub-model extracted
from it leaves as a transformers directory again; what cannot be imported is refused before any weight loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Qwen3MoeConfig,
)

from flows.cli import main
from models.chat_format import ChatTokenizer, Message, chat_format_of
from models.checkpoint import load_model, save_model
from models.extract import extract_subnet
from models.subnet import ElasticSpace, Importance
from registry.models import download_checkpoint
from registry.tracking import store_client
from tasks.deploy.hugging_face import export_hf
from tasks.init_from.import_hf import default_elastic_space
from tasks.init_from.task import import_hf


def test_import_registers_a_supernet_that_computes_what_transformers_computes(
    hf_checkpoint: Path, tmp_path: Path
) -> None:
    workdir = tmp_path / "registry"
    version = import_hf(hf_checkpoint, workdir, pretrain_tokens=15_000_000_000_000)
    assert version.uri == "models:/trainonce-supernet/1"
    tags = store_client(workdir).get_model_version("trainonce-supernet", "1").tags
    assert tags["source"] == f"hf:{hf_checkpoint.resolve()}" and len(tags["files_sha256"]) == 64
    assert tags["architecture"] == "Ernie4_5_MoeForCausalLM"

    downloaded = download_checkpoint(workdir, "trainonce-supernet/1")
    ours = load_model(downloaded.checkpoint_dir).eval()
    assert ElasticSpace.model_validate(downloaded.extra["elastic_space"]) == default_elastic_space(ours.config)
    assert downloaded.extra["pretrain_tokens"] == 15_000_000_000_000
    chat_format = chat_format_of(downloaded.extra)  # the source's own turns, not our role tokens
    assert (chat_format.end_of_turn, chat_format.end_of_text) == ("<|end_of_sentence|>", "</s>")
    hf = AutoModelForCausalLM.from_pretrained(hf_checkpoint).eval()
    tokens = torch.randint(6, 400, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(tokens).logits - hf(tokens).logits).abs().max().item()
    assert diff <= 1e-5

    # extract a sub-model (3 layers, 4 experts, top-1), export it, load it back in transformers
    space = default_elastic_space(ours.config)
    spec = space.smallest(ours.config, Importance.identity(ours.config))
    sub = extract_subnet(ours, spec).eval()
    out = export_hf(save_model(sub, tmp_path / "sub"), downloaded.tokenizer_path, chat_format, tmp_path / "sub-hf")
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    assert back.generation_config.eos_token_id == [404, 402]  # <|end_of_sentence|>, </s>
    messages = [Message(role="user", content="Name a king."), Message(role="assistant", content="Lear")]
    rendered = AutoTokenizer.from_pretrained(out).apply_chat_template(
        [m.model_dump() for m in messages], return_dict=False
    )
    assert (
        rendered == ChatTokenizer(Tokenizer.from_file(str(downloaded.tokenizer_path)), chat_format).render(messages)[0]
    )
    with torch.no_grad():
        assert (back(tokens).logits - sub(tokens).logits).abs().max().item() <= 1e-4
        assert (back(tokens).logits - ours(tokens, subnet=spec).logits).abs().max().item() <= 1e-4
    assert back.config.num_hidden_layers == len(spec.layers) < 4


def test_what_cannot_be_imported_is_refused_before_anything_is_registered(
    hf_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workdir = tmp_path / "registry"

    def refused(folder: Path, message: str, *extra: str) -> None:
        with pytest.raises(SystemExit, match=message):
            main(["import-hf", str(folder), "--workdir", str(workdir), *extra])

    qwen = tmp_path / "qwen"
    qwen.mkdir()
    (qwen / "config.json").write_text(json.dumps(Qwen3MoeConfig(num_hidden_layers=2).to_dict()))
    refused(qwen, "model_type: expected 'ernie4_5_moe', got 'qwen3_moe'")

    wrong_shape = tmp_path / "wrong-shape"
    shutil.copytree(hf_checkpoint, wrong_shape)
    config = json.loads((wrong_shape / "config.json").read_text())
    (wrong_shape / "config.json").write_text(json.dumps({**config, "moe_intermediate_size": 48}))
    refused(
        wrong_shape,
        r"weights do not match config.json: .*mlp.experts.gate_up_proj: \(8, 64, 64\) in the files, "
        r"\(8, 96, 64\) in config.json",
    )

    refused(hf_checkpoint, "elastic: .*", "--depths", "2,9")
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(hf_checkpoint, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    refused(no_tokenizer, "no tokenizer.json")
    assert not (workdir / "mlflow.db").exists() or store_client(workdir).search_registered_models() == []

    main(["import-hf", str(hf_checkpoint), "--workdir", str(workdir), "--depths", "2,4", "--top-ks", "1"])
    assert "-> models:/trainonce-supernet/1" in capsys.readouterr().out
    extra = download_checkpoint(workdir, "trainonce-supernet/1").extra["elastic_space"]
    assert (extra["depths"], extra["top_ks"]) == ([2, 4], [1])


def test_init_from_imports_once_and_hands_later_stages_the_sources_shape_and_tokenizer(
    hf_checkpoint: Path, tmp_path: Path
) -> None:
    from pydantic import ValidationError

    from tasks.init_from.task import adapt_config, resolve_init_source
    from tasks.pipeline_config import load_pipeline_config

    workdir = tmp_path / "registry"
    first = resolve_init_source(f"hf:{hf_checkpoint}", workdir)
    assert first == "models:/trainonce-supernet/1"
    assert resolve_init_source(f"hf:{hf_checkpoint}", workdir) == first  # same files hash: no second import
    assert resolve_init_source("trainonce-supernet/1", workdir) == first

    preset = load_pipeline_config("tiny", {"init_from": f"hf:{hf_checkpoint}", "init_steps": 7})
    adapted = adapt_config(preset, first, workdir)
    source = download_checkpoint(workdir, first)
    assert adapted.pretrain.model == load_model(source.checkpoint_dir).config != preset.pretrain.model
    assert adapted.pretrain.elastic == ElasticSpace.model_validate(source.extra["elastic_space"])
    assert adapted.data.vocab_size == 408 and adapted.data.tokenizer_file == str(source.tokenizer_path)
    assert adapted.data.chat_format == chat_format_of(source.extra) != preset.data.chat_format
    assert (adapted.pretrain.max_steps, adapted.pretrain.warm_start) == (7, "never")
    with pytest.raises(ValidationError, match="init_from"):
        load_pipeline_config("tiny", {"init_from": "not a reference"})
    with pytest.raises(ValidationError, match="pretrain.optim.warmup_steps=5 must be < init_steps=3"):
        load_pipeline_config("tiny", {"init_from": "trainonce-supernet/1", "init_steps": 3})
    with pytest.raises(FileNotFoundError, match="init_from: .* is not a folder"):
        resolve_init_source(f"hf:{tmp_path / 'missing'}", workdir)
