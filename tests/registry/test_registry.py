"""Registry against a real MLflow SQLite store: register with lineage, resolve by version/alias, load back."""

import json
import os
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch

from models.checkpoint import load_model, save_model
from models.config import MoEConfig
from models.moe import ElasticMoE
from registry.models import (
    RegisteredVersion,
    download_model,
    parse_model_ref,
    register_checkpoint,
    resolve_version,
    version_cache_dir,
    version_tags,
)
from registry.names import SUPERNET_MODEL
from registry.tracking import RunLogger, active_store, flatten, store_client, tracking_uri
from tasks.data.config import DataConfig
from tasks.data.corpus import prepare_data


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path):
    workdir = tmp_path_factory.mktemp("registry")
    data = prepare_data(DataConfig(source=str(small_corpus), vocab_size=300, data_dir=workdir / "data"))
    config = MoEConfig(vocab_size=300, d_model=32, n_layers=2, n_experts=4, top_k=2, expert_ffn_dim=16)
    torch.manual_seed(0)
    model = ElasticMoE(config).eval()
    save_model(model, workdir / "ckpt" / "supernet")
    logger = RunLogger(workdir, run_name="pretrain")
    versions = [
        register_checkpoint(
            workdir,
            logger.run_id,
            SUPERNET_MODEL,
            workdir / "ckpt" / "supernet",
            data.tokenizer_path,
            {"elastic_space": {"depths": [1, 2]}},
            {"data_fingerprint": data.fingerprint, "config_hash": f"hash{i}"},
        )
        for i in range(2)
    ]
    return workdir, model, data, versions


def test_register_creates_versions_with_lineage_tags(registered) -> None:
    workdir, _, data, versions = registered
    assert [v.version for v in versions] == ["1", "2"]
    tags = version_tags(workdir, versions[1])
    assert tags["data_fingerprint"] == data.fingerprint and tags["config_hash"] == "hash1"
    assert (Path(workdir) / "mlflow.db").is_file()


def test_resolve_by_version_latest_and_alias(registered) -> None:
    workdir, _, _, versions = registered
    client = store_client(workdir)
    client.set_registered_model_alias(SUPERNET_MODEL, "champion", "1")
    assert resolve_version(workdir, f"{SUPERNET_MODEL}@champion").version == "1"
    assert resolve_version(workdir, f"models:/{SUPERNET_MODEL}/2").version == "2"
    assert resolve_version(workdir, f"{SUPERNET_MODEL}/latest").version == "2"
    with pytest.raises(LookupError, match="nope"):
        resolve_version(workdir, f"{SUPERNET_MODEL}@nope")
    with pytest.raises(ValueError, match="expected NAME@ALIAS"):
        parse_model_ref("not a ref!")


def test_download_gives_local_weights_that_load(registered, tmp_path: Path) -> None:
    workdir, model, _, _ = registered
    local = download_model(workdir, f"{SUPERNET_MODEL}/1", tmp_path / "dl")
    loaded = load_model(local / "artifacts" / "supernet")
    tokens = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    assert (local / "artifacts" / "tokenizer.json").is_file()
    assert json.loads((local / "artifacts" / "supernet_extra.json").read_text())["elastic_space"]["depths"] == [1, 2]


def test_pyfunc_scores_text_under_full_and_sub_models(registered) -> None:
    workdir, _, _, _ = registered
    with active_store(workdir):
        scorer = mlflow.pyfunc.load_model(f"models:/{SUPERNET_MODEL}/1")
    small = '{"layers": [1], "experts": [[0, 1]], "top_k": 1}'
    out = scorer.predict(pd.DataFrame({"text": ["To be, or not to be"] * 2, "subnet": ["", small]}))
    assert list(out.columns) == ["nll", "tokens"]
    assert out["nll"].between(1.0, 20.0).all() and out["nll"][0] != out["nll"][1]


def test_flatten_nested_params() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x"}) == {"a.b": "1", "a.c.d": "[1, 2]", "e": "x"}


def test_active_store_leaves_no_global_tracking_uri_behind(tmp_path: Path) -> None:
    before = os.environ.get("MLFLOW_TRACKING_URI")
    with active_store(tmp_path) as uri:
        assert os.environ["MLFLOW_TRACKING_URI"] == uri == tracking_uri(tmp_path)
    assert os.environ.get("MLFLOW_TRACKING_URI") == before


def test_ui_links_point_at_the_store_ui(monkeypatch: pytest.MonkeyPatch) -> None:
    from registry.models import version_link

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert version_link("models:/trainonce-chat/3") == (
        "[trainonce-chat/3](http://127.0.0.1:5000/#/models/trainonce-chat/versions/3)"
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000/")
    assert version_link("trainonce-subnet/1").endswith(
        "(http://mlflow.internal:5000/#/models/trainonce-subnet/versions/1)"
    )
    monkeypatch.setenv("MLFLOW_UI_URL", "https://ml.example.org/mlflow/")  # a UI behind a proxy
    assert version_link("trainonce-subnet/1").startswith("[trainonce-subnet/1](https://ml.example.org/mlflow/#/")


def test_the_ui_hint_names_the_store_of_the_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from registry.tracking import ui_hint

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_UI_URL", raising=False)
    assert f"mlflow ui --backend-store-uri sqlite:///{(tmp_path / 'mlflow.db').resolve()}" in ui_hint(tmp_path)


def test_downloaded_versions_are_cached_per_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A workdir used with the embedded store, then pointed at a tracking server: version 1 there is another model,
    and must not be served from the files cached for the first store's version 1."""
    version = RegisteredVersion("trainonce-subnet", "1", "run")
    embedded = version_cache_dir(tmp_path / "cache", tmp_path, version)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    server = version_cache_dir(tmp_path / "cache", tmp_path, version)
    assert server != embedded and server.parts[-2:] == embedded.parts[-2:] == ("trainonce-subnet", "1")
