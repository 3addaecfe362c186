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


def materialize(uri: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local folder holding the contents of ``uri`` (copied once from S3 into a cache)."""
    uri = str(uri)
    if not is_remote(uri):
        path = Path(uri[len("file://") :] if uri.startswith("file://") else uri)
        if not path.exists():
            raise FileNotFoundError(f"no such model or data path: {path}")
        return path
    cache_root = Path(cache_dir or os.environ.get("LDM_CACHE", Path.home() / ".cache" / "ldm"))
    # the endpoint is part of the cache key: the same bucket name on another server is other data
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    local = cache_root / hashlib.sha256(f"{endpoint}\n{uri}".encode()).hexdigest()[:16]
    marker = local / ".complete"
    if marker.exists():
        return local
    fs, prefix = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    files = [info for info in infos if info.type == pafs.FileType.File]
    if not files:
        single = fs.get_file_info(prefix)
        if single.type != pafs.FileType.File:
            raise FileNotFoundError(f"nothing at {uri}")
        files = [single]
        prefix = prefix.rsplit("/", 1)[0]
    for info in files:
        target = local / info.path[len(prefix) :].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(
            info.path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
        )
    marker.touch()
    return local
