"""Hugging Face export: transformers loads the directory offline and computes what we compute (logits, greedy
tokens), and its chat template renders the token ids SFT trained on; so does the last transformers 4.x, in a
virtual environment of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.chat_format import ChatFormat, Message
from models.checkpoint import save_model
from models.extract import extract_subnet
from models.generate import greedy_generate
from models.moe import ElasticMoE
from models.subnet import SubnetSpec
from tasks.data.corpus import PreparedData
from tasks.deploy.hugging_face import export_hf
from tests.conftest import image_model
from tests.tool_venvs import tool_venv

MESSAGES = [
    Message(role="system", content="Answer briefly."),
    Message(role="user", content="Copy: king queen crown"),
    Message(role="assistant", content="king queen crown"),
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, chat_model: ElasticMoE, small_data: PreparedData) -> Path:
    folder = tmp_path_factory.mktemp("hf")
    checkpoint = save_model(chat_model, folder / "checkpoint")
    return export_hf(checkpoint, small_data.tokenizer_path, small_data.chat_format, folder / "export")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_transformers_computes_our_logits_and_greedy_tokens(exported: Path, chat_model: ElasticMoE) -> None:
    assert all(path.stat().st_mode & 0o044 == 0o044 for path in exported.iterdir())  # readable by a serving user
    hf = AutoModelForCausalLM.from_pretrained(exported).eval()
    assert type(hf).__name__ == "Ernie4_5_MoeForCausalLM" and hf.dtype == torch.float32
    tokens = torch.randint(6, chat_model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = chat_model(tokens).logits, hf(tokens).logits
    assert theirs.std() > 0.1
    assert (ours - theirs).abs().max().item() <= 1e-4

    prompt = tokens[:1, :12]
    with torch.no_grad():
        generated = hf.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=1)
    assert torch.equal(generated, greedy_generate(chat_model, prompt, 20))


def test_chat_template_renders_the_sft_token_ids_and_generation_stops_at_end_of_turn(
    exported: Path, chat_model: ElasticMoE, small_data: PreparedData
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(exported)
    ours = small_data.chat_tokenizer()
    as_dicts = [m.model_dump() for m in MESSAGES]
    assert tokenizer.apply_chat_template(as_dicts, tokenize=True, return_dict=False) == ours.render(MESSAGES)[0]
    prompt_ids, _ = ours.render(MESSAGES[:2], add_generation_prompt=True)
    rendered = tokenizer.apply_chat_template(as_dicts[:2], add_generation_prompt=True, return_dict=False)
    assert rendered == prompt_ids
    with pytest.raises(Exception, match="role must be one of system, user, assistant; got tool"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], return_dict=False)

    hf = AutoModelForCausalLM.from_pretrained(exported).eval()
    prompt = torch.tensor([prompt_ids])
    end = ours.end_of_turn_id
    with torch.no_grad():
        reply = hf.generate(prompt, max_new_tokens=16, do_sample=False)  # generation_config: stop at <|end|>
    expected = greedy_generate(chat_model, prompt, 16, eos_id=end)
    assert reply[0].tolist() == expected[0, : reply.shape[1]].tolist()
    assert tokenizer.decode(reply[0, len(prompt_ids) :], skip_special_tokens=True) == ours.decode(
        [t for t in expected[0, len(prompt_ids) :].tolist() if t != end]
    )


# The last 4.x on the package index; ERNIE 4.5 MoE is in transformers from 4.54. torch pinned: the CPU build.
TRANSFORMERS_4 = ("torch==2.13.0", "transformers==4.57.6")
PROBE = Path(__file__).with_name("transformers_probe.py")


@pytest.mark.parametrize(
    "transformers",
    [
        pytest.param("4.57.6", marks=pytest.mark.slow, id="transformers-4.57.6"),
        pytest.param("installed", id="transformers-installed"),
    ],
)
def test_both_transformers_majors_load_the_same_model_and_tokenizer(
    transformers: str, exported: Path, chat_model: ElasticMoE, small_data: PreparedData, tmp_path: Path
) -> None:
    """A user's code with only transformers (tests/tasks/transformers_probe.py), in a process of its own: 4.x reads
    the rotary base and the tokenizer files in their 4.x form, 5.x in its own, and both compute our model."""
    python = sys.executable
    if transformers != "installed":
        python = str(tool_venv(f"transformers-{transformers}", TRANSFORMERS_4) / "bin" / "python")
    generator = torch.Generator().manual_seed(4)
    tokens = torch.randint(6, chat_model.config.vocab_size, (3, 40), generator=generator)
    text = small_data.documents()[0][:2000]
    request = {"tokens": tokens.tolist(), "prompt": tokens[0, :12].tolist(), "new_tokens": 20, "text": text}
    request["messages"] = [m.model_dump() for m in MESSAGES]
    (tmp_path / "request.json").write_text(json.dumps(request))
    done = subprocess.run(
        [python, str(PROBE), str(exported), str(tmp_path / "request.json"), str(tmp_path / "out.json")],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = json.loads((tmp_path / "out.json").read_text())
    major = transformers.split(".")[0] if transformers != "installed" else "5"
    assert theirs["transformers"].startswith(major + ".") and theirs["model_class"] == "Ernie4_5_MoeForCausalLM"

    with torch.no_grad():
        ours = chat_model(tokens).logits
    assert ours.std() > 0.1
    assert (ours - torch.tensor(theirs["logits"])).abs().max().item() <= 1e-4
    prompt = tokens[:1, :12]
    assert theirs["greedy"] == greedy_generate(chat_model, prompt, 20)[0].tolist()

    chat = small_data.chat_tokenizer()
    assert theirs["chat_text"] == small_data.chat_format.render(MESSAGES)
    assert theirs["chat_ids"] == chat.render(MESSAGES)[0]
    prompt_ids, _ = chat.render(MESSAGES[:-1], add_generation_prompt=True)
    assert theirs["prompt_ids"] == prompt_ids
    expected = greedy_generate(chat_model, torch.tensor([prompt_ids]), 20, eos_id=chat.end_of_turn_id)
    expected_reply = expected[0, len(prompt_ids) :].tolist()
    assert theirs["reply_ids"] == expected_reply[: len(theirs["reply_ids"])]
    assert theirs["reply_text"] == chat.decode([t for t in expected_reply if t != chat.end_of_turn_id])
    assert theirs["encoded"] == small_data.tokenizer().encode(text).ids


def test_config_json_carries_both_majors_names_for_the_same_values(exported: Path, chat_model: ElasticMoE) -> None:
    config = json.loads((exported / "config.json").read_text())
    theta = chat_model.config.rope_theta
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == theta != 500000.0  # 4.x's default
    tokens = json.loads((exported / "tokenizer_config.json").read_text())
    assert tokens["tokenizer_class"] == "PreTrainedTokenizerFast" and "extra_special_tokens" not in tokens
    assert tokens["additional_special_tokens"] == ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


def test_an_extracted_sub_model_exports_and_one_hf_cannot_express_is_refused(
    tmp_path: Path, chat_model: ElasticMoE, small_data: PreparedData
) -> None:
    uniform = extract_subnet(chat_model, SubnetSpec(layers=(1,), experts=((0, 2),), top_k=1)).eval()
    checkpoint = save_model(uniform, tmp_path / "uniform")
    out = export_hf(checkpoint, small_data.tokenizer_path, ChatFormat(), tmp_path / "uniform-hf")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(6, 400, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf(tokens).logits - uniform(tokens).logits).abs().max().item() <= 1e-4
    assert hf.config.num_hidden_layers == 1 and hf.config.moe_num_experts == 2 and hf.config.moe_k == 1

    ragged = extract_subnet(chat_model, SubnetSpec(layers=(0, 1), experts=((0, 1, 2), (0, 3)), top_k=1))
    with pytest.raises(ValueError, match="layer 1 has 2 experts but layer 0 has 3"):
        checkpoint = save_model(ragged, tmp_path / "ragged")
        export_hf(checkpoint, small_data.tokenizer_path, ChatFormat(), tmp_path / "ragged-hf")
    assert {p.name for p in tmp_path.iterdir()} == {"uniform", "uniform-hf", "ragged"}  # nothing staged is left


def test_an_export_replaces_only_its_own_earlier_export(
    tmp_path: Path, chat_model: ElasticMoE, small_data: PreparedData
) -> None:
    """A downloaded transformers model has a config.json like ours: exporting over it must refuse, not delete it;
    exporting over our own earlier export replaces it."""
    checkpoint = save_model(chat_model, tmp_path / "checkpoint")
    downloaded = tmp_path / "downloaded"
    downloaded.mkdir()
    (downloaded / "config.json").write_text('{"architectures": ["Ernie4_5_MoeForCausalLM"]}')
    with pytest.raises(FileExistsError, match="not an earlier trainonce hugging-face export"):
        export_hf(checkpoint, small_data.tokenizer_path, small_data.chat_format, downloaded)
    assert [p.name for p in downloaded.iterdir()] == ["config.json"]

    ours = export_hf(checkpoint, small_data.tokenizer_path, small_data.chat_format, tmp_path / "ours")
    (ours / "stale.txt").write_text("from the first export")
    export_hf(checkpoint, small_data.tokenizer_path, small_data.chat_format, ours)
    assert not (ours / "stale.txt").exists() and (ours / "model.safetensors").is_file()


def test_cli_exports_a_registered_model_by_reference(
    tmp_path: Path, chat_model: ElasticMoE, small_data: PreparedData, capsys: pytest.CaptureFixture[str]
) -> None:
    from flows.cli import main
    from registry.models import register_checkpoint
    from registry.tracking import RunLogger

    workdir = tmp_path / "registry"
    logger = RunLogger(workdir, run_name="align")
    checkpoint = save_model(chat_model, tmp_path / "dpo")
    register_checkpoint(
        workdir, logger.run_id, "trainonce-chat-torch", checkpoint, small_data.tokenizer_path, {}, {"stage": "dpo"}
    )
    logger.finish()
    main(["export-hf", "--workdir", str(workdir), "--model", "trainonce-chat-torch/1", "--out", str(tmp_path / "hf")])
    assert "models:/trainonce-chat-torch/1 -> " in capsys.readouterr().out
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(6, 400, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (hf(tokens).logits - chat_model(tokens).logits).abs().max().item() <= 1e-4

    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "notes.txt").write_text("mine")
    with pytest.raises(
        SystemExit, match="export-hf: out: .*occupied is not empty and not an earlier trainonce hugging-face export"
    ):
        main(
            [
                "export-hf",
                "--workdir",
                str(workdir),
                "--model",
                "trainonce-chat-torch/1",
                "--out",
                str(tmp_path / "occupied"),
            ]
        )
    with pytest.raises(SystemExit, match="export-hf: .*trainonce-chat"):
        main(["export-hf", "--workdir", str(workdir), "--out", str(tmp_path / "none")])  # no champion registered
    assert (tmp_path / "occupied" / "notes.txt").read_text() == "mine"


def test_a_model_with_images_exports_with_its_codebook_and_reads_images_as_we_do(
    tmp_path: Path, image_data: PreparedData
) -> None:
    """The image codes are ordinary tokens of the vocabulary, so transformers' ERNIE computes our logits on a prompt
    with a drawing in it; the codebook travels beside the tokenizer, so the drawing can be made and read outside."""
    from models.image_tokenizer import ImageTokenizer

    model = image_model()
    checkpoint = save_model(model, tmp_path / "checkpoint")
    exported = export_hf(checkpoint, image_data.tokenizer_path, image_data.chat_format, tmp_path / "export")
    images = image_data.images
    assert images is not None and ImageTokenizer.load(exported) == images.image_tokenizer
    codes = images.image_tokenizer.encode(images.split("held_out").pixels[0])
    tokenizer = AutoTokenizer.from_pretrained(exported)
    ids = tokenizer(f"{images.image_tokenizer.text(codes)} Which digit is this?", return_tensors="pt").input_ids
    assert ids[0, 1:9].tolist() == [402 + code for code in codes]
    hf = AutoModelForCausalLM.from_pretrained(exported).eval()
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max().item() <= 1e-4
