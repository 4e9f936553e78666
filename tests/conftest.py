"""Shared fixtures: tiny model configs and a small real-text corpus written to a temp folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.config import MoEConfig
from models.moe import ElasticMoE
from tasks.data import DataConfig, PreparedData, builtin_shakespeare_files, prepare_data


@pytest.fixture(scope="session")
def tiny_config() -> MoEConfig:
    """Small but with every architectural feature on: a leading dense layer, shared expert, GQA."""
    return MoEConfig(
        vocab_size=97,
        d_model=32,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        n_experts=6,
        top_k=2,
        expert_ffn_dim=16,
        n_shared_experts=1,
        first_dense_layers=1,
        dense_ffn_dim=48,
        max_seq_len=64,
    )


@pytest.fixture(scope="session")
def tiny_supernet(tiny_config: MoEConfig) -> ElasticMoE:
    """A random supernet with non-zero selection biases, so tests also cover bias-driven expert choice.

    Shared by the session: tests that change it work on a copy.
    """
    torch.manual_seed(0)
    model = ElasticMoE(tiny_config).eval()
    with torch.no_grad():
        for layer in model.layers[tiny_config.first_dense_layers :]:
            layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.05)
    return model


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three real plays as .txt files: enough text for a tokenizer and a few training steps."""
    folder = tmp_path_factory.mktemp("corpus")
    for path in builtin_shakespeare_files()[:3]:
        (folder / path.name).write_text(path.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def small_data(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path) -> PreparedData:
    """The small corpus prepared with a 400-token BPE vocabulary (chat special tokens included)."""
    return prepare_data(DataConfig(source=str(small_corpus), vocab_size=400, data_dir=tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="session")
def chat_model(small_data: PreparedData) -> ElasticMoE:
    """A small MoE briefly trained on the small corpus (so it is better than chance), for export and serving."""
    from models.losses import causal_lm_loss
    from tasks.data import sample_batch

    torch.manual_seed(0)
    config = MoEConfig(
        vocab_size=400, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=4, top_k=2, expert_ffn_dim=32,
        n_shared_experts=1, max_seq_len=128,
    )  # fmt: skip
    model = ElasticMoE(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = np.random.default_rng(0)
    for _ in range(60):
        batch = sample_batch(small_data.split("train"), 8, 64, rng)
        causal_lm_loss(model(batch).logits, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="session")
def chat_packages(tmp_path_factory: pytest.TempPathFactory, chat_model: ElasticMoE, small_data: PreparedData):
    """fp32, INT8 and INT4 chat packages of `chat_model` (exported once per session)."""
    from tasks.export import DeployConfig, build_packages

    return build_packages(chat_model, small_data.tokenizer_path, tmp_path_factory.mktemp("packages"), DeployConfig())


@pytest.fixture(scope="session")
def make_chat_registry(tmp_path_factory: pytest.TempPathFactory, chat_packages):
    """Factory: a fresh MLflow store (its own workdir) with the fp32, INT8 and INT4 packages registered as
    `trainonce-chat` versions 1, 2 and 3, no aliases set. Each test module that moves aliases takes its own."""
    from registry.models import register_chat_package
    from registry.tracking import RunLogger

    def make() -> Path:
        workdir = tmp_path_factory.mktemp("chat-registry")
        logger = RunLogger(workdir, run_name="export")
        for variant in ("fp32", "int8", "int4"):
            register_chat_package(workdir, logger.run_id, chat_packages[variant], {"quantization": variant})
        logger.finish()
        return workdir

    return make
