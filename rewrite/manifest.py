"""Write OUT/manifest.json for a folder (or s3:// prefix) of the rewriter's shard outputs: what
every finished NNNNN.parquet holds (columns, rows, settings, input fingerprint) with its size and
version, so a training start (--rewrite-data) and a rewriter rerun read one object instead of one
footer per shard (common/rewrite_manifest.py; format in docs/formats.md).

    python -m rewrite.manifest OUT        # or --out OUT

The rewriter writes it too whenever a run ends (rewrite/units_shards.py, ShardUnits.conclude), and a
rerun that finds nothing to do ends the same way: this command is for folders written before, or
changed since. Entries that still match their file are kept; every other footer is read
(concurrently). Holding no claim, it never blocks a run; a run that ends later rewrites it.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

from common import rewrite_manifest, storage
from rewrite.flags import check_names, document, flag, run_fire  # noqa: F401  (check_names: run_fire's)
from rewrite.shard_input import RUN_RECORD


@dataclass(frozen=True)
class Config:
    out: Optional[str] = flag(None, "the rewriter's output folder or prefix (--output_filename of a shard run).")


def main(**flags) -> None:
    out = flags.get("out")
    if not out or not isinstance(out, str):
        raise ValueError("--out: give the rewriter's output folder or prefix (python -m rewrite.manifest OUT)")
    out = out.rstrip("/") if storage.is_url(out) else storage.local_path(out)
    names = storage.list_names(out)
    if RUN_RECORD not in names:
        raise ValueError(f"--out {out}: no {RUN_RECORD} there; it is not a folder of the rewriter's shard outputs")
    manifest = rewrite_manifest.write(out)
    rows = sum(e["rows"] for e in manifest["files"].values())
    print(f"{storage.join(out, rewrite_manifest.MANIFEST)}: {len(manifest['files'])} files, {rows} rows")


document(main, Config, "Write OUT/manifest.json for the rewriter's shard outputs in OUT.")


def cli(argv: Optional[list[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and not args[0].startswith("-"):  # the folder given as the one positional argument
        args = ["--out", *args]
    return run_fire(main, Config, args, "rewrite.manifest")


if __name__ == "__main__":
    sys.exit(cli())
