"""Local paths and ``s3://`` URIs, through pyarrow's filesystems, for every job.

``filesystem(uri)`` returns a pyarrow FileSystem and the path inside it. S3 settings come from the
usual AWS variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``) plus
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` for an S3-compatible endpoint (MinIO, moto, Ceph).
``materialize(uri)`` copies a remote folder (a model, say) to a local cache and returns the local
path, so loaders that only read local folders (``from_pretrained``) work on ``s3://`` too.

Jobs that take the endpoint from their config call ``configure_s3`` on the driver; Ray workers do not
see variables set in the driver after ``ray.init``, so the job hands ``s3_env()`` to its tasks and
actors as ``runtime_env={"env_vars": ...}``. A pyarrow ``S3FileSystem`` object passed to Ray Data
(``read_parquet(filesystem=...)``) carries its endpoint and credentials with it when pickled.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

# The variables that configure S3 access (and the model cache); `s3_env` forwards those that are
# set to Ray workers.
S3_ENV_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_EC2_METADATA_DISABLED",
    "LDM_CACHE",
)


def is_remote(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def configure_s3(endpoint_url: str | None = None, region: str | None = None) -> None:
    """Set this process's S3 endpoint and region (``None`` leaves what the environment says)."""
    if endpoint_url is not None:
        parsed = urlparse(endpoint_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"S3 endpoint must look like http(s)://host[:port], got {endpoint_url!r}")
        os.environ["AWS_ENDPOINT_URL_S3"] = endpoint_url
    if region is not None:
        os.environ["AWS_REGION"] = region


def s3_env() -> dict[str, str]:
    """The S3 settings of this process (see ``S3_ENV_VARS``), to pass to Ray tasks and actors."""
    return {name: os.environ[name] for name in S3_ENV_VARS if os.environ.get(name)}


def s3_ray_options() -> dict:
    """Ray options giving a task or actor this process's S3 settings: ``{"runtime_env": ...}``, or
    ``{}`` when there are none (so the caller's own runtime environment is left alone)."""
    env = s3_env()
    return {"runtime_env": {"env_vars": env}} if env else {}


def s3_filesystem() -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict = {
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    }
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for a local path or an ``s3://bucket/key`` URI."""
    uri = str(uri)
    if is_remote(uri):
        return s3_filesystem(), uri[len("s3://") :].rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported storage URI {uri!r}: use a local path or s3://bucket/prefix")
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), str(Path(path).resolve())


def join(uri: str | os.PathLike, *parts: str) -> str:
    uri = str(uri)
    if is_remote(uri):
        return "/".join([uri.rstrip("/"), *parts])
    return str(Path(uri).joinpath(*parts))


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _s3_client():
    """A boto3 S3 client with the same endpoint, region and credentials as ``s3_filesystem``.

    pyarrow's FileInfo has no ETag; the listing that keys the model cache comes from boto3 (a
    dependency already), the copies from pyarrow.
    """
    import boto3

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return boto3.client("s3", endpoint_url=endpoint or None, region_name=region)


def list_remote(uri: str) -> list[tuple[str, int, str]]:
    """(key relative to ``uri``, size, ETag) of every object under the ``s3://`` prefix ``uri``, sorted.

    A prefix that names one object lists that object with the relative key being its file name.
    """
    from botocore.exceptions import ClientError

    bucket, _, prefix = uri[len("s3://") :].partition("/")
    prefix = prefix.rstrip("/")
    folder = prefix + "/" if prefix else ""
    client = _s3_client()
    listing: list[tuple[str, int, str]] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=folder):
            for item in page.get("Contents", []):
                key = item["Key"][len(folder) :]
                if key and not key.endswith("/"):
                    listing.append((key, int(item["Size"]), str(item["ETag"]).strip('"')))
        if not listing and prefix:
            head = client.head_object(Bucket=bucket, Key=prefix)
            listing.append(
                (prefix.rsplit("/", 1)[-1], int(head["ContentLength"]), str(head["ETag"]).strip('"'))
            )
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NoSuchBucket"):
            return []
        raise
    return sorted(listing)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where ``materialize`` keeps remote folders: ``cache_dir``, else ``$LDM_CACHE``, else ~/.cache/ldm."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("LDM_CACHE") or Path.home() / ".cache" / "ldm")


def materialize(uri: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local folder holding the contents of ``uri`` (copied from S3 into a cache when remote).

    The cache entry is keyed by the endpoint, the URI and every object's key, size and ETag: a folder
    rewritten in place (a re-exported model under the same prefix) is fetched again, an unchanged one
    costs one listing. The copy goes to a temporary folder renamed into place, so concurrent workers
    materializing the same model never see a half-written folder.
    """
    uri = str(uri)
    if not is_remote(uri):
        path = Path(uri[len("file://") :] if uri.startswith("file://") else uri)
        if not path.exists():
            raise FileNotFoundError(f"no such model or data path: {path}")
        return path
    listing = list_remote(uri)
    if not listing:
        raise FileNotFoundError(f"nothing at {uri}")
    # the endpoint is part of the key: the same bucket name on another server is other data
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    digest = hashlib.sha256(f"{endpoint}\n{uri.rstrip('/')}\n{listing}".encode()).hexdigest()[:16]
    local = cache_root(cache_dir) / digest
    if local.is_dir():
        return local
    local.parent.mkdir(parents=True, exist_ok=True)
    fs, prefix = filesystem(uri)
    single = len(listing) == 1 and fs.get_file_info(prefix).type == pafs.FileType.File
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=local.parent))
    try:
        for key, _, _ in listing:
            target = tmp / key
            target.parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(
                prefix if single else f"{prefix}/{key}",
                str(target),
                source_filesystem=fs,
                destination_filesystem=pafs.LocalFileSystem(),
            )
        try:
            tmp.rename(local)
        except OSError:
            if not local.is_dir():  # not another process's copy landing first: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return local


def upload_folder(local: str | os.PathLike, uri: str | os.PathLike) -> str:
    """Copy the local folder ``local`` to ``uri`` (an ``s3://`` prefix or a local folder); returns ``uri``."""
    local, uri = Path(local), str(uri)
    if not local.is_dir():
        raise FileNotFoundError(f"no such folder: {local}")
    fs, path = filesystem(uri)
    if not is_remote(uri):
        if Path(path).resolve() == local.resolve():
            return uri
        shutil.copytree(local, path, dirs_exist_ok=True)
        return uri
    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        pafs.copy_files(
            str(file),
            f"{path}/{file.relative_to(local).as_posix()}",
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=fs,
        )
    return uri
