"""The rewriter's start over finished shards (issue 27): the outputs' records from OUT/manifest.json
where it matches the listing (two footers spot-checked), footers read for outputs it does not describe;
every refusal of a finished shard stays (another input, other settings), and a manifest that lies or is
damaged is never trusted."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common import rewrite_manifest
from common.rewrite_format import METADATA_KEY
from rewrite import shard_input
from rewrite.shard_input import check_finished, remembered_fingerprint
from rewrite.units import ResumeError
from rewrite.units_shards import shard_output_path

SETTINGS = {"seed": 0, "sample_mode": ["chatgpt"], "text_key": "caption"}


def write_input(path: Path, shard: int, caption: str = "a photo") -> None:
    keys = [f"{shard:05d}{i:04d}" for i in range(2)]
    pq.write_table(pa.table({"key": keys, "caption": [f"{caption} {k}" for k in keys], "status": ["success"] * 2}),
                   path)


def write_output(out: Path, shard: Path, settings: dict) -> None:
    meta = {"settings": settings, "input": remembered_fingerprint(out, shard), "stats": {}}
    table = pa.table({"key": ["a"], "caption": ["a photo"], "chatgpt": ["a picture"]})
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True)}),
                   out / f"{shard.stem}.parquet")


@pytest.fixture
def finished(tmp_path):
    """6 input shards and their finished outputs, with the folder's manifest."""
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    shards = []
    for s in range(6):
        write_input(tmp_path / "in" / f"{s:05d}.parquet", s)
        shards.append(tmp_path / "in" / f"{s:05d}.parquet")
        write_output(tmp_path / "out", shards[-1], SETTINGS)
    rewrite_manifest.write(str(tmp_path / "out"))
    return tmp_path / "out", [(p, shard_output_path(tmp_path / "out", p.stem)) for p in shards]


def counting_footers(monkeypatch) -> list:
    read, real = [], shard_input.read_output_metadata
    monkeypatch.setattr(shard_input, "read_output_metadata", lambda p: read.append(Path(p).name) or real(p))
    return read


def test_finished_shards_are_checked_from_the_manifest(finished, monkeypatch):
    out, pairs = finished
    read = counting_footers(monkeypatch)
    assert check_finished(out, pairs, SETTINGS) == 6 and len(read) == 2  # the spot checks only
    with pytest.raises(ResumeError, match=r"shard .*00000.parquet was rewritten with other settings: seed: 0 -> 5"):
        check_finished(out, pairs, {**SETTINGS, "seed": 5})  # the manifest's settings are compared as the footers'
    write_input(pairs[3][0], 3, caption="another download of")  # the input changed: refused as without a manifest
    with pytest.raises(ResumeError, match=r"shard .*00003.parquet was rewritten from another 00003.parquet "
                                          r"\((size|content hash) .* then, .* now\)"):
        check_finished(out, pairs, SETTINGS)


def test_an_output_replaced_after_the_manifest_is_read_from_its_footer(finished, monkeypatch):
    out, pairs = finished
    write_output(out, pairs[4][0], {**SETTINGS, "seed": 7})  # e.g. copied in from another run's folder
    read = counting_footers(monkeypatch)
    with pytest.raises(ResumeError, match=r"shard .*00004.parquet was rewritten with other settings: seed: 7 -> 0"):
        check_finished(out, pairs, SETTINGS)
    assert "00004.parquet" in read


def test_a_manifest_that_lies_or_is_damaged_is_not_trusted(finished, monkeypatch):
    out, pairs = finished
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["settings"][0] = {**SETTINGS, "seed": 9}  # sizes and versions still match the files
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ResumeError, match=r"manifest.json does not describe .*00000.parquet as its footer does; "
                                          r"`python -m rewrite.manifest "):
        check_finished(out, pairs, SETTINGS)
    (out / "manifest.json").write_text('{"version": 1, "schemas": ["not base64!"], "files": {"00000.parquet": '
                                       '{"tag": "1:2", "rows": 1, "schema": 0}}}')
    read = counting_footers(monkeypatch)
    assert check_finished(out, pairs, SETTINGS) == 6 and len(read) == 6  # read as if it had none
    with pytest.raises(rewrite_manifest.Damaged, match=r"manifest.json cannot be used \(binascii.Error|Error"):
        rewrite_manifest.read(str(out))
    assert len(rewrite_manifest.write(str(out))["files"]) == 6  # made anew from the footers
