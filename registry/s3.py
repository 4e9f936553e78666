"""S3 (and S3-compatible stores: SeaweedFS, MinIO, Ceph) through boto3: where data sources and artifacts live
past one machine.

Credentials and endpoint come from the standard environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION, AWS_PROFILE, ...; the endpoint from MLFLOW_S3_ENDPOINT_URL, which MLflow's own S3 client
reads too, or AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL), never from configs, so they are never logged as params.
Every failure is turned into an `S3AccessError` that names the URI, the config field and what to fix.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

from models.publish import staged_file

_BUCKET_MISSING = {"NoSuchBucket", "404", "NotFound"}
_CREDENTIALS_REJECTED = {"SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "403", "InvalidToken"}


class S3AccessError(RuntimeError):
    """An S3 location that cannot be used, with the reason in words."""


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str

    @classmethod
    def parse(cls, uri: str, field: str) -> S3Location:
        if not uri.startswith("s3://") or not uri[5:].split("/", 1)[0]:
            raise ValueError(f"{field}: {uri!r} is not an s3://bucket/prefix URI")
        bucket, _, prefix = uri[5:].partition("/")
        return cls(bucket, prefix)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def endpoint_url() -> str | None:
    """The S3 endpoint of an S3-compatible store, or None for AWS itself."""
    return (
        os.environ.get("MLFLOW_S3_ENDPOINT_URL")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or None
    )


def s3_client():
    """A boto3 S3 client from the environment as it is now (a fresh session: boto3's default one keeps the
    credentials it first found); path-style addressing for S3-compatible endpoints."""
    endpoint = endpoint_url()
    config = Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}) if endpoint else None
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


def explain(error: Exception, location: S3Location, field: str) -> S3AccessError:
    """An S3AccessError saying, in words, why `location` could not be used."""
    where = f"{field}: {location.uri} (endpoint {endpoint_url() or 'AWS'})"
    if isinstance(error, NoCredentialsError):
        return S3AccessError(f"{where}: no credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
    if isinstance(error, EndpointConnectionError):
        return S3AccessError(f"{where}: cannot connect; check MLFLOW_S3_ENDPOINT_URL / AWS_ENDPOINT_URL")
    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        if code in _BUCKET_MISSING:
            return S3AccessError(f"{where}: bucket {location.bucket!r} does not exist; create it first")
        if code in _CREDENTIALS_REJECTED:
            key = os.environ.get("AWS_ACCESS_KEY_ID", "<unset>")
            return S3AccessError(
                f"{where}: the credentials were rejected ({code}) for access key {key!r}; check AWS_ACCESS_KEY_ID, "
                "AWS_SECRET_ACCESS_KEY and the key's permissions on the bucket"
            )
        return S3AccessError(f"{where}: {code or 'error'}: {error}")
    return S3AccessError(f"{where}: {error}")


def check_bucket(uri: str, field: str) -> S3Location:
    """Fail now, with the reason, when the bucket of `uri` is missing or the credentials cannot list it. (A list
    rather than HEAD: a HEAD answer has no body, so it cannot say whether the key or the signature was wrong.)"""
    location = S3Location.parse(uri, field)
    try:
        s3_client().list_objects_v2(Bucket=location.bucket, Prefix=location.prefix, MaxKeys=1)
    except (BotoCoreError, ClientError) as error:
        raise explain(error, location, field) from error
    return location


def download_prefix(uri: str, destination: Path, suffixes: tuple[str, ...], field: str) -> list[Path]:
    """Mirror what `uri` names (the objects under it as a folder whose names end in `suffixes`, or the one object
    it is) into `destination`, downloading only objects whose ETag changed since the last call; returns the
    local files, sorted.

    Objects (and the ETag manifest) are written to a name private to this process and renamed, so neither an
    interrupted download nor two processes mirroring the same prefix at once leave a partial file under a real
    name; files whose objects were deleted leave the mirror."""
    location = check_bucket(uri, field)
    client = s3_client()
    folder = location.prefix if location.prefix.endswith("/") or not location.prefix else location.prefix + "/"
    manifest_path = destination / ".etags.json"
    manifest: dict[str, str] = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    current: dict[str, str] = {}  # local relative path -> ETag
    keys: dict[str, str] = {}  # local relative path -> object key
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=folder):
            for item in page.get("Contents", []):
                relative = item["Key"][len(folder) :]
                if relative.endswith(suffixes):
                    current[relative], keys[relative] = item["ETag"], item["Key"]
        if not current and location.prefix and location.prefix.endswith(suffixes):
            head = client.head_object(Bucket=location.bucket, Key=location.prefix)
            relative = location.prefix.rsplit("/", 1)[-1]
            current[relative], keys[relative] = head["ETag"], location.prefix
        for relative, etag in current.items():
            target = destination / relative
            if manifest.get(relative) == etag and target.is_file():
                continue
            with staged_file(target) as staged:
                client.download_file(location.bucket, keys[relative], str(staged))
    except (BotoCoreError, ClientError) as error:
        raise explain(error, location, field) from error
    if not current:
        raise FileNotFoundError(f"{field}: {uri} holds no {'/'.join(suffixes)} objects")
    for stale in set(manifest) - set(current):
        (destination / stale).unlink(missing_ok=True)
    with staged_file(manifest_path) as staged:
        staged.write_text(json.dumps(current, indent=1, sort_keys=True))
    return sorted(destination / relative for relative in current)
