"""Tiny img2dataset-style shards for the shard tests: NNNNN.tar (KEY.jpg, KEY.txt, KEY.json,
written with webdataset's TarWriter) beside NNNNN.parquet (key, caption, url, status), with a
few bad samples of every kind the readers must count."""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

WORDS = ["dog", "cat", "boat", "bridge", "soup", "bike", "snow", "tea", "lamp", "kids"]


def caption_of(shard: int, i: int) -> str:
    """Unique per sample, so a test can tell from a caption which sample it is."""
    return f"a {WORDS[(shard + i) % len(WORDS)]} near the {WORDS[(3 * shard + i + 1) % len(WORDS)]} {shard} {i}"


def key_of(shard: int, i: int) -> str:
    return f"{shard:05d}{i:04d}"  # img2dataset's keys: shard number, then the sample's index


def jpeg(seed: int, size: tuple[int, int] = (40, 32)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@dataclass
class Shards:
    folder: Path
    n_shards: int
    per_shard: int
    corrupt_image: set = field(default_factory=set)  # keys whose .jpg is not an image
    no_text: set = field(default_factory=set)  # keys without a .txt
    not_downloaded: set = field(default_factory=set)  # parquet rows with status failed (no tar sample)
    truncated: dict = field(default_factory=dict)  # shard -> samples left readable in its cut tar

    @property
    def tars(self) -> str:
        return str(self.folder / f"{{00000..{self.n_shards - 1:05d}}}.tar")

    @property
    def parquets(self) -> str:
        return str(self.folder / f"{{00000..{self.n_shards - 1:05d}}}.parquet")

    def good_keys(self) -> list[str]:
        """Keys a training pass can use: readable image and text, in a tar that holds them."""
        keys = []
        for s in range(self.n_shards):
            for i in range(self.truncated.get(s, self.per_shard)):
                k = key_of(s, i)
                if k not in self.corrupt_image | self.no_text | self.not_downloaded:
                    keys.append(k)
        return keys


def make_shards(folder: Path, n_shards: int = 8, per_shard: int = 6, bad: bool = True) -> Shards:
    """n_shards x per_shard samples; with `bad`: one corrupt image, one sample without text,
    one row never downloaded, and the last tar cut off in the middle."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds
    folder.mkdir(parents=True, exist_ok=True)
    info = Shards(folder, n_shards, per_shard)
    if bad:
        info.corrupt_image = {key_of(2, 1)}
        info.no_text = {key_of(5, 3)}
        info.not_downloaded = {key_of(3, 2)}
        info.truncated = {n_shards - 1: per_shard // 2}
    for s in range(n_shards):
        rows = {"key": [], "caption": [], "url": [], "status": []}
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as tar:
            for i in range(per_shard):
                key, caption = key_of(s, i), caption_of(s, i)
                ok = key not in info.not_downloaded
                rows["key"].append(key)
                rows["caption"].append(caption)
                rows["url"].append(f"http://example.com/{key}.jpg")
                rows["status"].append("success" if ok else "failed_to_download")
                if not ok:
                    continue
                sample = {"__key__": key, "jpg": b"not a jpeg" if key in info.corrupt_image else jpeg(100 * s + i),
                          "json": json.dumps({"key": key, "re_caption": f"recap of {caption}"}).encode()}
                if key not in info.no_text:
                    sample["txt"] = caption.encode()
                tar.write(sample)
        pq.write_table(pa.table(rows), folder / f"{s:05d}.parquet")
    for s, keep in info.truncated.items():
        cut_tar(folder / f"{s:05d}.tar", keep)
    return info


def cut_tar(path: Path, keep_samples: int) -> None:
    """Cut a tar inside the first member of sample `keep_samples`: what an interrupted copy leaves."""
    import tarfile
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    key = list(dict.fromkeys(m.name.split(".")[0] for m in members))[keep_samples]
    first = next(m for m in members if m.name.startswith(key + "."))
    data = path.read_bytes()
    path.write_bytes(data[: first.offset_data + max(first.size // 2, 1)])
