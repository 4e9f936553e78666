"""Shared fixtures: tiny model configs and a small real-text corpus written to a temp folder."""

from __future__ import annotations

from pathlib import Path

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
