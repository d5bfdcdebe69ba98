"""Storage URIs -> filesystems that pyarrow and Ray Data both accept.

A URI is a local path, ``file://...``, ``s3://bucket/prefix`` or ``gs://bucket/prefix``
(the last where gcsfs is installed). Object stores go through fsspec (s3fs/gcsfs) wrapped
in a pyarrow ``PyFileSystem`` so that one object serves ``pyarrow.parquet`` and
``ray.data.read_parquet(filesystem=...)`` alike, and pickles into Ray workers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import posixpath
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs


class StorageError(RuntimeError):
    """Storage could not be reached, listed or read; the message names the URI."""


@dataclass
class StorageOptions:
    """How to reach object storage. Credentials always come from the standard AWS
    (or Google) environment variables and config files, never from here."""

    # S3-compatible stores (MinIO, Ceph, moto). Falls back to $AWS_ENDPOINT_URL.
    endpoint_url: str | None = None
    anon: bool = False
    region: str | None = None
    # Attempts per S3 request (botocore's "standard" retry mode: exponential backoff with jitter, capped at 20 s).
    # 10 rides out a store that is unreachable for about a minute (a restart, a failover) instead of failing the
    # whole job; botocore's default (5 "legacy" attempts) gives up after a few seconds.
    retries: int = 10
    connect_timeout: float = 10.0  # seconds per connection attempt


@dataclass(frozen=True)
class FileEntry:
    uri: str
    path: str  # path inside the filesystem (no scheme)
    size: int
    mtime_ns: int | None = None  # last modification, where the store reports it


def scheme_of(uri: str) -> str:
    parsed = urlparse(uri)
    if len(parsed.scheme) <= 1:  # "" or a Windows drive letter
        return "file"
    return parsed.scheme


def is_remote(uri: str) -> bool:
    return scheme_of(uri) != "file"


def _strip(uri: str) -> str:
    scheme = scheme_of(uri)
    if scheme == "file":
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return os.path.abspath(os.path.expanduser(path))
    return uri.split("://", 1)[1].rstrip("/")


def _fsspec_filesystem(scheme: str, options: StorageOptions) -> Any:
    if scheme in ("s3", "s3a"):
        import s3fs

        endpoint = options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
        client_kwargs: dict[str, Any] = {}
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        if options.region:
            client_kwargs["region_name"] = options.region
        retry = {"retries": {"max_attempts": max(1, options.retries), "mode": "standard"},
                 "connect_timeout": options.connect_timeout}
        # skip_instance_cache: a test or a job that changes the endpoint must not get a stale client.
        # use_listings_cache=False: the client is reused (``_object_store``), and files written by other processes
        # (the Ray workers) must show up in its next listing.
        return s3fs.S3FileSystem(anon=options.anon, client_kwargs=client_kwargs, config_kwargs=retry,
                                 skip_instance_cache=True, use_listings_cache=False)
    if scheme in ("gs", "gcs"):
        try:
            import gcsfs
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise StorageError("gs:// URIs need the gcsfs package: pip install gcsfs") from exc
        return gcsfs.GCSFileSystem(token="anon" if options.anon else None, cache_timeout=0)  # (as use_listings_cache)
    raise StorageError(f"unsupported storage scheme {scheme!r}; use a local path, file://, s3:// or gs://")


# The environment an object-store client reads when it is made: a client is reused only where all of it is unchanged.
_CLIENT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
               "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_SHARED_CREDENTIALS_FILE",
               "AWS_CONFIG_FILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE", "GOOGLE_APPLICATION_CREDENTIALS")


@functools.lru_cache(maxsize=16)
def _object_store(scheme: str, options: tuple, env: tuple) -> pafs.FileSystem:
    # One client per store and settings, not one per call: a new S3 client costs a session, a connection pool and
    # often a credentials lookup, and a run makes thousands of calls.
    fs = _fsspec_filesystem(scheme, StorageOptions(*options))
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def resolve(uri: str, options: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path)`` for ``uri``."""
    options = options or StorageOptions()
    scheme = scheme_of(uri)
    if scheme == "file":
        return pafs.LocalFileSystem(), _strip(uri)
    env = tuple(os.environ.get(k) for k in _CLIENT_ENV)
    return _object_store(scheme, dataclasses.astuple(options), env), _strip(uri)


def join(uri: str, *parts: str) -> str:
    if scheme_of(uri) == "file":
        return os.path.join(uri, *parts)
    return posixpath.join(uri.rstrip("/"), *parts)


