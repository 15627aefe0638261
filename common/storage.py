"""Paths and object-storage URLs behind one small interface (fsspec underneath).

A *location* is a local path (or file:// URL) or a URL that fsspec opens with an installed
backend (s3:// through s3fs, gs:// through gcsfs, ...). Local paths keep the crash-safe
writes of common.fileio; a URL is written by filling a local temporary file and uploading it
whole, so the object appears complete or not at all (an S3 PUT or a completed multipart
upload is atomic). fsspec is imported only when a URL is used, so local runs need nothing
beyond the standard library.

Errors. Every failure becomes a StorageError: one line that names the URL and what went
wrong (no credentials, no such bucket, access denied, not found). Transient errors (a
dropped connection, a timeout, a 5xx) are retried RETRIES times with backoff, on top of the
backend's own retries, then stop the run with a message saying so: a caller never sees a
transient error as "missing" and never skips data because of one.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from typing import IO, Any, Optional, TypeVar

import braceexpand

from common.fileio import atomic_write

RETRIES = 3  # tries of one operation at this layer; the backend retries each request too
BACKOFF_S = 0.5  # first wait between tries, doubled each time
READ_BLOCK = 8 << 20  # bytes per ranged GET when streaming a URL
T = TypeVar("T")


class StorageError(OSError):
    """A storage operation failed for good; str() is one line naming the URL."""


class NotFound(StorageError, FileNotFoundError):
    """The object (or file) does not exist."""


def is_url(location: str | os.PathLike) -> bool:
    """True for URLs fsspec opens (s3://, gs://, memory://, ...); False for local paths and
    file:// URLs, which keep the local code paths (flock, os.replace)."""
    text = os.fspath(location)
    return "://" in text and not text.startswith("file://")


def local_path(location: str | os.PathLike) -> str:
    text = os.fspath(location)
    return text[len("file://"):] if text.startswith("file://") else text


def protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def join(location: str, name: str) -> str:
    if is_url(location):
        return location.rstrip("/") + "/" + name
    return os.path.join(local_path(location), name)


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a URL; a missing backend is named."""
    import fsspec  # lazily: local runs do not need it
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise StorageError(f"{url}: no fsspec backend for {protocol(url)}:// is installed ({e}); install it, "
                           f"e.g. pip install s3fs for s3://") from None
    except ValueError as e:
        raise StorageError(f"{url}: {e}") from None


# ---------------------------------------------------------------- errors and retries
def http_status(err: BaseException) -> int:
    """The HTTP status of a botocore error, or of the one an fsspec error was made from (0: none)."""
    for e in (err, err.__cause__):
        status = (getattr(e, "response", None) or {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status:
            return int(status)
    return 0


def _is_permanent(err: BaseException) -> bool:
    """Errors that another try cannot fix (missing things, refusals, failed conditions, bad requests)."""
    if 400 <= http_status(err) < 500 and http_status(err) not in (408, 429):
        return True
    if isinstance(err, (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError,
                        NotADirectoryError, ValueError, TypeError)):
        return True
    name = type(err).__name__
    return name in ("NoCredentialsError", "PartialCredentialsError", "NoRegionError", "ParamValidationError",
                    "ProfileNotFound", "InvalidConfigError")


def no_such_bucket(err: BaseException) -> bool:
    """S3's NoSuchBucket (s3fs turns it into a FileNotFoundError with the server's message)."""
    codes = [str((getattr(e, "response", None) or {}).get("Error", {}).get("Code", "")) for e in (err, err.__cause__)]
    return "NoSuchBucket" in codes or "specified bucket does not exist" in str(err).lower()


def describe(err: BaseException, url: str) -> str:
    """One line naming the URL and the cause."""
    text = " ".join(str(err).split()) or type(err).__name__
    name = type(err).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError", "ProfileNotFound"):
        return (f"{url}: no credentials for {protocol(url)}:// ({text}); set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, as for the aws command")
    if no_such_bucket(err):
        bucket = url.split("://", 1)[-1].split("/", 1)[0]
        return f"{url}: the bucket {bucket!r} does not exist ({text})"
    if isinstance(err, PermissionError) or http_status(err) == 403 or "AccessDenied" in text:
        return f"{url}: access denied (403: {text}); check the credentials' permissions on this bucket and prefix"
    if isinstance(err, FileNotFoundError):
        return f"{url}: not found"
    return f"{url}: {text}"


def call(what: str, url: str, fn: Callable[[], T]) -> T:
    """fn() with RETRIES tries for transient errors; every failure as a one-line StorageError."""
    for attempt in range(1, RETRIES + 1):
        try:
            return fn()
        except StorageError:
            raise
        except Exception as err:  # the backends raise many types; sorted into permanent and transient
            if _is_permanent(err):
                cls = NotFound if isinstance(err, FileNotFoundError) else StorageError
                raise cls(f"{what}: {describe(err, url)}") from err
            if attempt == RETRIES:
                raise StorageError(f"{what}: {describe(err, url)} (gave up after {RETRIES} tries; "
                                   "rerun to continue from what was saved)") from err
            time.sleep(BACKOFF_S * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- one S3 object, by version
def s3_object(what: str, url: str, op: str, **kwargs) -> dict:
    """One S3 API call on the object at url (head_object, conditional put_object, ...); fsspec's
    cache of it dropped first, since conditional writes must see the object as it is now."""
    from fsspec.asyn import sync
    fs, path = filesystem(url)
    bucket, key = path.split("/", 1)
    fs.invalidate_cache(path)
    return call(f"{what} {op}", url, lambda: sync(fs.loop, fs._call_s3, op, Bucket=bucket, Key=key, **kwargs))


def s3_read_versioned(what: str, url: str) -> tuple[Optional[bytes], Optional[str]]:
    """(body, ETag) of one version of the object, from one GET (a HEAD then a GET could see two
    versions); (None, None) when there is none."""
    from fsspec.asyn import sync
    fs, path = filesystem(url)
    bucket, key = path.split("/", 1)

    async def get() -> tuple[bytes, str]:
        got = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        async with got["Body"] as stream:
            return await stream.read(), got["ETag"]

    try:
        return call(f"{what} read", url, lambda: sync(fs.loop, get))
    except NotFound:
        return None, None


# ---------------------------------------------------------------- reading
def open_read(location: str) -> IO[bytes]:
    """A binary file object for sequential reading: a URL is streamed in READ_BLOCK ranges
    (the backend retries each range), never downloaded whole first."""
    if not is_url(location):
        try:
            return open(local_path(location), "rb")
        except OSError as err:
            raise (NotFound if isinstance(err, FileNotFoundError) else StorageError)(
                f"open: {location}: {err.strerror or err}") from err
    fs, path = filesystem(location)
    return call("open", location, lambda: fs.open(path, "rb", block_size=READ_BLOCK, cache_type="readahead"))


def read_bytes(location: str) -> bytes:
    if not is_url(location):
        with open_read(location) as f:
            return f.read()
    fs, path = filesystem(location)
    return call("read", location, lambda: fs.cat_file(path))


def read_json(location: str) -> dict:
    return json.loads(read_bytes(location).decode("utf-8"))


def size(location: str) -> int:
    if not is_url(location):
        return os.path.getsize(local_path(location))
    fs, path = filesystem(location)
    return int(call("stat", location, lambda: fs.info(path))["size"])


# ---------------------------------------------------------------- writing
def write_atomic(location: str, write: Callable[[str], None]) -> None:
    """write(tmp) fills a local temporary file that then becomes `location` whole: os.replace
    for a path, one upload for a URL (the object appears only complete)."""
    if not is_url(location):
        atomic_write(local_path(location), write)
        return
    fs, path = filesystem(location)
    fd, tmp = tempfile.mkstemp(prefix=".upload-", suffix="-" + os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        call("upload", location, lambda: fs.put_file(tmp, path))
    finally:
        os.remove(tmp)


def write_bytes(location: str, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    write_atomic(location, write)


def write_json(location: str, obj: dict) -> None:
    write_bytes(location, json.dumps(obj, indent=1, sort_keys=True).encode("utf-8"))


def remove(location: str) -> None:
    """Remove a file or object; one that is already gone is fine."""
    if not is_url(location):
        try:
            os.remove(local_path(location))
        except FileNotFoundError:
            pass
        return
    fs, path = filesystem(location)

    def rm() -> None:
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass

    call("remove", location, rm)


def download(location: str, local: str) -> None:
    """Copy `location` to the local file `local` (replaced atomically)."""
    fs, path = filesystem(location)
    atomic_write(local, lambda tmp: call("download", location, lambda: fs.get_file(path, tmp)))


# ---------------------------------------------------------------- listing
def exists(location: str) -> bool:
    if not is_url(location):
        return os.path.exists(local_path(location))
    fs, path = filesystem(location)
    fs.invalidate_cache()  # other processes write here: never answer from a stale listing
    return bool(call("stat", location, lambda: fs.exists(path)))


def _listing(folder: str, detail: bool) -> list:
    """fsspec's ls of a URL prefix, with the cache dropped (other processes write there: never
    answer from a stale listing); [] for an empty prefix, a missing bucket named."""
    fs, path = filesystem(folder)
    fs.invalidate_cache()

    def ls() -> list:
        try:
            return fs.ls(path, detail=detail)
        except FileNotFoundError as err:
            if no_such_bucket(err):
                raise
            return []  # an empty prefix: object stores have no folders

    return call("list", folder, ls)


def list_names(folder: str) -> list[str]:
    """Names directly inside a folder or prefix (none when it does not exist)."""
    if not is_url(folder):
        path = local_path(folder)
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in _listing(folder, detail=False))


def list_details(folder: str) -> list[dict]:
    """fsspec's entries (name, size, type, ETag, ...) directly inside a URL prefix: one listing,
    paged by the server."""
    return _listing(folder, detail=True)


def expand(pattern: str) -> tuple[list[str], list[str]]:
    """A brace pattern's names split into (existing, missing), in pattern order. Each folder
    (prefix) is listed once, not probed per name: LAION has 41408 shards."""
    names = list(braceexpand.braceexpand(pattern))
    if not is_url(pattern):
        found = [n for n in names if os.path.isfile(local_path(n))]
    else:
        listed: dict[str, set] = {}
        found = []
        for name in names:
            folder, _, base = name.rpartition("/")
            if folder not in listed:
                listed[folder] = set(list_names(folder))
            if base in listed[folder]:
                found.append(name)
    present = set(found)
    return found, [n for n in names if n not in present]


def check_reachable(location: str) -> None:
    """Fail early, with one line, on missing credentials, a missing bucket or a 403: list the
    location's folder once (a local path needs nothing)."""
    if is_url(location):
        list_names(location)
