"""Where a run folder's bytes live: a local folder or an fsspec URL, behind one ``Folder``
interface, so that callers never learn which kind they have."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlparse

from tenacity import retry_if_exception_type, retry_if_not_exception_type

from job.exits import EXIT_USAGE
from job.runtime.files import atomic_write_bytes

T = TypeVar("T")


class StorageError(RuntimeError):
    """The run folder cannot be used (unreachable, not writable, a backlog that cannot be delivered)."""


class WriteConflict(RuntimeError):
    """A conditional write found the file other than the caller expected (someone else wrote it)."""


class StoreRefused(StorageError):
    """The store refuses us for good (wrong credentials, access denied, no such bucket): no retry
    and no restart can change its answer, only a person (exit 2)."""

    exit_code, summary = EXIT_USAGE, "store refused"


# The store's answers that no retry changes, by S3 error code, with what a person must fix. A
# HEAD request's 403 has no body, so its code is the bare status. Everything else (timeouts,
# resets, 5xx, SlowDown, a missing key) is transient or an answer, and callers retry or use it.
_ACCESS_DENIED = (
    "these credentials may not use it: check the bucket policy, or the IAM policy of the "
    "credentials (infra/iam-policy.json is the least one a run needs)"
)
REFUSALS = {
    "InvalidAccessKeyId": "the store does not know this access key id: check AWS_ACCESS_KEY_ID "
                          "(or the profile or instance role that supplies the credentials)",
    "SignatureDoesNotMatch": "the secret key does not belong to the access key id: check AWS_SECRET_ACCESS_KEY",
    "AccessDenied": _ACCESS_DENIED,
    "AllAccessDisabled": _ACCESS_DENIED,
    "403": "the credentials are wrong or may not use it: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
           "then the bucket policy and the IAM policy of the credentials (infra/iam-policy.json)",
    "NoSuchBucket": "bucket {bucket} does not exist{at}: create it, or correct the bucket in --run-uri "
                    "(env JOB_RUN_URI) or the endpoint in AWS_ENDPOINT_URL",
    "NoCredentials": "no credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, "
                     "or give the host an instance role)",
}


# tenacity's predicate for a store's requests: retry any failure but a refusal for good. Only
# Exceptions: tenacity's "any but StoreRefused" alone would also retry a KeyboardInterrupt that
# lands inside a request, and a Ctrl-C would be lost.
retry_transient = retry_if_exception_type(Exception) & retry_if_not_exception_type(StoreRefused)


def describe(exc: BaseException | None) -> str:
    """The store's own words: botocore's ClientError carries its code and message in str()."""
    return f"{type(exc).__name__}: {exc}" if exc else "unknown error"


def refusal_code(exc: BaseException) -> str | None:
    """The store's error code if ``exc`` is a refusal for good (a key of REFUSALS), else None.
    s3fs turns botocore's errors into OSErrors, so the code is read from the exception chain."""
    seen: BaseException | None = exc
    while seen is not None:
        code = _error_code(seen)
        if code is not None:
            return code if code in REFUSALS else None
        if type(seen).__name__ == "NoCredentialsError":  # botocore's; imported only by remote folders
            return "NoCredentials"
        seen = seen.__cause__ or seen.__context__
    return None


