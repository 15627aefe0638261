"""OUT/manifest.json: what every finished shard output of a rewriter folder holds, in one object,
so that a start (training's --rewrite-data checks, the rewriter's finished-shard checks) reads it
and a listing instead of one parquet footer per shard (41k at LAION scale).

Each entry is trusted only while the file is the one it describes: its size and version (an
object's ETag, a local file's mtime_ns; common/survey.py) in the folder's listing now must equal
the entry's. A file without an entry, or whose entry disagrees, has its footer read as if there
were no manifest, and the reader says so in one line: a manifest that disagrees is never trusted
silently, and never needed for correctness. Written atomically (temporary file + rename, or one
upload) by the rewriter when a run concludes and by `python -m rewrite.manifest OUT`; the format
is in docs/formats.md (Rewriter output for shards).
"""
from __future__ import annotations

import base64
import functools
import json
from typing import Optional

from common import storage
from common.rewrite_format import METADATA_KEY, read_footer
from common.survey import FileMeta, concurrently, list_meta

MANIFEST = "manifest.json"
VERSION = 1


def _schema_text(schema) -> str:
    """The schema without its key-value metadata (which differs per shard), serialised (Arrow IPC)."""
    return base64.b64encode(schema.remove_metadata().serialize().to_pybytes()).decode("ascii")


@functools.lru_cache(maxsize=256)
def _decoded(text: str, rewriter: bool):
    import pyarrow as pa
    schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text, validate=True)))
    # the checks ask only whether the rewriter's metadata key is there; its per-shard values are in the entry
    return schema.with_metadata({METADATA_KEY: b'{"from": "manifest.json"}'}) if rewriter else schema


def entry_schema(manifest: dict, entry: dict):
    """The pyarrow schema an entry stands for, with the rewriter's metadata key when the file had it
    (schemas are shared: decoded once per distinct schema)."""
    return _decoded(manifest["schemas"][entry["schema"]], bool(entry.get("rewriter")))


def settings_of(manifest: dict, entry: dict) -> Optional[dict]:
    index = entry.get("settings")
    return None if index is None else manifest["settings"][index]


def build(folder: str, listed: Optional[dict[str, FileMeta]] = None, old: Optional[dict] = None) -> dict:
    """The manifest of the parquet files in `folder` now: entries of `old` that still match the
    listing are kept, every other footer is read (concurrently)."""
    listed = {n: m for n, m in (list_meta(folder) if listed is None else listed).items() if n.endswith(".parquet")}
    schemas: list[str] = []
    settings: list[dict] = []
    keep, read = {}, []
    for name, meta in sorted(listed.items()):
        entry = (old or {}).get("files", {}).get(name)
        if entry is not None and entry.get("tag") == meta.tag():
            keep[name] = {**entry, "schema": entry_schema(old, entry)}
        else:
            read.append(name)
    footers = concurrently(lambda n: read_footer(storage.join(folder, n)), read)
    for name, (rows, schema) in zip(read, footers):
        recorded = json.loads((schema.metadata or {}).get(METADATA_KEY, b"null") or b"null")
        keep[name] = {"tag": listed[name].tag(), "rows": rows, "schema": schema, "rewriter": recorded is not None,
                      "settings": (recorded or {}).get("settings"), "input": (recorded or {}).get("input")}
    files = {}
    for name in sorted(keep):
        entry = dict(keep[name])
        text = _schema_text(entry["schema"])
        if text not in schemas:
            schemas.append(text)
        entry["schema"] = schemas.index(text)
        if isinstance(entry.get("settings"), int):  # a kept entry: its settings by value again
            entry["settings"] = settings_of(old, keep[name])
        if entry.get("settings") is not None:
            if entry["settings"] not in settings:
                settings.append(entry["settings"])
            entry["settings"] = settings.index(entry["settings"])
        files[name] = entry
    return {"version": VERSION, "schemas": schemas, "settings": settings, "files": files}


class Damaged(ValueError):
    """A manifest that cannot be read as this version writes it (then the footers are read)."""


def read(folder: str) -> Optional[dict]:
    """The folder's manifest, None when it has none; Damaged (one line naming it) when it is not one
    this version can use: not JSON, another version, entries that do not fit its tables."""
    where = storage.join(folder, MANIFEST)
    try:
        manifest = storage.read_json(where)
    except storage.NotFound:
        return None
    except ValueError as e:
        raise Damaged(f"{where} is not JSON ({e})") from None
    try:
        if manifest.get("version") != VERSION:
            raise ValueError(f"version {manifest.get('version')!r}, not {VERSION}")
        for entry in manifest["files"].values():  # every entry usable, so a start never fails on one later
            entry_schema(manifest, entry)
            if not isinstance(entry["tag"], str) or not isinstance(entry["rows"], int):
                raise ValueError("an entry without its tag or rows")
    except Exception as e:  # noqa: BLE001 (KeyError, IndexError, pyarrow's errors, ...: all mean damaged)
        raise Damaged(f"{where} cannot be used ({type(e).__name__}: {e})") from None
    return manifest


def write(folder: str, listed: Optional[dict[str, FileMeta]] = None) -> dict:
    """Build the folder's manifest (reusing the entries of the one there that still match) and
    replace it atomically; returns it."""
    try:
        old = read(folder)
    except Damaged:
        old = None  # made anew from the footers
    manifest = build(folder, listed, old)
    storage.write_json(storage.join(folder, MANIFEST), manifest)
    return manifest


def split(manifest: Optional[dict], folder_listing: dict[str, FileMeta], names: list[str]) \
        -> tuple[dict[str, dict], list[tuple[str, str]]]:
    """(name -> entry for the files whose entry matches the listing, [(name, why)] for files the
    manifest has no entry for or describes otherwise)."""
    trusted, stale = {}, []
    files = (manifest or {}).get("files", {})
    for name in names:
        entry, now = files.get(name), folder_listing.get(name)
        if entry is None:
            stale.append((name, "no entry"))
        elif now is None or entry.get("tag") != now.tag():
            stale.append((name, f"size:version {entry.get('tag')} recorded, {now.tag() if now else 'absent'} now"))
        else:
            trusted[name] = entry
    return trusted, stale


def hint(folder: str) -> str:
    return f"`python -m rewrite.manifest {folder}` writes {storage.join(folder, MANIFEST)}"
