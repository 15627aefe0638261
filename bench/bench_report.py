"""The rewrite report's throughput: captions/s of `python -m rewrite.report` over synthetic rewriter
outputs (no baseline: no other tool computes these metrics).

    python -m bench.bench_report [--lines 1000000] [--modes 2] [--shards 0] [--exact-limit 1048576]

Captions are alt-text-like lines of 4-24 words drawn from a Zipf-distributed 30k-word
vocabulary (or --captions FILE); each mode's rewrite keeps the caption's words, adds a few,
and falls back to the caption (or is blank) on a few percent of lines, so every metric has
work to do (docs/report_example.png shows a report on such rewrites of rewrite/text/source.txt). Text
outputs (--source + one file per mode) by default; --shards N writes N NNNNN.parquet shards of
the same rows instead. Prints the pass's captions/s (lines x modes and lines), wall and CPU
time, the peak RSS, and a table row for bench/README.md. The page's PNGs are included in the
time (they cost well under a second).
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from rewrite import report

MODES = ("chatgpt", "bard", "mscoco", "human")


def synthetic_captions(lines: int, rng: np.random.Generator) -> list[str]:
    vocab = np.array([f"w{i}" for i in range(30_000)], dtype=object)
    ranks = np.minimum(rng.zipf(1.3, size=lines * 30) - 1, len(vocab) - 1)
    words = vocab[ranks]
    lengths = rng.integers(4, 25, size=lines)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return [" ".join(words[s:s + n]) for s, n in zip(starts.tolist(), lengths.tolist())]


EXTRA = ("small", "bright", "old", "busy", "quiet", "wooden", "sunny", "crowded", "scenic", "vintage")


def synthetic_rewrites(captions: list[str], modes: int, rng: np.random.Generator) -> dict[str, list[str]]:
    """Per mode: ~3% fall back (the caption), ~1% blank, the rest the caption with three added words
    (mode k draws them from its own part of EXTRA, so modes differ)."""
    rewrites = {}
    for k in range(modes):
        pick = rng.integers(0, 4, size=(len(captions), 3)) + 2 * k
        fate = rng.random(len(captions))
        rewrites[MODES[k]] = [c if f < 0.03 else "" if f < 0.04 else
                              f"a {EXTRA[e[0] % 10]} view: {c}, {EXTRA[e[1] % 10]} and {EXTRA[e[2] % 10]}"
                              for c, e, f in zip(captions, pick.tolist(), fate.tolist())]
    return rewrites


def write_inputs(folder: Path, captions: list[str], rewrites: dict[str, list[str]], shards: int) -> list[str]:
    """The flags that point the report at the written outputs."""
    if shards:
        import pyarrow as pa
        import pyarrow.parquet as pq
        out = folder / "rewrites"
        out.mkdir()
        for s, rows in enumerate(np.array_split(np.arange(len(captions)), shards)):
            lo, hi = int(rows[0]), int(rows[-1]) + 1
            pq.write_table(pa.table({"key": [str(i) for i in range(lo, hi)], "caption": captions[lo:hi],
                                     **{m: r[lo:hi] for m, r in rewrites.items()}}), out / f"{s:05d}.parquet")
        return ["--rewrites", str(out), "--modes", ",".join(rewrites)]
    (folder / "source.txt").write_text("".join(c + "\n" for c in captions))
    files = []
    for m, r in rewrites.items():
        (folder / f"out.{m}.txt").write_text("".join(line + "\n" for line in r))
        files.append(str(folder / f"out.{m}.txt"))
    return ["--source", str(folder / "source.txt"), "--rewrites", ",".join(files)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--modes", type=int, default=2, choices=range(1, len(MODES) + 1))
    parser.add_argument("--shards", type=int, default=0, help="write N parquet shards instead of text files")
    parser.add_argument("--exact-limit", type=int, default=1 << 20)
    parser.add_argument("--captions", help="rewrite these captions (a text file) instead of synthetic ones")
    parser.add_argument("--out", help="keep the report in this folder")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        rng = np.random.default_rng(0)
        captions = Path(args.captions).read_text().splitlines() if args.captions else \
            synthetic_captions(args.lines, rng)
        args.lines = len(captions)
        flags = write_inputs(Path(tmp), captions, synthetic_rewrites(captions, args.modes, rng), args.shards)
        del captions
        print(f"wrote {args.lines} lines x {args.modes} modes in {time.perf_counter() - t:.1f} s")
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        wall, cpu = time.perf_counter(), time.process_time()
        rc = report.cli(flags + ["--out", args.out or str(Path(tmp) / "report"), "--exact_limit", str(args.exact_limit),
                                 "--noprogress"])
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        assert rc == 0, "the report failed"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kind = f"{args.shards} parquet shards" if args.shards else "text files"
    print(f"report over {args.lines} lines x {args.modes} modes ({kind}): wall {wall:.1f} s, CPU {cpu:.1f} s; "
          f"{args.lines / wall:,.0f} captions/s ({args.lines * args.modes / wall:,.0f} rewrites/s); "
          f"peak RSS {peak:.0f} MB (before the pass {rss_before / 1024:.0f} MB, the synthetic lists included)")
    print(f"| `bench_report` | the rewrite report (`python -m rewrite.report`), {args.lines} synthetic captions x "
          f"{args.modes} modes, {kind} | **{args.lines / wall:,.0f} captions/s** (CPU {args.lines / cpu:,.0f}); "
          f"peak RSS {peak:.0f} MB | MACHINE | DATE | `python -m bench.bench_report --lines {args.lines} --modes {args.modes}"
          + (f" --shards {args.shards}" if args.shards else "") + "` |")


if __name__ == "__main__":
    main()
