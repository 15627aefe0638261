"""One webdataset tar, wherever it is: local paths, pipe: and http(s):// are webdataset's to
open (its gopen); s3://, gs:// and other fsspec URLs are streamed through common.storage
(ranged reads, never the whole tar first). common/tar_keys.py groups the members into samples.

Damage in a tar's bytes (a truncated or corrupt tar) and a failure of the storage under it
are told apart: the first is the caller's to count and skip, the second must stop the run,
since a shard skipped because a connection dropped would be lost silently.
"""
from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator

from common import storage

WDS_OPENS = ("pipe:", "http://", "https://")  # URLs webdataset's own gopen handles


def opened_by_fsspec(url: str) -> bool:
    return storage.is_url(url) and not url.startswith(WDS_OPENS)


def url_streams(url: str, handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """webdataset's url_opener for one tar ({"url", "stream"}), except that an fsspec URL is
    opened through common.storage: a failure to open it raises a one-line StorageError."""
    from webdataset.tariterators import url_opener
    if not opened_by_fsspec(url):
        return url_opener([{"url": url}], handler=handler)
    return iter([{"url": url, "stream": storage.open_read(url)}])


def is_storage_failure(url: str, exn: Exception) -> bool:
    """For an fsspec URL, an error that is not damage in the tar's bytes (a dropped connection
    after the backend's retries, an object removed or replaced while read, a 403)."""
    if not opened_by_fsspec(url):
        return False
    return not isinstance(exn, (tarfile.TarError, EOFError, ValueError, KeyError))  # what damaged bytes raise