def refused(code: str, uri: str) -> StoreRefused:
    """The refusal, naming its cause and what to fix; never a credential."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    fix = REFUSALS[code].format(bucket=urlparse(uri).netloc, at=f" at {endpoint}" if endpoint else "")
    return StoreRefused(f"the store refuses {uri} ({code}): {fix}")


_RAISE = object()


class Folder(Protocol):
    """What the job needs of a run folder. Paths are relative to its root (see ``Layout``)."""

    uri: str

    def read_bytes(self, rel: str) -> bytes | None: ...
    def write_bytes(self, rel: str, data: bytes) -> None: ...
    def list_dir(self, rel: str) -> list[str]: ...
    def list_files(self, rel: str) -> list[str]: ...
    def file_sizes(self, rel: str) -> dict[str, int]: ...
    def exists(self, rel: str) -> bool: ...
    def delete(self, rel: str) -> None: ...
    def delete_many(self, rels: list[str]) -> None: ...
    def check(self) -> None: ...
    def read_tagged(self, rel: str) -> tuple[bytes, str] | None: ...
    def write_if(self, rel: str, data: bytes, etag: str | None) -> str: ...


def delete_remote_tree(folder: Folder, rel: str, first: tuple[str, ...], known: tuple[str, ...] | None = None) -> None:
    """Delete every file under ``rel``: those named in ``first`` on their own, then the rest at once.
    ``known``: the names of the folder's files, when the caller wrote them all itself; the folder
    is then not listed (one request fewer)."""
    files = [f"{rel}/{name}" for name in known] if known is not None else folder.list_files(rel)
    leading = [f for f in files if f.rsplit("/", 1)[-1] in first]
    for f in leading:
        folder.delete(f)
    rest = [f for f in files if f not in leading]
    if rest:
        folder.delete_many(rest)


class LocalFolder:
    """A folder on local disk; writes are atomic (temp file, fsync, rename)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def path(self, rel: str) -> Path:
        return self.root / rel

    def read_bytes(self, rel: str) -> bytes | None:
        try:
            return self.path(rel).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def write_bytes(self, rel: str, data: bytes) -> None:
        atomic_write_bytes(self.path(rel), data)

    def list_dir(self, rel: str) -> list[str]:
        folder = self.path(rel)
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def list_files(self, rel: str) -> list[str]:
        """Relative paths of every file under folder ``rel``."""
        folder = self.path(rel)
        if not folder.is_dir():
            return []
        return sorted(str(p.relative_to(self.root)) for p in folder.rglob("*") if p.is_file())

    def file_sizes(self, rel: str) -> dict[str, int]:
        """Size of each file directly inside folder ``rel``, by name."""
        sizes = {}
        for name in self.list_dir(rel):
            try:
                stat = (self.path(rel) / name).stat()
            except FileNotFoundError:  # deleted between the listing and the stat
                continue
            if not (self.path(rel) / name).is_dir():
                sizes[name] = stat.st_size
        return sizes

    def exists(self, rel: str) -> bool:
        return self.path(rel).exists()

    def delete(self, rel: str) -> None:
        self.path(rel).unlink(missing_ok=True)

    def delete_many(self, rels: list[str]) -> None:
        for rel in rels:
            self.delete(rel)

    def delete_tree(self, rel: str, first: tuple[str, ...] = ()) -> None:
        """Delete folder ``rel``: the files named in ``first`` before anything else."""
        folder = self.path(rel)
        for name in first:
            (folder / name).unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)

    # Conditional writes (the lease): a read-compare-replace under an exclusive flock on the run
    # folder itself, atomic for every process of this machine; the tag is the content's hash.
    def read_tagged(self, rel: str) -> tuple[bytes, str] | None:
        data = self.read_bytes(rel)
        return None if data is None else (data, content_tag(data))

    def write_if(self, rel: str, data: bytes, etag: str | None) -> str:
        """Write ``rel`` only if it is absent (``etag`` None) or still holds the content tagged
        ``etag``; otherwise raise WriteConflict. Returns the new content's tag."""
        with self._folder_lock():
            current = self.read_tagged(rel)
            if (current[1] if current else None) != etag:
                raise WriteConflict(f"{self.uri}/{rel} changed: expected {etag or 'no file'}")
            self.write_bytes(rel, data)
        return content_tag(data)

    @contextmanager
    def _folder_lock(self):
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the only descriptor releases the lock

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"run folder {self.uri} cannot be created: {exc}") from exc
        _probe(self)


