"""S3 through boto3 against a real S3-compatible server (SeaweedFS, which checks signatures and permissions):
a data source read from a bucket, MLflow artifacts written to one by the embedded store, and clear errors for
a missing bucket or rejected credentials before any work starts."""

from __future__ import annotations

import uuid
from pathlib import Path

import mlflow
import pytest

from registry.s3 import S3AccessError, download_prefix
from registry.tracking import RunLogger, check_artifact_store, store_client
from tasks.data.config import DataConfig
from tasks.data.corpus import prepare_data


@pytest.fixture
def bucket(s3_server) -> str:
    """A fresh bucket (created with the admin identity: the pipeline's may not create buckets)."""
    name = f"trainonce-{uuid.uuid4().hex[:8]}"
    s3_server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def pipeline_env(s3_server, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)


def _upload_corpus(s3_server, bucket: str, corpus: Path, prefix: str) -> None:
    client = s3_server.client(s3_server.pipeline)
    for path in sorted(corpus.glob("*.txt")):
        client.upload_file(str(path), bucket, f"{prefix}/{path.name}")


def test_s3_data_source_prepares_the_same_dataset_as_its_local_copy(
    s3_server, bucket: str, pipeline_env: None, small_corpus: Path, tmp_path: Path
) -> None:
    _upload_corpus(s3_server, bucket, small_corpus, "corpus/plays")
    local = prepare_data(DataConfig(source=str(small_corpus), vocab_size=400, data_dir=tmp_path / "local"))
    remote = prepare_data(DataConfig(source=f"s3://{bucket}/corpus/plays", vocab_size=400, data_dir=tmp_path / "s3"))
    assert remote.fingerprint == local.fingerprint  # content-addressed: where the text lives does not matter
    assert (remote.train_tokens, remote.val_tokens) == (local.train_tokens, local.val_tokens)
    mirror = tmp_path / "s3" / "s3" / bucket / "corpus" / "plays"
    assert sorted(p.name for p in mirror.glob("*.txt")) == sorted(p.name for p in small_corpus.glob("*.txt"))

    # a changed object is downloaded again (and changes the fingerprint); unchanged ones are not
    first, second = sorted(mirror.glob("*.txt"))[:2]
    untouched = second.stat().st_mtime_ns
    writer = s3_server.client(s3_server.pipeline)
    writer.put_object(Bucket=bucket, Key=f"corpus/plays/{first.name}", Body=b"New. " * 400)
    changed = prepare_data(DataConfig(source=f"s3://{bucket}/corpus/plays", vocab_size=400, data_dir=tmp_path / "s3"))
    assert changed.fingerprint != remote.fingerprint
    assert first.read_bytes() == b"New. " * 400 and second.stat().st_mtime_ns == untouched

    one_file = download_prefix(f"s3://{bucket}/corpus/plays/{second.name}", tmp_path / "one", (".txt",), "data.source")
    assert [p.name for p in one_file] == [second.name]


def test_missing_bucket_and_rejected_credentials_fail_clearly_before_any_work(
    s3_server, bucket: str, pipeline_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def prepare(source: str):
        return prepare_data(DataConfig(source=source, vocab_size=400, data_dir=tmp_path / "data"))

    with pytest.raises(S3AccessError, match="data.source: s3://no-such-bucket/x .*bucket 'no-such-bucket' does not"):
        prepare("s3://no-such-bucket/x")
    with pytest.raises(FileNotFoundError, match=f"data.source: s3://{bucket}/empty holds no .txt/.jsonl objects"):
        prepare(f"s3://{bucket}/empty")

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(S3AccessError, match="credentials were rejected \\(SignatureDoesNotMatch\\)") as rejected:
        prepare(f"s3://{bucket}/corpus")
    assert "not-the-secret" not in str(rejected.value)  # secrets never appear in errors (or params)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "NOSUCHKEY")
    with pytest.raises(S3AccessError, match="rejected \\(InvalidAccessKeyId\\) for access key 'NOSUCHKEY'"):
        prepare(f"s3://{bucket}/corpus")
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").glob("*/meta.json"))


def test_embedded_store_keeps_artifacts_in_s3_and_refuses_a_missing_bucket(
    s3_server, bucket: str, pipeline_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRAINONCE_ARTIFACT_ROOT", f"s3://{bucket}/mlflow")
    assert check_artifact_store(tmp_path / "store") == f"s3://{bucket}/mlflow"
    logger = RunLogger(tmp_path / "store", run_name="probe")
    (tmp_path / "note.txt").write_text("stored in S3")
    logger.log_artifact(tmp_path / "note.txt", "notes")
    logger.finish()
    keys = [o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket, Prefix="mlflow/")["Contents"]]
    assert f"mlflow/{logger.run_id}/artifacts/notes/note.txt" in keys
    run = store_client(tmp_path / "store").get_run(logger.run_id)
    downloaded = mlflow.artifacts.download_artifacts(
        artifact_uri=f"{run.info.artifact_uri}/notes/note.txt", dst_path=str(tmp_path / "back")
    )
    assert Path(downloaded).read_text() == "stored in S3"

    monkeypatch.setenv("TRAINONCE_ARTIFACT_ROOT", "s3://missing-artifacts/mlflow")
    with pytest.raises(S3AccessError, match="MLflow artifact location: s3://missing-artifacts/mlflow .*does not exist"):
        check_artifact_store(tmp_path / "other-store")
