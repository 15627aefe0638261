"""What the rewriter's weight identity costs at start (rewrite/weights_identity.py): the content
hash of every weight file from sampled blocks, on the first start (nothing remembered: the blocks
are read) and on a repeat start (remembered by stat: nothing is read), against the identity
before it (weight file names and sizes: a stat per file).

The folder is LLaMA-7B-sized by default with --size-gb 13.5 (one consolidated.00.pth, as Meta
ships 7B), made in a temporary folder and deleted after. Sparse by default: reading a hole is
not a disk read (the kernel returns zeros), so the first-start figure is then the cost of the
seeks and hashing only; --random writes random bytes (needs the disk space, and minutes to
write) so that the first start reads from the disk: the file's pages are dropped from the page
cache (posix_fadvise DONTNEED) before it. --full also times BLAKE2b of the whole files, what a
full content hash would cost at every start without a memo.

    python -m bench.bench_weight_identity [--size-gb 13.5] [--files 1] [--random] [--full]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

CHUNK = 64 << 20


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gb", type=float, default=1.0, help="total size of the weight files (13.5: LLaMA-7B)")
    p.add_argument("--files", type=int, default=1, help="weight files the size is split over")
    p.add_argument("--random", action="store_true", help="random bytes on disk instead of sparse files")
    p.add_argument("--full", action="store_true", help="also time a full BLAKE2b of every file")
    p.add_argument("--dir", default=None, help="where to make the folder (default: the system's temp folder)")
    return p


def make_files(folder: Path, total: int, n: int, random: bool) -> list[Path]:
    files = []
    for i in range(n):
        path = folder / f"consolidated.{i:02d}.pth"
        size = total // n
        with open(path, "wb") as f:
            if random:
                left = size
                while left > 0:
                    f.write(os.urandom(min(CHUNK, left)))
                    left -= min(CHUNK, left)
                f.flush()
                os.fsync(f.fileno())
            else:
                f.truncate(size)
        files.append(path)
    return files


def drop_cached(files: list[Path]) -> None:
    """Evict these files' pages from the page cache (only theirs), so the next read is a disk read."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def full_hash(files: list[Path]) -> list[str]:
    out = []
    for path in files:
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        out.append(h.hexdigest())
    return out


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench_weight_identity_", dir=args.dir))
    os.environ["LACLIP_CACHE"] = str(root / "cache")  # a memo of this run's own, empty at first
    from rewrite.weights_identity import content_hashes, sampled_spans
    try:
        folder = root / "weights"
        folder.mkdir()
        total = int(args.size_gb * 1e9)
        t_make, files = timed(lambda: make_files(folder, total, args.files, args.random))
        print(f"{args.files} file(s), {total / 1e9:.2f} GB in all, {'random bytes' if args.random else 'sparse'} "
              f"(made in {t_make:.1f} s); per file {len(sampled_spans(total // args.files))} spans, "
              f"{sum(n for _, n in sampled_spans(total // args.files)) / 2**20:.1f} MiB read")
        t_list, _ = timed(lambda: [[p.name, p.stat().st_size] for p in files])
        drop_cached(files)
        t_first, first = timed(lambda: content_hashes(files))
        t_repeat, repeat = timed(lambda: content_hashes(files))
        assert first == repeat
        print(f"file list (the identity before): {t_list * 1e3:.3f} ms")
        print(f"first start (blocks read):  {t_first:.3f} s  ({t_first / t_list:.0f}x the file list)")
        print(f"repeat start (remembered):  {t_repeat * 1e3:.3f} ms  ({t_repeat / t_list:.0f}x the file list)")
        if args.full:
            drop_cached(files)
            t_full, _ = timed(lambda: full_hash(files))
            print(f"full BLAKE2b of every file: {t_full:.1f} s  ({t_full / t_first:.0f}x the first start)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
