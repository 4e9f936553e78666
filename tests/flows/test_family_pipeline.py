"""A family from one pipeline run (`family: [{name: large, ...}]`): the main member and a larger one cut from the
same supernet, each searched under its own budget, aligned, exported and gated into its own registered model,
then served behind one endpoint by `trainonce serve --also`."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.cli import EPHEMERAL_STARTUP_SECONDS, main
from registry.names import CHAT_MODEL
from registry.promotion import CHAMPION, alias_version
from registry.tracking import store_client
from tests.serving.test_server import API_KEY, running_server

LARGE = f"{CHAT_MODEL}-large"


@pytest.mark.slow
def test_one_run_deploys_a_family_that_one_server_serves(
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
        f"data.source={small_corpus}",
        f"data.data_dir={tmp_path / 'data'}",
        "search.max_evaluations=4",
        "deploy.variants=[fp32]",
        "deploy.hugging_face=false",
        "family=[{name: large, active_params_fraction: 0.75}]",
    ]
    with prefect_test_harness(server_startup_timeout=EPHEMERAL_STARTUP_SECONDS):
        main(["pipeline", "--config", "tiny", "--workdir", str(workdir), *(f"--set={o}" for o in overrides)])
    out = capsys.readouterr().out
    assert f"--also {LARGE}" in out and "family member large" in out

    client = store_client(workdir)
    champions = {name: alias_version(workdir, name, CHAMPION) for name in (CHAT_MODEL, LARGE)}
    assert all(champions.values()), champions  # each member passed its own gate (no champion before)
    main_tags = client.get_model_version(CHAT_MODEL, champions[CHAT_MODEL]).tags
    large_tags = client.get_model_version(LARGE, champions[LARGE]).tags
    assert large_tags["family_member"] == "large"
    assert large_tags["parent_supernet"] == main_tags["parent_supernet"]  # cut from the same elastic run
    assert large_tags["subnet"] != main_tags["subnet"]

    with running_server(workdir, "--also", LARGE) as url:
        api = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
        assert {m.id for m in api.models.list().data} == {CHAT_MODEL, LARGE}
        for name in (CHAT_MODEL, LARGE):
            reply = api.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "Repeat: king"}], max_tokens=4
            )
            assert reply.model == name and reply.usage.completion_tokens >= 1
