"""The tiny-images preset end to end: one Prefect pipeline run pre-trains on text and image-text documents, reports
the routing by modality, aligns on the text and digit tasks, exports packages and a transformers directory that
carry the codebook, and gates a champion that `trainonce serve` uses to answer a question about an image and to draw
a digit asked for."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image
from prefect.testing.utilities import prefect_test_harness

from flows.cli import EPHEMERAL_STARTUP_SECONDS, main
from models.image_tokenizer import ImageTokenizer
from registry.names import CHAT_MODEL, HF_MODEL
from registry.promotion import CHAMPION, alias_version
from registry.tracking import store_client
from tasks.data.images import load_digit_images
from tests.serving.test_server import API_KEY, running_server


@pytest.mark.slow
def test_the_images_preset_runs_to_a_champion_that_reads_and_draws(
    small_corpus: Path,
    short_pipeline: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    workdir = tmp_path / "pipeline"
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    overrides = [
        *short_pipeline,
        "data.vocab_size=530",  # the small corpus's 400 text tokens, then the 130 image tokens
        "pretrain.model.vocab_size=530",
        f"data.source={small_corpus}",
        f"data.data_dir={tmp_path / 'data'}",
        "search.max_evaluations=4",
        "deploy.variants=[fp32]",
    ]
    with prefect_test_harness(server_startup_timeout=EPHEMERAL_STARTUP_SECONDS):
        main(["pipeline", "--config", "tiny-images", "--workdir", str(workdir), *(f"--set={o}" for o in overrides)])
    out = capsys.readouterr().out
    assert "image-text validation loss" in out and "routing by modality: mean purity" in out
    assert "| digit_read |" in out and "| digit_draw |" in out  # aligned and measured on both image tasks

    assert alias_version(workdir, CHAT_MODEL, CHAMPION) is not None
    hf_dirs = list((workdir / "export-hf").iterdir())  # the transformers directory carries the codebook too
    assert len(hf_dirs) == 1 and (hf_dirs[0] / ImageTokenizer.FILE_NAME).is_file()
    hf_run = store_client(workdir).search_model_versions(f"name='{HF_MODEL}'")[0].run_id
    assert ImageTokenizer.FILE_NAME in {f.path for f in store_client(workdir).list_artifacts(hf_run)}

    digits = load_digit_images()
    pixels = np.round(digits.pixels[5] * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    with running_server(workdir) as server:
        api = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        question = [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "Which digit is this?"},
        ]
        reply = api.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": question}], max_tokens=3
        )
        assert reply.usage is not None and reply.usage.prompt_tokens > 10  # the drawing's tokens are in the prompt
        drawn = api.images.generate(model=CHAT_MODEL, prompt="Draw the digit 5.", n=2, size="64x64")
        assert [Image.open(io.BytesIO(base64.b64decode(d.b64_json or ""))).size for d in drawn.data] == [(64, 64)] * 2