def to_uri(uri_like: str, path: str) -> str:
    """The URI of ``path`` (a filesystem path) in the same store as ``uri_like``."""
    scheme = scheme_of(uri_like)
    return path if scheme == "file" else f"{scheme}://{path}"


def list_files(uri: str, suffix: str = ".parquet", options: StorageOptions | None = None) -> list[FileEntry]:
    """Files under ``uri`` (or ``uri`` itself if it is a file) ending in ``suffix``, sorted by path."""
    fs, path = resolve(uri, options)
    try:
        info = fs.get_file_info(path)
    except Exception as exc:
        raise StorageError(f"cannot reach {uri}: {exc}") from exc
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"input {uri} does not exist")
    if info.type == pafs.FileType.File:
        infos = [info]
    else:
        try:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        except Exception as exc:
            raise StorageError(f"cannot list {uri}: {exc}") from exc
    entries = [
        FileEntry(uri=to_uri(uri, i.path), path=i.path, size=int(i.size or 0), mtime_ns=i.mtime_ns)
        for i in infos
        if i.type == pafs.FileType.File and i.path.endswith(suffix)
        and not posixpath.basename(i.path).startswith((".", "_"))
    ]
    return sorted(entries, key=lambda e: e.path)


IO_THREADS = 16  # storage round trips a driver makes at once (reading 100k footers one by one takes hours on S3)


def in_threads(fn: Any, items: list, threads: int = IO_THREADS) -> list:
    """``[fn(x) for x in items]``, with up to ``threads`` calls at once: for per-file metadata reads and listings,
    which wait on storage, not the CPU. The first exception (in item order) is raised."""
    from concurrent.futures import ThreadPoolExecutor

    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
        return list(pool.map(fn, items))


def delete_dir(uri: str, options: StorageOptions | None = None) -> None:
    fs, path = resolve(uri, options)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def makedirs(uri: str, options: StorageOptions | None = None) -> None:
    fs, path = resolve(uri, options)
    fs.create_dir(path, recursive=True)


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    fs, path = resolve(uri, options)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _write_durably(f: Any, data: bytes) -> None:
    """Write ``data`` to the open local file ``f`` and flush it to disk (a crash must not leave it empty)."""
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def _publish(uri: str, options: StorageOptions | None, data: bytes) -> None:
    """Create ``uri`` holding ``data`` so that readers never see it half written, even when the writer fails.
    The bytes are complete before anything is sent: an object store gets them in one ``pipe`` (a single PUT, or
    a multipart upload completed only after its last part), so an error leaves no object, where a stream's
    ``close()`` would commit whatever had been written. A local or shared file system is written under a hidden
    temporary name in the same folder (``list_files`` skips dot-files), flushed to disk (fsync) and then renamed,
    which is atomic there: a crash of the machine leaves the old file or the whole new one."""
    import uuid

    fs, path = resolve(uri, options)
    if is_remote(uri):
        fs.handler.fs.pipe_file(path, data)  # the fsspec filesystem behind the pyarrow wrapper
        return
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            _write_durably(f, data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    _publish(uri, options, data)


def write_parquet(uri: str, table: Any, options: StorageOptions | None = None) -> None:
    """Write ``table`` (a ``pyarrow.Table``) as one Parquet file, atomically (see ``_publish``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    _publish(uri, options, sink.getvalue().to_pybytes())


def create_exclusive(uri: str, data: bytes, options: StorageOptions | None = None) -> bool:
    """Create ``uri`` holding ``data`` only if nothing is there; False if something is. Of two writers racing, one
    wins: locally by ``O_EXCL``; on S3 by a conditional PUT (``If-None-Match: *``, which AWS S3, MinIO and moto
    honour; a store that ignores it is guarded only by the existence check before the PUT); on GCS by that check
    alone (a narrow race)."""
    fs, path = resolve(uri, options)
    if not is_remote(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            _write_durably(f, data)
        return True
    if exists(uri, options):
        return False
    try:
        # (gcsfs: not verified here that every version honours mode="create" rather than taking it for metadata)
        fs.handler.fs.pipe_file(path, data, **({"mode": "create"} if scheme_of(uri) in ("s3", "s3a") else {}))
    except FileExistsError:
        return False
    except OSError:
        # s3fs reports some refusals of the condition (a 412 without its header, a 409 conflict) as OSError:
        # lost the race if the object is there now
        if exists(uri, options):
            return False
        raise
    return True


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    fs, path = resolve(uri, options)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as exc:
        raise StorageError(f"{uri} does not exist") from exc


def write_json(uri: str, obj: Any, options: StorageOptions | None = None) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), options)


def read_json(uri: str, options: StorageOptions | None = None) -> Any:
    return json.loads(read_bytes(uri, options))