class RemoteFolder:
    """A folder behind an fsspec URL (s3://bucket/prefix). Endpoint and credentials come only from
    the standard AWS chain (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, instance roles, ...).

    Each call fails fast (short timeouts, one try): retrying is the caller's job, with backoff
    and logging, rather than the client's hidden one."""

    def __init__(self, uri: str):
        import fsspec  # imported here: a local run never needs it

        self.uri = uri.rstrip("/")
        options: dict[str, Any] = {"skip_instance_cache": True, "use_listings_cache": False}
        self._read_options: dict[str, Any] = {}
        if urlparse(uri).scheme in ("s3", "s3a"):
            options["config_kwargs"] = {"connect_timeout": 3, "read_timeout": 20, "retries": {"max_attempts": 1}}
            # A read is one GET: s3fs's concurrent read first asks a HEAD for the size (a request
            # more per file), and a HEAD's error has no body, so a refusal would lose its code.
            self._read_options["max_concurrency"] = 1
        self.fs, self.base = fsspec.core.url_to_fs(self.uri, **options)
        if hasattr(self.fs, "retries"):
            self.fs.retries = 1

    def _full(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def _ask(self, call: Callable[..., T], *args: Any, missing: Any = _RAISE, **kwargs: Any) -> T:
        """One request. A missing key answers ``missing`` when given (s3fs says FileNotFoundError
        for a missing bucket too, which is a refusal); a refusal for good becomes StoreRefused;
        anything else (a transient failure) goes to the caller, who retries."""
        try:
            return call(*args, **kwargs)
        except Exception as exc:
            code = refusal_code(exc)
            if code is not None:
                raise refused(code, self.uri) from None  # the chain would repeat the request
            if isinstance(exc, FileNotFoundError) and missing is not _RAISE:
                return missing
            raise

    def read_bytes(self, rel: str) -> bytes | None:
        return self._ask(self.fs.cat_file, self._full(rel), missing=None, **self._read_options)

    def write_bytes(self, rel: str, data: bytes) -> None:
        self._ask(self.fs.pipe_file, self._full(rel), data)

    def list_dir(self, rel: str) -> list[str]:
        entries = self._ask(self.fs.ls, self._full(rel), detail=False, missing=[])
        prefix = self._full(rel).rstrip("/") + "/"
        return sorted({e[len(prefix):].split("/")[0] for e in entries if e.startswith(prefix)} - {""})

    def list_files(self, rel: str) -> list[str]:
        found = self._ask(self.fs.find, self._full(rel), missing=[])
        return sorted(f[len(self.base) + 1 :] for f in found)

    def file_sizes(self, rel: str) -> dict[str, int]:
        entries = self._ask(self.fs.ls, self._full(rel), detail=True, missing=[])
        return {e["name"].rsplit("/", 1)[-1]: e["size"] for e in entries if e.get("type") == "file"}

    def exists(self, rel: str) -> bool:
        return self._ask(self.fs.exists, self._full(rel))

    def stored(self, rel: str) -> dict[str, Stored]:
        """Every file under folder ``rel`` (the whole run for ""), by relative path, with its size
        and the checksum the store reports for it: one listing (a request per 1000 files)."""
        found = self._ask(self.fs.find, self._full(rel), detail=True, missing={})
        return {
            name[len(self.base) + 1 :]: Stored(entry["size"], str(entry.get("ETag") or "").strip('"'))
            for name, entry in found.items()
            if entry.get("type") == "file"
        }

    def delete(self, rel: str) -> None:
        self._ask(self.fs.rm_file, self._full(rel), missing=None)

    def delete_many(self, rels: list[str]) -> None:
        """Delete files, in one request per 1000 on S3 (DeleteObjects), one by one elsewhere."""
        if not hasattr(self.fs, "call_s3"):
            for rel in rels:
                self.delete(rel)
            return
        bucket = self.fs.split_path(self.base)[0]
        for start in range(0, len(rels), 1000):
            keys = [{"Key": self.fs.split_path(self._full(rel))[1]} for rel in rels[start : start + 1000]]
            answer = self._ask(self.fs.call_s3, "delete_objects", Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
            # A quiet DeleteObjects answers 200 and lists only the keys it could not delete.
            errors = answer.get("Errors") or []
            if errors:
                first = errors[0]
                raise OSError(
                    f"{len(errors)} key(s) not deleted, e.g. {first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                )

    def check(self) -> None:
        _probe(self)

    def now(self) -> datetime:
        """The store's clock: the Date header of its answer to a listing of one key of this folder
        (a request the least IAM policy allows)."""
        bucket, key, _ = self.fs.split_path(self.base)

        async def ask() -> str:
            s3 = await self._client(bucket)
            answer = await s3.list_objects_v2(Bucket=bucket, Prefix=f"{key}/" if key else "", MaxKeys=1)
            return answer["ResponseMetadata"]["HTTPHeaders"]["date"]

        return parsedate_to_datetime(self._ask(self._sync, ask))

    def connect(self) -> None:
        """Set up the S3 client now (its service model is parsed once per client) rather than
        within the first request; a store that is away is not an error here."""
        if hasattr(self.fs, "set_session"):
            try:
                self._sync(self.fs.set_session)
            except Exception:  # the first request retries, and reports
                pass

    # Conditional writes (the lease): S3's If-None-Match / If-Match on PutObject, through the raw
    # client so that the store's own error code decides what a refusal means.
    def read_tagged(self, rel: str) -> tuple[bytes, str] | None:
        bucket, key, _ = self.fs.split_path(self._full(rel))

        async def get() -> tuple[bytes, str] | None:
            s3 = await self._client(bucket)
            try:
                answer = await s3.get_object(Bucket=bucket, Key=key)
            except Exception as exc:
                if _error_code(exc) in ("NoSuchKey", "404"):
                    return None
                raise
            async with answer["Body"] as body:
                return await body.read(), answer["ETag"]

        return self._ask(self._sync, get)

    def write_if(self, rel: str, data: bytes, etag: str | None) -> str:
        """Write ``rel`` only if it is absent (``etag`` None) or still has ``etag``; otherwise
        raise WriteConflict. Returns the new ETag."""
        bucket, key, _ = self.fs.split_path(self._full(rel))
        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}

        async def put() -> str:
            s3 = await self._client(bucket)
            try:
                answer = await s3.put_object(Bucket=bucket, Key=key, Body=data, **condition)
            except Exception as exc:
                # 412: the condition failed; 409: a concurrent conditional write won; 404: an
                # If-Match on a file that is gone.
                if _error_code(exc) in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409"):
                    raise WriteConflict(f"{self.uri}/{rel} changed: {exc}") from exc
                raise
            return answer["ETag"]

        return self._ask(self._sync, put)

    async def _client(self, bucket: str):
        if not hasattr(self.fs, "get_s3"):
            raise StorageError(f"{self.uri}: one writer per run needs S3 conditional writes (If-Match, If-None-Match)")
        await self.fs.set_session()
        return await self.fs.get_s3(bucket)

    def _sync(self, function):
        from fsspec.asyn import sync

        return sync(self.fs.loop, function)


def _error_code(exc: BaseException) -> str | None:
    """The store's error code of a botocore ClientError (None for anything else)."""
    response = getattr(exc, "response", None)
    return str((response.get("Error") or {}).get("Code")) if isinstance(response, dict) else None


@dataclass(frozen=True)
class Stored:
    """What a store says of one of its objects without sending it: size and ETag."""

    size: int
    etag: str

    def proves(self, data: bytes) -> bool:
        """Whether the store's word proves the object is ``data``, byte for byte: its size and an
        ETag that is the MD5 of ``data`` (a single-part upload's ETag is its content's MD5). A
        multipart upload's ETag ("md5-of-part-md5s-N") or an SSE-KMS object's proves nothing: the
        caller then reads the object itself."""
        return len(data) == self.size and content_tag(data) == self.etag


def content_tag(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _probe(folder: Folder) -> None:
    """Write, read back and delete a small file: the folder is usable now."""
    probe = f".preflight-{os.getpid()}"
    folder.write_bytes(probe, b"ok")
    if folder.read_bytes(probe) != b"ok":
        raise StorageError(f"run folder {folder.uri}: a file written there did not read back")
    folder.delete(probe)


def open_folder(uri: str) -> Folder:
    """Direct access to a run folder, without a cache (what ``status`` reads)."""
    return RemoteFolder(uri) if is_remote(uri) else LocalFolder(uri.removeprefix("file://"))


def is_remote(uri: str) -> bool:
    scheme = urlparse(uri).scheme
    return scheme not in ("", "file") and len(scheme) > 1  # one letter: a Windows drive


def default_cache_dir(uri: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    parsed = urlparse(uri)
    return base / "magvit-job" / parsed.scheme / parsed.netloc / parsed.path.strip("/")
